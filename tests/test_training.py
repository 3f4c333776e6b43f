"""Training: TrainConfig, the GradientTape loop (overfitting, determinism, steps per call, schedule, NaN, bad
arguments), and its checkpoints (exact resume after an interruption or a kill, damaged files, another run refused,
new settings, what a resumed run shows)."""

import functools
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

import vae_extensions as vx
import vae_runtime as vr
import vae_utils
from conftest import TINY_CONFIG as CONFIG, synthetic_images

HERE = os.path.dirname(os.path.abspath(__file__))


# float32 throughout: "auto" is mixed_bfloat16 on CPUs with native bfloat16, and the comparisons hold to float32.
def fresh_model(seed: int = 0, config=CONFIG, model_class=vae_utils.CVAE) -> vae_utils.CVAE:
    return vae_utils.build_model(config, vae_utils.TrainConfig(seed=seed, precision="float32"), model_class=model_class)


def train_config(epochs: int = 2, batch_size: int = 32, **changes) -> vae_utils.TrainConfig:
    return vae_utils.TrainConfig(epochs=epochs, batch_size=batch_size, **{"precision": "float32", **changes})


@pytest.fixture(scope="module")
def data():
    train, _ = synthetic_images(128, seed=1)
    test, _ = synthetic_images(32, seed=2)
    return train, test


def deterministic_loss(model, x):
    """Negative ELBO with the analytic KL, decoded at the posterior mean: no sampling."""
    mean, logvar = model.encode(x)
    logpx_z = model.reconstruction_log_prob(x, model.decode(mean))
    return -tf.reduce_mean(logpx_z - vae_utils.kl_divergence_to_standard_normal(mean, logvar))


deterministic_loss.description = "deterministic ELBO"


def run(data, seed=0, epochs=2, config=None, model=None, **kwargs):
    kwargs.setdefault("verbose", False)
    return vae_utils.main_train_loop(model or fresh_model(seed), *data, config or train_config(epochs, seed=seed),
                                     **kwargs)


def without_seconds(history):
    return [{key: value for key, value in row.items() if key != "seconds"} for row in history]


def assert_same_weights(model, reference):
    for resumed, expected in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(resumed, expected)


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
    with pytest.raises(ValueError, match="test_sample have shape"):
        vae_utils.main_train_loop(fresh_model(), train, test, train_config(), test_sample=test[:4, :14])
    with pytest.raises(ValueError, match="batch_size=256"):
        vae_utils.main_train_loop(fresh_model(), train, test, train_config(batch_size=256))


@pytest.mark.parametrize("argument, value, named", [
    ("train_images", "tuple", "train_images is a tuple"),
    ("loss_fn", "compute_loss", "loss_fn must be a function"),
    ("on_epoch_end", 3, "on_epoch_end must be None or a function"),
    ("verbose", "yes", "verbose must be True or False"),
    ("allow_new_settings", 1, "allow_new_settings must be True or False"),
    ("strategy", "mirrored", "strategy must be a tf.distribute.Strategy"),
    ("checkpoint_dir", 3, "checkpoint_dir must be a folder name"),
    ("checkpoint_dir", b"checkpoints", "checkpoint_dir must be a folder name"),
    ("checkpoint_dir", "", "checkpoint_dir must be a folder name"),
    ("config", {"epochs": 2}, "config must be a TrainConfig"),
    ("model", "cvae", "model must be a CVAE"),
])
def test_main_train_loop_names_a_bad_argument_before_any_work(data, tmp_path, monkeypatch, argument, value, named):
    monkeypatch.chdir(tmp_path)  # a checkpoint_dir="" that slipped through would write here
    trained = []
    arguments = {"model": fresh_model(), "train_images": data[0], "test_images": data[1], "config": train_config(1),
                 "on_epoch_end": lambda epoch, *_: trained.append(epoch)}
    arguments[argument] = (data[0], np.zeros(len(data[0]), int)) if value == "tuple" else value
    with pytest.raises((TypeError, ValueError), match=named):
        vae_utils.main_train_loop(**arguments)
    assert trained == [] and os.listdir(tmp_path) == []


