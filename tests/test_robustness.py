"""Robustness: a run killed with SIGKILL resumes, bad input gets a clear one-line error before any TensorFlow work,
extreme inputs keep losses and gradients finite, a NaN loss stops training naming the epoch and the step, checkpoint
folders survive damage (CheckpointedRun: recovery, run signature, lock, with real child processes), and every public
argument is checked (NumPy scalars accepted; bools, strings, NaN, infinities, out-of-range values, bad labels, empty
plot inputs, corrupt data files refused naming the argument or the file)."""

import contextlib
import dataclasses
import functools
import glob
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import tensorflow as tf

import _checkpoint_child as tiny
import vae_utils
from conftest import TINY, TINY_CONFIG, synthetic_images

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "_train_child.py")


# ---------------------------------------------------------------------------------------------------------------------
# SIGKILL in the middle of an epoch
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_resumes_after_last_checkpointed_epoch(tmp_path):
    checkpoint_dir, markers = tmp_path / "checkpoints", tmp_path / "markers"
    # Every step sleeps 0.1 s, so an epoch (8 steps) lasts at least 0.8 s: the kill 0.2 s after epoch 2 has started
    # lands while its steps run, with a wide margin on a slow or busy machine.
    command = [sys.executable, CHILD, str(checkpoint_dir), str(markers), "3", "0.1"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(tmp_path / "first_run.log", "w+") as log:
        first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.path.dirname(HERE))
        deadline = time.monotonic() + 240
        while not (markers / "started_2").exists():
            if first.poll() is not None or time.monotonic() > deadline:
                first.kill()
                first.wait()
                log.seek(0)
                pytest.fail(f"the training process never reached epoch 2:\n{log.read()[-3000:]}")
            time.sleep(0.02)
        time.sleep(0.2)
        os.kill(first.pid, signal.SIGKILL)
        assert first.wait(timeout=60) == -signal.SIGKILL
    first_pid = first.pid

    # Killed during epoch 2: epoch 1 is checkpointed, epoch 2 is not.
    assert tf.train.latest_checkpoint(str(checkpoint_dir)).endswith("ckpt-1")
    with open(checkpoint_dir / "history.json") as handle:
        history_before = json.load(handle)
    assert [row["epoch"] for row in history_before] == [1]

    second = subprocess.run(command, capture_output=True, text=True, env=env, cwd=os.path.dirname(HERE),
                            timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "1 epoch(s) done, resuming at epoch 2" in second.stdout
    started = {epoch: (markers / f"started_{epoch}").read_text().split() for epoch in (1, 2, 3)}
    assert started[1] == [str(first_pid)]  # epoch 1 ran once, in the first process ...
    assert started[2][0] == str(first_pid) and len(started[2]) == 2  # ... epoch 2 started there, was killed, re-ran
    second_pid = started[2][1]
    assert started[3] == [second_pid]
    with open(markers / "final_history.json") as handle:
        history = json.load(handle)
    assert [row["epoch"] for row in history] == [1, 2, 3]  # every epoch exactly once
    assert history[0] == history_before[0]
    assert all(np.isfinite(row["train_loss"]) for row in history)
    # The weights the resumed epoch 2 started from are those checkpointed after epoch 1 (which the first process
    # also started its epoch 2 from).
    saved = np.load(markers / f"start_2_{first_pid}.npz")
    restored = np.load(markers / f"start_2_{second_pid}.npz")
    assert sorted(saved.files) == sorted(restored.files) and len(saved.files) > 0
    for name in saved.files:
        np.testing.assert_array_equal(restored[name], saved[name], err_msg=name)
    initial = np.load(markers / f"start_1_{first_pid}.npz")
    assert not np.array_equal(initial["w0"], saved["w0"])  # epoch 1 did change them


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear, one-line error that names the argument and the value, before any TensorFlow work
# ---------------------------------------------------------------------------------------------------------------------

def _forbidden(*args, **kwargs):
    raise AssertionError("TensorFlow work started before the input was validated")


@contextlib.contextmanager
def no_tensorflow_work(monkeypatch):
    """Make the entry points of TensorFlow work that vae_utils uses fail while the block runs."""
    with monkeypatch.context() as patch:
        patch.delenv("VAE_DATA_DIR", raising=False)
        for owner, name in [(tf, "function"), (tf, "GradientTape"), (tf.data.Dataset, "from_tensor_slices"),
                            (tf.keras.optimizers, "Adam"), (tf.train, "Checkpoint"), (tf.keras, "Sequential"),
                            (vae_utils, "make_train_function"), (vae_utils.CVAE, "encode"),
                            (vae_utils.CVAE, "decode"), (tf.keras.datasets.mnist, "load_data"),
                            (tf.keras.datasets.cifar10, "load_data")]:
            patch.setattr(owner, name, _forbidden)
        yield


@pytest.fixture(scope="module")
def model():
    vae_utils.set_seed(0)
    return vae_utils.CVAE(vae_utils.VAEConfig(latent_dim=2, **TINY))


class Inputs:
    """What the bad-input cases work on: a tiny 28x28x1 model, good data, and a folder for .npz files."""

    def __init__(self, folder, model):
        self.folder, self.model = str(folder), model
        self.train, self.labels = synthetic_images(64)
        self.test, _ = synthetic_images(16, seed=2)
        self.class_means = np.zeros((10, 2), np.float32)

    def npz(self, **changes):
        rng = np.random.default_rng(0)
        arrays = {"x_train": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), "y_train": np.arange(5, dtype=np.uint8),
                  "x_test": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), "y_test": np.arange(3, dtype=np.uint8)}
        arrays.update(changes)
        np.savez(os.path.join(self.folder, "mnist.npz"), **{k: v for k, v in arrays.items() if v is not None})
        return vae_utils.load_dataset("mnist", data_dir=self.folder)

    def corrupt_npz(self):
        with open(os.path.join(self.folder, "mnist.npz"), "wb") as handle:
            handle.write(b"\x00\x01 definitely not a zip archive" * 20)
        return vae_utils.load_dataset("mnist", data_dir=self.folder)

    def train_with(self, **changes):
        arguments = {"train_images": self.train, "test_images": self.test, "epochs": 1, "batch_size": 16, **changes}
        train_images, test_images = arguments.pop("train_images"), arguments.pop("test_images")
        return vae_utils.main_train_loop(self.model, train_images, test_images, vae_utils.TrainConfig(**arguments),
                                         verbose=False)

    def walk(self, src=0, dst=1, steps=5, class_means=None):
        means = self.class_means if class_means is None else class_means
        return vae_utils.walk_src_to_dst(self.model, src, dst, means, vae_utils.MNIST_CLASS_NAMES, steps=steps)


def with_nan(images):
    images = images.copy()
    images[3, 5, 5, 0] = np.nan
    return images


