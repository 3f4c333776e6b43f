"""Training section: TrainConfig, the GradientTape loop (overfitting, determinism, steps per call, schedule, NaN), and
its checkpoints (resume after an interruption or a kill, damaged checkpoints, another run refused, new settings)."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import vae_utils
from conftest import TINY_CONFIG as CONFIG, synthetic_images

HERE = os.path.dirname(os.path.abspath(__file__))


# float32 throughout: "auto" is mixed_bfloat16 on CPUs with native bfloat16, and the comparisons hold to float32.
def fresh_model(seed: int = 0, config=CONFIG) -> vae_utils.CVAE:
    return vae_utils.build_model(config, vae_utils.TrainConfig(seed=seed, precision="float32"))


def train_config(epochs: int = 2, batch_size: int = 32, **changes) -> vae_utils.TrainConfig:
    return vae_utils.TrainConfig(epochs=epochs, batch_size=batch_size, **{"precision": "float32", **changes})


@pytest.fixture(scope="module")
def data():
    train, _ = synthetic_images(128, seed=1)
    test, _ = synthetic_images(32, seed=2)
    return train, test


def deterministic_loss(model, x):
    """Negative ELBO with the analytic KL, decoded at the posterior mean: no sampling, so runs can match exactly."""
    mean, logvar = model.encode(x)
    logpx_z = model.reconstruction_log_prob(x, model.decode(mean))
    return -tf.reduce_mean(logpx_z - vae_utils.kl_divergence_to_standard_normal(mean, logvar))


deterministic_loss.description = "deterministic ELBO"


def run(data, seed=0, epochs=2, config=None, **kwargs):
    kwargs.setdefault("verbose", False)
    return vae_utils.main_train_loop(fresh_model(seed), *data, config or train_config(epochs, seed=seed), **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("epochs", 0), ("batch_size", 2.5), ("seed", -1), ("learning_rate", 0.0),
                                          ("learning_rate", float("nan")), ("lr_schedule", "linear"),
                                          ("precision", "float64")])
def test_train_config_refuses_bad_values_naming_them(field, value):
    with pytest.raises(ValueError, match=f"{field}="):
        vae_utils.TrainConfig(**{field: value})


def test_main_train_loop_refuses_bad_images_and_batch_size_before_training(data):
    train, test = data
    with pytest.raises(ValueError, match="train_images"):
        vae_utils.main_train_loop(fresh_model(), (train * 255).astype(np.uint8), test, train_config())
    with pytest.raises(ValueError, match="test_images have shape"):
        vae_utils.main_train_loop(fresh_model(), train, test[:, :14], train_config())
    with pytest.raises(ValueError, match="batch_size=256"):
        vae_utils.main_train_loop(fresh_model(), train, test, train_config(batch_size=256))


def test_overfits_one_small_batch(tiny_model):
    batch, _ = synthetic_images(16, seed=3)
    strategy = tf.distribute.get_strategy()
    optimizer = tf.keras.optimizers.Adam(2e-2)
    train_steps = vae_utils.make_train_function(tiny_model, optimizer, vae_utils.compute_loss, strategy)
    dataset = vae_utils.make_dataset(batch, 16).repeat()
    losses = train_steps(iter(strategy.experimental_distribute_dataset(dataset)), tf.constant(120)).numpy()
    assert np.isfinite(losses).all()
    assert losses[-20:].mean() < 0.5 * losses[:5].mean(), (losses[:5], losses[-20:])


def test_same_seed_same_history_other_seed_other_history(data):
    seen = []
    first = run(data, 0, on_epoch_end=lambda epoch, model, row: seen.append((epoch, row)))
    again, other = run(data, 0), run(data, 1)
    losses = [[row["train_loss"], row["test_elbo"]] for row in first]
    assert losses == [[row["train_loss"], row["test_elbo"]] for row in again]
    assert losses != [[row["train_loss"], row["test_elbo"]] for row in other]
    assert [row["epoch"] for row in first] == [1, 2] and seen == [(1, first[0]), (2, first[1])]
    assert all(np.isfinite(row["train_loss"]) and np.isfinite(row["test_elbo"]) for row in first)


def test_steps_per_call_train_as_one_step_per_call_and_cosine_decays_to_5_percent(data):
    one = run(data, epochs=1, config=train_config(1, steps_per_execution=1), loss_fn=deterministic_loss)
    three = run(data, epochs=1, config=train_config(1, steps_per_execution=3), loss_fn=deterministic_loss)
    np.testing.assert_allclose(three[0]["train_loss"], one[0]["train_loss"], rtol=1e-6)  # 4 steps: 3 + 1
    cosine = vae_utils.make_optimizer(train_config(2, learning_rate=0.01, lr_schedule="cosine"), 4)
    rates = []
    for step in (0, 4, 8):  # the start, half-way (2 epochs of 4 steps), the end
        cosine.iterations.assign(step)
        rates.append(float(cosine.learning_rate))
    assert rates == pytest.approx([0.01, 0.00525, 0.0005])  # alpha + (1 - alpha) (1 + cos(pi t)) / 2, alpha = 5%


class NaNAtStep:
    """compute_loss, but NaN at one global step."""

    description = "compute_loss, NaN at one step"

    def __init__(self, bad_step: int):
        self.bad_step, self.steps = bad_step, tf.Variable(0)

    def __call__(self, model, x):
        step = self.steps.assign_add(1)
        return tf.where(step == self.bad_step, np.float32("nan"), vae_utils.compute_loss(model, x))


def test_nan_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_epoch(data, tmp_path):
    finished = []
    # 4 steps per epoch; global step 6 is epoch 2, step 2, inside a call of 3 steps.
    with pytest.raises(vae_utils.NonFiniteLossError) as error:
        run(data, config=train_config(3, steps_per_execution=3), loss_fn=NaNAtStep(6),
            checkpoint_dir=str(tmp_path), on_epoch_end=lambda epoch, *_: finished.append(epoch))
    assert "nan at epoch 2, step 2 of 4" in str(error.value) and "checkpoint of epoch 1 is kept" in str(error.value)
    assert finished == [1] and tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-1")


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------

def test_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(data, tmp_path, capsys):
    uninterrupted = fresh_model(0)
    expected = vae_utils.main_train_loop(uninterrupted, *data, train_config(3), deterministic_loss, verbose=False)

    folder = str(tmp_path / "run")
    run(data, 0, config=train_config(1), loss_fn=deterministic_loss, checkpoint_dir=folder)  # "interrupted" after 1
    model, trained = fresh_model(0), []  # a new session, the same settings; its weights scrambled until restored
    model.set_weights([np.random.default_rng(5).normal(size=w.shape).astype(w.dtype) for w in model.get_weights()])
    history = vae_utils.main_train_loop(model, *data, train_config(3), deterministic_loss, checkpoint_dir=folder,
                                        on_epoch_end=lambda epoch, *_: trained.append(epoch))
    assert "1 epoch(s) done, resuming at epoch 2" in capsys.readouterr().out
    assert trained == [2, 3] and [row["epoch"] for row in history] == [1, 2, 3]
    assert [row["train_loss"] for row in history] == pytest.approx([row["train_loss"] for row in expected], rel=1e-5)
    for resumed, reference in zip(model.get_weights(), uninterrupted.get_weights()):
        np.testing.assert_allclose(resumed, reference, rtol=1e-5, atol=1e-6)

    # A finished run re-run trains nothing and returns its history; more epochs train only the new ones.
    again, trained = fresh_model(6), []
    assert vae_utils.main_train_loop(again, *data, train_config(3), deterministic_loss, checkpoint_dir=folder,
                                     on_epoch_end=lambda epoch, *_: trained.append(epoch)) == history
    assert "3 epoch(s) done, complete" in capsys.readouterr().out and trained == []
    more = vae_utils.main_train_loop(again, *data, train_config(4), deterministic_loss, checkpoint_dir=folder,
                                     on_epoch_end=lambda epoch, *_: trained.append(epoch), verbose=False)
    assert trained == [4] and more[:3] == history
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "ckpt-*.index"))) == [
        "ckpt-3.index", "ckpt-4.index"]  # the newest two


def test_a_kill_during_the_save_loses_only_that_epoch(data, tmp_path, monkeypatch):
    folder = str(tmp_path / "run")
    run(data, config=train_config(1), checkpoint_dir=folder)
    write = tf.train.CheckpointManager.save

    def killed_before_the_state_file(manager, checkpoint_number=None):
        manager._checkpoint.write(os.path.join(manager.directory, f"ckpt-{checkpoint_number}"))  # files, no record
        raise KeyboardInterrupt

    monkeypatch.setattr(tf.train.CheckpointManager, "save", killed_before_the_state_file)
    with pytest.raises(KeyboardInterrupt):
        run(data, config=train_config(2), checkpoint_dir=folder)
    monkeypatch.setattr(tf.train.CheckpointManager, "save", write)
    trained = []
    history = run(data, config=train_config(2), checkpoint_dir=folder,
                  on_epoch_end=lambda epoch, *_: trained.append(epoch))
    assert trained == [2] and [row["epoch"] for row in history] == [1, 2]


def damage(path_prefix: str) -> None:
    """Flip bytes in the middle of a checkpoint's data file (the bundle's checksums catch it)."""
    data_file = glob.glob(path_prefix + ".data-*")[0]
    content = bytearray(open(data_file, "rb").read())
    middle = len(content) // 2
    content[middle:middle + 8] = bytes(b ^ 0xFF for b in content[middle:middle + 8])
    open(data_file, "wb").write(bytes(content))


def test_a_damaged_newest_checkpoint_resumes_from_the_older_one_saying_so(data, tmp_path, capsys):
    folder = str(tmp_path / "run")
    run(data, config=train_config(2), checkpoint_dir=folder)
    damage(os.path.join(folder, "ckpt-2"))
    trained = []
    history = run(data, config=train_config(2), checkpoint_dir=folder, verbose=True,
                  on_epoch_end=lambda epoch, *_: trained.append(epoch))
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"{folder}/ckpt-2 does not restore") for line in lines)
    assert trained == [2] and [row["epoch"] for row in history] == [1, 2]
    damage(os.path.join(folder, "ckpt-1"))
    damage(os.path.join(folder, "ckpt-2"))
    with pytest.raises(OSError, match="no checkpoint .* restores"):
        run(data, config=train_config(2), checkpoint_dir=folder)


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory):
    """A folder with one trained epoch of CONFIG on `data`, batch size 32, compute_loss."""
    folder = str(tmp_path_factory.mktemp("finished") / "run")
    run(data, config=train_config(1), checkpoint_dir=folder)
    return folder


@pytest.mark.parametrize("change, named", [
    (dict(model=lambda: fresh_model(config=vae_utils.VAEConfig(latent_dim=3, filters=4))), "model.latent_dim: 2"),
    (dict(seed=3), "training.seed: 0 in the checkpoint, 3 now"),
    (dict(batch_size=16), "training.batch_size: 32 in the checkpoint, 16 now"),
    (dict(loss_fn=vae_utils.MMDLoss(10.0)), "loss: 'vae_utils.compute_loss' in the checkpoint, "
                                            "'compute_mmd_loss(mmd_weight=10)' now"),
    (dict(other_data=True), "data: "),
], ids=["architecture", "seed", "batch_size", "loss", "data"])
def test_another_run_is_refused_naming_the_difference(data, finished_run, change, named):
    model = change.get("model", fresh_model)()
    train, test = data
    if change.get("other_data"):
        train = 1.0 - train
    config = train_config(1, seed=change.get("seed", 0), batch_size=change.get("batch_size", 32))
    with pytest.raises(vae_utils.CheckpointMismatchError, match="holds another run") as error:
        vae_utils.main_train_loop(model, train, test, config, change.get("loss_fn", vae_utils.compute_loss),
                                  checkpoint_dir=finished_run, allow_new_settings=True)
    assert named in str(error.value)


def test_new_optimisation_settings_need_allow_new_settings_and_precision_needs_nothing(data, finished_run, tmp_path):
    config = train_config(1, learning_rate=1e-2)
    with pytest.raises(vae_utils.CheckpointMismatchError, match="allow_new_settings=True") as error:
        run(data, config=config, checkpoint_dir=finished_run)
    assert "training.learning_rate: 0.001 in the checkpoint, 0.01 now" in str(error.value)
    folder = str(tmp_path / "copy")
    run(data, config=train_config(1), checkpoint_dir=folder)
    assert len(run(data, config=train_config(2, learning_rate=1e-2), checkpoint_dir=folder,
                   allow_new_settings=True)) == 2
    bfloat16 = vae_utils.TrainConfig(epochs=2, batch_size=32, precision="mixed_bfloat16", learning_rate=1e-2)
    model = vae_utils.build_model(CONFIG, bfloat16)
    assert len(vae_utils.main_train_loop(model, *data, bfloat16, checkpoint_dir=folder, verbose=False)) == 2


def test_a_loss_is_named_the_same_in_every_interpreter(data, tmp_path, monkeypatch):
    assert vae_utils.describe_loss(vae_utils.compute_loss) == "vae_utils.compute_loss"
    assert vae_utils.describe_loss(vae_utils.MMDLoss(10)) == "compute_mmd_loss(mmd_weight=10)"
    folder = str(tmp_path / "run")
    run(data, config=train_config(1), checkpoint_dir=folder)

    # Another interpreter compiles the same function to other bytecode: model it by swapping the code object.
    def other_bytecode(model, x):  # runs in vae_utils' globals, where elbo_per_example is defined
        return -tf.reduce_mean(elbo_per_example(model, x))  # noqa: F821

    monkeypatch.setattr(vae_utils.compute_loss, "__code__", other_bytecode.__code__)
    history = run(data, config=train_config(2), checkpoint_dir=folder)
    assert [row["epoch"] for row in history] == [1, 2]


def test_a_finished_run_in_a_read_only_folder_returns_its_history(data, tmp_path):
    folder = tmp_path / "run"
    history = run(data, config=train_config(1), checkpoint_dir=str(folder))
    for path in [folder, *folder.iterdir()]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        assert run(data, config=train_config(1), checkpoint_dir=str(folder)) == history
    finally:
        folder.chmod(0o755)


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_after_its_last_checkpointed_epoch(tmp_path):
    checkpoint_dir, markers = tmp_path / "checkpoints", tmp_path / "markers"
    # Every step sleeps 0.1 s, so an epoch (8 steps) lasts at least 0.8 s: a kill 0.2 s into epoch 2 lands mid-epoch.
    command = [sys.executable, os.path.join(HERE, "_train_child.py"), str(checkpoint_dir), str(markers), "3", "0.1"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 240
    while not (markers / "started_2").exists():
        assert first.poll() is None and time.monotonic() < deadline, "the training process never reached epoch 2"
        time.sleep(0.02)
    time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL
    assert tf.train.latest_checkpoint(str(checkpoint_dir)).endswith("ckpt-1")

    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "1 epoch(s) done, resuming at epoch 2" in second.stdout
    started = {epoch: (markers / f"started_{epoch}").read_text().split() for epoch in (1, 2, 3)}
    assert started[1] == [str(first.pid)] and len(started[2]) == 2 and started[3] == started[2][1:]
    # Epoch 2 of the second process starts from the weights epoch 1 ended with in the first.
    before, after = (np.load(markers / f"start_2_{pid}.npz") for pid in started[2])
    for key in before.files:
        np.testing.assert_array_equal(before[key], after[key])
    history = json.loads((markers / "final_history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]