def test_a_loss_that_is_not_one_number_is_refused_naming_it(data):
    def per_example(model, x):
        return -vae_utils.elbo_per_example(model, x)

    with pytest.raises(ValueError, match=r"loss_fn .*per_example returns shape \[2\], not one"):
        run(data, loss_fn=per_example)


def test_a_homework_loss_on_another_likelihood_names_the_loss_to_use(data):
    logistic = vx.ExtendedVAEConfig(**{**vars(CONFIG), "likelihood": "logistic"})
    for loss in (vae_utils.compute_loss, vae_utils.MMDLoss(10)):
        with pytest.raises(ValueError, match="fails on this model .*vae_extensions.KLWarmup"):
            run(data, model=fresh_model(config=logistic, model_class=vx.ExtendedCVAE), loss_fn=loss)
    history = run(data, epochs=1, model=fresh_model(config=logistic, model_class=vx.ExtendedCVAE),
                  loss_fn=vx.ExtendedMMDLoss(10))
    assert np.isfinite(history[0]["train_loss"])


def test_overfits_one_small_batch(tiny_model):
    batch, _ = synthetic_images(16, seed=3)
    strategy = tf.distribute.get_strategy()
    optimizer = tf.keras.optimizers.Adam(2e-2)
    train_steps = vr.compile_steps(vae_utils.train_step, tiny_model, optimizer, vae_utils.compute_loss, strategy)
    dataset = vae_utils.make_dataset(batch, 16).repeat()
    losses = train_steps(iter(strategy.experimental_distribute_dataset(dataset)), tf.constant(120)).numpy()
    assert np.isfinite(losses).all()
    assert losses[-20:].mean() < 0.5 * losses[:5].mean(), (losses[:5], losses[-20:])


def test_same_seed_same_history_other_seed_other_history(data):
    seen = []
    first = run(data, 0, on_epoch_end=lambda epoch, model, row: seen.append((epoch, row)))
    again, other = run(data, 0), run(data, 1)
    assert without_seconds(first) == without_seconds(again) != without_seconds(other)
    assert [row["epoch"] for row in first] == [1, 2] and seen == [(1, first[0]), (2, first[1])]
    assert all(np.isfinite(row["train_loss"]) and np.isfinite(row["test_elbo"]) for row in first)


def test_steps_per_call_train_as_one_step_per_call_and_cosine_decays_to_5_percent(data):
    one = run(data, epochs=1, config=train_config(1, steps_per_execution=1))
    three = run(data, epochs=1, config=train_config(1, steps_per_execution=3))
    np.testing.assert_allclose(three[0]["train_loss"], one[0]["train_loss"], rtol=1e-6)  # 4 steps: 3 + 1
    cosine = vr.make_optimizer(train_config(2, learning_rate=0.01, lr_schedule="cosine"), 4)
    rates = []
    for step in (0, 4, 8):  # the start, half-way (2 epochs of 4 steps), the end
        cosine.iterations.assign(step)
        rates.append(float(cosine.learning_rate))
    assert rates == pytest.approx([0.01, 0.00525, 0.0005])  # alpha + (1 - alpha) (1 + cos(pi t)) / 2, alpha = 5%


class NaNAtStep:
    """compute_loss, but NaN at one training step (counted in the compiled steps only)."""

    description = "compute_loss, NaN at one step"

    def __init__(self, bad_step: int):
        self.bad_step, self.steps = bad_step, tf.Variable(0)

    def __call__(self, model, x):
        if not tf.inside_function():  # the check before training runs the loss once, eagerly
            return vae_utils.compute_loss(model, x)
        step = self.steps.assign_add(1)
        return tf.where(step == self.bad_step, np.float32("nan"), vae_utils.compute_loss(model, x))