BAD_INPUTS = {
    # case: (call, exception, strings the one-line message must contain: the argument and the value)
    "unknown data set name": (lambda c: vae_utils.load_dataset("fashion_mnist", data_dir=c.folder), ValueError,
                              ["name=", "'fashion_mnist'"]),
    "npz missing a key": (lambda c: c.npz(y_test=None), vae_utils.DatasetError, ["mnist.npz", "'y_test'"]),
    "corrupt npz": (lambda c: c.corrupt_npz(), vae_utils.DatasetError, ["mnist.npz", "not a readable .npz"]),
    "images of the wrong shape for the data set": (
        lambda c: c.npz(x_train=np.zeros((5, 32, 32, 3), np.uint8)), vae_utils.DatasetError,
        ["x_train", "(5, 32, 32, 3)", "(N, 28, 28)"]),
    "float images in the npz": (lambda c: c.npz(x_test=np.zeros((3, 28, 28), np.float64)), vae_utils.DatasetError,
                                ["x_test", "float64"]),
    "labels out of range": (lambda c: c.npz(y_train=np.array([0, 1, 2, 3, 12], np.uint8)), vae_utils.DatasetError,
                            ["y_train", "[0, 12]"]),
    "empty arrays in the npz": (lambda c: c.npz(x_train=np.zeros((0, 28, 28), np.uint8), y_train=np.zeros(0, np.uint8)),
                                vae_utils.DatasetError, ["x_train", "empty", "(0, 28, 28)"]),
    "float images outside [0, 1]": (lambda c: c.train_with(train_images=c.train * 255.0), ValueError,
                                    ["train_images", "[0, 1]", "255"]),
    "uint8 images without preprocessing": (
        lambda c: c.train_with(train_images=(c.train * 255).astype(np.uint8)), TypeError,
        ["train_images", "uint8", "preprocess_images"]),
    "empty image array": (lambda c: c.train_with(train_images=c.train[:0]), ValueError,
                          ["train_images", "(0, 28, 28, 1)"]),
    "NaN in the images": (lambda c: c.train_with(test_images=with_nan(c.test)), ValueError, ["test_images", "NaN"]),
    "image size does not match the model": (
        lambda c: c.train_with(train_images=synthetic_images(8, 32, 3)[0]), ValueError,
        ["train_images", "(32, 32, 3)", "(28, 28, 1)"]),
    "latent_dim = 0": (lambda c: vae_utils.VAEConfig(latent_dim=0, **TINY), ValueError, ["latent_dim=0"]),
    "latent_dim < 0": (lambda c: vae_utils.VAEConfig(latent_dim=-4), ValueError, ["latent_dim=-4"]),
    "strides**convolutions does not divide the image size": (
        lambda c: vae_utils.VAEConfig(img_size=28, num_convolutions=3, strides=2, filters=4), ValueError,
        ["img_size=28", "2**3 = 8"]),
    "walk to an unknown class": (lambda c: c.walk(dst="cat"), ValueError, ["dst_class=", "'cat'"]),
    "walk from a class index out of range": (lambda c: c.walk(src=10), ValueError, ["src_class=10"]),
    "walk with fewer than 2 steps": (lambda c: c.walk(steps=1), ValueError, ["steps=1"]),
    "walk with class means of another data set": (lambda c: c.walk(class_means=np.zeros((4, 2))), ValueError,
                                                  ["class_means", "(4, 2)"]),
    "epochs = 0": (lambda c: c.train_with(epochs=0), ValueError, ["epochs=0"]),
    "epochs not an integer": (lambda c: c.train_with(epochs=2.5), ValueError, ["epochs=2.5"]),
    "batch size larger than the data set": (lambda c: c.train_with(batch_size=1000), ValueError,
                                            ["batch_size=1000", "64"]),
    "learning rate <= 0": (lambda c: c.train_with(learning_rate=0.0), ValueError, ["learning_rate=0.0"]),
    "labels not matching the images": (
        lambda c: vae_utils.get_allClass_encodings(c.model, c.test, c.labels[:3]), ValueError, ["labels", "3", "16"]),
    "evaluation images of another size": (
        lambda c: vae_utils.evaluate_elbo(c.model, synthetic_images(4, 32, 3)[0]), ValueError, ["(32, 32, 3)"]),
    "uint8 test sample to display": (
        lambda c: vae_utils.generate_and_display_images(c.model, 1, (c.test * 255).astype(np.uint8)), TypeError,
        ["test_sample", "uint8"]),
}


def assert_refused_before_tensorflow_work(case, model, tmp_path, monkeypatch):
    """`case` = (call, exception, strings): the call raises `exception` with one short line naming the strings."""
    call, exception, expected = case
    inputs = Inputs(tmp_path, model)
    with no_tensorflow_work(monkeypatch), pytest.raises(exception) as error:
        call(inputs)
    message = str(error.value)
    assert type(error.value) is exception or exception is ValueError, type(error.value)
    assert "\n" not in message and len(message) < 400, message
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_one_line_error_before_tensorflow_work(case, model, tmp_path, monkeypatch):
    assert_refused_before_tensorflow_work(BAD_INPUTS[case], model, tmp_path, monkeypatch)


def test_the_no_tensorflow_guard_catches_work(model, tmp_path, monkeypatch):
    """The guard above is not vacuous: valid input reaches TensorFlow and trips it."""
    inputs = Inputs(tmp_path, model)
    for call in (lambda: inputs.train_with(), lambda: inputs.walk(), lambda: vae_utils.CVAE(vae_utils.VAEConfig(latent_dim=2)),
                 lambda: vae_utils.load_dataset("mnist", data_dir=inputs.folder)):
        # load_dataset reports the failed download as a DatasetError that quotes the AssertionError.
        with no_tensorflow_work(monkeypatch), pytest.raises(Exception, match="TensorFlow work started"):
            call()


# ---------------------------------------------------------------------------------------------------------------------
# Numerical faults
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("likelihood", ["bernoulli", "logistic"])
@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_extreme_inputs_give_finite_losses_and_gradients(likelihood, fill):
    """Encoder outputs of +-500 (exp(500) overflows float32) and saturated images: everything stays finite."""
    vae_utils.set_seed(0)
    model = vae_utils.ExtendedCVAE(
        vae_utils.ExtendedVAEConfig(img_size=28, channels=1, latent_dim=2, likelihood=likelihood, **TINY))
    dense = model.encoder.layers[-1]
    kernel, _ = dense.get_weights()
    dense.set_weights([kernel * 50.0, np.array([300.0, -300.0, 500.0, -500.0], np.float32)])
    x = tf.fill((4, 28, 28, 1), fill)
    raw = model.encoder(x).numpy()
    assert np.abs(raw[:, 2:]).max() > 88.7  # without the bound exp(logvar) would overflow float32
    mean, logvar = model.encode(x)
    assert np.abs(logvar.numpy()).max() <= model.config.logvar_bound
    # compute_loss and the MMD loss are the homework's, Bernoulli only; KLWarmup is the ELBO of any likelihood.
    losses = [("elbo", vae_utils.KLWarmup()),
              ("analytic", lambda m, b: -tf.reduce_mean(vae_utils.elbo_per_example(m, b, True)))]
    if likelihood == "bernoulli":
        losses += [("homework elbo", vae_utils.compute_loss), ("mmd", vae_utils.MMDLoss(1000.0))]
    for name, loss_fn in losses:
        with tf.GradientTape() as tape:
            loss = loss_fn(model, x)
        gradients = tape.gradient(loss, model.trainable_variables)
        assert np.isfinite(float(loss)), name
        for variable, gradient in zip(model.trainable_variables, gradients):
            assert gradient is not None and np.isfinite(tf.convert_to_tensor(gradient).numpy()).all(), \
                f"{name}: gradient of {variable.path}"
    assert np.isfinite(vae_utils.iwae_log_likelihood(model, x, num_samples=4).numpy()).all()


class NaNAtStep:
    """The ELBO loss, except that global training step `bad_step` (counted from 1) returns NaN."""

    def __init__(self, bad_step: int, value=float("nan")):
        self.__name__ = f"elbo_nan_at_{bad_step}"
        self.bad_step, self.value = bad_step, value
        self.steps = tf.Variable(0, dtype=tf.int64, trainable=False)

    def __call__(self, model, x):
        step = self.steps.assign_add(1)
        loss = vae_utils.compute_loss(model, x)
        return tf.where(step == self.bad_step, tf.constant(self.value, tf.float32), loss)


def test_nan_loss_stops_training_naming_epoch_and_step(tmp_path):
    vae_utils.set_seed(0)
    model = vae_utils.CVAE(vae_utils.VAEConfig(latent_dim=2, **TINY))
    train, _ = synthetic_images(64)
    test, _ = synthetic_images(16, seed=2)
    finished = []
    # 4 steps per epoch; global step 6 is epoch 2, step 2, inside a multi-step execution of 3 steps.
    with pytest.raises(vae_utils.NonFiniteLossError) as error:
        vae_utils.main_train_loop(model, train, test, vae_utils.TrainConfig(epochs=3, batch_size=16,
                                                                            steps_per_execution=3),
                                  loss_fn=NaNAtStep(6), checkpoint_dir=str(tmp_path), verbose=False,
                                  on_epoch_end=lambda epoch, *_: finished.append(epoch))
    message = str(error.value)
    assert "epoch 2, step 2 of 4" in message and "nan" in message and "\n" not in message
    assert finished == [1]
    # The last checkpoint is still the good epoch 1.
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-1")
    with open(tmp_path / "history.json") as handle:
        assert [row["epoch"] for row in json.load(handle)] == [1]


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint folders: damage recovered from, another run refused, new settings only when asked for, one run at a time
# (CheckpointedRun on a tiny Keras model + Adam, 3 epochs of one step each; tests/_checkpoint_child.py)
# ---------------------------------------------------------------------------------------------------------------------

def train_tiny(folder, epochs=3, seed=0, **run_kwargs):
    """Train `epochs` epochs (one step each) in `folder`; return the weights after each epoch, by epoch."""
    model, optimizer = tiny.make(seed)
    snapshots = {}
    signature = tiny.signature(epochs=max(epochs, tiny.TRAIN_CONFIG.epochs))
    with vae_utils.CheckpointedRun(folder, model, optimizer, signature, verbose=False, **run_kwargs) as run:
        for epoch in range(run.completed_epochs + 1, epochs + 1):
            loss = tiny.step(model, optimizer)
            run.save(epoch, {"epoch": epoch, "loss": np.float32(loss), "steps": np.int64(epoch)})
            snapshots[epoch] = model.get_weights()
    return snapshots


