"""Training section: TrainConfig, overfitting, determinism, checkpoint resume, MirroredStrategy over two logical CPU
devices."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import vae_utils
from _train_child import EpochMarkers
from conftest import LOGICAL_CPUS, TINY_CONFIG as CONFIG, synthetic_images


# float32 throughout: "auto" precision is mixed_bfloat16 on CPUs with native bfloat16, and the comparisons below
# hold to float32 round-off.
def fresh_model(seed: int = 0, strategy=None) -> vae_utils.CVAE:
    return vae_utils.build_model(CONFIG, vae_utils.TrainConfig(seed=seed, precision="float32"), strategy)


def train_config(epochs: int = 2, batch_size: int = 32, **changes) -> vae_utils.TrainConfig:
    return vae_utils.TrainConfig(epochs=epochs, batch_size=batch_size, **{"precision": "float32", **changes})


@pytest.mark.parametrize("field, value", [
    ("epochs", 0), ("epochs", 2.5), ("epochs", True), ("batch_size", -1), ("steps_per_execution", 0),
    ("eval_batch_size", 0), ("seed", -1), ("seed", 1.0), ("learning_rate", 0.0), ("learning_rate", float("nan")),
    ("learning_rate", "1e-3"), ("lr_schedule", "linear")])
def test_train_config_rejects_bad_values_naming_them(field, value):
    with pytest.raises(ValueError) as error:
        vae_utils.TrainConfig(**{field: value})
    assert f"{field}=" in str(error.value) and "\n" not in str(error.value)


def test_train_config_is_frozen_and_plain():
    config = vae_utils.TrainConfig(epochs=np.int64(3), batch_size=np.int32(16), learning_rate=np.float32(0.5))
    assert type(config.epochs) is int and type(config.batch_size) is int and type(config.learning_rate) is float
    json.dumps(dataclasses.asdict(config))  # recorded whole in the run signature
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 4


def test_main_train_loop_checks_its_arguments(data):
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        vae_utils.main_train_loop(fresh_model(), *data, {"epochs": 1})
    with pytest.raises(TypeError, match="model must be a CVAE"):
        vae_utils.main_train_loop(object(), *data, train_config())
    with pytest.raises(TypeError, match="loss_fn="):
        vae_utils.main_train_loop(fresh_model(), *data, train_config(), "elbo")


def deterministic_loss(model, x):
    """Negative ELBO with the analytic KL, decoded at the posterior mean: no sampling, so runs can match exactly."""
    mean, logvar = model.encode(x)
    logpx_z = vae_utils.reconstruction_log_prob(model, x, model.decode(mean))
    return -tf.reduce_mean(logpx_z - vae_utils.kl_divergence_to_standard_normal(mean, logvar))


def train_losses(model, images, strategy, loss_fn, steps: int, batch_size: int, learning_rate: float = 3e-3):
    """Per-step losses of `steps` steps of the module's train function on a fixed, seeded batch order."""
    with strategy.scope():
        optimizer = tf.keras.optimizers.Adam(learning_rate)
        optimizer.build(model.trainable_variables)
    train_steps = vae_utils.make_train_function(model, optimizer, loss_fn, strategy)
    dataset = vae_utils.make_dataset(images, batch_size, shuffle_seed=0, drop_remainder=True).repeat()
    return train_steps(iter(strategy.experimental_distribute_dataset(dataset)), tf.constant(steps)).numpy()


def test_overfits_one_small_batch(tiny_model):
    batch, _ = synthetic_images(16, seed=3)
    losses = train_losses(tiny_model, batch, tf.distribute.get_strategy(), vae_utils.compute_loss, steps=120,
                          batch_size=16, learning_rate=2e-2)
    assert np.isfinite(losses).all()
    assert losses[-20:].mean() < 0.5 * losses[:5].mean(), (losses[:5], losses[-20:])


@pytest.fixture(scope="module")
def data():
    train, _ = synthetic_images(128, seed=1)
    test, _ = synthetic_images(32, seed=2)
    return train, test


def run(data, seed: int, epochs: int = 2, **kwargs) -> list[dict]:
    kwargs.setdefault("verbose", False)
    config = train_config(epochs, seed=seed, **{k: kwargs.pop(k) for k in ("learning_rate", "steps_per_execution",
                                                                           "lr_schedule") if k in kwargs})
    return vae_utils.main_train_loop(fresh_model(seed), *data, config, **kwargs)