def test_nan_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_epoch(data, tmp_path):
    finished = []
    # 4 steps per epoch; global step 6 is epoch 2, step 2, inside a call of 3 steps.
    with pytest.raises(vr.NonFiniteLossError) as error:
        run(data, config=train_config(3, steps_per_execution=3), loss_fn=NaNAtStep(6),
            checkpoint_dir=str(tmp_path), on_epoch_end=lambda epoch, *_: finished.append(epoch))
    assert "nan at epoch 2, step 2 of 4" in str(error.value) and "checkpoint of epoch 1 is kept" in str(error.value)
    assert finished == [1] and sorted(os.listdir(tmp_path)) == ["ckpt-1.data-00000-of-00001", "ckpt-1.index"]


# ---------------------------------------------------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------------------------------------------------

RESUMED_LOSSES = {
    "compute_loss": (CONFIG, vae_utils.CVAE, lambda: vae_utils.compute_loss),
    "MMDLoss": (CONFIG, vae_utils.CVAE, lambda: vae_utils.MMDLoss(10.0)),
    "KLWarmup, autoregressive": (vx.ExtendedVAEConfig(**{**vars(CONFIG), "likelihood": "logistic_ar"}),
                                 vx.ExtendedCVAE, lambda: vx.KLWarmup(1)),
    "ExtendedMMDLoss, logistic": (vx.ExtendedVAEConfig(**{**vars(CONFIG), "likelihood": "logistic"}),
                                  vx.ExtendedCVAE, lambda: vx.ExtendedMMDLoss(10.0)),
}


@pytest.mark.parametrize("name", RESUMED_LOSSES)
def test_an_interrupted_run_resumes_to_the_weights_and_history_of_an_uninterrupted_one(data, tmp_path, capsys, name):
    config, model_class, make_loss = RESUMED_LOSSES[name]
    uninterrupted = fresh_model(config=config, model_class=model_class)
    expected = run(data, epochs=3, model=uninterrupted, loss_fn=make_loss())

    folder = str(tmp_path / "run")
    run(data, epochs=1, model=fresh_model(config=config, model_class=model_class), loss_fn=make_loss(),
        checkpoint_dir=folder)  # "interrupted" after epoch 1
    model, trained = fresh_model(config=config, model_class=model_class), []  # a new session, the same settings
    model.set_weights([np.random.default_rng(5).normal(size=w.shape).astype(w.dtype) for w in model.get_weights()])
    model.rng.reset_from_seed(99)  # and another state of its noise, until restored
    history = run(data, epochs=3, model=model, loss_fn=make_loss(), checkpoint_dir=folder, verbose=True,
                  on_epoch_end=lambda epoch, *_: trained.append(epoch))
    assert "1 epoch done, resuming at epoch 2" in capsys.readouterr().out
    assert trained == [2, 3]
    # The same noise, shuffles and steps: equal to the last bit, the test ELBO of every epoch included.
    assert without_seconds(history) == without_seconds(expected)
    assert_same_weights(model, uninterrupted)


def test_a_finished_run_trains_nothing_and_more_epochs_train_only_the_new_ones(data, tmp_path, capsys):
    folder = str(tmp_path / "run")
    history = run(data, epochs=2, checkpoint_dir=folder)
    again, trained = fresh_model(6), []
    assert run(data, epochs=2, model=again, checkpoint_dir=folder, verbose=True,
               on_epoch_end=lambda epoch, *_: trained.append(epoch)) == history
    assert "2 epochs done, complete" in capsys.readouterr().out and trained == []
    more = run(data, epochs=3, model=again, checkpoint_dir=folder, on_epoch_end=lambda epoch, *_: trained.append(epoch))
    assert trained == [3] and more[:2] == history
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "ckpt-*.index"))) == [
        "ckpt-2.index", "ckpt-3.index"]  # the newest two