@pytest.fixture(scope="module")
def finished_tiny(tmp_path_factory):
    """(folder, weights by epoch) of a finished 3-epoch run: the template that each test copies and damages."""
    folder = str(tmp_path_factory.mktemp("template") / "run")
    return folder, train_tiny(folder)


@pytest.fixture
def run_dir(finished_tiny, tmp_path):
    folder = str(tmp_path / "run")
    shutil.copytree(finished_tiny[0], folder)
    return folder


def reopen(folder, signature=None, seed=7, loss_scale=False, learning_rate=1e-2, **kwargs):
    """Open and close `folder` with a fresh model (other initial weights); return (run, model, optimizer)."""
    model, optimizer = tiny.make(seed, learning_rate=learning_rate, loss_scale=loss_scale)
    kwargs.setdefault("verbose", False)
    with vae_utils.CheckpointedRun(folder, model, optimizer, signature or tiny.signature(), **kwargs) as run:
        pass
    return run, model, optimizer


@contextlib.contextmanager
def no_recovery_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", vae_utils.CheckpointRecoveryWarning)
        yield


def assert_restored(run, model, optimizer, weights, epoch):
    assert run.completed_epochs == epoch
    assert [row["epoch"] for row in run.history] == list(range(1, epoch + 1))
    for restored, saved in zip(model.get_weights(), weights[epoch]):
        np.testing.assert_array_equal(restored, saved)
    assert int(optimizer.iterations.numpy()) == epoch  # one step per epoch: Adam's state came back too


def ckpt_files(folder, epoch):
    return sorted(glob.glob(os.path.join(folder, f"ckpt-{epoch}.*")))


def test_checkpointed_run_keeps_the_last_two_and_resumes_model_optimizer_and_history(finished_tiny, run_dir):
    assert sorted(os.listdir(run_dir)) == ["checkpoint", "ckpt-2.data-00000-of-00001", "ckpt-2.index",
                                           "ckpt-3.data-00000-of-00001", "ckpt-3.index", "history.json", "run.json",
                                           "run.lock"]
    assert tf.train.latest_checkpoint(run_dir).endswith("ckpt-3")
    with open(os.path.join(run_dir, "history.json")) as handle:
        history = json.load(handle)
    assert [row["epoch"] for row in history] == [1, 2, 3] and isinstance(history[0]["steps"], int)
    with open(os.path.join(run_dir, "run.json")) as handle:
        record = json.load(handle)
    assert record["signature"] == tiny.signature() and record["settings_changes"] == []
    assert os.path.getsize(os.path.join(run_dir, "run.lock")) == 0  # released
    run, model, optimizer = reopen(run_dir)
    assert_restored(run, model, optimizer, finished_tiny[1], 3)
    assert run.history == history and run.notes == []


def test_checkpointed_run_without_a_folder_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, optimizer = tiny.make()
    with vae_utils.CheckpointedRun(None, model, optimizer, tiny.signature()) as run:
        assert run.completed_epochs == 0
        run.save(1, {"loss": np.float64(2.0)})
        run.save(2, {"loss": 1.0})
    assert run.history == [{"loss": 2.0}, {"loss": 1.0}] and os.listdir(tmp_path) == []


def test_checkpoint_dir_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    train_tiny("~/runs/a", epochs=1)
    assert os.path.exists(tmp_path / "runs" / "a" / "ckpt-1.index") and not os.path.exists("~")


def test_checkpoint_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "not_a_folder"
    path.write_text("x")
    with pytest.raises(NotADirectoryError, match="checkpoint_dir=.*not_a_folder.*is a file"):
        train_tiny(str(path))


@pytest.mark.parametrize("epoch, row, exception, named", [
    (2, {"loss": 1.0}, ValueError, "epoch=2"),
    (True, {"loss": 1.0}, ValueError, "epoch=True"),
    (1, [1.0], TypeError, "row="),
    (1, {"loss": object()}, TypeError, "row['loss']"),
    (1, {"loss": {1.5: 2}}, TypeError, "1.5"),
], ids=["skipped epoch", "bool epoch", "row not a dict", "object in row", "float key"])
def test_save_refuses_a_bad_epoch_or_row_and_writes_nothing(tmp_path, epoch, row, exception, named):
    folder = str(tmp_path / "run")
    model, optimizer = tiny.make()
    with vae_utils.CheckpointedRun(folder, model, optimizer, tiny.signature(), verbose=False) as run:
        with pytest.raises(exception) as error:
            run.save(epoch, row)
        assert named in str(error.value)
        assert run.completed_epochs == 0 and run.history == []
    assert not glob.glob(os.path.join(folder, "ckpt-*")) and not glob.glob(os.path.join(folder, ".*tmp"))


def test_older_checkpoints_are_deleted_only_after_the_new_one_reads_back(run_dir, monkeypatch):
    model, optimizer = tiny.make()
    with vae_utils.CheckpointedRun(run_dir, model, optimizer, tiny.signature(epochs=5), verbose=False) as run:
        real_inspect = run._inspect
        monkeypatch.setattr(run, "_inspect", lambda epoch: ("DataLossError: simulated", None) if epoch == 4
                            else real_inspect(epoch))
        with pytest.raises(OSError, match="epoch 4 .* does not read back .* epoch 3 is kept"):
            run.save(4, {"loss": 1.0})
        assert run.completed_epochs == 3
    assert ckpt_files(run_dir, 2) and ckpt_files(run_dir, 3)
    assert tf.train.latest_checkpoint(run_dir).endswith("ckpt-3")


def _data_file(folder, epoch):
    return glob.glob(os.path.join(folder, f"ckpt-{epoch}.data-*"))[0]


def _truncate(path, keep=0.5):
    with open(path, "r+b") as handle:
        handle.truncate(int(os.path.getsize(path) * keep))


def _flip_byte(path):
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


def _write(path, text):
    with open(path, "w") as handle:
        handle.write(text)


