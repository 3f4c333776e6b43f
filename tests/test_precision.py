"""Mixed precision: the policy choose_precision picks for described machines, models that compute in bfloat16 or
float16 while the losses read float32, and float16 training through the LossScaleOptimizer."""

import numpy as np
import pytest
import tensorflow as tf

import vae_runtime
import vae_utils
from conftest import TINY_CONFIG, synthetic_images

BF16_CPU = {"avx2", "avx512f", "avx512_bf16"}
AMX_CPU = {"avx2", "avx512f", "amx_bf16", "amx_tile"}
OLD_CPU = {"sse4_2", "avx2"}


@pytest.mark.parametrize("cpu_flags, gpu_capabilities, tpu, expected", [
    (OLD_CPU, [], True, "mixed_bfloat16"),  # a TPU
    (BF16_CPU, [], False, "mixed_bfloat16"),  # a CPU with bfloat16 instructions
    (AMX_CPU, [], False, "mixed_bfloat16"),
    (OLD_CPU, [], False, "float32"),
    (OLD_CPU, [(8, 0)], False, "mixed_bfloat16"),  # A100
    (OLD_CPU, [(8, 9)], False, "mixed_bfloat16"),  # L4
    (OLD_CPU, [(7, 5)], False, "mixed_float16"),  # T4
    (OLD_CPU, [(7, 0)], False, "mixed_float16"),  # V100
    (OLD_CPU, [(8, 9), (7, 5)], False, "mixed_float16"),  # the weakest GPU decides
    (BF16_CPU, [(6, 0)], False, "float32"),  # P100: the GPU decides, not the CPU
], ids=["tpu", "avx512_bf16", "amx_bf16", "old_cpu", "a100", "l4", "t4", "v100", "l4_and_t4", "p100"])
def test_auto_precision_for_described_machines(cpu_flags, gpu_capabilities, tpu, expected, capsys):
    chosen = vae_runtime.choose_precision("auto", cpu_flags=cpu_flags, gpu_capabilities=gpu_capabilities, tpu=tpu,
                                        verbose=True)
    assert chosen == expected
    out = capsys.readouterr().out
    assert out.startswith(f"Precision: {expected} (") and out.count("\n") == 1


@pytest.mark.parametrize("requested", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_an_explicit_precision_is_kept_on_any_machine(requested):
    for machine in (dict(cpu_flags=OLD_CPU, gpu_capabilities=[], tpu=False),
                    dict(cpu_flags=BF16_CPU, gpu_capabilities=[(7, 5)], tpu=True)):
        assert vae_runtime.choose_precision(requested, **machine) == requested


@pytest.mark.parametrize("bad", ["bfloat16", "fp16", ""])
def test_an_unknown_precision_is_refused_naming_the_argument(bad):
    with pytest.raises(ValueError, match=f"precision={bad!r}"):
        vae_runtime.choose_precision(bad)
    with pytest.raises(ValueError, match=f"precision={bad!r}"):
        vae_utils.TrainConfig(precision=bad)


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_model_precision_is_the_policy_the_model_was_built_with_and_the_global_policy_is_restored(precision):
    model = vae_utils.build_model(TINY_CONFIG, vae_utils.TrainConfig(precision=precision))
    assert vae_runtime.model_precision(model) == precision
    assert tf.keras.mixed_precision.global_policy().name == "float32"
    assert all(variable.dtype == tf.float32 for variable in model.variables)  # variables stay float32


def test_a_bfloat16_model_computes_its_decoder_in_bfloat16_and_hands_the_losses_float32():
    model = vae_utils.build_model(TINY_CONFIG, vae_utils.TrainConfig(precision="mixed_bfloat16"))
    x, _ = synthetic_images(4, seed=1)
    assert model.encoder.layers[0](x).dtype == tf.bfloat16
    head = model.encoder.layers[-1]
    assert isinstance(head, tf.keras.layers.Dense) and head.compute_dtype == "float32"
    mean, logvar = model.encode(x)
    assert mean.dtype == logvar.dtype == tf.float32
    assert all(layer.compute_dtype == "bfloat16" for layer in model.decoder.layers)
    assert model.decoder(mean).dtype == tf.bfloat16
    assert model.decode(mean).dtype == tf.float32 and model.decode(mean, apply_sigmoid=True).dtype == tf.float32
    assert vae_utils.compute_loss(model, tf.constant(x)).dtype == tf.float32


def test_float16_training_uses_loss_scaling_and_gives_finite_losses(monkeypatch):
    wrapped = []

    class RecordingLossScaleOptimizer(tf.keras.optimizers.LossScaleOptimizer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            wrapped.append(self)

    monkeypatch.setattr(tf.keras.optimizers, "LossScaleOptimizer", RecordingLossScaleOptimizer)
    train, _ = synthetic_images(32, seed=1)
    test, _ = synthetic_images(8, seed=2)
    config = vae_utils.TrainConfig(epochs=1, batch_size=16, precision="mixed_float16")
    model = vae_utils.build_model(TINY_CONFIG, config)
    assert vae_runtime.model_precision(model) == "mixed_float16"
    history = vae_utils.main_train_loop(model, train, test, config, verbose=False)
    # Steps whose float16 gradients overflow are skipped (and the loss scale halved), so none need have been applied.
    assert len(wrapped) == 1 and np.isfinite(float(wrapped[0].dynamic_scale.numpy()))
    assert [row["epoch"] for row in history] == [1]
    assert np.isfinite(history[0]["train_loss"]) and np.isfinite(history[0]["test_elbo"])
    assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)
