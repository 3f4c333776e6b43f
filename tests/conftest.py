"""Shared set-up of the test suite: quiet TensorFlow, two logical CPU devices, tiny seeded data and models.

The CPU is split into two logical devices here, at import time, because TensorFlow fixes its devices the first time
it initialises them; `tf.distribute.MirroredStrategy(["/CPU:0", "/CPU:1"])` can then run two replicas on one CPU.
The default strategy still places everything on /CPU:0.
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
    return vae_utils.CVAE(vae_utils.VAEConfig(img_size=28, channels=1, latent_dim=2, **TINY))