DAMAGE = {
    # case: (damage(folder), epoch restored, text in the note, or None for no note)
    "garbled state file": (lambda d: _write(os.path.join(d, "checkpoint"), "\x00\x13garbage {{{\n"), 3,
                           "state file"),
    "state file pointing at a deleted epoch": (
        lambda d: _write(os.path.join(d, "checkpoint"), 'model_checkpoint_path: "ckpt-1"\n'), 3, None),
    "missing state file": (lambda d: os.remove(os.path.join(d, "checkpoint")), 3, None),
    "truncated newest data file": (lambda d: _truncate(_data_file(d, 3)), 2, "epoch 3"),
    "empty newest data file": (lambda d: _truncate(_data_file(d, 3), 0.0), 2, "epoch 3"),
    "bit flip in the newest data file": (lambda d: _flip_byte(_data_file(d, 3)), 2, "epoch 3"),
    "missing newest data file": (lambda d: os.remove(_data_file(d, 3)), 2, "epoch 3"),
    "missing newest index file": (lambda d: os.remove(os.path.join(d, "ckpt-3.index")), 2, "index file is missing"),
    "garbled newest index file": (lambda d: _write(os.path.join(d, "ckpt-3.index"), "not an index"), 2, "epoch 3"),
    "truncated newest index file": (lambda d: _truncate(os.path.join(d, "ckpt-3.index")), 2, "epoch 3"),
    "missing newest checkpoint files": (lambda d: [os.remove(p) for p in ckpt_files(d, 3)], 2, "files are missing"),
    "garbled state file and truncated newest data": (
        lambda d: (_write(os.path.join(d, "checkpoint"), "garbage"), _truncate(_data_file(d, 3))), 2, "epoch 3"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_folder_resumes_from_the_newest_complete_epoch(case, finished_tiny, run_dir):
    damage, expected_epoch, note = DAMAGE[case]
    damage(run_dir)
    before = {os.path.basename(p): open(p, "rb").read() for p in glob.glob(os.path.join(run_dir, "ckpt-*"))}
    with pytest.warns(vae_utils.CheckpointRecoveryWarning) if note else no_recovery_warning():
        run, model, optimizer = reopen(run_dir)
    assert_restored(run, model, optimizer, finished_tiny[1], expected_epoch)
    if note:
        assert any(note in text for text in run.notes), run.notes
        assert all("\n" not in text for text in run.notes)
    else:
        assert run.notes == []
    # Nothing deleted: every checkpoint file is where it was or, byte for byte, in the damaged-* folder.
    for name, content in before.items():
        places = [os.path.join(run_dir, name)] + glob.glob(os.path.join(run_dir, "damaged-*", name))
        assert any(os.path.exists(p) and open(p, "rb").read() == content for p in places), name
    if expected_epoch == 2 and any(name.startswith("ckpt-3") for name in before):
        (moved,) = glob.glob(os.path.join(run_dir, "damaged-*"))
        assert moved in run.notes[0] and "resumed from the checkpoint of epoch 2" in run.notes[0]
        assert not ckpt_files(run_dir, 3)
    with open(os.path.join(run_dir, "history.json")) as handle:
        assert json.load(handle) == run.history
    assert tf.train.latest_checkpoint(run_dir).endswith(f"ckpt-{expected_epoch}")
    # Training goes on as usual from there.
    weights = train_tiny(run_dir, epochs=4, seed=9)
    assert sorted(weights) == list(range(expected_epoch + 1, 5))
    assert ckpt_files(run_dir, 3) and ckpt_files(run_dir, 4) and not ckpt_files(run_dir, 2)


def test_no_checkpoint_restores_so_training_starts_at_epoch_1_with_everything_moved_aside(run_dir):
    for epoch in (2, 3):
        _truncate(_data_file(run_dir, epoch))
    with pytest.warns(vae_utils.CheckpointRecoveryWarning):
        run, model, optimizer = reopen(run_dir)
    assert run.completed_epochs == 0 and run.history == []
    assert "no checkpoint restores completely" in run.notes[0] and "epoch 3" in run.notes[0]
    (moved,) = glob.glob(os.path.join(run_dir, "damaged-*"))
    assert len(glob.glob(os.path.join(moved, "ckpt-*"))) == 4 and os.path.exists(os.path.join(moved, "history.json"))
    with open(os.path.join(run_dir, "history.json")) as handle:
        assert json.load(handle) == []


def test_history_without_checkpoint_files_is_moved_aside(run_dir):
    for epoch in (2, 3):
        for path in ckpt_files(run_dir, epoch):
            os.remove(path)
    with pytest.warns(vae_utils.CheckpointRecoveryWarning, match="history.json lists 3 epoch"):
        run, _, _ = reopen(run_dir)
    assert run.completed_epochs == 0


HISTORY_DAMAGE = {
    # case: (new content of history.json, None to delete it; text of the note, None for no note)
    "garbage": ("{[not json", "unreadable"),
    "truncated": ('[{"epoch": 1, "loss"', "unreadable"),
    "missing": (None, "missing"),
    "not a list": ('{"epoch": 1}', "not a list of rows"),
    "edited row": ('[{"epoch": 1, "loss": 0.0}, {"epoch": 2}, {"epoch": 3}]', "disagreed"),
    "orphan row of an unsaved epoch": ("APPEND", None),
    "one row behind the checkpoint": ("DROP", None),
}


@pytest.mark.parametrize("case", list(HISTORY_DAMAGE))
def test_damaged_or_missing_history_json_is_rebuilt_from_the_checkpoint(case, run_dir):
    content, note = HISTORY_DAMAGE[case]
    path = os.path.join(run_dir, "history.json")
    with open(path) as handle:
        good = json.load(handle)
    if content is None:
        os.remove(path)
    elif content == "APPEND":
        _write(path, json.dumps(good + [{"epoch": 4, "loss": -1.0}]))
    elif content == "DROP":
        _write(path, json.dumps(good[:2]))
    else:
        _write(path, content)
    with pytest.warns(vae_utils.CheckpointRecoveryWarning) if note else no_recovery_warning():
        run, _, _ = reopen(run_dir)
    assert run.completed_epochs == 3 and run.history == good
    with open(path) as handle:
        assert json.load(handle) == good
    if note:
        assert any("history.json was" in text and note in text for text in run.notes), run.notes
        if content is not None:  # the damaged file is kept
            (kept,) = glob.glob(os.path.join(run_dir, "damaged-*", "history.json"))
            assert open(kept).read() == content
    else:
        assert run.notes == []


@pytest.mark.parametrize("content", [None, "{{garbage", "[]", '{"learning_rate": 0.5}'],
                         ids=["missing", "garbage", "not a record", "old flat format"])
def test_damaged_or_missing_run_json_is_rebuilt_from_the_checkpoint(run_dir, content):
    path = os.path.join(run_dir, "run.json")
    if content is None:
        os.remove(path)
    else:
        _write(path, content)
    with pytest.warns(vae_utils.CheckpointRecoveryWarning, match="run.json was"):
        run, _, _ = reopen(run_dir)
    assert run.completed_epochs == 3
    with open(path) as handle:
        assert json.load(handle)["signature"] == tiny.signature()


def test_recovery_notes_are_printed_in_one_line_when_verbose(run_dir, capsys):
    _truncate(_data_file(run_dir, 3))
    reopen(run_dir, verbose=True)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "epoch 2" in lines[0] and "damaged-" in lines[0] and "epoch 3" in lines[0]


def test_checkpoint_of_an_older_version_is_refused_and_left_alone(tmp_path):
    folder = str(tmp_path / "old")
    model, optimizer = tiny.make()
    tf.train.CheckpointManager(tf.train.Checkpoint(model=model, optimizer=optimizer), folder, 2).save(1)
    names = sorted(os.listdir(folder))
    with pytest.raises(vae_utils.CheckpointMismatchError, match="older version .* new directory"):
        reopen(folder)
    assert sorted(name for name in os.listdir(folder) if name != "run.lock") == names


def _one_value_changed():
    data = tiny.DATA.copy()
    data[-1, -1] = np.nextafter(data[-1, -1], 2.0)  # the last value of the last example, by one ulp
    return data


IDENTITY = {
    # case: (run_signature arguments of the second run, text the error names)
    "another lambda as the loss": (dict(loss_fn=lambda m, x: tf.reduce_mean(m(x))), "loss:"),
    "lambda with another captured weight": (dict(loss_fn=tiny.scaled(3.0)), "loss:"),
    "one value changed at the end of the data": (dict(data=_one_value_changed()), "train_data"),
    "data of another dtype": (dict(data=tiny.DATA.astype(np.float64)), "train_data"),
    "architecture": (dict(model_config=dataclasses.replace(tiny.MODEL_CONFIG, latent_dim=4)), "model.latent_dim"),
    "config class of an extension model": (
        dict(model_config=vae_utils.ExtendedVAEConfig(**dataclasses.asdict(tiny.MODEL_CONFIG))), "model.class"),
    "batch size": (dict(batch_size=2), "training.batch_size"),
    "seed": (dict(seed=1), "training.seed"),
}


@pytest.mark.parametrize("allow", [False, True], ids=["strict", "allow_new_settings"])
@pytest.mark.parametrize("case", list(IDENTITY))
def test_another_run_is_refused_even_with_allow_new_settings(case, allow, run_dir):
    changes, named = IDENTITY[case]
    files = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(run_dir, "*")) if not p.endswith("run.lock")}
    with pytest.raises(vae_utils.CheckpointMismatchError) as error:
        reopen(run_dir, tiny.signature(**changes), allow_new_settings=allow)
    message = str(error.value)
    assert named in message and run_dir in message and "new directory" in message and "\n" not in message
    assert {p: os.path.getmtime(p) for p in files} == files  # the folder is left as it was
    assert os.path.getsize(os.path.join(run_dir, "run.lock")) == 0  # and the lock released


NEW_SETTINGS = {"learning_rate": 1e-4, "lr_schedule": "cosine", "steps_per_execution": 4, "eval_batch_size": 2,
                "epochs": 2}  # fewer epochs; more are always allowed


def test_a_new_precision_needs_no_flag_and_is_recorded(finished_tiny, run_dir):
    new = tiny.signature(precision="mixed_bfloat16")
    run, model, optimizer = reopen(run_dir, new)  # the variables are float32 in every precision
    assert_restored(run, model, optimizer, finished_tiny[1], 3)
    with open(os.path.join(run_dir, "run.json")) as handle:
        record = json.load(handle)
    (change,) = record["settings_changes"]
    assert change["changed"] == {"training.precision": ["auto", "mixed_bfloat16"]}


@pytest.mark.parametrize("field", list(NEW_SETTINGS))
def test_new_optimisation_settings_need_allow_new_settings_and_are_recorded(field, finished_tiny, run_dir):
    new = tiny.signature(**{field: NEW_SETTINGS[field]})
    with pytest.raises(vae_utils.CheckpointMismatchError) as error:
        reopen(run_dir, new)
    message = str(error.value)
    assert f"training.{field}" in message and "allow_new_settings=True" in message and "\n" not in message
    run, model, optimizer = reopen(run_dir, new, allow_new_settings=True)
    assert_restored(run, model, optimizer, finished_tiny[1], 3)
    with open(os.path.join(run_dir, "run.json")) as handle:
        record = json.load(handle)
    assert record["signature"] == new
    (change,) = record["settings_changes"]
    assert change["after_epoch"] == 3 and list(change["changed"]) == [f"training.{field}"]
    # Once an epoch has been saved with them, the new settings are the run's: later calls need no flag.
    model, optimizer = tiny.make(3)
    with vae_utils.CheckpointedRun(run_dir, model, optimizer, new, verbose=False, allow_new_settings=True) as run:
        tiny.step(model, optimizer)
        run.save(4, {"epoch": 4})
    run, _, _ = reopen(run_dir, new)
    assert run.completed_epochs == 4
    with open(os.path.join(run_dir, "run.json")) as handle:
        assert len(json.load(handle)["settings_changes"]) == 1