def test_same_seed_same_losses_different_seed_different(data, capsys):
    seen = []
    first = run(data, 0, verbose=True, on_epoch_end=lambda epoch, model, row: seen.append((epoch, row)))
    again, other = run(data, 0), run(data, 1)
    key = ("train_loss", "test_elbo")
    assert [[row[k] for k in key] for row in first] == [[row[k] for k in key] for row in again]
    assert [row["train_loss"] for row in first] != [row["train_loss"] for row in other]
    # The history: one row per epoch, passed to the callback too; one summary line per epoch.
    assert [row["epoch"] for row in first] == [1, 2] and seen == [(1, first[0]), (2, first[1])]
    assert set(first[0]) >= {"epoch", "seconds", "train_loss", "test_elbo"}
    assert all(np.isfinite(row["train_loss"]) and np.isfinite(row["test_elbo"]) for row in first)
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("Epoch 2/2: ") and "s training, test ELBO" in summary and summary.endswith(" nats")


def test_steps_per_execution_and_schedule(data):
    """Several steps per compiled call train exactly as one step per call; the cosine schedule decays to 5%."""
    one = run(data, 0, epochs=1, loss_fn=deterministic_loss, steps_per_execution=1)
    three = run(data, 0, epochs=1, loss_fn=deterministic_loss, steps_per_execution=3)  # 4 steps: a call of 3, of 1
    np.testing.assert_allclose(three[0]["train_loss"], one[0]["train_loss"], rtol=1e-6)
    cosine = vae_utils.make_optimizer(train_config(2, learning_rate=0.01, lr_schedule="cosine"), 4)
    rates = []
    for step in (0, 4, 8):  # the start, half-way (2 epochs of 4 steps), the end
        cosine.iterations.assign(step)
        rates.append(float(cosine.learning_rate))
    assert rates == pytest.approx([0.01, 0.00525, 0.0005])  # alpha + (1 - alpha) (1 + cos(pi t)) / 2, alpha = 5%
    assert float(vae_utils.make_optimizer(train_config(2, learning_rate=0.01), 4).learning_rate) == pytest.approx(0.01)


def test_interrupted_run_resumes_at_epoch_2_and_finished_run_does_not_retrain(data, tmp_path, capsys):
    checkpoint_dir, markers = str(tmp_path / "run"), str(tmp_path / "markers")
    model = fresh_model(0)
    first = vae_utils.main_train_loop(model, *data, train_config(1), checkpoint_dir=checkpoint_dir,
                                      loss_fn=EpochMarkers(model, markers), verbose=False)
    weights_after_epoch_1 = model.get_weights()
    assert [row["epoch"] for row in first] == [1]
    # A kill between writing history.json and the checkpoint of epoch 2 leaves a row the checkpoint lacks.
    with open(os.path.join(checkpoint_dir, "history.json"), "w") as handle:
        json.dump(first + [{"epoch": 2, "train_loss": -1.0}], handle)

    # "Interrupted after epoch 1": a new process would build a new model; its weights differ until restored.
    model = fresh_model(5)
    assert not np.array_equal(model.get_weights()[0], weights_after_epoch_1[0])
    trained = []
    history = vae_utils.main_train_loop(model, *data, train_config(3), checkpoint_dir=checkpoint_dir,
                                        loss_fn=EpochMarkers(model, markers), verbose=True,
                                        on_epoch_end=lambda epoch, *_: trained.append(epoch))
    assert "1 epoch(s) done, resuming at epoch 2" in capsys.readouterr().out
    assert trained == [2, 3]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[0] == first[0] and history[1]["train_loss"] > 0  # the orphan row was dropped, epoch 2 re-ran
    restored = np.load(os.path.join(markers, f"start_2_{os.getpid()}.npz"))
    for index, saved in enumerate(weights_after_epoch_1):
        np.testing.assert_array_equal(restored[f"w{index}"], saved)
    with open(os.path.join(checkpoint_dir, "history.json")) as handle:
        assert json.load(handle) == history

    # A finished run started again restores, says it is complete and trains nothing.
    model, trained = fresh_model(6), []
    again = vae_utils.main_train_loop(model, *data, train_config(3), checkpoint_dir=checkpoint_dir,
                                      loss_fn=EpochMarkers(model, markers), verbose=True,
                                      on_epoch_end=lambda epoch, *_: trained.append(epoch))
    assert "3 epoch(s) done, complete" in capsys.readouterr().out
    assert trained == [] and again == history


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory):
    """A checkpoint directory holding one trained epoch of CONFIG on `data` with batch size 32."""
    checkpoint_dir = str(tmp_path_factory.mktemp("finished_run"))
    vae_utils.main_train_loop(fresh_model(), *data, train_config(1), checkpoint_dir=checkpoint_dir, verbose=False)
    return checkpoint_dir


