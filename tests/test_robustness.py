"""Robustness: a run killed with SIGKILL resumes, bad input gets a clear one-line error before any TensorFlow work,
extreme inputs keep losses and gradients finite, and a NaN loss stops training naming the epoch and the step."""

import contextlib
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
from conftest import TINY, synthetic_images

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "_train_child.py")


# ---------------------------------------------------------------------------------------------------------------------
# SIGKILL in the middle of an epoch
# ---------------------------------------------------------------------------------------------------------------------

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
        return vae_utils.main_train_loop(self.model, arguments.pop("train_images"), arguments.pop("test_images"),
                                         verbose=False, **arguments)

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
    "latent_dim = 0": (lambda c: vae_utils.CVAE(latent_dim=0, **TINY), ValueError, ["latent_dim=0"]),
    "latent_dim < 0": (lambda c: vae_utils.VAEConfig(latent_dim=-4), ValueError, ["latent_dim=-4"]),
    "strides**convolutions does not divide the image size": (
        lambda c: vae_utils.CVAE(img_size=28, num_convolutions=3, strides=2, filters=4), ValueError,
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


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_one_line_error_before_tensorflow_work(case, model, tmp_path, monkeypatch):
    call, exception, expected = BAD_INPUTS[case]
    inputs = Inputs(tmp_path, model)
    with no_tensorflow_work(monkeypatch), pytest.raises(exception) as error:
        call(inputs)
    message = str(error.value)
    assert "\n" not in message and len(message) < 400, message
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"


def test_the_no_tensorflow_guard_catches_work(model, tmp_path, monkeypatch):
    """The guard above is not vacuous: valid input reaches TensorFlow and trips it."""
    inputs = Inputs(tmp_path, model)
    for call in (lambda: inputs.train_with(), lambda: inputs.walk(), lambda: vae_utils.CVAE(latent_dim=2),
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
    model = vae_utils.CVAE(vae_utils.VAEConfig(img_size=28, channels=1, latent_dim=2, likelihood=likelihood, **TINY))
    dense = model.encoder.layers[-1]
    kernel, _ = dense.get_weights()
    dense.set_weights([kernel * 50.0, np.array([300.0, -300.0, 500.0, -500.0], np.float32)])
    x = tf.fill((4, 28, 28, 1), fill)
    raw = model.encoder(x).numpy()
    assert np.abs(raw[:, 2:]).max() > 88.7  # without the bound exp(logvar) would overflow float32
    mean, logvar = model.encode(x)
    assert np.abs(logvar.numpy()).max() <= model.config.logvar_bound
    for name, loss_fn in [("elbo", vae_utils.compute_loss), ("mmd", vae_utils.mmd_loss(1000.0)),
                          ("analytic", lambda m, b: -tf.reduce_mean(vae_utils.elbo_per_example(m, b, True)))]:
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
        vae_utils.main_train_loop(model, train, test, epochs=3, batch_size=16, loss_fn=NaNAtStep(6),
                                  steps_per_execution=3, checkpoint_dir=str(tmp_path), verbose=False,
                                  on_epoch_end=lambda epoch, *_: finished.append(epoch))
    message = str(error.value)
    assert "epoch 2, step 2 of 4" in message and "nan" in message and "\n" not in message
    assert finished == [1]
    # The last checkpoint is still the good epoch 1.
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-1")
    with open(tmp_path / "history.json") as handle:
        assert [row["epoch"] for row in json.load(handle)] == [1]