def test_more_epochs_need_no_flag_and_a_new_learning_rate_is_the_one_used(run_dir):
    run, _, _ = reopen(run_dir, tiny.signature(epochs=10))
    assert run.completed_epochs == 3
    new = tiny.signature(epochs=10, learning_rate=1e-4)
    run, _, optimizer = reopen(run_dir, new, learning_rate=1e-4, allow_new_settings=True)
    # The learning rate is not restored from the checkpoint (which has 1e-2): the resumed run uses the new one.
    assert np.isclose(float(optimizer.learning_rate.numpy()), 1e-4)


@pytest.mark.parametrize("save_scaled, restore_scaled", [(True, False), (False, True)],
                         ids=["float16 run resumed in float32", "float32 run resumed in float16"])
def test_checkpoints_do_not_depend_on_loss_scaling(tmp_path, save_scaled, restore_scaled):
    folder = str(tmp_path / "run")
    model, optimizer = tiny.make(loss_scale=save_scaled)
    with vae_utils.CheckpointedRun(folder, model, optimizer, tiny.signature(), verbose=False) as run:
        for epoch in (1, 2):
            tiny.step(model, optimizer)
            run.save(epoch, {"epoch": epoch})
    weights = {2: model.get_weights()}
    slots = [v.numpy() for v in getattr(optimizer, "inner_optimizer", optimizer).variables[2:]]
    run, model, restored = reopen(folder, loss_scale=restore_scaled)
    assert_restored(run, model, restored, weights, 2)
    for saved, value in zip(slots, getattr(restored, "inner_optimizer", restored).variables[2:]):
        np.testing.assert_array_equal(value.numpy(), saved)


class Described:
    description = "elbo(beta=2)"

    def __call__(self, model, x):
        return 0.0


def test_describe_loss_tells_losses_apart_and_keeps_one_loss_the_same():
    first = lambda m, x: tf.reduce_mean(m(x))  # noqa: E731
    second = lambda m, x: tf.reduce_mean(m(x)) ** 2  # noqa: E731
    third = lambda m, x: tf.reduce_max(m(x))  # noqa: E731 - the bytecode of `first`, another function called
    descriptions = [vae_utils.describe_loss(f) for f in (first, second, third)]
    assert len(set(descriptions)) == 3 and all("<lambda>" in text for text in descriptions)
    assert vae_utils.describe_loss(first) == descriptions[0]
    assert vae_utils.describe_loss(tiny.scaled(2.5)) != vae_utils.describe_loss(tiny.scaled(3.0))
    assert vae_utils.describe_loss(tiny.scaled(2.5)) == vae_utils.describe_loss(tiny.scaled(2.5))
    partial = functools.partial(tiny.uses_a_set, kinds=("beta",))
    assert "kinds=('beta',)" in vae_utils.describe_loss(partial)
    assert vae_utils.describe_loss(partial) != vae_utils.describe_loss(functools.partial(tiny.uses_a_set,
                                                                                         kinds=("x",)))
    assert vae_utils.describe_loss(Described()) == "elbo(beta=2)"
    assert vae_utils.describe_loss(vae_utils.MMDLoss(10.0)) == "compute_mmd_loss(mmd_weight=10)"
    # An object by its class and parameters; a variable's value (which training changes) is left out.
    weighted = tiny.Weighted(3.0)
    text = vae_utils.describe_loss(weighted)
    assert text.startswith("_checkpoint_child.Weighted(") and "weight=3.0" in text and " at 0x" not in text
    weighted.step.assign(5)
    assert vae_utils.describe_loss(weighted) == text
    assert vae_utils.describe_loss(tiny.Weighted(np.float32(3.0))) == text
    assert "tf.function(" in vae_utils.describe_loss(tf.function(first))
    with pytest.raises(TypeError, match="loss_fn=3"):
        vae_utils.describe_loss(3)


def test_describe_loss_is_the_same_in_another_process():
    """Another process, another hash seed (set constants iterate in another order), other memory addresses."""
    ours = tiny.describe_losses()
    code = f"import sys; sys.path.insert(0, {HERE!r}); import _checkpoint_child as c; print(c.describe_losses())"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONHASHSEED": "12345"}
    theirs = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240,
                            check=True).stdout.strip()
    assert theirs == ours
    assert len({line.split("\t")[1] for line in ours.splitlines()}) == len(tiny.LOSS_EXAMPLES)


def test_data_fingerprint_covers_every_byte_shape_and_dtype():
    base = vae_utils.data_fingerprint(tiny.DATA)
    assert vae_utils.data_fingerprint(tiny.DATA.copy()) == base
    assert vae_utils.data_fingerprint(_one_value_changed()) != base
    assert vae_utils.data_fingerprint(tiny.DATA.reshape(4, 8)) != base
    assert vae_utils.data_fingerprint(tiny.DATA.astype(np.float64)) != base
    wide = np.random.default_rng(1).random((6, 5, 3)).astype(np.float32)
    assert vae_utils.data_fingerprint(wide[:, ::2]) == vae_utils.data_fingerprint(np.ascontiguousarray(wide[:, ::2]))
    assert base.startswith("8x4:<f4:")


def test_json_writer_converts_numpy_and_refuses_other_objects_leaving_no_tmp(tmp_path):
    path = str(tmp_path / "history.json")
    vae_utils._write_json_atomically(path, [{"epoch": np.int64(1), "loss": np.float32(0.5), "shape": (2, 3),
                                             "mask": np.array([True, False])}])
    with open(path) as handle:
        assert json.load(handle) == [{"epoch": 1, "loss": 0.5, "shape": [2, 3], "mask": [True, False]}]
    before = open(path).read()
    with pytest.raises(TypeError, match=r"history.json\[0\]\['model'\] is .* which JSON cannot hold"):
        vae_utils._write_json_atomically(path, [{"model": object()}])
    assert open(path).read() == before and os.listdir(tmp_path) == ["history.json"]


def test_json_writer_leaves_no_tmp_when_the_write_fails(tmp_path, monkeypatch):
    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vae_utils.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        vae_utils._write_json_atomically(str(tmp_path / "run.json"), {"a": 1})
    assert os.listdir(tmp_path) == []


def test_lock_of_a_live_run_refuses_and_a_killed_runs_lock_is_taken_over(tmp_path):
    folder, ready = str(tmp_path / "run"), str(tmp_path / "ready")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    with open(tmp_path / "child.log", "w+") as log:
        child = subprocess.Popen([sys.executable, os.path.join(HERE, "_checkpoint_child.py"), folder, ready],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 240
            while not os.path.exists(ready):
                if child.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"the child never took the lock:\n{log.read()[-3000:]}")
                time.sleep(0.05)
            with pytest.raises(vae_utils.CheckpointLockedError) as error:
                reopen(folder)
            message = str(error.value)
            assert f"process {child.pid}" in message and folder in message and "\n" not in message
            assert ckpt_files(folder, 1)  # the refused run changed nothing
        finally:
            child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=60) == -signal.SIGKILL
    with pytest.warns(vae_utils.CheckpointRecoveryWarning, match=f"left by process {child.pid}.*no longer running"):
        run, _, _ = reopen(folder)
    assert run.completed_epochs == 1  # the killed run's epoch is kept


def test_a_second_open_in_the_same_process_is_refused(run_dir):
    model, optimizer = tiny.make()
    with vae_utils.CheckpointedRun(run_dir, model, optimizer, tiny.signature(), verbose=False):
        with pytest.raises(vae_utils.CheckpointLockedError, match="this same Python process"):
            reopen(run_dir)
    run, _, _ = reopen(run_dir)  # released on exit
    assert run.completed_epochs == 3 and run.notes == []


def test_lock_without_flock_checks_the_process_id(run_dir, monkeypatch):
    """Where flock is unavailable (some network file systems), the recorded process id decides."""
    monkeypatch.setattr(vae_utils, "fcntl", None)
    lock, host = os.path.join(run_dir, "run.lock"), socket.gethostname()
    _write(lock, json.dumps({"pid": os.getppid(), "host": host, "started": "earlier"}))
    with pytest.raises(vae_utils.CheckpointLockedError, match=f"process {os.getppid()} on {host}"):
        reopen(run_dir)
    _write(lock, json.dumps({"pid": os.getppid(), "host": "another-machine"}))
    with pytest.raises(vae_utils.CheckpointLockedError, match="cannot be checked .* delete .*run.lock"):
        reopen(run_dir)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write(lock, json.dumps({"pid": dead.pid, "host": host}))
    with pytest.warns(vae_utils.CheckpointRecoveryWarning, match=f"left by process {dead.pid}"):
        run, _, _ = reopen(run_dir)
    assert run.completed_epochs == 3