@pytest.mark.parametrize("change, named", [
    (dict(config=dataclasses.replace(CONFIG, latent_dim=3)), "latent_dim"),
    (dict(config=vae_utils.ExtendedVAEConfig(**dataclasses.asdict(CONFIG), upsampling="resize")), "upsampling"),
    (dict(data_seed=9), "train_data"),
    (dict(batch_size=16), "batch_size"),
    (dict(loss_fn=vae_utils.MMDLoss(10.0)), "compute_mmd_loss(mmd_weight=10)"),
], ids=["latent_dim", "architecture", "data_set", "batch_size", "loss"])
def test_checkpoint_of_another_run_is_refused(data, finished_run, change, named):
    model = vae_utils.build_model(change.get("config", CONFIG), train_config())
    train = synthetic_images(128, seed=change["data_seed"])[0] if "data_seed" in change else data[0]
    with pytest.raises(vae_utils.CheckpointMismatchError) as error:
        vae_utils.main_train_loop(model, train, data[1], train_config(2, change.get("batch_size", 32)),
                                  loss_fn=change.get("loss_fn", vae_utils.compute_loss),
                                  checkpoint_dir=finished_run, verbose=False)
    message = str(error.value)
    assert named in message and finished_run in message and "new directory" in message and "\n" not in message


def test_get_strategy_on_cpu_is_the_default_one(capsys):
    strategy = vae_utils.get_strategy()
    assert strategy.num_replicas_in_sync == 1 and not isinstance(strategy, tf.distribute.MirroredStrategy)
    assert "Strategy:" in capsys.readouterr().out


# MirroredStrategy over the two logical CPU devices made in conftest.py. Each replica gets half of every global batch
# and divides its loss by the replica count, so the summed gradients are those of the global-batch mean.
# Tolerances: with a loss that draws no random numbers the training-loss curves agree to float32 round-off
# (rtol 1e-5); the test ELBO samples epsilon, differently on two replicas, so it agrees within MC noise (rtol 2e-3).

@pytest.fixture(scope="module")
def mirrored():
    if LOGICAL_CPUS < 2:
        pytest.skip("the CPU could not be split into two logical devices")
    return tf.distribute.MirroredStrategy(["/CPU:0", "/CPU:1"])


def test_mirrored_two_cpus_same_loss_curve_as_one_device(data, mirrored):
    initial = fresh_model(0).get_weights()
    histories = {}
    for name, strategy in (("one device", None), ("two replicas", mirrored)):
        model = fresh_model(1, strategy)
        model.set_weights(initial)
        vae_utils.set_seed(0)
        histories[name] = vae_utils.main_train_loop(model, *data, train_config(learning_rate=3e-3),
                                                    deterministic_loss, strategy=strategy, verbose=False)
    one, two = histories["one device"], histories["two replicas"]
    assert one[1]["train_loss"] < one[0]["train_loss"]
    # Epoch means over 4 steps each: steps 2.. differ unless the first step's gradients were those of the global batch.
    np.testing.assert_allclose([row["train_loss"] for row in two], [row["train_loss"] for row in one], rtol=1e-5)
    np.testing.assert_allclose([row["test_elbo"] for row in two], [row["test_elbo"] for row in one], rtol=2e-3)


def test_mirrored_needs_divisible_batch_and_model_built_in_scope(data, mirrored):
    model = fresh_model(0, mirrored)
    with pytest.raises(ValueError, match="batch_size=31 must be divisible by the 2 replicas"):
        vae_utils.main_train_loop(model, *data, train_config(1, 31), strategy=mirrored, verbose=False)
    with pytest.raises(ValueError, match=r"not built under MirroredStrategy.scope\(\)"):
        vae_utils.main_train_loop(fresh_model(), *data, train_config(1), strategy=mirrored, verbose=False)