def test_a_resumed_run_shows_each_epoch_as_it_was_shown(data, tmp_path, capsys, monkeypatch):
    shown = []
    monkeypatch.setattr(vr, "show", shown.append)
    folder, sample = str(tmp_path / "run"), data[1][:4]
    run(data, epochs=2, checkpoint_dir=folder, test_sample=sample, verbose=True)
    fresh_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch ")]
    assert len(fresh_lines) == 2 and len(shown) == 2  # a Figure per epoch, each also saved beside its checkpoint
    shown.clear()
    run(data, epochs=2, checkpoint_dir=folder, test_sample=sample, verbose=True)  # Run all again: everything restored
    resumed_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch ")]
    assert resumed_lines == fresh_lines
    assert shown == [os.path.join(folder, "epoch-1.png"), os.path.join(folder, "epoch-2.png")]


# ---------------------------------------------------------------------------------------------------------------------
# Interruptions and damage
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_run_exactly(tmp_path):
    checkpoint_dir, markers = tmp_path / "checkpoints", tmp_path / "markers"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    child = os.path.join(HERE, "_train_child.py")
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, child, str(tmp_path / "uninterrupted"), str(reference), "3"], env=env,
                   check=True, capture_output=True, timeout=300)
    # Every step sleeps 0.1 s, so an epoch (8 steps) lasts at least 0.8 s: a kill 0.2 s into epoch 2 lands mid-epoch.
    command = [sys.executable, child, str(checkpoint_dir), str(markers), "3", "0.1"]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 240
    while not (markers / "started_2").exists():
        assert first.poll() is None and time.monotonic() < deadline, "the training process never reached epoch 2"
        time.sleep(0.02)
    time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL
    assert sorted(glob.glob(str(checkpoint_dir / "ckpt-*.index"))) == [str(checkpoint_dir / "ckpt-1.index")]

    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "1 epoch done, resuming at epoch 2" in second.stdout
    started = {epoch: (markers / f"started_{epoch}").read_text().split() for epoch in (1, 2, 3)}
    assert started[1] == [str(first.pid)] and len(started[2]) == 2 and started[3] == started[2][1:]
    history = json.loads((markers / "final_history.json").read_text())
    expected = json.loads((reference / "final_history.json").read_text())
    assert without_seconds(history) == without_seconds(expected)
    resumed, uninterrupted = np.load(markers / "final.npz"), np.load(reference / "final.npz")
    for key in uninterrupted.files:
        np.testing.assert_array_equal(resumed[key], uninterrupted[key])


def test_a_kill_during_the_save_loses_only_that_epoch(data, tmp_path, monkeypatch):
    folder = str(tmp_path / "run")
    run(data, config=train_config(1), checkpoint_dir=folder)
    write = tf.train.Checkpoint.write

    def killed_before_the_index(checkpoint, file_prefix, options=None):
        path = write(checkpoint, file_prefix)
        os.remove(path + ".index")  # TensorFlow writes the .index last: a killed save has data files and no index
        raise KeyboardInterrupt

    monkeypatch.setattr(tf.train.Checkpoint, "write", killed_before_the_index)
    with pytest.raises(KeyboardInterrupt):
        run(data, config=train_config(2), checkpoint_dir=folder)
    monkeypatch.setattr(tf.train.Checkpoint, "write", write)
    trained = []
    history = run(data, config=train_config(2), checkpoint_dir=folder,
                  on_epoch_end=lambda epoch, *_: trained.append(epoch))
    assert trained == [2] and without_seconds(history) == without_seconds(run(data, epochs=2))