class ElboNaNAt(NaNAtStep):
    description = "compute_loss"  # one loss, wherever its NaN falls, as far as the run signature is concerned


def test_non_finite_loss_advice_can_be_followed_on_its_checkpoint(tmp_path):
    """The NaN message says to lower the learning rate; allow_new_settings=True lets the run go on with it."""
    vae_utils.set_seed(0)
    train, _ = synthetic_images(64)
    test, _ = synthetic_images(16, seed=2)
    config = vae_utils.TrainConfig(epochs=3, batch_size=16)
    with pytest.raises(vae_utils.NonFiniteLossError, match="allow_new_settings=True"):
        vae_utils.main_train_loop(vae_utils.CVAE(TINY_CONFIG), train, test, config, loss_fn=ElboNaNAt(6),
                                  checkpoint_dir=str(tmp_path), verbose=False)
    lower = dataclasses.replace(config, learning_rate=config.learning_rate / 10)
    with pytest.raises(vae_utils.CheckpointMismatchError, match="training.learning_rate.*allow_new_settings=True"):
        vae_utils.main_train_loop(vae_utils.CVAE(TINY_CONFIG), train, test, lower, loss_fn=ElboNaNAt(0),
                                  checkpoint_dir=str(tmp_path), verbose=False)
    history = vae_utils.main_train_loop(vae_utils.CVAE(TINY_CONFIG), train, test, lower, loss_fn=ElboNaNAt(0),
                                        checkpoint_dir=str(tmp_path), allow_new_settings=True, verbose=False)
    assert [row["epoch"] for row in history] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------------------------
# Every public argument checked before any TensorFlow work: NumPy scalars are the numbers they are; booleans, strings,
# NaN, infinities and out-of-range values are refused naming the argument and the value
# ---------------------------------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
CONFIG_KW = dict(img_size=28, channels=1, latent_dim=2, **TINY)


def train_call(c, **changes):
    """main_train_loop on the tiny model with one keyword argument changed."""
    return vae_utils.main_train_loop(c.model, c.train, c.test, vae_utils.TrainConfig(epochs=1, batch_size=16),
                                     **{"verbose": False, **changes})


def splits_call(c, **changes):
    arguments = dict(name="mnist", train_images=c.train, train_labels=c.labels, test_images=c.test,
                     test_labels=c.labels[:16])
    return vae_utils.DataSplits(**{**arguments, **changes})


def codes(rows=20, dims=3, seed=0):
    return np.random.default_rng(seed).normal(size=(rows, dims))


def with_nan_codes():
    values = codes()
    values[4, 1] = np.nan
    return values


def summary_row(weight, mmd):
    return {"mmd_weight": weight, "mmd_to_prior": mmd, "psnr_db": 20.0, "test_elbo": -100.0}


