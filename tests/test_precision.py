"""Mixed precision: the policy chosen for described machines, float16 with loss scaling, bfloat16 against float32,
and checkpoints that resume across precisions."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

import vae_utils
from conftest import TINY, synthetic_images

CONFIG = vae_utils.VAEConfig(img_size=28, channels=1, latent_dim=2, **TINY)
EPYC_FLAGS = {"avx2", "avx512f", "avx512_bf16"}
XEON_AMX_FLAGS = {"avx2", "avx512f", "amx_bf16", "amx_tile"}
OLD_CPU_FLAGS = {"sse4_2", "avx2"}


@pytest.mark.parametrize("machine, expected", [
    ({"cpu_flags": EPYC_FLAGS, "gpu_capabilities": [], "tpu": False}, "mixed_bfloat16"),
    ({"cpu_flags": XEON_AMX_FLAGS, "gpu_capabilities": [], "tpu": False}, "mixed_bfloat16"),
    ({"cpu_flags": OLD_CPU_FLAGS, "gpu_capabilities": [], "tpu": False}, "float32"),
    ({"cpu_flags": OLD_CPU_FLAGS, "gpu_capabilities": [(7, 5)], "tpu": False}, "mixed_float16"),  # T4
    ({"cpu_flags": OLD_CPU_FLAGS, "gpu_capabilities": [(8, 0)], "tpu": False}, "mixed_bfloat16"),  # A100
    ({"cpu_flags": OLD_CPU_FLAGS, "gpu_capabilities": [(8, 9), (7, 5)], "tpu": False}, "mixed_float16"),  # the weakest
    ({"cpu_flags": EPYC_FLAGS, "gpu_capabilities": [(6, 0)], "tpu": False}, "float32"),  # P100: the GPU decides
    ({"cpu_flags": OLD_CPU_FLAGS, "gpu_capabilities": [], "tpu": True}, "mixed_bfloat16"),
])
def test_auto_precision_for_described_machines(machine, expected, capsys):
    assert vae_utils.choose_precision("auto", verbose=True, **machine) == expected
    line = capsys.readouterr().out
    assert line.startswith(f"Precision: {expected} (") and line.count("\n") == 1


@pytest.mark.parametrize("requested", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_an_explicit_precision_is_kept(requested):
    assert vae_utils.choose_precision(requested, cpu_flags=set(), gpu_capabilities=[], tpu=False) == requested


@pytest.mark.parametrize("bad", ["bfloat16", "fp16", "", None, 16])
def test_unknown_precision_is_refused_naming_the_argument(bad):
    with pytest.raises(ValueError, match="precision="):
        vae_utils.TrainConfig(precision=bad)
    with pytest.raises(ValueError, match="precision="):
        vae_utils.choose_precision(bad)


def build(precision: str, seed: int = 0) -> vae_utils.CVAE:
    return vae_utils.build_model(CONFIG, vae_utils.TrainConfig(seed=seed, precision=precision))


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_layers_compute_in_the_policy_and_the_loss_reads_float32(precision):
    model = build(precision)
    assert vae_utils.model_precision(model) == precision
    assert tf.keras.mixed_precision.global_policy().name == "float32"  # build_model restores the global policy
    assert all(v.dtype == tf.float32 for v in model.variables)
    x, _ = synthetic_images(4, seed=1)
    mean, logvar = model.encode(x)
    assert mean.dtype == logvar.dtype == model.decode(mean).dtype == tf.float32
    compute_dtype = {"float32": tf.float32, "mixed_bfloat16": tf.bfloat16, "mixed_float16": tf.float16}[precision]
    assert model.encoder.layers[0](x).dtype == compute_dtype
    # The logits layer computes in the policy too (in float32 it made the bfloat16 step 1.15x slower at batch 32 and
    # 1.33x at batch 128 on this project's CPU); decode hands the loss float32 logits.
    assert model.decoder(mean).dtype == compute_dtype


def steps(model, optimizer, batches):
    train_steps = vae_utils.make_train_function(model, optimizer, vae_utils.compute_loss, tf.distribute.get_strategy())
    dataset = tf.data.Dataset.from_tensor_slices(batches).batch(len(batches) // 4).repeat()
    return train_steps(iter(dataset), tf.constant(8)).numpy()


def test_bfloat16_training_gives_finite_losses_close_to_float32():
    x, _ = synthetic_images(64, seed=1)
    losses = {}
    for precision in ("float32", "mixed_bfloat16"):
        tf.random.set_seed(5)
        losses[precision] = steps(build(precision), tf.keras.optimizers.Adam(1e-3), x)
    assert np.isfinite(losses["mixed_bfloat16"]).all()
    np.testing.assert_allclose(losses["mixed_bfloat16"], losses["float32"], rtol=0.02)


def test_float16_with_loss_scaling_trains_and_matches_float32_loosely():
    x, _ = synthetic_images(64, seed=1)
    tf.random.set_seed(5)
    reference = steps(build("float32"), tf.keras.optimizers.Adam(1e-3), x)
    tf.random.set_seed(5)
    optimizer = tf.keras.optimizers.LossScaleOptimizer(tf.keras.optimizers.Adam(1e-3), initial_scale=2.0 ** 8)
    losses = steps(build("mixed_float16"), optimizer, x)
    assert np.isfinite(losses).all()
    np.testing.assert_allclose(losses, reference, rtol=0.05)


def test_float16_step_with_non_finite_gradients_is_skipped():
    model = build("mixed_float16")
    optimizer = tf.keras.optimizers.LossScaleOptimizer(tf.keras.optimizers.Adam(1e-3))
    x, _ = synthetic_images(32, seed=1)
    steps(model, optimizer, x)  # builds the optimizer and takes finite steps
    before = [v.numpy().copy() for v in model.trainable_variables]
    iterations, scale = int(optimizer.iterations.numpy()), float(optimizer.dynamic_scale.numpy())
    poisoned = [tf.fill(v.shape, np.inf) for v in model.trainable_variables]
    optimizer.apply_gradients(zip(poisoned, model.trainable_variables))
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables))
    assert int(optimizer.iterations.numpy()) == iterations  # skipped: the schedule does not advance
    assert float(optimizer.dynamic_scale.numpy()) == scale / 2


@pytest.mark.parametrize("first, second", [("mixed_bfloat16", "float32"), ("float32", "mixed_bfloat16"),
                                           ("mixed_float16", "float32"), ("float32", "mixed_float16")])
def test_training_resumes_across_precisions(first, second, tmp_path):
    train, _ = synthetic_images(64, seed=1)
    test, _ = synthetic_images(16, seed=2)
    config = vae_utils.TrainConfig(epochs=1, batch_size=16, seed=0, precision=first)
    model = vae_utils.build_model(CONFIG, config)
    vae_utils.main_train_loop(model, train, test, config, checkpoint_dir=str(tmp_path), verbose=False)
    saved = [v.numpy().copy() for v in model.trainable_variables]
    resumed_config = vae_utils.TrainConfig(epochs=2, batch_size=16, seed=0, precision=second)
    resumed = vae_utils.build_model(CONFIG, resumed_config)
    history = vae_utils.main_train_loop(resumed, train, test, dataclasses.replace(resumed_config, epochs=1),
                                        checkpoint_dir=str(tmp_path), verbose=False)
    assert [row["epoch"] for row in history] == [1]
    assert all(np.array_equal(s, v.numpy()) for s, v in zip(saved, resumed.trainable_variables))
    history = vae_utils.main_train_loop(resumed, train, test, resumed_config, checkpoint_dir=str(tmp_path),
                                        verbose=False)
    assert [row["epoch"] for row in history] == [1, 2] and np.isfinite(history[-1]["test_elbo"])

