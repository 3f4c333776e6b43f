"""Shared set-up of the test suite: quiet TensorFlow, two logical CPU devices, tiny seeded data and models.

The CPU is split into two logical devices here, at import time, because TensorFlow fixes its devices the first time
it initialises them; `tf.distribute.MirroredStrategy(["/CPU:0", "/CPU:1"])` can then run two replicas on one CPU.
The default strategy still places everything on /CPU:0.

Slow tests carry `@pytest.mark.slow` (registered in pytest.ini): `pytest -m "not slow"` is the fast loop.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _split_cpu(count: int = 2) -> int:
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:  # devices already initialised (e.g. TensorFlow used by another conftest or plugin)
        pass
    return len(tf.config.list_logical_devices("CPU"))


LOGICAL_CPUS = _split_cpu()

import vae_utils  # noqa: E402

TINY = dict(filters=4, kernel_size=3, num_convolutions=2, strides=2)
TINY_CONFIG = vae_utils.VAEConfig(img_size=28, channels=1, latent_dim=2, **TINY)
# The real keras-format .npz files, where this machine has them.
REAL_DATA_DIR = os.environ.get("VAE_DATA_DIR") or os.path.join(ROOT, "..", "shared", "data")


def real_data_available(*names: str) -> bool:
    return all(os.path.isfile(os.path.join(REAL_DATA_DIR, f"{name}.npz")) for name in names)


def synthetic_images(count: int, img_size: int = 28, channels: int = 1, seed: int = 0, classes: int = 4):
    """Binary-ish images in [0, 1]: one bright square per class at a class-specific place, plus a little noise.

    Returns float32 images (count, img_size, img_size, channels) and integer labels (count,).
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % classes
    images = np.zeros((count, img_size, img_size, channels), np.float32)
    side = img_size // 2
    for index, label in enumerate(labels):
        row, col = divmod(int(label) % 4, 2)
        images[index, row * side:(row + 1) * side, col * side:(col + 1) * side, :] = 1.0
    noise = rng.random(images.shape) < 0.05
    images = np.where(noise, 1.0 - images, images).astype(np.float32)
    return images, labels.astype(np.int64)


@pytest.fixture
def seeded():
    """Seed Python, NumPy and TensorFlow before the test."""
    vae_utils.set_seed(0)


@pytest.fixture
def mnist_like():
    """(train, train_labels, test, test_labels): 256 + 64 tiny 28x28x1 images."""
    train, train_labels = synthetic_images(256, seed=1)
    test, test_labels = synthetic_images(64, seed=2)
    return train, train_labels, test, test_labels


@pytest.fixture
def tiny_model(seeded):
    """A seeded 28x28x1 CVAE with 4 filters and a 2-d latent space."""
    return vae_utils.CVAE(TINY_CONFIG)


@pytest.fixture
def splits(mnist_like):
    """`mnist_like` as the `DataSplits` that `prepare_data` returns (binary 28x28x1 images, labels 0..3)."""
    return vae_utils.DataSplits("mnist", *mnist_like)


def tiny_images(count: int, img_size: int = 8, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Uniform random float32 images in [0, 1], for models that only need inputs of the right shape."""
    return np.random.default_rng(seed).random((count, img_size, img_size, channels)).astype(np.float32)


def assert_gradients_reach_every_variable(model, loss_fn, x):
    """The loss is finite, and its gradient for every trainable variable is finite and somewhere non-zero."""
    with tf.GradientTape() as tape:
        loss = loss_fn(model, x)
    gradients = tape.gradient(loss, model.trainable_variables)
    assert np.isfinite(float(loss))
    assert len(gradients) == len(model.trainable_variables) > 0
    for variable, gradient in zip(model.trainable_variables, gradients):
        assert gradient is not None, f"no gradient reaches {variable.path}"
        gradient = tf.convert_to_tensor(gradient).numpy()
        assert np.isfinite(gradient).all(), f"non-finite gradient for {variable.path}"
        assert np.abs(gradient).max() > 0, f"zero gradient for {variable.path}"