BAD_ARGUMENTS = {
    # case: (call, exception, strings the one-line message must contain)
    # data
    "data set name not a string": (lambda c: vae_utils.dataset_spec(["mnist"]), ValueError, ["name=['mnist']"]),
    "data_dir a number": (lambda c: vae_utils.load_dataset("mnist", data_dir=5), TypeError, ["data_dir=5"]),
    "max_train negative": (lambda c: vae_utils.prepare_data("mnist", c.folder, max_train=-5), ValueError,
                           ["max_train=-5"]),
    "max_test a float": (lambda c: vae_utils.prepare_data("mnist", c.folder, max_test=2.0), ValueError,
                         ["max_test=2.0"]),
    "binarize a string": (lambda c: vae_utils.preprocess_images(np.zeros((2, 28, 28), np.uint8), "no"), ValueError,
                          ["binarize='no'"]),
    "batch size a float": (lambda c: vae_utils.make_dataset(c.train, 2.5), ValueError, ["batch_size=2.5"]),
    "batch size a bool": (lambda c: vae_utils.make_dataset(c.train, True), ValueError, ["batch_size=True"]),
    "shuffle seed negative": (lambda c: vae_utils.make_dataset(c.train, 4, shuffle_seed=-1), ValueError,
                              ["shuffle_seed=-1"]),
    "shuffle seed a string": (lambda c: vae_utils.make_dataset(c.train, 4, shuffle_seed="0"), ValueError,
                              ["shuffle_seed='0'"]),
    "drop_remainder a string": (lambda c: vae_utils.make_dataset(c.train, 4, drop_remainder="yes"), ValueError,
                                ["drop_remainder='yes'"]),
    "labels of -1 in DataSplits": (lambda c: splits_call(c, train_labels=c.labels - 1), ValueError,
                                   ["train_labels", "[-1, 2]"]),
    "labels of 3.5 in DataSplits": (lambda c: splits_call(c, test_labels=np.full(16, 3.5)), ValueError,
                                    ["test_labels", "integer", "float64"]),
    "labels not one per image in DataSplits": (lambda c: splits_call(c, test_labels=c.labels), ValueError,
                                               ["test_labels", "(64,)", "(16)"]),
    "unknown data set in DataSplits": (lambda c: splits_call(c, name="svhn"), ValueError, ["name='svhn'"]),
    # model
    "latent_dim a NumPy float": (lambda c: vae_utils.VAEConfig(**{**CONFIG_KW, "latent_dim": np.float64(2)}),
                                 ValueError, ["latent_dim=", "2.0"]),
    "filters a string": (lambda c: vae_utils.VAEConfig(**{**CONFIG_KW, "filters": "32"}), ValueError,
                         ["filters='32'"]),
    "latent_dim a bool": (lambda c: vae_utils.VAEConfig(**{**CONFIG_KW, "latent_dim": True}), ValueError,
                          ["latent_dim=True"]),
    "logvar_bound NaN": (lambda c: vae_utils.VAEConfig(logvar_bound=NAN), ValueError, ["logvar_bound=nan"]),
    "logvar_bound infinite": (lambda c: vae_utils.VAEConfig(logvar_bound=INF), ValueError, ["logvar_bound=inf"]),
    "unknown likelihood": (lambda c: vae_utils.ExtendedVAEConfig(likelihood="gauss"), ValueError,
                           ["likelihood='gauss'"]),
    "spatial_latent a string": (lambda c: vae_utils.ExtendedVAEConfig(spatial_latent="yes"), ValueError,
                                ["spatial_latent='yes'"]),
    "CVAE given a dict": (lambda c: vae_utils.CVAE({"latent_dim": 2}), TypeError, ["config must be a VAEConfig"]),
    "set_seed negative": (lambda c: vae_utils.set_seed(-1), ValueError, ["seed=-1"]),
    "set_seed a string": (lambda c: vae_utils.set_seed("0"), ValueError, ["seed='0'"]),
    # losses
    "MMD weight NaN": (lambda c: vae_utils.MMDLoss(NAN), ValueError, ["mmd_weight=nan"]),
    "MMD weight negative": (lambda c: vae_utils.MMDLoss(-1), ValueError, ["mmd_weight=-1"]),
    "MMD weight a string": (lambda c: vae_utils.MMDLoss("10"), ValueError, ["mmd_weight='10'"]),
    "KL warm-up negative": (lambda c: vae_utils.KLWarmup(-1), ValueError, ["warmup_epochs=-1"]),
    "KL warm-up a float": (lambda c: vae_utils.KLWarmup(1.5), ValueError, ["warmup_epochs=1.5"]),
    # training
    "learning rate negative": (lambda c: vae_utils.TrainConfig(learning_rate=-1e-3), ValueError,
                               ["learning_rate=-0.001"]),
    "learning rate infinite": (lambda c: vae_utils.TrainConfig(learning_rate=INF), ValueError, ["learning_rate=inf"]),
    "seed None": (lambda c: vae_utils.TrainConfig(seed=None), ValueError, ["seed=None"]),
    "batch size a NumPy float": (lambda c: vae_utils.TrainConfig(batch_size=np.float32(16)), ValueError,
                                 ["batch_size=", "16"]),
    "checkpoint_dir a number": (lambda c: train_call(c, checkpoint_dir=5), TypeError, ["checkpoint_dir=5"]),
    "on_epoch_end a string": (lambda c: train_call(c, on_epoch_end="print"), TypeError, ["on_epoch_end='print'"]),
    "verbose a string": (lambda c: train_call(c, verbose="yes"), ValueError, ["verbose='yes'"]),
    "allow_new_settings an int": (lambda c: train_call(c, allow_new_settings=1), ValueError,
                                  ["allow_new_settings=1"]),
    "strategy a string": (lambda c: train_call(c, strategy="cpu"), TypeError, ["strategy='cpu'"]),
    "loss_fn a string": (lambda c: train_call(c, loss_fn="elbo"), TypeError, ["loss_fn='elbo'"]),
    "steps_per_epoch 0": (lambda c: vae_utils.make_optimizer(vae_utils.TrainConfig(), 0), ValueError,
                          ["steps_per_epoch=0"]),
    "get_strategy verbose a string": (lambda c: vae_utils.get_strategy("loud"), ValueError, ["verbose='loud'"]),
    # evaluation
    "evaluation batch size 0": (lambda c: vae_utils.evaluate_elbo(c.model, c.test, 0), ValueError, ["batch_size=0"]),
    "evaluation batch size a float": (lambda c: vae_utils.evaluate_elbo(c.model, c.test, 10.0), ValueError,
                                      ["batch_size=10.0"]),
    "analytic_kl a string": (lambda c: vae_utils.evaluate_elbo(c.model, c.test, analytic_kl="yes"), ValueError,
                             ["analytic_kl='yes'"]),
    "IWAE samples 0": (lambda c: vae_utils.iwae_nll(c.model, c.test, num_samples=0), ValueError, ["num_samples=0"]),
    "IWAE samples a float": (lambda c: vae_utils.iwae_nll(c.model, c.test, num_samples=2.5), ValueError,
                             ["num_samples=2.5"]),
    "not a model": (lambda c: vae_utils.encode_means(object(), c.test), TypeError, ["model must be a CVAE"]),
    "NaN reconstructions": (lambda c: vae_utils.psnr(c.test, with_nan(c.test)), ValueError,
                            ["reconstructions", "finite"]),
    "active-unit threshold negative": (lambda c: vae_utils.active_units(codes(), -0.1), ValueError,
                                       ["threshold=-0.1"]),
    "active units of a 1-d array": (lambda c: vae_utils.active_units(np.zeros(5)), ValueError,
                                    ["latent_means", "(5,)"]),
    "active units of NaN codes": (lambda c: vae_utils.active_units(with_nan_codes()), ValueError,
                                  ["latent_means", "NaN"]),
    "bits per dim over 0 dims": (lambda c: vae_utils.bits_per_dim(100.0, 0), ValueError, ["dims=0"]),
    "bits per dim of NaN": (lambda c: vae_utils.bits_per_dim(NAN, 784), ValueError, ["nll_nats=nan"]),
    "bits per dim of a string": (lambda c: vae_utils.bits_per_dim("3", 784), ValueError, ["nll_nats='3'"]),
    "probe labels of -1": (lambda c: vae_utils.linear_probe_accuracy(codes(), np.arange(20) % 3 - 1, codes(),
                                                                     np.arange(20) % 3), ValueError,
                           ["train_labels", "[-1, 1]"]),
    "probe labels of 3.5": (lambda c: vae_utils.linear_probe_accuracy(codes(), np.full(20, 3.5), codes(),
                                                                      np.arange(20) % 3), ValueError,
                            ["train_labels", "integer"]),
    "probe labels not one per code": (lambda c: vae_utils.linear_probe_accuracy(codes(), np.arange(20) % 3, codes(),
                                                                                np.arange(3)), ValueError,
                                      ["test_labels", "(3,)", "(20)"]),
    "probe max_train 1": (lambda c: vae_utils.linear_probe_accuracy(codes(), np.arange(20) % 3, codes(),
                                                                    np.arange(20) % 3, max_train=1), ValueError,
                          ["max_train=1"]),
    "probe of one class": (lambda c: vae_utils.linear_probe_accuracy(codes(), np.zeros(20, int), codes(),
                                                                     np.arange(20) % 3), ValueError,
                           ["train_labels", "one class"]),
    "separability of 1-d codes": (lambda c: vae_utils.class_separability(codes(dims=1), np.arange(20) % 3,
                                                                         codes(dims=1), np.arange(20) % 3),
                                  ValueError, ["train_codes", "1 dimension"]),
    "encodings with labels of -1": (lambda c: vae_utils.get_allClass_encodings(c.model, c.test, np.full(16, -1)),
                                    ValueError, ["labels", "[-1, -1]"]),
    "encodings with labels of 3.5": (lambda c: vae_utils.get_allClass_encodings(c.model, c.test, np.full(16, 3.5)),
                                     ValueError, ["labels", "integer"]),
    "metrics of a dict": (lambda c: vae_utils.model_metrics(c.model, {"test_images": c.test}), TypeError,
                          ["data must be a DataSplits"]),
    "score with an empty name": (lambda c: vae_utils.train_and_score("", c.model, splits_call(c),
                                                                     vae_utils.TrainConfig()), ValueError,
                                 ["name=''"]),
    "score with 0 IWAE samples": (lambda c: vae_utils.train_and_score("a", c.model, splits_call(c),
                                                                      vae_utils.TrainConfig(), iwae_samples=0),
                                  ValueError, ["iwae_samples=0"]),
    "score with a number as checkpoint root": (
        lambda c: vae_utils.train_and_score("a", c.model, splits_call(c), vae_utils.TrainConfig(), checkpoint_root=3),
        TypeError, ["checkpoint_root=3"]),
    "results written to no path": (lambda c: vae_utils.write_results(None, [{"name": "a"}]), TypeError,
                                   ["path=None"]),
    "no results to write": (lambda c: vae_utils.write_results(os.path.join(c.folder, "r.json"), []), ValueError,
                            ["results is empty"]),
    "no results to tabulate": (lambda c: vae_utils.results_table([]), ValueError, ["results is empty"]),
    # plots
    "plot of no images": (lambda c: vae_utils.plot_image_grid(c.test[:0]), ValueError,
                          ["images", "(0, 28, 28, 1)"]),
    "plot of strings": (lambda c: vae_utils.plot_image_grid(np.full((2, 2, 2, 1), "a")), TypeError,
                        ["images", "<U1"]),
    "plot with 0 columns": (lambda c: vae_utils.plot_image_grid(c.test, ncols=0), ValueError, ["ncols=0"]),
    "plot cells of NaN inches": (lambda c: vae_utils.plot_image_grid(c.test, cell=NAN), ValueError, ["cell=nan"]),
    "plot with too few titles": (lambda c: vae_utils.plot_image_grid(c.test, titles=["a"]), ValueError,
                                 ["titles", "1", "16"]),
    "plot saved to a number": (lambda c: vae_utils.plot_image_grid(c.test, path=5), TypeError, ["path=5"]),
    "one image per class of no classes": (lambda c: vae_utils.plot_one_image_per_class(c.test, c.labels[:16], []),
                                          ValueError, ["class_names", "empty"]),
    "one image per class with labels of 3.5": (
        lambda c: vae_utils.plot_one_image_per_class(c.test, np.full(16, 3.5), vae_utils.MNIST_CLASS_NAMES),
        ValueError, ["labels", "integer"]),
    "history of nothing": (lambda c: vae_utils.plot_history({}), ValueError, ["histories"]),
    "history rows without the test ELBO": (lambda c: vae_utils.plot_history({"a": [{"epoch": 1}]}), ValueError,
                                           ["histories['a']", "test_elbo"]),
    "latent space of nothing": (lambda c: vae_utils.plot_latent_space({}, vae_utils.MNIST_CLASS_NAMES), ValueError,
                                ["codes_by_class"]),
    "latent space of NaN codes": (lambda c: vae_utils.plot_latent_space({0: with_nan_codes()},
                                                                        vae_utils.MNIST_CLASS_NAMES),
                                  ValueError, ["codes_by_class", "NaN"]),
    "latent space with 0 points per class": (
        lambda c: vae_utils.plot_latent_space({0: codes()}, vae_utils.MNIST_CLASS_NAMES, max_points_per_class=0),
        ValueError, ["max_points_per_class=0"]),
    "latent moments of nothing": (lambda c: vae_utils.plot_latent_moments({}), ValueError, ["summaries"]),
    "prior samples with a negative seed": (lambda c: vae_utils.plot_prior_samples(c.model, seed=-1), ValueError,
                                           ["seed=-1"]),
    "display at epoch -1": (lambda c: vae_utils.generate_and_display_images(c.model, -1, c.test), ValueError,
                            ["epoch=-1"]),
    "walk between images named by one string": (
        lambda c: vae_utils.walk_between_images(c.model, c.test[0], c.test[1], names="ab"), ValueError,
        ["names='ab'"]),
    "walk between images in 1 step": (lambda c: vae_utils.walk_between_images(c.model, c.test[0], c.test[1], 1),
                                      ValueError, ["steps=1"]),
    "architecture with an empty prefix": (lambda c: vae_utils.draw_architecture(c.model, "", c.folder), ValueError,
                                          ["prefix=''"]),
    # code diagnostics and the MMD sweep
    "MMD of one code": (lambda c: vae_utils.mmd_to_prior(codes(rows=1)), ValueError, ["codes", "N >= 2", "(1, 3)"]),
    "MMD against 1 prior sample": (lambda c: vae_utils.mmd_to_prior(codes(), num_prior_samples=1), ValueError,
                                   ["num_prior_samples=1"]),
    "MMD with a string seed": (lambda c: vae_utils.mmd_to_prior(codes(), seed="x"), ValueError, ["seed='x'"]),
    "summary of NaN codes": (lambda c: vae_utils.latent_distribution_summary(with_nan_codes()), ValueError,
                             ["codes", "NaN"]),
    "noise floor of 1 code": (lambda c: vae_utils.prior_mmd_noise_floor(1, 2), ValueError, ["num_codes=1"]),
    "noise floor in 0 dimensions": (lambda c: vae_utils.prior_mmd_noise_floor(10, 0), ValueError, ["latent_dim=0"]),
    "aggregate posterior with a negative seed": (
        lambda c: vae_utils.aggregate_posterior_samples(c.model, c.test, seed=-1), ValueError, ["seed=-1"]),
    "checkerboard of NaN images": (lambda c: vae_utils.checkerboard_energy(with_nan(c.test)), ValueError,
                                   ["images", "finite"]),
    "checkerboard of no images": (lambda c: vae_utils.checkerboard_energy(c.test[:0]), ValueError,
                                  ["images", "(0, 28, 28, 1)"]),
    "crops of an image index out of range": (
        lambda c: vae_utils.plot_reconstruction_crops(c.test, {}, indices=(0, 99)), ValueError, ["indices=[0, 99]"]),
    "crops with a box of two numbers": (lambda c: vae_utils.plot_reconstruction_crops(c.test, {}, box=(1, 2)),
                                        ValueError, ["box=(1, 2)"]),
    "code distributions of no models": (lambda c: vae_utils.compare_code_distributions({}, c.test), ValueError,
                                        ["models"]),
    "prior samples by model with a negative seed": (
        lambda c: vae_utils.plot_prior_samples_by_model({"a": c.model}, seed=-1), ValueError, ["seed=-1"]),
    "reconstructions by a non-model": (lambda c: vae_utils.plot_reconstructions_by_model({"a": None}, c.test),
                                       TypeError, ["models['a'] must be a CVAE"]),
    "sweep of no weights": (lambda c: vae_utils.mmd_weight_sweep([], c.model.config, splits_call(c),
                                                                 vae_utils.TrainConfig()), ValueError,
                            ["weights is empty"]),
    "sweep with a NaN weight": (lambda c: vae_utils.mmd_weight_sweep([1.0, NAN], c.model.config, splits_call(c),
                                                                     vae_utils.TrainConfig()), ValueError,
                                ["mmd_weight=nan"]),
    "sweep on 0 training images": (lambda c: vae_utils.mmd_weight_sweep([1.0], c.model.config,
                                                                        splits_call(c).take_train(0),
                                                                        vae_utils.TrainConfig()),
                                   ValueError, ["count=0"]),
    "weight chosen from no rows": (lambda c: vae_utils.choose_mmd_weight([], 0.1), ValueError, ["rows"]),
    "weight chosen against a NaN reference": (lambda c: vae_utils.choose_mmd_weight([summary_row(1.0, 0.1)], NAN),
                                              ValueError, ["reference_mmd=nan"]),
    "sweep plot of nothing": (lambda c: vae_utils.plot_mmd_sweep(None), ValueError, ["sweep"]),
    "table of mismatched models": (lambda c: vae_utils.elbo_vs_mmd_table({"a": {}}, {"b": {}}), ValueError,
                                   ["results and summaries", "'a'", "'b'"]),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_argument_is_refused_naming_it_before_tensorflow_work(case, model, tmp_path, monkeypatch):
    assert_refused_before_tensorflow_work(BAD_ARGUMENTS[case], model, tmp_path, monkeypatch)


def test_numpy_scalars_are_the_numbers_they_are(model, tmp_path):
    config = vae_utils.VAEConfig(**{**CONFIG_KW, "latent_dim": np.int64(2), "logvar_bound": np.float32(10.0)})
    assert type(config.latent_dim) is int and type(config.logvar_bound) is float
    assert config == vae_utils.VAEConfig(**CONFIG_KW)
    train, _ = synthetic_images(32)
    history = vae_utils.main_train_loop(model, train, train[:8], vae_utils.TrainConfig(
        epochs=np.int64(1), batch_size=np.int32(16), learning_rate=np.float32(1e-3), seed=np.uint8(0),
        eval_batch_size=np.int16(8)), checkpoint_dir=str(tmp_path / "run"), verbose=np.bool_(False))
    assert [row["epoch"] for row in history] == [1]
    assert np.isfinite(vae_utils.iwae_nll(model, train[:4], num_samples=np.int32(2), batch_size=np.int64(2)))
    assert vae_utils.bits_per_dim(np.float32(784 * math.log(2.0)), np.int64(784)) == pytest.approx(1.0)
    vae_utils.write_results(str(tmp_path / "results.json"), [{"name": "a", "epochs": np.int64(3),
                                                              "psnr_db": np.float32(20.5)}])
    with open(tmp_path / "results.json") as handle:
        assert json.load(handle)["models"] == [{"name": "a", "epochs": 3, "psnr_db": 20.5}]
    assert os.listdir(tmp_path / "run") and not glob.glob(str(tmp_path / "*.tmp"))


def test_tilde_is_expanded_in_every_path(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "data")
    np.savez(tmp_path / "data" / "mnist.npz", x_train=rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
             y_train=np.arange(5, dtype=np.uint8), x_test=rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
             y_test=np.arange(3, dtype=np.uint8))
    assert vae_utils.prepare_data("mnist", "~/data", max_train=4).train_images.shape == (4, 28, 28, 1)
    vae_utils.write_results("~/out/results.json", [{"name": "a"}])
    vae_utils.plot_image_grid(synthetic_images(2)[0], path="~/figures/grid.png")
    assert (tmp_path / "out" / "results.json").exists() and (tmp_path / "figures" / "grid.png").exists()


def test_a_loss_of_one_value_per_example_is_refused(model):
    train, _ = synthetic_images(32)
    per_example = lambda m, x: -vae_utils.elbo_per_example(m, x)  # noqa: E731 - forgot the mean
    with pytest.raises(ValueError) as error:
        vae_utils.main_train_loop(model, train, train[:8], vae_utils.TrainConfig(epochs=1, batch_size=16),
                                  per_example, verbose=False)
    message = str(error.value)
    assert "loss_fn=" in message and "<lambda>" in message and "[16]" in message and "one number" in message


def _npz_bytes(compressed: bool) -> bytes:
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
                  y_train=np.arange(50, dtype=np.uint8) % 10,
                  x_test=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), y_test=np.arange(20, dtype=np.uint8) % 10)
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def _flip_in_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x55]) + data[middle + 1:]