def truncate_to_half(path):
    content = open(path, "rb").read()
    open(path, "wb").write(content[:len(content) // 2])


def empty(path):
    open(path, "wb").close()


def flip_a_byte(path):
    content = bytearray(open(path, "rb").read())
    content[len(content) // 2] ^= 0xFF
    open(path, "wb").write(bytes(content))


@pytest.mark.parametrize("damage", [truncate_to_half, empty, flip_a_byte])
@pytest.mark.parametrize("part", ["data-00000-of-00001", "index"])
def test_a_damaged_newest_checkpoint_resumes_from_the_older_one_saying_so(data, tmp_path, capsys, damage, part):
    folder = str(tmp_path / "run")
    run(data, config=train_config(2), checkpoint_dir=folder)
    damage(os.path.join(folder, f"ckpt-2.{part}"))
    trained = []
    history = run(data, config=train_config(2), checkpoint_dir=folder, verbose=True,
                  on_epoch_end=lambda epoch, *_: trained.append(epoch))
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if "does not restore" in line][0].startswith(f"{folder}/ckpt-2 does not restore")
    assert any(line.startswith(f"Restored {folder}/ckpt-1") for line in lines)
    assert trained == [2] and without_seconds(history) == without_seconds(run(data, epochs=2))


def test_no_checkpoint_that_restores_is_an_os_error_naming_the_folder(data, tmp_path):
    folder = str(tmp_path / "run")
    run(data, config=train_config(2), checkpoint_dir=folder)
    for epoch in (1, 2):
        truncate_to_half(os.path.join(folder, f"ckpt-{epoch}.data-00000-of-00001"))
    with pytest.raises(OSError, match=f"no checkpoint in {folder} restores .ckpt-2, ckpt-1.; move the folder away"):
        run(data, config=train_config(2), checkpoint_dir=folder)


@pytest.mark.parametrize("state_file", [None, b"\xff\xfe garbled \x00", b'model_checkpoint_path: "ckpt-1"\n'],
                         ids=["missing", "garbled", "stale"])
def test_checkpoints_are_found_by_their_files_whatever_the_state_file_says(data, tmp_path, capsys, state_file):
    folder = tmp_path / "run"
    run(data, config=train_config(2), checkpoint_dir=str(folder))
    if state_file is not None:  # e.g. left by another tool, or by a Drive sync
        (folder / "checkpoint").write_bytes(state_file)
    trained = []
    history = run(data, config=train_config(3), checkpoint_dir=str(folder), verbose=True,
                  on_epoch_end=lambda epoch, *_: trained.append(epoch))
    assert f"Restored {folder}/ckpt-2: 2 epochs done" in capsys.readouterr().out
    assert trained == [3] and without_seconds(history) == without_seconds(run(data, epochs=3))


@pytest.mark.parametrize("name", ["HW3 [final] (1)", "runs*?", "Übung 3 – VAE"])
def test_a_folder_named_with_glob_characters_or_spaces_resumes(data, tmp_path, capsys, name):
    folder = str(tmp_path / name)
    run(data, config=train_config(1), checkpoint_dir=folder)
    history = run(data, config=train_config(2), checkpoint_dir=folder, verbose=True)
    assert "1 epoch done, resuming at epoch 2" in capsys.readouterr().out
    assert without_seconds(history) == without_seconds(run(data, epochs=2))


@pytest.fixture
def read_only(tmp_path):
    """Make a folder read-only for this process (for root, which ignores permissions, immutable with chattr)."""
    made = []

    def make(folder):
        if os.geteuid() == 0:
            if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
                pytest.skip("running as root where chattr +i does not work: no folder is read-only to root")
        else:
            folder.chmod(0o555)
        made.append(folder)

    yield make
    for folder in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_a_folder_that_cannot_be_written_is_refused_before_training(data, tmp_path, read_only):
    folder = tmp_path / "run"
    history = run(data, config=train_config(1), checkpoint_dir=str(folder))
    read_only(folder)
    assert run(data, config=train_config(1), checkpoint_dir=str(folder)) == history  # finished: nothing to write
    trained = []
    with pytest.raises(OSError, match=f"checkpoint_dir {folder} cannot be written"):
        run(data, config=train_config(2), checkpoint_dir=str(folder), on_epoch_end=lambda e, *_: trained.append(e))
    assert trained == []


def test_a_checkpoint_dir_that_is_a_file_is_refused_before_training(data, tmp_path):
    (tmp_path / "notes.txt").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="notes.txt is a file"):
        run(data, checkpoint_dir=str(tmp_path / "notes.txt"))
    with pytest.raises(OSError, match="cannot be written"):
        run(data, checkpoint_dir=str(tmp_path / "notes.txt" / "run"))


# ---------------------------------------------------------------------------------------------------------------------
# Another run, new settings
# ---------------------------------------------------------------------------------------------------------------------

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
    with pytest.raises(vr.CheckpointMismatchError, match="holds another run") as error:
        vae_utils.main_train_loop(model, train, test, config, change.get("loss_fn", vae_utils.compute_loss),
                                  checkpoint_dir=finished_run, allow_new_settings=True)
    assert named in str(error.value)


def test_a_partial_is_described_with_its_arguments_so_another_weight_is_another_run(data, tmp_path):
    weight_10 = functools.partial(vae_utils.compute_mmd_loss, mmd_weight=10)
    assert vr.describe_loss(weight_10) == "vae_utils.compute_mmd_loss(mmd_weight=10)"
    folder = str(tmp_path / "run")
    run(data, config=train_config(1), loss_fn=weight_10, checkpoint_dir=folder)
    with pytest.raises(vr.CheckpointMismatchError, match="compute_mmd_loss.mmd_weight=1000.' now"):
        run(data, config=train_config(2), loss_fn=functools.partial(vae_utils.compute_mmd_loss, mmd_weight=1000),
            checkpoint_dir=folder)


def test_new_optimisation_settings_need_allow_new_settings_and_precision_needs_nothing(data, finished_run, tmp_path,
                                                                                       capsys):
    config = train_config(1, learning_rate=1e-2)
    with pytest.raises(vr.CheckpointMismatchError, match="allow_new_settings=True") as error:
        run(data, config=config, checkpoint_dir=finished_run)
    assert "training.learning_rate: 0.001 in the checkpoint, 0.01 now" in str(error.value)
    folder = str(tmp_path / "copy")
    run(data, config=train_config(1), checkpoint_dir=folder)
    assert len(run(data, config=train_config(2, learning_rate=1e-2), checkpoint_dir=folder,
                   allow_new_settings=True)) == 2
    assert "with new settings: training.learning_rate: 0.001 in the checkpoint, 0.01 now" in capsys.readouterr().out
    bfloat16 = vae_utils.TrainConfig(epochs=3, batch_size=32, precision="mixed_bfloat16", learning_rate=1e-2)
    model = vae_utils.build_model(CONFIG, bfloat16)
    assert len(vae_utils.main_train_loop(model, *data, bfloat16, checkpoint_dir=folder, verbose=False)) == 3


def test_more_epochs_on_a_cosine_schedule_are_a_new_setting(data, tmp_path, capsys):
    folder = str(tmp_path / "run")
    run(data, config=train_config(1, lr_schedule="cosine"), checkpoint_dir=folder)
    with pytest.raises(vr.CheckpointMismatchError, match=r"training.epochs: 1 in the checkpoint, 2 now\) \(the cosine"):
        run(data, config=train_config(2, lr_schedule="cosine"), checkpoint_dir=folder)
    assert len(run(data, config=train_config(2, lr_schedule="cosine"), checkpoint_dir=folder,
                   allow_new_settings=True)) == 2
    assert "the cosine schedule decays over all the epochs" in capsys.readouterr().out


def test_a_loss_is_named_the_same_in_every_interpreter(data, tmp_path, monkeypatch):
    assert vr.describe_loss(vae_utils.compute_loss) == "vae_utils.compute_loss"
    assert vr.describe_loss(vae_utils.MMDLoss(10)) == "compute_mmd_loss(mmd_weight=10)"
    folder = str(tmp_path / "run")
    run(data, config=train_config(1), checkpoint_dir=folder)

    # Another interpreter compiles the same function to other bytecode: model it by swapping the code object.
    def other_bytecode(model, x):  # runs in vae_utils' globals, where elbo_per_example is defined
        return -tf.reduce_mean(elbo_per_example(model, x))  # noqa: F821

    monkeypatch.setattr(vae_utils.compute_loss, "__code__", other_bytecode.__code__)
    history = run(data, config=train_config(2), checkpoint_dir=folder)
    assert [row["epoch"] for row in history] == [1, 2]