def _object_array_npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x_train=np.array([{"a": 1}], dtype=object), y_train=np.zeros(1), x_test=np.zeros(1),
             y_test=np.zeros(1))
    return buffer.getvalue()


def _npy_bytes() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((3, 28, 28), np.uint8))
    return buffer.getvalue()


CORRUPT_FILES = {
    "bit flip in a compressed archive (zlib.error)": lambda: _flip_in_middle(_npz_bytes(compressed=True)),
    "bit flip in a stored archive (CRC)": lambda: _flip_in_middle(_npz_bytes(compressed=False)),
    "truncated archive": lambda: _npz_bytes(compressed=True)[: len(_npz_bytes(compressed=True)) // 2],
    "empty file": lambda: b"",
    "text file": lambda: b"x_train,y_train\n1,2\n",
    "a single .npy array under the .npz name": _npy_bytes,
    "pickled object arrays": _object_array_npz,
}


@pytest.mark.parametrize("case", list(CORRUPT_FILES))
def test_a_corrupt_data_file_of_any_kind_is_a_dataset_error_naming_it(case, tmp_path, monkeypatch):
    monkeypatch.delenv("VAE_DATA_DIR", raising=False)
    path = tmp_path / "mnist.npz"
    path.write_bytes(CORRUPT_FILES[case]())
    with pytest.raises(vae_utils.DatasetError) as error:
        vae_utils.load_dataset("mnist", data_dir=str(tmp_path))
    message = str(error.value)
    assert str(path) in message and "\n" not in message, message
