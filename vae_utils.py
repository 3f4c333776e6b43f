"""Convolutional variational autoencoders for MNIST and CIFAR-10: data, model, losses, training, evaluation, plots.

The homework's own pieces come first, in the form of the TensorFlow CVAE tutorial; the last section holds what goes
beyond the homework (better likelihoods and decoders, code diagnostics), built on them.
Importing this module has no side effects: it downloads nothing, trains nothing and reads no arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import math
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import time
import types
import warnings
from typing import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure

try:
    import fcntl  # the checkpoint folder's lock
except ImportError:  # Windows: the lock checks the recorded process id instead
    fcntl = None

# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------

MNIST_CLASS_NAMES = tuple(str(digit) for digit in range(10))
CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Shapes, label layout and class names of one data set as `tf.keras.datasets` returns it."""

    image_shape: tuple[int, ...]
    label_ndim: int
    class_names: tuple[str, ...]


DATASETS = {
    "mnist": DatasetSpec((28, 28), 1, MNIST_CLASS_NAMES),
    "cifar10": DatasetSpec((32, 32, 3), 2, CIFAR10_CLASS_NAMES),
}
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DatasetError(ValueError):
    """The data set could not be found, read or validated."""


def dataset_spec(name: str) -> DatasetSpec:
    """Return the specification of a known data set, or raise a ValueError naming the known ones."""
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"unknown data set name={name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name]


def _validate_arrays(name: str, arrays: Mapping[str, np.ndarray], source: str) -> None:
    spec = dataset_spec(name)
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 1 + len(spec.image_shape) or x.shape[1:] != spec.image_shape:
            raise DatasetError(f"{source}: x_{split} has shape {x.shape} and dtype {x.dtype}; "
                               f"{name} needs uint8 images of shape (N, {', '.join(map(str, spec.image_shape))})")
        if len(x) == 0:
            raise DatasetError(f"{source}: x_{split} is empty (shape {x.shape}); {name} needs at least one image")
        if y.shape[0:1] != (len(x),) or y.ndim != spec.label_ndim or not np.issubdtype(y.dtype, np.integer):
            raise DatasetError(f"{source}: y_{split} has shape {y.shape} and dtype {y.dtype} for {len(x)} images; "
                               f"{name} needs {spec.label_ndim}-d integer labels, one per image")
        if y.min() < 0 or y.max() >= len(spec.class_names):
            raise DatasetError(f"{source}: y_{split} holds labels in [{y.min()}, {y.max()}]; "
                               f"{name} has classes 0..{len(spec.class_names) - 1}")


def _load_npz(name: str, path: str) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ValueError("a single array (.npy), not an archive of arrays")
            missing = [key for key in _NPZ_KEYS if key not in archive.files]
            if missing:
                raise DatasetError(f"{path} lacks the keys {missing}; a keras-format .npz holds {list(_NPZ_KEYS)}")
            arrays = {key: archive[key] for key in _NPZ_KEYS}
    except DatasetError:
        raise
    except Exception as error:  # noqa: BLE001 - BadZipFile, zlib.error (a flipped bit), EOFError, OSError, ...
        message = (str(error).strip().splitlines() or [""])[0][:200]
        raise DatasetError(f"{path} is not a readable .npz file ({type(error).__name__}: {message}); "
                           f"replace it with a copy of the keras-format archive") from None
    _validate_arrays(name, arrays, path)
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


def load_dataset(name: str, data_dir: str | None = None):
    """Return `(x_train, y_train), (x_test, y_test)` as `tf.keras.datasets.<name>.load_data()` does."""
    dataset_spec(name)
    data_dir = _check_path("data_dir", data_dir)
    tried = []
    for directory in (data_dir, os.environ.get("VAE_DATA_DIR")):
        if not directory:
            continue
        path = os.path.join(os.path.expanduser(directory), f"{name}.npz")
        if os.path.isfile(path):
            return _load_npz(name, path)
        tried.append(f"no file {path}")
    try:
        (x_train, y_train), (x_test, y_test) = getattr(tf.keras.datasets, name).load_data()
    except Exception as error:  # noqa: BLE001 - any download failure gets the same advice
        tried.append(f"tf.keras.datasets.{name}.load_data() failed ({type(error).__name__}: {str(error)[:200]})")
        raise DatasetError(f"could not load {name!r}: " + "; ".join(tried) + f". Put the keras-format {name}.npz "
                           f"(keys {', '.join(_NPZ_KEYS)}) in a folder and pass data_dir= or set VAE_DATA_DIR "
                           f"to that folder.") from None
    _validate_arrays(name, {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test},
                     f"tf.keras.datasets.{name}")
    return (x_train, y_train), (x_test, y_test)


def preprocess_images(images: np.ndarray, binarize: bool = False) -> np.ndarray:
    """Scale uint8 images to float32 in [0, 1] with a channel axis; optionally binarize at 0.5 (static binarization)."""
    binarize = _check_bool("binarize", binarize)
    images = np.asarray(images)
    if images.ndim not in (3, 4) or images.size == 0:
        raise ValueError(f"images must be a non-empty (N, H, W) or (N, H, W, C) array, got shape {images.shape}")
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    elif np.issubdtype(images.dtype, np.floating):
        images = images.astype(np.float32)
        if not np.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values")
        if images.min() < 0.0 or images.max() > 1.0:
            raise ValueError(f"float images must lie in [0, 1], got values in [{images.min():g}, {images.max():g}]")
    else:
        raise TypeError(f"images must be uint8 or floating point, got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[..., np.newaxis]
    if binarize:
        images = np.where(images > 0.5, 1.0, 0.0).astype(np.float32)
    return images


def check_images(images, config: "VAEConfig | None" = None, name: str = "images") -> np.ndarray:
    """Return `images` as float32 after checking they are model-ready: (N, H, W, C), finite, in [0, 1]."""
    if isinstance(images, tf.Tensor):
        images = images.numpy()
    images = np.asarray(images)
    if images.ndim != 4 or images.size == 0:
        raise ValueError(f"{name} must be a non-empty (N, H, W, C) array, got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"{name} has dtype {images.dtype}; pass them through preprocess_images() first "
                        f"to get float32 values in [0, 1]")
    images = images.astype(np.float32, copy=False)
    if not np.isfinite(images).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got values in [{low:g}, {high:g}]; "
                         f"use preprocess_images() on raw uint8 images")
    if config is not None and images.shape[1:] != (config.img_size, config.img_size, config.channels):
        raise ValueError(f"{name} have shape {images.shape[1:]} but the model expects "
                         f"({config.img_size}, {config.img_size}, {config.channels})")
    return images


def make_dataset(images: np.ndarray, batch_size: int, shuffle_seed: int | None = None,
                 drop_remainder: bool = False) -> tf.data.Dataset:
    """Batch images into a `tf.data` pipeline; shuffled with `shuffle_seed` when one is given, then prefetched."""
    batch_size = _check_int("batch_size", batch_size, 1, max(1, len(images)))
    shuffle_seed = _check_optional_int("shuffle_seed", shuffle_seed, 0)
    drop_remainder = _check_bool("drop_remainder", drop_remainder)
    dataset = tf.data.Dataset.from_tensor_slices(images)
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(images), seed=shuffle_seed, reshuffle_each_iteration=False)
    return dataset.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


@dataclasses.dataclass(frozen=True)
class DataSplits:
    """A preprocessed data set: float32 images in [0, 1] of shape (N, H, W, C), integer labels of shape (N,)."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    def __post_init__(self):
        classes = len(dataset_spec(self.name).class_names)
        for split in ("train", "test"):
            images = np.asarray(getattr(self, f"{split}_images"))
            if images.ndim != 4 or len(images) == 0 or not np.issubdtype(images.dtype, np.floating):
                raise ValueError(f"{split}_images must be a non-empty float (N, H, W, C) array (see "
                                 f"preprocess_images), got shape {images.shape} and dtype {images.dtype}")
            object.__setattr__(self, f"{split}_labels",
                               check_labels(getattr(self, f"{split}_labels"), len(images), classes, f"{split}_labels"))

    @property
    def class_names(self) -> tuple[str, ...]:
        return dataset_spec(self.name).class_names

    def take_train(self, count: int) -> "DataSplits":
        """The same data set with only its first `count` training images (the test split unchanged)."""
        count = _check_int("count", count, 1)
        return DataSplits(self.name, self.train_images[:count], self.train_labels[:count], self.test_images,
                          self.test_labels)


def prepare_data(name: str, data_dir: str | None = None, max_train: int | None = None,
                 max_test: int | None = None) -> DataSplits:
    """Load a data set and preprocess it as the homework does: MNIST binarized at 0.5, CIFAR-10 scaled to [0, 1].

    `max_train` / `max_test` keep only the first images of each split (the notebook's QUICK smoke run).
    """
    max_train, max_test = _check_optional_int("max_train", max_train, 1), _check_optional_int("max_test", max_test, 1)
    (x_train, y_train), (x_test, y_test) = load_dataset(name, data_dir)
    binarize = name == "mnist"  # binary pixels make the Bernoulli likelihood a proper model of the data
    return DataSplits(name, preprocess_images(x_train[:max_train], binarize), np.ravel(y_train[:max_train]),
                      preprocess_images(x_test[:max_test], binarize), np.ravel(y_test[:max_test]))


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------

def _is_int(value) -> bool:
    """True for Python and NumPy integers, but not for booleans (which Python counts as integers)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_number(name: str, value, minimum: float | None = None, maximum: float | None = None,
                  inclusive: bool = True) -> float:
    """Return `value` as a float after checking it is a finite real number within the bounds; else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}={value!r} must be a number")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be finite")
    below = minimum is not None and (value < minimum if inclusive else value <= minimum)
    above = maximum is not None and (value > maximum if inclusive else value >= maximum)
    if below or above:
        low = "-inf" if minimum is None else f"{minimum:g}"
        high = "inf" if maximum is None else f"{maximum:g}"
        bracket = "[]" if inclusive else "()"
        raise ValueError(f"{name}={value!r} must lie in {bracket[0]}{low}, {high}{bracket[1]}")
    return value


# Argument checks shared by the public functions: each names the argument and the value it refuses, before any
# TensorFlow work. NumPy scalars count as the numbers they are; booleans are not numbers.

def _check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return `value` as an int after checking it is an integer (Python or NumPy, not bool) within the bounds."""
    if not _is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = (f" between {minimum} and {maximum}" if minimum is not None and maximum is not None
                  else f" >= {minimum}" if minimum is not None else f" <= {maximum}" if maximum is not None else "")
        raise ValueError(f"{name}={value!r} must be an integer{bounds}")
    return int(value)


def _check_optional_int(name: str, value, minimum: int | None = None) -> int | None:
    return None if value is None else _check_int(name, value, minimum)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}={value!r} must be True or False")
    return bool(value)


def _check_callable(name: str, value, allow_none: bool = False):
    if not (callable(value) or (allow_none and value is None)):
        raise TypeError(f"{name}={value!r} must be callable" + (" or None" if allow_none else ""))
    return value


def _check_path(name: str, value, allow_none: bool = True) -> str | None:
    """Return a path argument with `~` expanded; None where allowed."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise TypeError(f"{name}={value!r} must be a non-empty path (str)" + (" or None" if allow_none else ""))
    return os.path.expanduser(os.fspath(value))


def _check_nonempty(name: str, value, kind: str = "sequence"):
    """A mapping or sequence argument that must hold something (plots and tables of nothing fail obscurely)."""
    try:
        size = len(value)
    except TypeError:
        raise TypeError(f"{name} must be a {kind}, got {type(value).__name__}") from None
    if size == 0:
        raise ValueError(f"{name} is empty; pass at least one item")
    return value


def _check_codes(name: str, codes, min_rows: int = 1) -> np.ndarray:
    """Latent codes: a finite, real (N, D) array with at least `min_rows` rows, as float64."""
    array = np.asarray(codes)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)) \
            or array.dtype == np.bool_:
        raise TypeError(f"{name} must be a real-valued (N, D) array, got dtype {array.dtype}")
    if array.ndim != 2 or len(array) < min_rows or array.shape[1] < 1:
        raise ValueError(f"{name} must be an (N, D) array with N >= {min_rows}, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return array.astype(np.float64, copy=False)


def _check_type(name: str, value, kind: type, source: str = ""):
    """Return `value` after checking it is a `kind`; else a TypeError naming the argument (and where one comes from)."""
    if not isinstance(value, kind):
        hint = f" (see {source})" if source else ""
        raise TypeError(f"{name} must be a {kind.__name__}{hint}, got {type(value).__name__}")
    return value


def _check_model(name: str, model):
    return _check_type(name, model, CVAE, "build_model")


def _check_strategy(strategy):
    if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError(f"strategy={strategy!r} must be a tf.distribute.Strategy (see get_strategy) or None")
    return strategy


def decoder_grid_size(img_size: int, num_convolutions: int, strides: int) -> int:
    """Side of the feature map fed to the first transposed convolution: img_size / strides**num_convolutions."""
    downsampling = strides ** num_convolutions
    if img_size % downsampling:
        raise ValueError(f"img_size={img_size} is not divisible by strides**num_convolutions = "
                         f"{strides}**{num_convolutions} = {downsampling}")
    return img_size // downsampling


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of a `CVAE`; `filters` doubles with each strided convolution of the encoder."""

    img_size: int = 28
    channels: int = 1
    latent_dim: int = 2
    num_convolutions: int = 2
    filters: int = 32
    kernel_size: int = 3
    strides: int = 2
    encoder_padding: str = "same"  # the TensorFlow tutorial's encoder uses "valid"
    logvar_bound: float = 10.0  # |log-variance| < bound, so that exp(logvar) cannot overflow

    def __post_init__(self):
        for field in ("img_size", "channels", "latent_dim", "num_convolutions", "filters", "kernel_size", "strides"):
            # As plain ints: a NumPy integer would not survive JSON.
            object.__setattr__(self, field, _check_int(field, getattr(self, field), 1))
        decoder_grid_size(self.img_size, self.num_convolutions, self.strides)
        if self.encoder_padding not in ("same", "valid"):
            raise ValueError(f"encoder_padding={self.encoder_padding!r} must be 'same' or 'valid'")
        object.__setattr__(self, "logvar_bound",
                           _check_number("logvar_bound", self.logvar_bound, minimum=0.0, inclusive=False))

    @property
    def grid_size(self) -> int:
        return decoder_grid_size(self.img_size, self.num_convolutions, self.strides)

    @property
    def widths(self) -> list[int]:
        """Filters of the strided convolutions of the encoder, in order; the decoder uses them reversed."""
        return [self.filters * 2 ** i for i in range(self.num_convolutions)]

    @property
    def image_dims(self) -> int:
        return self.img_size * self.img_size * self.channels


class CVAE(tf.keras.Model):
    """Convolutional VAE: strided Conv2D encoder to (mean, log-variance), Dense + transposed-conv decoder to logits."""

    def __init__(self, config: VAEConfig):
        if not isinstance(config, VAEConfig):
            raise TypeError(f"config must be a VAEConfig, got {type(config).__name__}")
        super().__init__()
        self.config = config
        self.encoder = self.build_encoder(config)
        self.decoder = self.build_decoder(config)

    def build_encoder(self, config: VAEConfig) -> tf.keras.Sequential:
        return tf.keras.Sequential(
            [tf.keras.Input(shape=(config.img_size, config.img_size, config.channels))]
            + [tf.keras.layers.Conv2D(width, config.kernel_size, strides=config.strides, padding=config.encoder_padding,
                                      activation="relu") for width in config.widths]
            + [tf.keras.layers.Flatten(),
               # No activation: mean and log-variance are any real numbers. float32 even under mixed precision.
               tf.keras.layers.Dense(2 * config.latent_dim, dtype="float32")],
            name="encoder")

    def build_decoder(self, config: VAEConfig) -> tf.keras.Sequential:
        grid = config.grid_size  # img_size / strides**num_convolutions: the strided layers below multiply it back
        return tf.keras.Sequential(
            [tf.keras.Input(shape=(config.latent_dim,)),
             tf.keras.layers.Dense(grid * grid * config.filters, activation="relu"),
             tf.keras.layers.Reshape((grid, grid, config.filters))]
            + [tf.keras.layers.Conv2DTranspose(width, config.kernel_size, strides=config.strides, padding="same",
                                               activation="relu") for width in reversed(config.widths)]
            # One logit per pixel and channel; stride 1 keeps the image size. No activation: these are logits.
            + [tf.keras.layers.Conv2DTranspose(config.channels, config.kernel_size, strides=1, padding="same")],
            name="decoder")

    def encode(self, x):
        """Return the mean and the (softly bounded) log-variance of q(z|x)."""
        mean, logvar = tf.split(self.encoder(x), num_or_size_splits=2, axis=1)  # (B, latent_dim) each
        bound = self.config.logvar_bound  # tanh keeps exp(logvar) finite, with a gradient everywhere
        return mean, bound * tf.tanh(logvar / bound)

    def reparameterize(self, mean, logvar):
        """Draw z = mean + sigma * eps with eps ~ N(0, I), so the randomness sits outside the trainable path."""
        eps = tf.random.normal(shape=tf.shape(mean))
        return eps * tf.exp(logvar * 0.5) + mean

    def decode(self, z, apply_sigmoid=False):
        """Return the decoder's logits, or the pixel probabilities sigmoid(logits) when `apply_sigmoid` is true."""
        # Under mixed precision the layers compute in bfloat16 or float16; the loss reads the logits in float32.
        logits = tf.cast(self.decoder(z), tf.float32)
        if apply_sigmoid:
            return tf.sigmoid(logits)
        return logits

    def sample(self, eps=None, num_samples=100):
        """Decode latent codes `eps` (drawn from the prior N(0, I) when not given) into images."""
        if eps is None:
            eps = tf.random.normal(shape=(num_samples, self.config.latent_dim))
        return self.decode(eps, apply_sigmoid=True)

    def call(self, x):
        mean, logvar = self.encode(x)
        return self.decode(self.reparameterize(mean, logvar))


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow so that weights, shuffles and samples repeat."""
    tf.keras.utils.set_random_seed(_check_int("seed", seed, 0))


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------

LOG_2PI = math.log(2.0 * math.pi)


def log_normal_pdf(sample, mean, logvar, raxis=1):
    """Log-density of a diagonal Gaussian N(mean, exp(logvar)) at `sample`, summed over `raxis`."""
    return tf.reduce_sum(-0.5 * ((sample - mean) ** 2.0 * tf.exp(-logvar) + logvar + LOG_2PI), axis=raxis)


def compute_loss(model, x):
    """Negative single-sample Monte-Carlo ELBO, -mean(log p(x|z) + log p(z) - log q(z|x)), over the batch."""
    mean, logvar = model.encode(x)
    z = model.reparameterize(mean, logvar)
    x_logit = model.decode(z)
    cross_ent = tf.nn.sigmoid_cross_entropy_with_logits(logits=x_logit, labels=x)
    logpx_z = -tf.reduce_sum(cross_ent, axis=[1, 2, 3])  # (a) log p(x|z): Bernoulli pixels, the reconstruction term
    logpz = log_normal_pdf(z, 0.0, 0.0)
    logqz_x = log_normal_pdf(z, mean, logvar)  # (b) logqz_x - logpz: a one-sample Monte-Carlo estimate of the KL
    return -tf.reduce_mean(logpx_z + logpz - logqz_x)


def compute_kernel(x, y):
    """Gaussian kernel matrix k(x_i, y_j) = exp(-||x_i - y_j||^2 / dim) (bandwidth as in Zhao et al., InfoVAE)."""
    dim = tf.cast(tf.shape(x)[1], x.dtype)
    squared_distances = tf.reduce_sum(tf.square(x[:, tf.newaxis, :] - y[tf.newaxis, :, :]), axis=2)  # (Nx, Ny)
    return tf.exp(-squared_distances / dim)


def compute_mmd(x, y):
    """Biased (V-statistic) estimate of the squared maximum mean discrepancy (Gretton et al. 2012)."""
    return (tf.reduce_mean(compute_kernel(x, x)) + tf.reduce_mean(compute_kernel(y, y))
            - 2.0 * tf.reduce_mean(compute_kernel(x, y)))


def compute_mmd_loss(model, x, mmd_weight=1000.0):
    """InfoVAE / MMD-VAE loss: mean reconstruction negative log-likelihood + mmd_weight * MMD(codes, N(0, I))."""
    mean, logvar = model.encode(x)
    z = model.reparameterize(mean, logvar)
    x_logit = model.decode(z)
    cross_ent = tf.nn.sigmoid_cross_entropy_with_logits(logits=x_logit, labels=x)
    reconstruction_nll = tf.reduce_sum(cross_ent, axis=[1, 2, 3])
    prior_samples = tf.random.normal(shape=tf.shape(z))
    return tf.reduce_mean(reconstruction_nll) + mmd_weight * compute_mmd(z, prior_samples)


class MMDLoss:
    """`compute_mmd_loss` with a fixed weight, in the `loss_fn(model, x)` form that `main_train_loop` takes."""

    def __init__(self, mmd_weight: float = 1000.0):
        self.mmd_weight = _check_number("mmd_weight", mmd_weight, minimum=0.0)
        self.description = f"compute_mmd_loss(mmd_weight={self.mmd_weight:g})"

    def __call__(self, model, x):
        return compute_mmd_loss(model, x, self.mmd_weight)


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------

class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How a model is trained: Adam for `epochs` epochs, and the settings of the loop around it."""

    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"  # "cosine": decay to 5% of learning_rate by the last epoch
    steps_per_execution: int = 1  # training steps per compiled call: fewer round trips to Python and the device
    seed: int = 0  # weights, shuffles and samples
    eval_batch_size: int = 1000  # images per compiled call of the test-set evaluation
    precision: str = "auto"  # a Keras dtype policy, or "auto" (see choose_precision)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of {PRECISIONS}")
        for field in ("epochs", "batch_size", "steps_per_execution", "eval_batch_size"):
            # As plain ints: a NumPy integer would not survive JSON.
            object.__setattr__(self, field, _check_int(field, getattr(self, field), 1))
        object.__setattr__(self, "seed", _check_int("seed", self.seed, 0))
        object.__setattr__(self, "learning_rate",
                           _check_number("learning_rate", self.learning_rate, minimum=0.0, inclusive=False))
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} must be one of {LR_SCHEDULES}")


def get_strategy(verbose: bool = True) -> tf.distribute.Strategy:
    """Pick the distribution strategy for this machine, say which one and why, and return it.

    - TPUStrategy when TensorFlow can use a TPU: the environment variable `TPU_NAME` names one (a Cloud TPU by name,
      or "local"), or TensorFlow itself lists TPU devices (`tf.config.list_physical_devices("TPU")`), as it does on
      a TPU VM with TensorFlow's TPU build (tensorflow plus libtpu); there the resolver is
      `TPUClusterResolver(tpu="local")`. TPU device files (/dev/accel*, /dev/vfio/<n>) alone do not count: a
      TensorFlow without TPU support cannot use the chips (Colab's TPU runtimes have no TensorFlow at all today), so
      they only explain why the CPU is used.
    - MirroredStrategy, one replica per GPU, when TensorFlow sees more than one GPU.
    - Otherwise the default strategy: one device, the GPU if there is one, else the CPU.

    Any failure to resolve or start the TPU (ValueError, RuntimeError, an OSError from the network, a TensorFlow
    error, ...) prints one line and falls through to the next choice, as does a failure to set up MirroredStrategy.
    """
    verbose = _check_bool("verbose", verbose)

    def one_line(error: BaseException) -> str:
        lines = str(error).strip().splitlines()
        return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__

    strategy, name, reason = None, "", ""
    tpu_name = os.environ.get("TPU_NAME", "").strip()
    try:
        tpu_devices = tf.config.list_physical_devices("TPU")
    except Exception:  # noqa: BLE001 - a broken device query means no usable TPU
        tpu_devices = []
    if tpu_name or tpu_devices:
        target = tpu_name or "local"
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=target)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            strategy = tf.distribute.TPUStrategy(resolver)
            reason = (f"TPU {tpu_name!r} from TPU_NAME" if tpu_name
                      else f"{len(tpu_devices)} TPU device(s) visible to TensorFlow, TPUClusterResolver(tpu='local')")
        except Exception as error:  # noqa: BLE001 - whatever the resolver raises, the next-best strategy is used
            print(f"TPU {target!r} not used ({one_line(error)}); falling back to the GPUs or the CPU.")
    if strategy is None:
        gpus = tf.config.list_logical_devices("GPU")
        if len(gpus) > 1:
            try:
                strategy = tf.distribute.MirroredStrategy()
                reason = f"{len(gpus)} GPUs, one replica each"
            except Exception as error:  # noqa: BLE001
                print(f"MirroredStrategy not used ({one_line(error)}); falling back to one device.")
        if strategy is None:
            strategy, name = tf.distribute.get_strategy(), "the default strategy"
            tried_tpu = bool(tpu_name or tpu_devices)
            reason = "one device, " + ("the GPU" if gpus else
                                       "the CPU: TensorFlow sees no GPU" + ("" if tried_tpu else " or TPU"))
            tpu_files = []
            for folder, pattern in (("/dev", r"accel\d+"), ("/dev/vfio", r"\d+")):
                try:
                    tpu_files += sorted(os.path.join(folder, n) for n in os.listdir(folder) if re.fullmatch(pattern, n))
                except OSError:
                    pass
            if tpu_files and not tpu_devices:
                reason += (f"; TPU chips seem present ({', '.join(tpu_files[:2])}) but this TensorFlow cannot use them "
                           "(a TPU needs TensorFlow's TPU build on a TPU VM)")
    if verbose:
        print(f"Strategy: {name or type(strategy).__name__} with {strategy.num_replicas_in_sync} replica(s); {reason}")
    return strategy


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where there is no such file."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _gpu_capabilities() -> list[tuple[int, int]]:
    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            capabilities.append(tuple(tf.config.experimental.get_device_details(gpu)["compute_capability"]))
        except (KeyError, TypeError, ValueError, RuntimeError):
            capabilities.append((0, 0))  # unknown: treated as too old for half precision
    return capabilities


def choose_precision(requested: str = "auto", *, cpu_flags: set[str] | None = None,
                     gpu_capabilities: Sequence[tuple[int, int]] | None = None, tpu: bool | None = None,
                     verbose: bool = False) -> str:
    """The Keras dtype policy for `requested` on this machine (or on the one the keywords describe), and say why.

    "auto": mixed_bfloat16 on TPUs, on GPUs of compute capability 8.0 or more (A100, L4) and on CPUs with native
    bfloat16 (avx512_bf16 or amx_bf16); mixed_float16, with loss scaling, on GPUs of capability 7.x (T4, V100);
    float32 otherwise. Variables and the loss stay float32 in every policy (see CVAE.decode).
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision={requested!r} must be one of {PRECISIONS}")
    if requested != "auto":
        policy, reason = requested, "as configured"
    else:
        tpu = bool(tf.config.list_logical_devices("TPU")) if tpu is None else tpu
        gpus = _gpu_capabilities() if gpu_capabilities is None else [tuple(c) for c in gpu_capabilities]
        flags = _cpu_flags() if cpu_flags is None else set(cpu_flags)
        if tpu:
            policy, reason = "mixed_bfloat16", "TPUs multiply bfloat16 natively"
        elif gpus and min(gpus) >= (8, 0):
            policy, reason = "mixed_bfloat16", f"GPU compute capability {min(gpus)[0]}.{min(gpus)[1]} >= 8.0"
        elif gpus and min(gpus) >= (7, 0):
            policy, reason = "mixed_float16", (f"GPU compute capability {min(gpus)[0]}.{min(gpus)[1]}: float16 "
                                               f"tensor cores, no bfloat16; with loss scaling")
        elif gpus:
            policy, reason = "float32", "the GPU predates float16 tensor cores (compute capability < 7.0)"
        elif flags & {"avx512_bf16", "amx_bf16"}:
            policy, reason = "mixed_bfloat16", f"the CPU has {' and '.join(sorted(flags & {'avx512_bf16', 'amx_bf16'}))}"
        else:
            policy, reason = "float32", "no bfloat16 or float16 hardware found"
    if verbose:
        print(f"Precision: {policy} ({reason})")
    return policy


def model_precision(model: CVAE) -> str:
    """The dtype policy the model's layers compute in (what the losses read, codes and logits, is float32)."""
    return model.encoder.layers[0].dtype_policy.name


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> tf.keras.optimizers.Optimizer:
    """Adam at the configured learning rate, constant or decayed along a cosine over all the run's steps."""
    _check_type("config", config, TrainConfig)
    steps_per_epoch = _check_int("steps_per_epoch", steps_per_epoch, 1)
    if config.lr_schedule == "constant":
        return tf.keras.optimizers.Adam(config.learning_rate)
    # The schedule is a function of the optimizer's step count, which the checkpoint restores.
    return tf.keras.optimizers.Adam(tf.keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=config.epochs * steps_per_epoch, alpha=0.05))


def make_train_function(model: CVAE, optimizer, loss_fn: Callable, strategy: tf.distribute.Strategy):
    """Build a `tf.function` that runs `num_steps` GradientTape steps from a distributed iterator.

    Returns the per-step mean loss over replicas, so the caller synchronises with the device once per call.
    """
    _check_callable("loss_fn", loss_fn)
    replicas = strategy.num_replicas_in_sync

    def train_step(x):
        with tf.GradientTape() as tape:
            loss = _scalar_loss(loss_fn, loss_fn(model, x))
            # Each replica sees an equal share of a fixed global batch, so dividing by the replica count makes the
            # summed gradients those of the global-batch mean. scale_loss multiplies by the float16 loss scale
            # (identity otherwise), which apply_gradients divides out again, skipping steps that overflowed.
            scaled_loss = optimizer.scale_loss(loss / replicas)
        gradients = tape.gradient(scaled_loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    @tf.function
    def train_steps(iterator, num_steps):
        losses = tf.TensorArray(tf.float32, size=num_steps)
        for step in tf.range(num_steps):
            per_replica_loss = strategy.run(train_step, args=(next(iterator),))
            losses = losses.write(step, strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica_loss, axis=None))
        return losses.stack()

    return train_steps


def main_train_loop(model: CVAE, train_images: np.ndarray, test_images: np.ndarray, config: TrainConfig,
                    loss_fn: Callable = compute_loss, *, strategy: tf.distribute.Strategy | None = None,
                    checkpoint_dir: str | None = None, allow_new_settings: bool = False,
                    on_epoch_end: Callable | None = None, verbose: bool = True) -> list[dict]:
    """Train `model` with Adam as `config` says, show per epoch its time and test ELBO, and return the history.

    With `checkpoint_dir`, each epoch is checkpointed and a new call resumes after the last completed one (see
    `CheckpointedRun`: damaged checkpoints are recovered from, another run's checkpoint is refused).
    `allow_new_settings=True` continues a checkpointed model with other optimisation settings (learning rate,
    schedule, fewer epochs, ...); more epochs need no flag. `on_epoch_end(epoch, model, row)` runs after each epoch
    (e.g. to show reconstructions).
    """
    checkpoint_dir = _check_path("checkpoint_dir", checkpoint_dir)
    _check_callable("on_epoch_end", on_epoch_end, allow_none=True)
    allow_new_settings, verbose = _check_bool("allow_new_settings", allow_new_settings), _check_bool("verbose", verbose)
    train_images, test_images, strategy = _check_training_inputs(model, train_images, test_images, config, loss_fn,
                                                                 strategy)
    steps_per_epoch = len(train_images) // config.batch_size  # whole batches: static shapes, equal replica shares
    precision = model_precision(model)  # set when the model was built (build_model)
    with strategy.scope():
        optimizer = make_optimizer(config, steps_per_epoch)
        if precision == "mixed_float16":  # float16 gradients underflow without a loss scale
            optimizer = tf.keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
    train_steps = make_train_function(model, optimizer, loss_fn, strategy)
    signature = run_signature(model.config, dataclasses.replace(config, precision=precision), loss_fn, train_images)
    with CheckpointedRun(checkpoint_dir, model, optimizer, signature, allow_new_settings=allow_new_settings,
                         verbose=verbose) as run:
        _report_resume(run.completed_epochs, config.epochs, checkpoint_dir, verbose)
        for epoch in range(run.completed_epochs + 1, config.epochs + 1):
            if verbose:
                print(f"Epoch {epoch}/{config.epochs}")
            progress = tf.keras.utils.Progbar(steps_per_epoch, stateful_metrics=["loss", "test ELBO"],
                                              verbose=int(verbose))
            started = time.perf_counter()
            # A fresh shuffle seeded by the epoch makes a resumed run see the same batches as an uninterrupted one.
            dataset = make_dataset(train_images, config.batch_size, shuffle_seed=config.seed * 100_003 + epoch,
                                   drop_remainder=True)
            iterator = iter(strategy.experimental_distribute_dataset(dataset))
            if hasattr(loss_fn, "start_epoch"):
                loss_fn.start_epoch(epoch)  # e.g. the KL weight of a warm-up schedule
            loss_sum, done = 0.0, 0
            while done < steps_per_epoch:
                num_steps = min(config.steps_per_execution, steps_per_epoch - done)
                losses = train_steps(iterator, tf.constant(num_steps)).numpy()
                _raise_if_not_finite(losses, epoch, done, steps_per_epoch, checkpoint_dir)
                loss_sum, done = loss_sum + float(losses.sum()), done + num_steps
                progress.update(done, [("loss", loss_sum / done)], finalize=False)
            train_seconds = time.perf_counter() - started
            test_elbo = evaluate_elbo(model, test_images, config.eval_batch_size)
            progress.update(done, [("loss", loss_sum / done), ("test ELBO", test_elbo)], finalize=True)
            row = {"epoch": epoch, "seconds": round(train_seconds, 2), "train_loss": loss_sum / steps_per_epoch,
                   "test_elbo": test_elbo}
            if verbose:
                print(f"Epoch {epoch}/{config.epochs}: {train_seconds:.1f} s training, "
                      f"test ELBO {test_elbo:.2f} nats")
            run.save(epoch, row)
            if on_epoch_end is not None:
                on_epoch_end(epoch, model, row)
    return run.history


def _scalar_loss(loss_fn: Callable, loss):
    """`loss` as a scalar tensor. Checked when the training step is traced, before it runs: a loss of one value per
    example would otherwise be summed into the gradient silently."""
    loss = tf.convert_to_tensor(loss)
    if loss.shape.rank is not None and loss.shape.rank > 0:
        if loss.shape.num_elements() != 1:
            raise ValueError(f"loss_fn={describe_loss(loss_fn)} returned a tensor of shape {loss.shape.as_list()}; "
                             f"a loss must be one number for the batch, e.g. the mean over its examples "
                             f"(-tf.reduce_mean(elbo_per_example(model, x)))")
        loss = tf.reshape(loss, [])
    return loss


def _check_training_inputs(model, train_images, test_images, config, loss_fn, strategy):
    """Check everything `main_train_loop` is given before any TensorFlow work; return the images and the strategy."""
    _check_model("model", model)
    _check_type("config", config, TrainConfig)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn={loss_fn!r} must be callable as loss_fn(model, x)")
    _check_strategy(strategy)
    if (loss_fn is compute_loss or isinstance(loss_fn, MMDLoss)) and getattr(model.config, "likelihood",
                                                                            "bernoulli") != "bernoulli":
        raise ValueError(f"loss_fn={describe_loss(loss_fn)} reads Bernoulli logits, but the model's likelihood is "
                         f"{model.config.likelihood!r}; train it with KLWarmup(warmup_epochs) instead")
    train_images = check_images(train_images, model.config, "train_images")
    test_images = check_images(test_images, model.config, "test_images")
    if config.batch_size > len(train_images):
        raise ValueError(f"batch_size={config.batch_size} is larger than the {len(train_images)} training images")
    strategy = strategy or tf.distribute.get_strategy()
    if config.batch_size % strategy.num_replicas_in_sync:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the "
                         f"{strategy.num_replicas_in_sync} replicas")
    if not all(strategy.extended.variable_created_in_scope(getattr(v, "value", v)) for v in model.variables):
        raise ValueError(f"the model was not built under {type(strategy).__name__}.scope(); "
                         f"build it with build_model(..., strategy=strategy)")
    return train_images, test_images, strategy


def _report_resume(completed_epochs: int, epochs: int, checkpoint_dir: str | None, verbose: bool) -> None:
    if verbose and completed_epochs:
        done = "complete" if completed_epochs >= epochs else f"resuming at epoch {completed_epochs + 1}"
        print(f"Checkpoint in {checkpoint_dir}: {completed_epochs} epoch(s) done, {done}.")


def _raise_if_not_finite(losses: np.ndarray, epoch: int, done: int, steps_per_epoch: int,
                         checkpoint_dir: str | None) -> None:
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        raise NonFiniteLossError(f"loss became {losses[bad[0]]} at epoch {epoch}, step {done + bad[0] + 1} of "
                                 f"{steps_per_epoch}; training stopped"
                                 + (f" (last checkpoint: epoch {epoch - 1})" if checkpoint_dir and epoch > 1 else "")
                                 + ". Lower the learning rate or check the inputs"
                                 + ("; to continue from that checkpoint with a lower learning rate, pass "
                                    "allow_new_settings=True" if checkpoint_dir and epoch > 1 else "") + ".")


class CheckpointMismatchError(ValueError):
    """A checkpoint directory holds another run (architecture, data, loss, batch size, seed), or this run with other
    optimisation settings and no `allow_new_settings=True`."""


class CheckpointLockedError(RuntimeError):
    """Another live run holds the checkpoint directory."""


class CheckpointRecoveryWarning(UserWarning):
    """A checkpoint directory was repaired (damaged files moved aside, files rebuilt, a stale lock taken over)."""


# JSON: plain values only, written atomically

def _jsonable(value, where: str = "value"):
    """`value` as plain JSON types (numpy scalars and arrays, tuples and dataclasses converted); TypeError naming
    `where` (e.g. "row['loss']") for anything JSON cannot hold."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, np.generic):
        return _jsonable(value.item(), where)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), where)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        converted = {}
        for key, item in value.items():
            if isinstance(key, np.generic):
                key = key.item()
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"{where} has the key {key!r} of type {type(key).__name__}; JSON keys are strings")
            converted[str(key)] = _jsonable(item, f"{where}[{key!r}]")
        return converted
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, f"{where}[{index}]") for index, item in enumerate(value)]
    raise TypeError(f"{where} is {_short(value)} of type {type(value).__name__}, which JSON cannot hold; "
                    f"pass numbers, strings, lists or dicts")


def _write_json_atomically(path: str, payload, what: str | None = None) -> None:
    """Write `payload` as JSON to `path` so that a reader sees the old file or the new one, never half of one.

    The payload is converted and encoded before any file is touched; a failure leaves no temporary file behind.
    """
    _write_text_atomically(path, json.dumps(_jsonable(payload, what or os.path.basename(path)), indent=1) + "\n")


class _JSONFileError(ValueError):
    pass


def _read_json(path: str):
    """Parsed JSON of `path`; _JSONFileError saying what is wrong with it (missing, unreadable, not JSON)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise _JSONFileError("missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise _JSONFileError(f"unreadable ({type(error).__name__}: {_first_line(error)})") from None


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = str(error).strip().splitlines()
    text = text[0] if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value, limit: int = 120) -> str:
    text = _strip_addresses(repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _strip_addresses(text: str) -> str:
    return re.sub(r"\s+at 0x[0-9a-fA-F]+", "", text)


# Run signature: what is trained

def _short_hash(text: str, length: int = 10) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def _code_token(code: types.CodeType, docstring=None) -> str:
    """Bytecode, constants (nested code objects recursively, sets sorted) and referenced names of a code object.

    Line numbers, file names and variable names are left out: moving or re-running a definition keeps its token.
    """
    consts = list(code.co_consts)
    if consts and isinstance(docstring, str) and consts[0] == docstring:
        consts = consts[1:]  # the docstring: editing it changes nothing that is trained
    parts = []
    for const in consts:
        if isinstance(const, types.CodeType):
            parts.append("code:" + _code_token(const))
        elif isinstance(const, (frozenset, set)):  # iteration order depends on PYTHONHASHSEED
            parts.append("set:" + repr(sorted(repr(item) for item in const)))
        else:
            parts.append(repr(const))
    return repr((code.co_code.hex(), parts, code.co_names, code.co_argcount, code.co_kwonlyargcount))


def _describe_value(value, depth: int = 0) -> str:
    """A description of a parameter (default, closure cell, partial argument, attribute) that is the same in every
    process: no memory addresses, no values of variables (they change while training), no object counters."""
    if depth > 4:
        return f"<{_type_name(value)}>"
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, np.generic):
        return repr(value.item())
    if isinstance(value, bytes):
        return f"bytes[{hashlib.sha256(value).hexdigest()[:10]}]"
    if isinstance(value, np.ndarray):
        return f"array{value.shape}:{value.dtype.str}[{data_fingerprint(value).rsplit(':', 1)[-1][:10]}]"
    if isinstance(value, (list, tuple)):
        items = ", ".join(_describe_value(item, depth + 1) for item in value)
        return f"[{items}]" if isinstance(value, list) else f"({items}{',' if len(value) == 1 else ''})"
    if isinstance(value, dict):
        items = sorted((_describe_value(key, depth + 1), _describe_value(item, depth + 1))
                       for key, item in value.items())
        return "{" + ", ".join(f"{key}: {item}" for key, item in items) + "}"
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(_describe_value(item, depth + 1) for item in value)) + "}"
    if isinstance(value, types.ModuleType):
        return f"module {value.__name__}"
    if isinstance(value, type):
        return f"class {value.__module__}.{value.__qualname__}"
    if isinstance(value, (tf.Variable,)) or (hasattr(value, "assign") and hasattr(value, "shape")
                                             and hasattr(value, "dtype")):
        return f"variable(shape={tuple(value.shape)}, dtype={getattr(value.dtype, 'name', value.dtype)})"
    if isinstance(value, tf.Tensor):
        return f"tensor({_describe_value(np.asarray(value), depth + 1)})"
    description = _own_description(value)
    if description is not None:
        return description
    if isinstance(value, (tf.Module, tf.__internal__.tracking.Trackable)):  # models, layers, optimizers
        return f"<{_type_name(value)}>"
    if callable(value):
        return _describe_callable(value, depth + 1)
    return f"<{_type_name(value)}>"


def _type_name(value) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def _own_description(value) -> str | None:
    """The `description` attribute (or property, or method without arguments) of an object, if it is a string."""
    try:
        description = getattr(value, "description", None)
        if callable(description) and not isinstance(description, str):
            description = description()
    except Exception:  # noqa: BLE001 - a broken property describes nothing
        return None
    return description if isinstance(description, str) and description else None


def _describe_function(function: types.FunctionType, depth: int) -> str:
    parts = [_code_token(function.__code__, function.__doc__)]
    if function.__defaults__:
        parts.append("defaults=" + _describe_value(function.__defaults__, depth + 1))
    if function.__kwdefaults__:
        parts.append("kwdefaults=" + _describe_value(function.__kwdefaults__, depth + 1))
    for name, cell in zip(function.__code__.co_freevars, function.__closure__ or ()):
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            contents = "<empty>"
        if contents is function:
            parts.append(f"{name}=<itself>")
        else:
            parts.append(f"{name}=" + _describe_value(contents, depth + 1))
    return f"{function.__module__}.{function.__qualname__}[{_short_hash(repr(parts))}]"


def _describe_callable(loss_fn, depth: int) -> str:
    if depth > 4:
        return f"<{_type_name(loss_fn)}>"
    description = _own_description(loss_fn)
    if description is not None:
        return description
    if isinstance(loss_fn, functools.partial):
        arguments = [_describe_value(argument, depth + 1) for argument in loss_fn.args]
        arguments += [f"{key}={_describe_value(item, depth + 1)}" for key, item in sorted(loss_fn.keywords.items())]
        text = f"functools.partial({', '.join([_describe_callable(loss_fn.func, depth + 1)] + arguments)})"
        label = loss_fn.__dict__.get("__name__")  # e.g. "mmd_loss(weight=10)", set by a factory
        return f"{label} = {text}" if isinstance(label, str) else text
    if isinstance(loss_fn, types.FunctionType):
        return _describe_function(loss_fn, depth)
    if callable(getattr(loss_fn, "python_function", None)):  # a tf.function
        return f"tf.function({_describe_callable(loss_fn.python_function, depth + 1)})"
    if isinstance(loss_fn, types.MethodType):
        owner = loss_fn.__self__
        owner_text = (f"class {owner.__module__}.{owner.__qualname__}" if isinstance(owner, type)
                      else _describe_callable(owner, depth + 1) if callable(owner) else _describe_object(owner, depth))
        return f"{owner_text}.{_describe_function(loss_fn.__func__, depth).rsplit('.', 1)[-1]}"
    if isinstance(loss_fn, (types.BuiltinFunctionType, types.BuiltinMethodType, type)):
        return f"{getattr(loss_fn, '__module__', None) or 'builtins'}.{loss_fn.__qualname__}"
    return _describe_object(loss_fn, depth)


def _describe_object(value, depth: int) -> str:
    """A callable object by its class and its public attributes: `module.Class(name=value, ...)`."""
    attributes = getattr(value, "__dict__", None)
    if not isinstance(attributes, dict):
        return _type_name(value)
    described = [f"{name}={_describe_value(item, depth + 1)}" for name, item in sorted(attributes.items())
                 if not name.startswith("_")]
    return f"{_type_name(value)}({', '.join(described)})"


def describe_loss(loss_fn) -> str:
    """A description of a loss function that is the same in every process and differs between different losses.

    - an object with a string `description` attribute (or property): that string;
    - a plain function or lambda: `module.qualname[hash]`, the hash over its bytecode, constants, referenced names,
      defaults and closure values (no memory addresses), so two different lambdas differ;
    - `functools.partial`: the function's description with the partial's arguments;
    - another callable object: its class and public attributes, e.g. `vae_utils.KLWarmup(warmup_epochs=5, ...)`.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn={_short(loss_fn)} is not callable; pass a function loss_fn(model, x) -> scalar")
    return _strip_addresses(_describe_callable(loss_fn, 0))


def data_fingerprint(images) -> str:
    """`shape:dtype:sha256` of an array: the SHA-256 of all of its bytes (in C order), hashed in row blocks so that
    a non-contiguous array is not copied whole. About 0.5 s for CIFAR-10's training set as float32 (614 MB)."""
    array = images if isinstance(images, np.ndarray) else np.asarray(images)
    if array.dtype.hasobject:
        raise TypeError(f"images of dtype {array.dtype} cannot be fingerprinted; pass a numeric array")
    digest = hashlib.sha256()
    if array.flags.c_contiguous:
        digest.update(array.reshape(-1).view(np.uint8))
    else:
        rows = max(1, (64 << 20) // max(1, array[:1].nbytes))
        for start in range(0, len(array), rows):
            digest.update(np.ascontiguousarray(array[start:start + rows]).tobytes())
    shape = "x".join(str(side) for side in array.shape)
    return f"{shape}:{array.dtype.str}:{digest.hexdigest()}"


def _config_dict(config, argument: str) -> dict:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, dict):
        return dict(config)
    raise TypeError(f"{argument}={_short(config)} must be a dataclass instance (or a dict)")


def run_signature(model_config, train_config, loss_fn, train_images) -> dict:
    """What a run trains, as plain JSON values: the architecture with its class name, the training configuration
    whole, the loss's description and the training data's fingerprint."""
    model = {"class": type(model_config).__qualname__, **_config_dict(model_config, "model_config")}
    signature = {"model": model, "training": _config_dict(train_config, "train_config"),
                 "loss": describe_loss(loss_fn), "train_data": data_fingerprint(train_images)}
    # Exactly what run.json and the checkpoint read back: tuples become lists, numpy scalars Python numbers.
    return json.loads(json.dumps(_jsonable(signature, "signature")))


def _flatten(mapping: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value and key in ("model", "training") and not prefix:
            flat.update(_flatten(value, f"{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_ABSENT = "<absent>"


# The folder lock

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    try:  # a killed child that its parent has not reaped yet is a zombie: no longer running
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


class _FolderLock:
    """An exclusive lock on a folder: `run.lock` holds the holder's process id, host and start time.

    On POSIX file systems it is an flock on that file, which the kernel releases when the holder dies, even by
    SIGKILL; where flock is unavailable, the recorded process id is checked instead. The file stays, empty, when
    released (removing it would let two later runs lock two different files).
    """

    NAME = "run.lock"

    def __init__(self, folder: str):
        self.folder, self.path = folder, os.path.join(folder, self.NAME)
        self.handle = None

    def _holder(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as handle:
                text = handle.read().strip()
            holder = json.loads(text) if text else {}
            return holder if isinstance(holder, dict) else {"unreadable": text[:80]}
        except (OSError, ValueError):
            return {}

    def _refuse(self, holder: dict, reason: str = ""):
        pid = holder.get("pid", "?")
        who = ("this same Python process (another CheckpointedRun on this folder is still open)"
               if pid == os.getpid() and holder.get("host") == socket.gethostname()
               else f"process {pid} on {holder.get('host', '?')}")
        raise CheckpointLockedError(
            f"checkpoint_dir={self.folder!r} is in use by another run: {who}, started "
            f"{holder.get('started', '?')}, holds {self.path}{reason}; wait for it to finish or stop it, "
            f"or use another checkpoint_dir")

    def acquire(self) -> str | None:
        """Take the lock; return a note when a lock left by a dead process was taken over."""
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            locked = False
            if fcntl is not None:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    locked = True
                except OSError as error:
                    if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        self._refuse(self._holder())
                    # ENOLCK, EOPNOTSUPP, ...: a file system without flock; check the process id instead.
            previous = self._holder()
            if not locked and previous.get("pid") is not None:
                same_host = previous.get("host") == socket.gethostname()
                if not same_host:
                    self._refuse(previous, f" (its liveness cannot be checked from {socket.gethostname()}; if that "
                                           f"run has ended, delete {self.path})")
                if previous.get("pid") != os.getpid() and _pid_alive(int(previous["pid"])):
                    self._refuse(previous)
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
            handle.flush()
        except BaseException:
            handle.close()
            raise
        self.handle = handle
        if previous.get("pid") is not None:
            return (f"took over the lock {self.path} left by process {previous.get('pid')} on "
                    f"{previous.get('host', '?')}, which is no longer running")
        return None

    def release(self) -> None:
        if self.handle is None:
            return
        with contextlib.suppress(OSError):
            self.handle.seek(0)
            self.handle.truncate()
            self.handle.flush()
        with contextlib.suppress(OSError):
            if fcntl is not None:
                fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
        self.handle.close()
        self.handle = None


# Checkpoints

class _RunRecord(tf.train.experimental.PythonState):
    """The run's record inside every checkpoint: completed epochs, history and run.json's content, as JSON."""

    def __init__(self):
        self.payload: dict = {}

    def serialize(self) -> str:
        return json.dumps(self.payload)

    def deserialize(self, string_value) -> None:
        self.payload = json.loads(string_value)


class _OptimizerState(tf.Module):
    """An optimizer's state without its learning rate: the step count and the slot variables (Adam's moments).

    The learning rate (or schedule) comes from the call that resumes, so a run continued with a new learning rate
    uses it. A LossScaleOptimizer (float16) is checkpointed as its inner optimizer, so checkpoints are the same
    whatever the precision; its dynamic loss scale starts afresh on resume.
    """

    def __init__(self, optimizer):
        super().__init__(name=None)
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        learning_rate = getattr(inner, "_learning_rate", None)
        iterations = inner.iterations
        self.iterations = iterations
        self.slots = [variable for variable in inner.variables
                      if variable is not iterations and variable is not learning_rate]


_RECORD_KEY = "run/.ATTRIBUTES/py_state"
_OLD_FORMAT = "written by an older version (no run record)"
_NO_FILES = "its files are missing"
_CKPT_FILE = re.compile(r"^ckpt-(\d+)\.(index|data-\d{5}-of-\d{5})$")


class CheckpointedRun:
    """A training run's checkpoint folder, as a context manager.

    On entry: take the folder's lock; find the newest checkpoint that restores completely (from the epoch files
    themselves, whatever the `checkpoint` state file says); check that it is a checkpoint of this run (`signature`);
    restore model and optimizer from it; move damaged newer checkpoint files aside into `damaged-<time>/` (never
    deleting them); rebuild history.json and run.json from the checkpoint when they are missing or damaged.
    `save(epoch, row)` after each epoch. On exit: release the lock. With `checkpoint_dir=None` nothing is read or
    written and the history is kept in memory.

    A checkpoint of another architecture, data, loss, batch size or seed is refused (CheckpointMismatchError).
    Optimisation settings (`SETTINGS`) may change only with `allow_new_settings=True`; `epochs` may always grow, and
    the precision may always change (recorded in run.json).
    """

    SETTINGS = ("learning_rate", "lr_schedule", "epochs", "steps_per_execution", "eval_batch_size")
    KEEP = 2

    def __init__(self, checkpoint_dir, model, optimizer, signature: dict, *, allow_new_settings: bool = False,
                 verbose: bool = True):
        if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise TypeError(f"checkpoint_dir={_short(checkpoint_dir)} must be a path (str) or None")
        if not isinstance(signature, dict):
            raise TypeError(f"signature={_short(signature)} must be the dict that run_signature() returns")
        for name, value in (("allow_new_settings", allow_new_settings), ("verbose", verbose)):
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{name}={_short(value)} must be True or False")
        self.checkpoint_dir = (None if checkpoint_dir is None
                               else os.path.abspath(os.path.expanduser(os.fspath(checkpoint_dir))))
        self.model, self.optimizer = model, optimizer
        self.signature = json.loads(json.dumps(_jsonable(signature, "signature")))
        self.allow_new_settings, self.verbose = bool(allow_new_settings), bool(verbose)
        self.completed_epochs = 0
        self.history: list[dict] = []
        self.notes: list[str] = []
        self._lock = None
        self._record = {"signature": self.signature, "settings_changes": [], "versions": _versions()}

    # -- entry ---------------------------------------------------------------------------------------------------

    def __enter__(self) -> "CheckpointedRun":
        if self.checkpoint_dir is None:
            return self
        folder = self.checkpoint_dir
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise NotADirectoryError(f"checkpoint_dir={folder!r} is a file, not a folder; pass a folder path")
        os.makedirs(folder, exist_ok=True)
        self._lock = _FolderLock(folder)
        self._note(self._lock.acquire())
        try:
            self._open(folder)
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _note(self, note: str | None) -> None:
        if not note:
            return
        note = f"Checkpoint folder {self.checkpoint_dir}: {note}"
        self.notes.append(note)
        if self.verbose:
            print(note)
        else:
            warnings.warn(note, CheckpointRecoveryWarning, stacklevel=3)

    def _path(self, name: str) -> str:
        return os.path.join(self.checkpoint_dir, name)

    def _open(self, folder: str) -> None:
        self._check_objects()
        epochs, listed, state_note = self._candidates()
        chosen, damaged = None, []
        for epoch in sorted(epochs | listed, reverse=True):
            problem, record = self._inspect(epoch)
            if problem == _OLD_FORMAT:
                raise CheckpointMismatchError(
                    f"checkpoint_dir={folder!r} holds a checkpoint (epoch {epoch}) written by an older version of "
                    f"this code, without the record of its run; use a new directory to train with this version")
            if problem is None:
                chosen = (epoch, record)
                break
            damaged.append((epoch, problem))

        if chosen is None:
            self._start_without_checkpoint(damaged)
        else:
            epoch, record = chosen
            self._check_signature(record["run"]["signature"], f"the checkpoint of epoch {epoch}")
            self._restore(epoch)
            self.completed_epochs, self.history = epoch, record["history"]
            self._record["settings_changes"] = list(record["run"].get("settings_changes", []))
            self._record_settings_change(record["run"]["signature"], epoch)
            moved_to = self._move_aside([number for number, _ in damaged], extra=("history.json",)) if damaged else None
            if damaged:
                problems = "; ".join(f"epoch {number}: {problem}" for number, problem in damaged)
                self._note(f"resumed from the checkpoint of epoch {epoch}; the newer checkpoint is damaged "
                           f"({problems}) and its files were moved to {moved_to}")
            self._note(state_note)
            self._repair_history(moved_to)
            self._repair_run_json()
        self._write_state_file()
        _write_json_atomically(self._path("run.json"), self._record)

    def _check_objects(self) -> None:
        if not self.model.variables:
            raise ValueError("the model has no variables yet; build it (call it on a batch) before checkpointing")
        if not getattr(self.optimizer, "built", True):
            self.optimizer.build(self.model.trainable_variables)

    def _checkpoint(self, record: _RunRecord | None = None) -> tf.train.Checkpoint:
        checkpoint = tf.train.Checkpoint(model=self.model, optimizer=_OptimizerState(self.optimizer),
                                         run=record or _RunRecord())
        checkpoint.save_counter  # noqa: B018 - created now, so that writing and restoring hold the same objects
        return checkpoint

    def _candidates(self):
        """Epoch numbers with files in the folder, those the state file lists, and a note if it is damaged."""
        epochs = set()
        for name in os.listdir(self.checkpoint_dir):
            match = _CKPT_FILE.match(name)
            if match:
                epochs.add(int(match.group(1)))
        listed, note = set(), None
        state_path = self._path("checkpoint")
        if os.path.exists(state_path):
            try:
                with open(state_path, encoding="utf-8") as handle:
                    lines = [line.strip() for line in handle.read().splitlines() if line.strip()]
                valid = all(re.fullmatch(r'(model_checkpoint_path|all_model_checkpoint_paths): "[^"]*"'
                                         r'|(all_model_checkpoint_timestamps|last_preserved_timestamp): [0-9.e+-]+',
                                         line) for line in lines) and lines
            except (OSError, UnicodeDecodeError):
                lines, valid = [], False
            if valid:
                for line in lines:
                    match = re.search(r'"(?:.*[/\\])?ckpt-(\d+)"', line)
                    if match:
                        listed.add(int(match.group(1)))
            elif epochs:
                note = ("the checkpoint state file `checkpoint` was unreadable; the epoch files themselves were "
                        "used, and the state file rewritten")
        return epochs, listed, note

    def _inspect(self, epoch: int):
        """(None, record) if the checkpoint of `epoch` reads back completely, else (what is wrong, None)."""
        prefix = self._path(f"ckpt-{epoch}")
        if not os.path.exists(prefix + ".index"):
            has_data = any(name.startswith(f"ckpt-{epoch}.data-") for name in os.listdir(self.checkpoint_dir))
            return ("the index file is missing" if has_data else _NO_FILES), None
        try:
            reader = tf.train.load_checkpoint(prefix)
            for key in reader.get_variable_to_shape_map():
                reader.get_tensor(key)  # reads every byte; the bundle format checks each tensor's CRC32C
            if not reader.has_tensor(_RECORD_KEY):
                return _OLD_FORMAT, None
            raw = reader.get_tensor(_RECORD_KEY)
            record = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))
            if (record.get("epoch") != epoch or not isinstance(record.get("history"), list)
                    or len(record["history"]) != epoch or not isinstance(record.get("run"), dict)
                    or not isinstance(record["run"].get("signature"), dict)):
                return "its run record is inconsistent", None
        except Exception as error:  # noqa: BLE001 - whatever the reason, this checkpoint does not restore
            return f"{type(error).__name__}: {_first_line(error, 100)}", None
        return None, record

    def _restore(self, epoch: int) -> None:
        prefix = self._path(f"ckpt-{epoch}")
        status = self._checkpoint().restore(prefix)
        try:
            status.assert_existing_objects_matched()
        except AssertionError as error:
            raise CheckpointMismatchError(
                f"checkpoint_dir={self.checkpoint_dir!r}: the checkpoint of epoch {epoch} does not hold every "
                f"variable of this model and optimizer ({_first_line(error, 160)}); use a new directory") from None
        status.expect_partial()

    def _start_without_checkpoint(self, damaged) -> None:
        """No checkpoint restores: refuse if run.json names another run, else move leftovers aside and start."""
        history_rows = None
        try:
            history_rows = _read_json(self._path("history.json"))
        except _JSONFileError:
            pass
        if not damaged and not (isinstance(history_rows, list) and history_rows):
            return  # a new run (or one killed before its first epoch ended)
        try:
            saved = _read_json(self._path("run.json"))
            if isinstance(saved, dict) and isinstance(saved.get("signature"), dict):
                self._check_signature(saved["signature"], "run.json", identity_only=True)
        except _JSONFileError:
            pass
        moved_to = self._move_aside([number for number, _ in damaged], extra=("history.json", "run.json"))
        _write_json_atomically(self._path("history.json"), [])  # a copy of the old one is in `moved_to`
        with_files = [(number, problem) for number, problem in damaged if problem != _NO_FILES]
        if with_files:
            problems = "; ".join(f"epoch {number}: {problem}" for number, problem in with_files)
            self._note(f"no checkpoint restores completely ({problems}); starting at epoch 1, and the damaged "
                       f"files were moved to {moved_to}")
        else:
            listed = (f" (the state file lists epoch(s) {', '.join(str(number) for number, _ in damaged)})"
                      if damaged else "")
            rows = len(history_rows) if isinstance(history_rows, list) else 0
            self._note(f"history.json lists {rows} epoch(s) but no checkpoint files exist{listed}; starting at "
                       f"epoch 1, and the old history.json and run.json were moved to {moved_to}")

    # -- signature -----------------------------------------------------------------------------------------------

    def _classify(self, saved: dict):
        """(differences of identity, differences of settings) between a saved signature and this run's."""
        old, new = _flatten(saved), _flatten(self.signature)
        identity, settings = [], []
        for key in sorted(set(old) | set(new), key=lambda k: (k.split(".")[0] != "model", k)):
            before, after = old.get(key, _ABSENT), new.get(key, _ABSENT)
            if before == after:
                continue
            text = f"{key}: checkpoint has {_short(before, 200)}, this run has {_short(after, 200)}"
            field = key[len("training."):] if key.startswith("training.") else None
            if field == "epochs" and _is_number(before) and _is_number(after) and after >= before:
                continue  # more epochs: the run goes on
            if field == "precision":
                continue  # variables and optimizer state are float32 in every precision: a run may change it
            (settings if field in self.SETTINGS else identity).append((key, before, after, text))
        return identity, settings

    def _check_signature(self, saved: dict, source: str, identity_only: bool = False) -> None:
        identity, settings = self._classify(saved)
        folder = self.checkpoint_dir
        if identity:
            also = f"; settings also differ: {'; '.join(item[3] for item in settings)}" if settings else ""
            raise CheckpointMismatchError(
                f"checkpoint_dir={folder!r} holds another run ({'; '.join(item[3] for item in identity)}{also}) "
                f"according to {source}; use a new directory, or move {folder} away to start again")
        if settings and not identity_only and not self.allow_new_settings:
            raise CheckpointMismatchError(
                f"checkpoint_dir={folder!r} holds this model trained with other optimisation settings "
                f"({'; '.join(item[3] for item in settings)}); to continue it with the new settings pass "
                f"allow_new_settings=True, or use a new directory")

    def _record_settings_change(self, saved: dict, epoch: int) -> None:
        _, settings = self._classify(saved)
        old, new = _flatten(saved), _flatten(self.signature)
        changed = {key: [before, after] for key, before, after, _ in settings}
        grown = {key: [old.get(key), new.get(key)] for key in ("training.epochs", "training.precision")
                 if old.get(key) != new.get(key) and key not in changed}
        if changed or grown:
            self._record["settings_changes"].append({"after_epoch": epoch, "changed": {**changed, **grown},
                                                     "time": time.strftime("%Y-%m-%d %H:%M:%S")})

    # -- repairs -------------------------------------------------------------------------------------------------

    def _move_aside(self, epochs, extra=()) -> str:
        """Move the files of `epochs` (and copies of `extra` files) into a new `damaged-<time>` sub-folder."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target, suffix = self._path(f"damaged-{stamp}"), 1
        while os.path.exists(target):
            suffix += 1
            target = self._path(f"damaged-{stamp}-{suffix}")
        os.makedirs(target)
        for name in sorted(os.listdir(self.checkpoint_dir)):
            match = _CKPT_FILE.match(name)
            if match and int(match.group(1)) in epochs:
                os.replace(self._path(name), os.path.join(target, name))
        for name in extra:
            if os.path.isfile(self._path(name)):
                shutil.copy2(self._path(name), os.path.join(target, name))
        return target

    def _repair_history(self, moved_to: str | None) -> None:
        path = self._path("history.json")
        try:
            rows = _read_json(path)
            problem = None if isinstance(rows, list) and all(isinstance(row, dict) for row in rows) else \
                "not a list of rows"
        except _JSONFileError as error:
            rows, problem = None, str(error)
        if problem is None and (rows[: self.completed_epochs] == self.history
                                or rows == self.history[: len(rows)]):
            # One row more than the checkpoint (killed between the two writes, or the row of a damaged epoch) or
            # fewer (killed after the checkpoint's write): the checkpoint's history is the run's.
            if rows != self.history:
                _write_json_atomically(path, self.history)
            return
        if problem is None:
            problem = "disagreed with the checkpoint"
        kept = ""
        if os.path.exists(path):
            moved_to = moved_to or self._move_aside([], extra=())
            shutil.copy2(path, os.path.join(moved_to, "history.json"))
            kept = f" (the old file is kept in {moved_to})"
        _write_json_atomically(path, self.history)
        self._note(f"history.json was {problem}; rebuilt from the checkpoint of epoch {self.completed_epochs}{kept}")

    def _repair_run_json(self) -> None:
        path = self._path("run.json")
        try:
            saved = _read_json(path)
            if isinstance(saved, dict) and isinstance(saved.get("signature"), dict):
                return  # rewritten from the checkpoint's record and this run's settings on entry anyway
            problem = "not a run record"
        except _JSONFileError as error:
            problem = str(error)
        self._note(f"run.json was {problem}; rebuilt from the checkpoint of epoch {self.completed_epochs}")

    def _write_state_file(self) -> None:
        """The `checkpoint` state file that tf.train.latest_checkpoint reads: the epochs present, newest last."""
        present = sorted({int(m.group(1)) for m in map(_CKPT_FILE.match, os.listdir(self.checkpoint_dir)) if m})
        present = [epoch for epoch in present if epoch <= self.completed_epochs]
        if not present:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._path("checkpoint"))
            return
        lines = [f'model_checkpoint_path: "ckpt-{present[-1]}"']
        lines += [f'all_model_checkpoint_paths: "ckpt-{epoch}"' for epoch in present]
        _write_text_atomically(self._path("checkpoint"), "\n".join(lines) + "\n")

    # -- saving --------------------------------------------------------------------------------------------------

    def save(self, epoch: int, row: dict) -> None:
        """Record epoch `epoch` (the next one): checkpoint with the history inside, then history.json, then delete
        the checkpoints older than the last `KEEP`, only once the new one has been read back completely."""
        if not _is_int(epoch) or epoch != self.completed_epochs + 1:
            raise ValueError(f"epoch={epoch!r} must be the next epoch, {self.completed_epochs + 1}")
        if not isinstance(row, dict):
            raise TypeError(f"row={_short(row)} must be a dict of the epoch's values")
        row = _jsonable(row, "row")
        epoch = int(epoch)
        history = self.history + [row]
        if self.checkpoint_dir is not None:
            if self._lock is None:
                raise RuntimeError("CheckpointedRun.save() needs the run opened: `with CheckpointedRun(...) as run`")
            record = _RunRecord()
            record.payload = {"epoch": epoch, "history": history, "run": self._record}
            self._checkpoint(record).write(self._path(f"ckpt-{epoch}"))
            problem, _ = self._inspect(epoch)
            if problem is not None:
                raise OSError(f"the checkpoint of epoch {epoch} in {self.checkpoint_dir} does not read back "
                              f"({problem}); the checkpoint of epoch {epoch - 1} is kept. Check the disk")
            self.completed_epochs, self.history = epoch, history
            for name in os.listdir(self.checkpoint_dir):  # only now that the new checkpoint reads back completely
                match = _CKPT_FILE.match(name)
                if match and int(match.group(1)) <= epoch - self.KEEP:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self._path(name))
            self._write_state_file()
            _write_json_atomically(self._path("history.json"), history)
        else:
            self.completed_epochs, self.history = epoch, history


def _write_text_atomically(path: str, text: str) -> None:
    """Write `text` to `path` through a synced temporary file and a rename; a failure leaves no temporary behind."""
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                         dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _versions() -> dict:
    return {"python": sys.version.split()[0], "tensorflow": tf.__version__, "numpy": np.__version__}


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------

def map_batches(model: CVAE, function: Callable, images: np.ndarray, batch_size: int = 1000, **kwargs) -> np.ndarray:
    """Apply `function(model, x, **kwargs)` to `images` in batches and concatenate the per-example results.

    The compiled function is kept on the model, keyed by `function` and `kwargs`, with the batch size left open, so
    each evaluation traces once per model however often it runs.
    """
    _check_model("model", model)
    _check_callable("function", function)
    images = check_images(images, model.config)
    batch_size = _check_int("batch_size", batch_size, 1)
    # A plain attribute, set past Keras's attribute tracking: the functions live and die with their model.
    compiled = model.__dict__.setdefault("_compiled_evaluations", {})
    key = (function, tuple(sorted(kwargs.items())))
    if key not in compiled:
        signature = [tf.TensorSpec((None,) + images.shape[1:], tf.float32)]
        compiled[key] = tf.function(functools.partial(function, model, **kwargs), input_signature=signature)
    outputs = [compiled[key](batch).numpy() for batch in make_dataset(images, min(batch_size, len(images)))]
    return np.concatenate(outputs)


def bernoulli_log_prob(x, logits):
    """log p(x|z) per example under independent Bernoulli pixels, summed over height, width and channels."""
    return -tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(logits=logits, labels=x), axis=[1, 2, 3])


def reconstruction_log_prob(model: CVAE, x, decoder_output, training: bool = False):
    """log p(x|z) per example, summed over height, width and channels: Bernoulli pixels for the homework's CVAE."""
    if isinstance(model, ExtendedCVAE):
        return model.reconstruction_log_prob(x, decoder_output, training)
    return bernoulli_log_prob(x, decoder_output)


def kl_divergence_to_standard_normal(mean, logvar):
    """Analytic KL(N(mean, exp(logvar)) || N(0, I)) per example (Kingma & Welling 2014, appendix B)."""
    return 0.5 * tf.reduce_sum(tf.exp(logvar) + tf.square(mean) - 1.0 - logvar, axis=1)


def elbo_per_example(model: CVAE, x, analytic_kl: bool = False, kl_weight=1.0, training: bool = False):
    """Single-sample ELBO log p(x|z) - KL per example; KL by Monte Carlo (as `compute_loss`) or in closed form."""
    mean, logvar = model.encode(x)
    z = model.reparameterize(mean, logvar)
    logpx_z = reconstruction_log_prob(model, x, model.decode(z), training)
    if analytic_kl:
        kl = kl_divergence_to_standard_normal(mean, logvar)
    else:
        kl = log_normal_pdf(z, mean, logvar) - log_normal_pdf(z, 0.0, 0.0)
    return logpx_z - kl_weight * kl


def evaluate_elbo(model: CVAE, images: np.ndarray, batch_size: int = 1000, analytic_kl: bool = False) -> float:
    """Mean single-sample ELBO over `images` in nats (KL by Monte Carlo, or in closed form when `analytic_kl`)."""
    analytic_kl = _check_bool("analytic_kl", analytic_kl)
    return float(np.mean(map_batches(model, elbo_per_example, images, batch_size, analytic_kl=analytic_kl)))


def _latent_mean(model, x):
    return model.encode(x)[0]


def _reconstruction(model, x):
    return model.decode(model.encode(x)[0], apply_sigmoid=True)


def encode_means(model: CVAE, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Latent means E_q[z|x] of all `images`, shape (N, latent_dim)."""
    return map_batches(model, _latent_mean, images, batch_size)


def reconstruct(model: CVAE, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Mean images decoded from the latent means of `images` (no sampling), in [0, 1]."""
    return map_batches(model, _reconstruction, images, batch_size)


def psnr(images: np.ndarray, reconstructions: np.ndarray) -> float:
    """Mean over images of the peak signal-to-noise ratio 10 log10(1 / MSE) in dB, for values in [0, 1]."""
    images, reconstructions = np.asarray(images), np.asarray(reconstructions)
    if images.shape != reconstructions.shape or images.ndim != 4 or images.size == 0:
        raise ValueError(f"images {images.shape} and reconstructions {reconstructions.shape} must be non-empty "
                         f"(N, H, W, C) arrays of one shape")
    for name, array in (("images", images), ("reconstructions", reconstructions)):
        if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
            raise ValueError(f"{name} must hold finite numbers (dtype {array.dtype})")
    mse = np.mean((images.astype(np.float64) - reconstructions) ** 2, axis=(1, 2, 3))
    return float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))))


def active_units(latent_means: np.ndarray, threshold: float = 0.01) -> int:
    """Number of latent dimensions whose mean code varies over the data by more than `threshold` (Burda et al.)."""
    latent_means = _check_codes("latent_means", latent_means)
    threshold = _check_number("threshold", threshold, minimum=0.0)
    return int(np.sum(np.var(latent_means, axis=0) > threshold))


def check_labels(labels, count: int, num_classes: int, name: str = "labels") -> np.ndarray:
    """Return `labels` as a flat int64 array after checking: integers in [0, num_classes), one per image."""
    labels = np.asarray(labels)
    if labels.size and not (np.issubdtype(labels.dtype, np.integer)
                            or (np.issubdtype(labels.dtype, np.floating) and np.all(np.mod(labels, 1) == 0))):
        raise ValueError(f"{name} must be integer class indices, got dtype {labels.dtype}")
    labels = labels.reshape(-1) if labels.ndim == 2 and labels.shape[1:] == (1,) else labels
    if labels.ndim != 1 or len(labels) != count:
        raise ValueError(f"{name} has shape {labels.shape}; expected one label per image ({count})")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name} holds values in [{labels.min()}, {labels.max()}]; classes are 0..{num_classes - 1}")
    return labels.astype(np.int64)


def linear_probe_accuracy(train_codes, train_labels, test_codes, test_labels, max_train: int | None = None,
                          seed: int = 0) -> float:
    """Test accuracy of a logistic regression fitted on the standardized training codes (`max_train` of them if set)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    train_codes, test_codes = _check_codes("train_codes", train_codes), _check_codes("test_codes", test_codes)
    if train_codes.shape[1] != test_codes.shape[1]:
        raise ValueError(f"train_codes {train_codes.shape} and test_codes {test_codes.shape} differ in dimensions")
    any_class = np.iinfo(np.int64).max
    train_labels = check_labels(train_labels, len(train_codes), any_class, "train_labels")
    test_labels = check_labels(test_labels, len(test_codes), any_class, "test_labels")
    max_train, seed = _check_optional_int("max_train", max_train, 2), _check_int("seed", seed, 0)
    chosen = np.random.default_rng(seed).permutation(len(train_codes))[:max_train]
    if len(np.unique(train_labels[chosen])) < 2:
        raise ValueError(f"train_labels hold one class ({np.unique(train_labels[chosen])}) among the "
                         f"{len(chosen)} codes used; a probe needs at least two")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    # One BLAS thread: these small products gain nothing from two, and threads that spin while TensorFlow's own
    # threads hold the cores slow the fit down many times.
    with threadpool_limits(limits=1, user_api="blas"):
        probe.fit(train_codes[chosen], train_labels[chosen])
    return float(probe.score(test_codes, test_labels))


def class_separability(train_codes, train_labels, test_codes, test_labels, seed: int = 0) -> dict[str, float]:
    """Linear-probe test accuracy on all latent dimensions and on the 2-D PCA projection a latent plot shows."""
    from sklearn.decomposition import PCA

    train_codes, seed = _check_codes("train_codes", train_codes, min_rows=2), _check_int("seed", seed, 0)
    if train_codes.shape[1] < 2:
        raise ValueError(f"train_codes have {train_codes.shape[1]} dimension; the 2-D projection needs at least two")
    train_labels = check_labels(train_labels, len(train_codes), np.iinfo(np.int64).max, "train_labels")
    pca = PCA(2, random_state=seed).fit(train_codes)
    majority = np.bincount(np.ravel(train_labels)).argmax()
    return {"probe_accuracy": linear_probe_accuracy(train_codes, train_labels, test_codes, test_labels, seed=seed),
            "probe_accuracy_pca2": linear_probe_accuracy(pca.transform(train_codes), train_labels,
                                                         pca.transform(test_codes), test_labels, seed=seed),
            "majority_class_accuracy": float(np.mean(np.ravel(test_labels) == majority))}


def iwae_log_likelihood(model: CVAE, x, num_samples: int = 64):
    """Importance-weighted bound on log p(x) per example with `num_samples` samples (Burda et al. 2016)."""
    mean, logvar = model.encode(x)
    batch = tf.shape(x)[0]
    mean_k = tf.repeat(mean, num_samples, axis=0)  # (B * k, latent_dim), example-major
    logvar_k = tf.repeat(logvar, num_samples, axis=0)
    z = model.reparameterize(mean_k, logvar_k)
    logpx_z = reconstruction_log_prob(model, tf.repeat(x, num_samples, axis=0), model.decode(z))
    log_weights = logpx_z + log_normal_pdf(z, 0.0, 0.0) - log_normal_pdf(z, mean_k, logvar_k)
    log_weights = tf.reshape(log_weights, (batch, num_samples))  # (B, k)
    return tf.reduce_logsumexp(log_weights, axis=1) - math.log(num_samples)


def iwae_nll(model: CVAE, images: np.ndarray, num_samples: int = 64, batch_size: int = 50) -> float:
    """Mean negative importance-weighted bound -log p(x) over `images`, in nats."""
    num_samples = _check_int("num_samples", num_samples, 1)
    return -float(np.mean(map_batches(model, iwae_log_likelihood, images, batch_size, num_samples=num_samples)))


def bits_per_dim(nll_nats: float, dims: int) -> float:
    """Convert a negative log-likelihood per image in nats to bits per dimension."""
    return _check_number("nll_nats", nll_nats) / (_check_int("dims", dims, 1) * math.log(2.0))


def likelihood_is_proper(model: CVAE, images: np.ndarray) -> bool:
    """Whether log p(x|z) is a distribution over these images: Bernoulli on binary pixels, or a discretized one."""
    images = check_images(images, _check_model("model", model).config)
    if isinstance(model, ExtendedCVAE) and model.config.likelihood != "bernoulli":
        return True
    return bool(np.isin(images, (0.0, 1.0)).all())


def model_metrics(model: CVAE, data: DataSplits, *, iwae_samples: int = 64, iwae_images: int = 2000,
                  batch_size: int = 1000) -> dict:
    """Test-set metrics of a trained model: ELBO, IWAE bound, bits/dim, PSNR, active units, linear probes.

    The IWAE bound is computed on the first `iwae_images` test images, and the ELBO on the same images beside it, so
    that the two can be compared; bits/dim only where the likelihood is a distribution over the pixels.
    """
    _check_model("model", model)
    if not isinstance(data, DataSplits):
        raise TypeError(f"data must be a DataSplits (see prepare_data), got {type(data).__name__}")
    for name, value in (("iwae_samples", iwae_samples), ("iwae_images", iwae_images), ("batch_size", batch_size)):
        _check_int(name, value, 1)
    test_images = check_images(data.test_images, model.config, "data.test_images")
    subset = test_images[:iwae_images]
    nll = iwae_nll(model, subset, iwae_samples)
    train_codes, test_codes = encode_means(model, data.train_images, batch_size), encode_means(model, test_images,
                                                                                               batch_size)
    return {
        "test_elbo": evaluate_elbo(model, test_images, batch_size),
        "test_elbo_analytic_kl": evaluate_elbo(model, test_images, batch_size, analytic_kl=True),
        "iwae_images": len(subset),
        "elbo_on_iwae_images": evaluate_elbo(model, subset, batch_size),
        "iwae_nll_nats": nll,
        "bits_per_dim": bits_per_dim(nll, model.config.image_dims) if likelihood_is_proper(model, subset) else None,
        "psnr_db": psnr(test_images, reconstruct(model, test_images, batch_size)),
        "active_units": active_units(test_codes),
        **class_separability(train_codes, data.train_labels, test_codes, data.test_labels),
    }


def build_model(config: VAEConfig, train_config: TrainConfig = TrainConfig(),
                strategy: tf.distribute.Strategy | None = None) -> CVAE:
    """Build the model for `config` (a `CVAE`, or an `ExtendedCVAE` for an `ExtendedVAEConfig`): seeded, in the
    strategy's scope, computing in the precision that `train_config.precision` chooses."""
    _check_type("config", config, VAEConfig)
    _check_type("train_config", train_config, TrainConfig)
    _check_strategy(strategy)
    set_seed(train_config.seed)
    model_class = ExtendedCVAE if isinstance(config, ExtendedVAEConfig) else CVAE
    previous_policy = tf.keras.mixed_precision.global_policy()
    # Layers take the global policy when they are built; restore it so that nothing else is affected.
    tf.keras.mixed_precision.set_global_policy(choose_precision(train_config.precision))
    try:
        with (strategy or tf.distribute.get_strategy()).scope():
            return model_class(config)
    finally:
        tf.keras.mixed_precision.set_global_policy(previous_policy)


@dataclasses.dataclass
class TrainedModel:
    """A model trained by `train_and_score`: its history and its row of the results table."""

    name: str
    model: CVAE
    history: list[dict]
    result: dict


def train_and_score(name: str, model: CVAE, data: DataSplits, config: TrainConfig, loss_fn: Callable = compute_loss,
                    *, strategy=None, checkpoint_root: str | None = None, on_epoch_end: Callable | None = None,
                    iwae_samples: int = 64, iwae_images: int = 2000, verbose: bool = True) -> TrainedModel:
    """Train `model` on `data` (checkpointed under `checkpoint_root/<name>`), score it (`score_model`), return both."""
    if not isinstance(name, str) or not slug(name):
        raise ValueError(f"name={name!r} must be a string with a letter or digit (it names the checkpoint folder)")
    _check_model("model", model)
    _check_type("data", data, DataSplits, "prepare_data")
    _check_int("iwae_samples", iwae_samples, 1)  # checked now, not after the training
    _check_int("iwae_images", iwae_images, 1)
    checkpoint_root = _check_path("checkpoint_root", checkpoint_root)
    checkpoint_dir = None if checkpoint_root is None else os.path.join(checkpoint_root, slug(name))
    history = main_train_loop(model, data.train_images, data.test_images, config, loss_fn, strategy=strategy,
                              checkpoint_dir=checkpoint_dir, on_epoch_end=on_epoch_end, verbose=verbose)
    return score_model(name, model, history, data, loss_fn, iwae_samples=iwae_samples, iwae_images=iwae_images,
                       batch_size=config.eval_batch_size, verbose=verbose)


def score_model(name: str, model: CVAE, history: list[dict], data: DataSplits, loss_fn: Callable = compute_loss, *,
                iwae_samples: int = 64, iwae_images: int = 2000, batch_size: int = 1000,
                verbose: bool = True) -> TrainedModel:
    """Score a model that `main_train_loop` trained (its `history`) and return it with its results row.

    The row's test ELBO is the one printed after the last epoch, so that the table and the log agree.
    """
    if not history:
        raise ValueError("history is empty; pass what main_train_loop returned")
    started = time.perf_counter()
    metrics = model_metrics(model, data, iwae_samples=iwae_samples, iwae_images=iwae_images, batch_size=batch_size)
    metrics["test_elbo"] = history[-1]["test_elbo"]
    loss = getattr(loss_fn, "description", None) or getattr(loss_fn, "__name__", type(loss_fn).__name__)
    result = {"name": name, "dataset": data.name, "loss": loss, "epochs": len(history),
              "train_images": len(data.train_images),
              "train_seconds": round(sum(row["seconds"] for row in history), 1), **metrics}
    if verbose:
        print(f"{name}: scored in {time.perf_counter() - started:.0f} s")
    return TrainedModel(name, model, history, result)


def results_table(results: Sequence[dict]):
    """The results rows as a pandas DataFrame indexed by model name, with readable column names."""
    import pandas as pd

    results = list(_check_nonempty("results", results))
    if not all(isinstance(row, Mapping) and "name" in row for row in results):
        raise ValueError("results must be result rows (dicts with a 'name'), as train_and_score returns in .result")
    return pd.DataFrame(results).set_index("name")


def write_results(path: str, results: Sequence[dict], **extra) -> None:
    """Write the results rows, and `extra` items such as the run's wall time, to a JSON file."""
    path = _check_path("path", path, allow_none=False)
    results = list(_check_nonempty("results", results))
    if not all(isinstance(row, Mapping) for row in results):
        raise TypeError("results must be a sequence of result rows (dicts), as train_and_score returns in .result")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    _write_json_atomically(path, {**extra, "models": [dict(row) for row in results]})  # NumPy numbers converted


def slug(name: str) -> str:
    """A file-name-safe form of a model or figure name: lower case, runs of other characters as one underscore."""
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")


def describe_machine() -> str:
    """One line naming the machine: Colab or not, CPU cores, accelerators (GPU models), Python, TensorFlow, Keras."""
    accelerators = [d.device_type for d in tf.config.list_logical_devices() if d.device_type in ("GPU", "TPU")]
    devices = ", ".join(f"{accelerators.count(t)} {t}" for t in sorted(set(accelerators))) or "no accelerator"
    models = set()
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            models.add(tf.config.experimental.get_device_details(gpu).get("device_name", ""))
        except Exception:  # noqa: BLE001 - the model name is a nicety
            pass
    devices += f" ({', '.join(sorted(models - {''}))})" if models - {""} else ""
    where = "Google Colab, " if "google.colab" in sys.modules else ""
    return (f"{where}{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, {devices}, "
            f"Python {platform.python_version()}, TensorFlow {tf.__version__}, "
            f"Keras {getattr(tf.keras, '__version__', 'unknown')}")


def get_allClass_encodings(model: CVAE, images: np.ndarray, labels: np.ndarray):  # noqa: N802 - the homework's name
    """Group the latent means of `images` by class; return ({class: (n_c, latent_dim) codes}, (classes, latent) means)."""
    images = check_images(images, _check_model("model", model).config)
    labels = check_labels(labels, len(images), np.iinfo(np.int64).max)
    codes = encode_means(model, images)
    classes = np.unique(labels)
    codes_by_class = {int(c): codes[labels == c] for c in classes}
    class_means = np.stack([codes_by_class[int(c)].mean(axis=0) for c in classes])
    return codes_by_class, class_means


# ---------------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------------

def _save(figure: Figure, path: str | None) -> Figure:
    path = _check_path("path", path)
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        figure.savefig(path, dpi=100, bbox_inches="tight")
    return figure


def _show_image(axis, image) -> None:
    image = np.asarray(image)
    if image.shape[-1] == 1:
        axis.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
    else:
        axis.imshow(np.clip(image, 0.0, 1.0))
    axis.set_xticks([])
    axis.set_yticks([])


def plot_image_grid(images, ncols: int = 10, titles: Sequence[str] | None = None, suptitle: str | None = None,
                    row_labels: Sequence[str] | None = None, cell: float = 1.1, path: str | None = None) -> Figure:
    """Show `images` (N, H, W, C) in a grid, with optional per-image titles and a label left of each row."""
    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (N, H, W, C) array, got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.number) or images.dtype == np.bool_:
        raise TypeError(f"images must hold numbers, got dtype {images.dtype}")
    ncols = _check_int("ncols", ncols, 1)
    cell = _check_number("cell", cell, minimum=0.0, inclusive=False)
    nrows = math.ceil(len(images) / ncols)
    for argument, labels, count in (("titles", titles, len(images)), ("row_labels", row_labels, nrows)):
        if labels is not None and len(labels) != count:
            raise ValueError(f"{argument} has {len(labels)} entries for {count} {argument.split('_')[0]}s")
    figure = Figure(figsize=(cell * ncols + (1.6 if row_labels else 0), cell * nrows + (0.4 if suptitle else 0)))
    axes = figure.subplots(nrows, ncols, squeeze=False)
    for index, axis in enumerate(axes.flat):
        if index < len(images):
            _show_image(axis, images[index])
            if titles is not None:
                axis.set_title(titles[index], fontsize=8)
        else:
            axis.axis("off")
    for row, label in enumerate(row_labels or []):
        axes[row, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    if suptitle:
        figure.suptitle(suptitle)
    return _save(figure, path)


def plot_one_image_per_class(images, labels, class_names: Sequence[str], path: str | None = None) -> Figure:
    """Show the first image of every class, titled with its class name."""
    images = np.asarray(images)
    class_names = _check_nonempty("class_names", class_names)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (N, H, W, C) array, got shape {images.shape}")
    labels = check_labels(labels, len(images), len(class_names))
    missing = [name for c, name in enumerate(class_names) if not np.any(labels == c)]
    if missing:
        raise ValueError(f"labels hold no image of the classes {missing}")
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in range(len(class_names))]
    return plot_image_grid(images[firsts], ncols=len(class_names), titles=list(class_names), cell=1.2, path=path)


def generate_and_display_images(model: CVAE, epoch: int, test_sample, path: str | None = None) -> Figure:
    """Show `test_sample` (top row) above its reconstructions through a sampled code (bottom row)."""
    epoch = _check_int("epoch", epoch, 0)
    test_sample = check_images(test_sample, _check_model("model", model).config, "test_sample")
    mean, logvar = model.encode(test_sample)
    z = model.reparameterize(mean, logvar)
    predictions = model.sample(z)  # decode with apply_sigmoid=True: pixel probabilities in [0, 1] for display
    figure = plot_image_grid(np.concatenate([test_sample, predictions.numpy()]), ncols=len(test_sample), cell=0.8,
                             suptitle=f"Test images (top) and reconstructions (bottom), epoch {epoch}")
    return _save(figure, path)


def plot_latent_space(codes_by_class: Mapping[int, np.ndarray], class_names: Sequence[str],
                      max_points_per_class: int = 400, title: str = "Latent means", seed: int = 0,
                      path: str | None = None) -> Figure:
    """Scatter the latent codes, one colour per class, class means marked and named.

    Codes of more than two dimensions are projected on their first two principal components; 2-d codes are drawn
    as they are.
    """
    from sklearn.decomposition import PCA

    if not isinstance(codes_by_class, Mapping) or not codes_by_class:
        raise ValueError("codes_by_class is empty or not a mapping; pass the first result of get_allClass_encodings")
    class_names = _check_nonempty("class_names", class_names)
    max_points_per_class = _check_int("max_points_per_class", max_points_per_class, 1)
    seed = _check_int("seed", seed, 0)
    if any(np.ndim(c) != 2 for c in codes_by_class.values()) or len({np.shape(c)[1] for c in
                                                                       codes_by_class.values()}) != 1:
        raise ValueError(f"codes_by_class must map classes to (n, latent_dim) arrays of one latent_dim, got shapes "
                         f"{[np.shape(c) for c in codes_by_class.values()]}")
    codes = _check_codes("codes_by_class", np.concatenate([np.asarray(c) for c in codes_by_class.values()]))
    if any(len(c) == 0 for c in codes_by_class.values()):
        raise ValueError(f"codes_by_class has classes without codes: "
                         f"{[label for label, c in codes_by_class.items() if len(c) == 0]}")
    unknown = [label for label in codes_by_class if not _is_int(label) or not 0 <= label < len(class_names)]
    if unknown:
        raise ValueError(f"codes_by_class has classes {unknown} that class_names ({len(class_names)}) does not name")
    if codes.shape[1] > 2:
        pca = PCA(n_components=2, random_state=seed).fit(codes)
        project = pca.transform
        explained = pca.explained_variance_ratio_
        labels = [f"PC {i + 1} ({explained[i]:.0%} of variance)" for i in range(2)]
    else:
        project = np.asarray  # nothing to project: the axes are the code's own dimensions
        labels = ["z[0]", "z[1]"]
    rng = np.random.default_rng(seed)
    figure = Figure(figsize=(7.5, 6))
    axis = figure.subplots()
    for index, (label, class_codes) in enumerate(codes_by_class.items()):
        class_codes = np.asarray(class_codes)
        chosen = project(class_codes[rng.permutation(len(class_codes))[:max_points_per_class]])
        colour = f"C{index % 10}"
        axis.scatter(chosen[:, 0], chosen[:, 1 % chosen.shape[1]], s=6, alpha=0.5, color=colour,
                     label=class_names[label])
        centre = project(class_codes.mean(axis=0, keepdims=True))[0]
        axis.scatter(centre[0], centre[1 % len(centre)], s=140, color=colour, edgecolors="black", marker="X")
        axis.annotate(class_names[label], (centre[0], centre[1 % len(centre)]), xytext=(6, 6),
                      textcoords="offset points", fontsize=9, weight="bold",
                      bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": colour, "alpha": 0.8})
    axis.set_xlabel(labels[0])
    axis.set_ylabel(labels[1])
    axis.set_title(title)
    axis.legend(markerscale=3, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(figure, path)


def _class_index(value, class_names: Sequence[str], argument: str) -> int:
    if isinstance(value, str) and value in class_names:
        return list(class_names).index(value)
    if _is_int(value) and 0 <= value < len(class_names):
        return int(value)
    raise ValueError(f"{argument}={value!r} is not a class; use an index 0..{len(class_names) - 1} or a name "
                     f"from {list(class_names)}")


def _decode_line(model: CVAE, start, end, steps) -> np.ndarray:
    """Decode `steps` codes evenly spaced (np.linspace) from `start` to `end`, in one batched call."""
    _check_model("model", model)
    if not _is_int(steps) or steps < 2:
        raise ValueError(f"steps={steps!r} must be an integer >= 2 (the start and the end)")
    codes = np.linspace(start, end, int(steps)).astype(np.float32)  # (steps, latent_dim)
    return model.decode(codes, apply_sigmoid=True).numpy()


def walk_src_to_dst(model: CVAE, src_class, dst_class, class_means: np.ndarray, class_names: Sequence[str],
                    steps: int = 10, path: str | None = None) -> Figure:
    """Decode `steps` codes evenly spaced from the mean code of `src_class` to that of `dst_class`."""
    _check_model("model", model)
    src = _class_index(src_class, class_names, "src_class")
    dst = _class_index(dst_class, class_names, "dst_class")
    if np.ndim(class_means) != 2 or len(class_means) != len(class_names):
        raise ValueError(f"class_means has shape {np.shape(class_means)}; walk_src_to_dst needs one mean code per "
                         f"class name ({len(class_names)} rows), as get_allClass_encodings returns for all classes")
    images = _decode_line(model, class_means[src], class_means[dst], steps)
    titles = [class_names[src]] + [f"{t:.2f}" for t in np.linspace(0, 1, steps)[1:-1]] + [class_names[dst]]
    return plot_image_grid(images, ncols=steps, titles=titles, cell=1.1, path=path,
                           suptitle=f"Walk between class means: {class_names[src]} to {class_names[dst]}")


def walk_between_images(model: CVAE, src_image, dst_image, steps: int = 10, names: tuple[str, str] = ("source",
                        "destination"), path: str | None = None) -> Figure:
    """Decode `steps` codes evenly spaced from the latent mean of one image to that of another, beside the two."""
    _check_model("model", model)
    if not (isinstance(names, (tuple, list)) and len(names) == 2 and all(isinstance(n, str) for n in names)):
        raise ValueError(f"names={names!r} must be two strings (source, destination)")
    _check_int("steps", steps, 2)
    if np.shape(src_image) != np.shape(dst_image) or np.ndim(src_image) != 3:
        raise ValueError(f"src_image {np.shape(src_image)} and dst_image {np.shape(dst_image)} must be two "
                         f"(H, W, C) images of one shape")
    pair = check_images(np.stack([np.asarray(src_image), np.asarray(dst_image)]), model.config, "src/dst image")
    start, end = encode_means(model, pair)
    images = np.concatenate([pair[:1], _decode_line(model, start, end, steps), pair[1:]])
    titles = [f"{names[0]} (input)"] + [f"{t:.2f}" for t in np.linspace(0, 1, steps)] + [f"{names[1]} (input)"]
    return plot_image_grid(images, ncols=steps + 2, titles=titles, cell=1.1, path=path,
                           suptitle=f"Walk between two test images: {names[0]} to {names[1]}")


def plot_prior_samples(model: CVAE, num_samples: int = 40, ncols: int = 10, seed: int = 0,
                       title: str = "Samples decoded from the prior N(0, I)", path: str | None = None) -> Figure:
    """Decode codes drawn from the prior N(0, I) in one batched call and show them in a grid."""
    _check_model("model", model)
    num_samples, seed = _check_int("num_samples", num_samples, 1), _check_int("seed", seed, 0)
    eps = tf.random.stateless_normal((num_samples, model.config.latent_dim), seed=(seed, 0))
    return plot_image_grid(model.sample(eps).numpy(), ncols=ncols, cell=0.9, path=path, suptitle=title)


def draw_architecture(model: CVAE, prefix: str, figures_dir: str) -> list[str]:
    """Draw the encoder and the decoder with `tf.keras.utils.plot_model` as `<figures_dir>/<prefix>_<part>.png`.

    Returns the paths of the PNGs written (show them with `IPython.display.Image`). The diagrams need the pydot
    package and graphviz's `dot` program. When either is missing, Keras 3's `plot_model` raises no error inside
    IPython: it prints a message and returns None. So this checks for both first, and that each file was written;
    when a diagram cannot be drawn it prints a one-line note and the text summary (`part.summary()`) instead, and
    returns only the paths written (none, normally).
    """
    _check_model("model", model)
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix={prefix!r} must be a non-empty string (the file names' start)")
    figures_dir = _check_path("figures_dir", figures_dir, allow_none=False)
    problem = ""
    try:
        import pydot  # noqa: PLC0415 - optional: only the diagrams need it
    except ImportError:
        problem = "the pydot package is not installed (pip install pydot)"
    else:
        try:
            pydot.Dot().create()  # runs graphviz's `dot`, as Keras does to check for it
        except Exception:  # noqa: BLE001 - FileNotFoundError, pydot's own errors, ...
            problem = "graphviz's `dot` program is missing (apt-get update && apt-get install -y graphviz)"
    paths, noted = [], False
    for part in (model.encoder, model.decoder):
        if not problem:
            os.makedirs(figures_dir, exist_ok=True)
            path = os.path.join(figures_dir, f"{prefix}_{part.name}.png")
            before = os.stat(path).st_mtime_ns if os.path.exists(path) else None
            try:
                tf.keras.utils.plot_model(part, to_file=path, show_shapes=True, show_layer_names=True, dpi=70)
            except ImportError as error:  # outside IPython Keras raises instead
                problem = (str(error).strip().splitlines() or ["ImportError"])[0]
            else:
                if os.path.exists(path) and os.stat(path).st_mtime_ns != before:
                    paths.append(path)
                    continue
                problem = ("tf.keras.utils.plot_model wrote no file (pydot installed after TensorFlow was imported? "
                           "then restart the session)")
        if not noted:
            print(f"No architecture diagram: {problem}; text summary instead.")
            noted = True
        part.summary()
    return paths


def plot_history(histories: Mapping[str, Sequence[dict]], path: str | None = None) -> Figure:
    """Plot the test-set ELBO per epoch for each named run."""
    if not isinstance(histories, Mapping) or not histories or not all(len(history) for history in histories.values()):
        raise ValueError("histories must map each run's name to a non-empty history from main_train_loop")
    for name, history in histories.items():
        if not all(isinstance(row, Mapping) and {"epoch", "test_elbo"} <= set(row) for row in history):
            raise ValueError(f"histories[{name!r}] must be rows with 'epoch' and 'test_elbo', as main_train_loop "
                             f"returns")
    figure = Figure(figsize=(6, 3.5))
    axis = figure.subplots()
    for name, history in histories.items():
        axis.plot([row["epoch"] for row in history], [row["test_elbo"] for row in history], marker="o", label=name)
    axis.set_xlabel("epoch")
    axis.set_ylabel("test ELBO (nats)")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(figure, path)


# ---------------------------------------------------------------------------------------------------------------------
# Beyond the homework: better likelihoods and decoders (Part 2.2), code diagnostics (Part 3.2), the MMD weight sweep
# ---------------------------------------------------------------------------------------------------------------------

LIKELIHOODS = ("bernoulli", "logistic", "logistic_ar")
UPSAMPLINGS = ("transpose", "resize")
# Causal neighbours (row, column offsets) whose residuals a "logistic_ar" pixel sees: left, up-left, up and up-right.
AR_NEIGHBOURS = ((0, -1), (-1, -1), (-1, 0), (-1, 1))
LOGISTIC_LOG_SCALE_SHIFT = 2.0  # log_scale = decoder output - shift, for the discretized logistic
LOGISTIC_MIN_LOG_SCALE = -7.0  # keeps the bin probabilities representable in float32


@dataclasses.dataclass(frozen=True)
class ExtendedVAEConfig(VAEConfig):
    """A `VAEConfig` with the Part 2.2 options: the likelihood, the decoder's upsampling, a spatial code."""

    likelihood: str = "bernoulli"  # "logistic": discretized logistic; "logistic_ar": plus an autoregressive term
    upsampling: str = "transpose"  # "resize": nearest-neighbour upsampling then a convolution
    spatial_latent: bool = False  # the code is a (grid, grid, latent_dim / grid**2) map that convolutions make

    def __post_init__(self):
        super().__post_init__()
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood={self.likelihood!r} must be one of {LIKELIHOODS}")
        if self.upsampling not in UPSAMPLINGS:
            raise ValueError(f"upsampling={self.upsampling!r} must be one of {UPSAMPLINGS}")
        if not isinstance(self.spatial_latent, (bool, np.bool_)):
            raise ValueError(f"spatial_latent={self.spatial_latent!r} must be True or False")
        if self.spatial_latent:
            if self.encoder_padding != "same":
                raise ValueError("spatial_latent=True must use encoder_padding='same', so that the code grid is the "
                                 "decoder's grid")
            if self.latent_dim % self.grid_size ** 2:
                raise ValueError(f"spatial_latent=True needs latent_dim divisible by grid_size**2 = "
                                 f"{self.grid_size ** 2} (channels per grid cell), got latent_dim={self.latent_dim}")

    @property
    def code_channels(self) -> int:
        """Channels per grid cell of a spatial code."""
        return self.latent_dim // self.grid_size ** 2

    @property
    def decoder_outputs(self) -> int:
        """Channels of the decoder's output: the likelihood's parameters for every image channel of a pixel."""
        if self.likelihood == "logistic_ar":  # location, two log-scales, and a coefficient per residual it sees
            return self.channels * (3 + (len(AR_NEIGHBOURS) + 1) * self.channels)
        return self.channels * {"bernoulli": 1, "logistic": 2}[self.likelihood]


class AutoregressiveHead(tf.keras.layers.Layer):
    """Decoder output of "logistic_ar": the mean model's maps from a k x k convolution, the rest from a 1 x 1 one."""

    def __init__(self, config: ExtendedVAEConfig, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.mean_model = tf.keras.layers.Conv2DTranspose(2 * config.channels, config.kernel_size, strides=1,
                                                          padding="same", dtype="float32")
        # 1 x 1, because the 45 coefficient maps of an RGB image would make a k x k layer 6 times wider.
        self.autoregressive = tf.keras.layers.Conv2D(config.decoder_outputs - 2 * config.channels, 1,
                                                     dtype="float32")

    def call(self, features):
        # The autoregressive maps read the features without training them: the encoder and decoder are trained by
        # the mean model alone, so that the code keeps carrying the image (see ExtendedCVAE.reconstruction_log_prob).
        return tf.concat([self.mean_model(features), self.autoregressive(tf.stop_gradient(features))], axis=-1)


class ExtendedCVAE(CVAE):
    """The homework's `CVAE` with the options of an `ExtendedVAEConfig`: its own decoder head and likelihood."""

    config: ExtendedVAEConfig

    def build_encoder(self, config: ExtendedVAEConfig) -> tf.keras.Sequential:
        if not config.spatial_latent:
            return super().build_encoder(config)
        # Mean and log-variance maps; channel-major flattening puts every mean before every log-variance, so `encode`
        # splits them as it does a dense code.
        return tf.keras.Sequential(
            [tf.keras.Input(shape=(config.img_size, config.img_size, config.channels))]
            + [tf.keras.layers.Conv2D(width, config.kernel_size, strides=config.strides, padding="same",
                                      activation="relu") for width in config.widths]
            + [tf.keras.layers.Conv2D(2 * config.code_channels, config.kernel_size, padding="same", dtype="float32"),
               tf.keras.layers.Permute((3, 1, 2), dtype="float32"),  # (B, 2 * code_channels, grid, grid)
               tf.keras.layers.Flatten(dtype="float32")],  # (B, 2 * latent_dim)
            name="encoder")

    def build_decoder(self, config: ExtendedVAEConfig) -> tf.keras.Sequential:
        grid = config.grid_size
        if config.spatial_latent:
            head = [tf.keras.layers.Reshape((config.code_channels, grid, grid)),
                    tf.keras.layers.Permute((2, 3, 1)),  # (B, grid, grid, code_channels)
                    tf.keras.layers.Conv2D(config.filters, config.kernel_size, padding="same", activation="relu")]
        else:
            head = [tf.keras.layers.Dense(grid * grid * config.filters, activation="relu"),
                    tf.keras.layers.Reshape((grid, grid, config.filters))]
        upsampling = []
        for width in reversed(config.widths):
            if config.upsampling == "transpose":
                upsampling.append(tf.keras.layers.Conv2DTranspose(width, config.kernel_size, strides=config.strides,
                                                                  padding="same", activation="relu"))
            else:  # resize, then convolve: no uneven kernel overlap, so no checkerboard (Odena et al. 2016)
                upsampling += [tf.keras.layers.UpSampling2D(config.strides, interpolation="nearest"),
                               tf.keras.layers.Conv2D(width, config.kernel_size, padding="same", activation="relu")]
        if config.likelihood == "logistic_ar":
            output = AutoregressiveHead(config)
        else:
            output = tf.keras.layers.Conv2DTranspose(config.decoder_outputs, config.kernel_size, strides=1,
                                                     padding="same", dtype="float32")
        return tf.keras.Sequential([tf.keras.Input(shape=(config.latent_dim,))] + head + upsampling + [output],
                                   name="decoder")

    def decode(self, z, apply_sigmoid=False):
        """Return the decoder's output maps, or the image in [0, 1] (Bernoulli means, logistic locations)."""
        output = self.decoder(z)
        if apply_sigmoid:
            # For "logistic_ar" the locations are the image too: decoding pixel by pixel, each at its predicted
            # location, leaves every residual at zero.
            return tf.sigmoid(output[..., :self.config.channels])
        return output

    def reconstruction_log_prob(self, x, decoder_output, training: bool = False):
        """log p(x|z) per example under the configured likelihood, summed over height, width and channels.

        With `training`, a "logistic_ar" model adds the log-probability of its factorized mean model.
        """
        config = self.config
        if config.likelihood == "bernoulli":
            return bernoulli_log_prob(x, decoder_output)
        channels = config.channels
        loc = 2.0 * tf.sigmoid(decoder_output[..., :channels]) - 1.0  # on the [-1, 1] scale
        log_scale = _log_scale(decoder_output[..., channels:2 * channels])
        factorized = tf.reduce_sum(discretized_logistic_log_prob(x, loc, log_scale), axis=[1, 2, 3])
        if config.likelihood == "logistic":
            return factorized
        # "logistic_ar": x = loc + residual, each residual predicted from the residuals before it. Trained on this
        # alone, the prediction from neighbours does the work of `loc` and the code carries less of the image; so
        # `loc` is trained by the factorized likelihood only, and the autoregressive term takes it as given.
        raw_log_scale, raw_coefficients = tf.split(decoder_output[..., 2 * channels:],
                                                   [channels, config.decoder_outputs - 3 * channels], axis=-1)
        ar_loc = _ar_locations(tf.stop_gradient(loc), tf.tanh(raw_coefficients), 2.0 * x - 1.0)
        autoregressive = tf.reduce_sum(discretized_logistic_log_prob(x, ar_loc, _log_scale(raw_log_scale)),
                                       axis=[1, 2, 3])
        return autoregressive + factorized if training else autoregressive


class KLWarmup:
    """ELBO loss whose KL weight rises linearly over the first epochs, against posterior collapse (Bowman et al. 2016).

    The weight in epoch e is min(1, e / (warmup_epochs + 1)); `main_train_loop` calls `start_epoch(e)` each epoch.
    It also trains the factorized mean model of a "logistic_ar" likelihood (`training=True`).
    """

    def __init__(self, warmup_epochs: int = 0):
        self.warmup_epochs = _check_int("warmup_epochs", warmup_epochs, 0)
        self.kl_weight = tf.Variable(self.weight(1), trainable=False, dtype=tf.float32, name="kl_weight")
        self.description = f"KLWarmup(warmup_epochs={self.warmup_epochs})"

    def weight(self, epoch: int) -> float:
        return min(1.0, epoch / (self.warmup_epochs + 1))

    def start_epoch(self, epoch: int) -> None:
        self.kl_weight.assign(self.weight(epoch))

    def __call__(self, model: CVAE, x):
        return -tf.reduce_mean(elbo_per_example(model, x, kl_weight=self.kl_weight, training=True))


def discretized_logistic_log_prob(x, loc, log_scale):
    """Log-probability of 8-bit pixels `x` in [0, 1] under a logistic discretized into 256 bins, per pixel.

    The discretized logistic of PixelCNN++ (Salimans et al. 2017).
    `loc` is on the [-1, 1] scale; the outer bins (pixel values 0 and 255) take all the tail mass, so the 256
    probabilities of one pixel sum to one.
    """
    x = 2.0 * x - 1.0
    inv_scale = tf.exp(-log_scale)
    bin_width = inv_scale * (2.0 / 255.0)  # standardized width of one pixel level
    plus_in = inv_scale * (x - loc + 1.0 / 255.0)  # upper edge of the pixel's bin, standardized
    minus_in = plus_in - bin_width  # lower edge
    log_cdf_plus = -tf.nn.softplus(-plus_in)  # log sigmoid(plus_in): the mass below the upper edge
    log_one_minus_cdf_minus = -tf.nn.softplus(minus_in)  # log (1 - sigmoid(minus_in)): the mass above the lower edge
    # sigmoid(a) - sigmoid(b) = sigmoid(a) (1 - sigmoid(b)) (1 - e^(b - a)) for the bin's mass, and b - a is the same
    # for every pixel value: no cancellation and no special case when the bin is far out in a tail.
    log_bin_factor = tf.math.log(-tf.math.expm1(-bin_width))
    log_prob_mid = log_cdf_plus + log_one_minus_cdf_minus + log_bin_factor
    return tf.where(x < -0.999, log_cdf_plus, tf.where(x > 0.999, log_one_minus_cdf_minus, log_prob_mid))


def _log_scale(raw_log_scale):
    """Log-scale of a discretized logistic from a raw decoder output."""
    # The shift starts the scale at e^-2 rather than e^0 (the decoder's raw outputs start near 0), so that the few
    # epochs of a CPU run are not spent shrinking it; the floor keeps the bin probabilities representable.
    return tf.maximum(raw_log_scale - LOGISTIC_LOG_SCALE_SHIFT, LOGISTIC_MIN_LOG_SCALE)


def _ar_locations(loc, coefficients, x):
    """Locations on [-1, 1] shifted by a linear prediction from the residuals x - loc that come earlier in raster order.

    Each channel sees the residuals of all channels at the left, up-left, up and up-right pixels (`AR_NEIGHBOURS`) and
    of the earlier channels of its own pixel, weighted by per-pixel coefficients that depend on z only.
    """
    residual = x - loc
    _, height, width, channels = residual.shape
    padded = tf.pad(residual, [[0, 0], [1, 0], [1, 1], [0, 0]])  # zeros above, left and right of the image
    seen = [padded[:, 1 + dy:1 + dy + height, 1 + dx:1 + dx + width, :] for dy, dx in AR_NEIGHBOURS]
    seen = tf.concat(seen + [residual], axis=-1)  # (..., (neighbours + 1) * channels)
    # Of the pixel's own residuals, channel k may see only channels 0 .. k-1: a strictly lower-triangular mask.
    mask = np.concatenate([np.ones((len(AR_NEIGHBOURS) * channels, channels)), np.tril(np.ones(channels), -1).T])
    weights = tf.reshape(coefficients, [-1, height, width, seen.shape[-1], channels]) * mask.astype(np.float32)
    return loc + tf.reduce_sum(weights * seen[..., None], axis=-2)


def aggregate_posterior_samples(model: CVAE, images: np.ndarray, batch_size: int = 1000, seed: int = 0) -> np.ndarray:
    """One code z ~ q(z|x) per image, i.e. samples of the aggregate posterior q(z) over `images`, (N, latent_dim)."""
    images = check_images(images, _check_model("model", model).config)
    batch_size, seed = _check_int("batch_size", batch_size, 1), _check_int("seed", seed, 0)
    codes, start = [], 0
    for batch in make_dataset(images, min(batch_size, len(images))):
        mean, logvar = model.encode(batch)
        eps = tf.random.stateless_normal(tf.shape(mean), seed=(seed, start))  # seeded: repeatable summaries
        codes.append((mean + eps * tf.exp(0.5 * logvar)).numpy())
        start += 1
    return np.concatenate(codes)


def mmd_to_prior(codes: np.ndarray, num_prior_samples: int | None = None, seed: int = 0) -> float:
    """Squared MMD between `codes` (N, D) and as many N(0, I) samples, with the kernel of `compute_kernel`.

    Computed in float64 NumPy through ||x||^2 + ||y||^2 - 2 x.y, so thousands of codes need no (N, N, D) tensor.
    """
    codes = _check_codes("codes", codes, min_rows=2)
    num_prior_samples = _check_optional_int("num_prior_samples", num_prior_samples, 2)
    seed = _check_int("seed", seed, 0)
    prior = np.random.default_rng(seed).standard_normal((num_prior_samples or len(codes), codes.shape[1]))

    def mean_kernel(x, y):
        squared = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
        return float(np.exp(-np.maximum(squared, 0.0) / codes.shape[1]).mean())

    return mean_kernel(codes, codes) + mean_kernel(prior, prior) - 2.0 * mean_kernel(codes, prior)


def latent_distribution_summary(codes: np.ndarray, seed: int = 0) -> dict:
    """How far the aggregate code distribution is from the prior N(0, I): MMD and per-dimension moments.

    `codes` are samples of q(z) (see `aggregate_posterior_samples`). Returns the squared MMD to as many prior samples,
    the per-dimension means and variances (lists), and their summaries; for N(0, I) they are 0, 1 and 0.
    """
    codes = _check_codes("codes", codes, min_rows=2)
    means, variances = codes.mean(axis=0), codes.var(axis=0)
    return {
        "mmd_to_prior": mmd_to_prior(codes, seed=seed),
        "mean_abs_mean": float(np.abs(means).mean()),
        "mean_variance": float(variances.mean()),
        "min_variance": float(variances.min()),
        "max_variance": float(variances.max()),
        # KL(N(m, diag v) || N(0, I)) of the moment-matched diagonal Gaussian, in nats: 0 when the moments match.
        "moment_kl_nats": float(0.5 * np.sum(variances + means ** 2 - 1.0 - np.log(np.maximum(variances, 1e-12)))),
        "per_dim_mean": means.tolist(),
        "per_dim_variance": variances.tolist(),
    }


def _latent_logvar(model, x):
    return model.encode(x)[1]


def compare_code_distributions(models: Mapping[str, CVAE], images: np.ndarray, seed: int = 0) -> dict[str, dict]:
    """Per model, `latent_distribution_summary` of its aggregate posterior on `images`, plus its mean posterior std."""
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty mapping from names to models")
    for name, model in models.items():
        _check_model(f"models[{name!r}]", model)
        check_images(images, model.config)
    seed = _check_int("seed", seed, 0)
    summaries = {}
    for name, model in models.items():
        summary = latent_distribution_summary(aggregate_posterior_samples(model, images, seed=seed), seed=seed)
        logvars = map_batches(model, _latent_logvar, images)
        summaries[name] = {**summary, "mean_posterior_std": float(np.exp(0.5 * logvars).mean())}
    return summaries


def elbo_vs_mmd_table(results: Mapping[str, dict], summaries: Mapping[str, dict]):
    """One column per model: its test metrics (a results row) and how its codes sit against N(0, I) (a summary)."""
    import pandas as pd

    metrics = {"test_elbo": "test ELBO (nats)", "iwae_nll_nats": "IWAE -log p(x) bound (nats)", "psnr_db": "PSNR (dB)",
               "active_units": "active units", "probe_accuracy": "linear probe accuracy"}
    code_stats = {"mmd_to_prior": "MMD^2(q(z), N(0, I))", "mean_abs_mean": "mean |code mean| per dimension",
                  "mean_variance": "mean code variance per dimension",
                  "moment_kl_nats": "KL of the moment-matched Gaussian to N(0, I) (nats)",
                  "mean_posterior_std": "mean posterior std exp(logvar / 2)"}
    missing = sorted(set(_check_nonempty("results", results)) ^ set(_check_nonempty("summaries", summaries)))
    if missing:
        raise ValueError(f"results and summaries must name the same models; only one of them has {missing}")
    table = {name: {**{label: results[name][key] for key, label in metrics.items()},
                    **{label: summaries[name][key] for key, label in code_stats.items()}} for name in results}
    return pd.DataFrame(table)


def checkerboard_energy(images: np.ndarray) -> float:
    """Share of each image's non-constant spectral power at the period-2 frequencies (Nyquist rows/columns), mean.

    Strided transposed convolutions leave a period-2 checkerboard (Odena, Dumoulin & Olah 2016) that shows up
    exactly there; natural images have little power at these frequencies, so compare a model with the data.
    """
    images = np.asarray(images)
    if not np.issubdtype(images.dtype, np.number) or not np.isfinite(images).all():
        raise ValueError(f"images must hold finite numbers (dtype {images.dtype})")
    images = images.astype(np.float64)
    if images.ndim != 4 or len(images) == 0 or images.shape[1] % 2 or images.shape[2] % 2:
        raise ValueError(f"images must be a non-empty (N, H, W, C) array with even H and W, got shape {images.shape}")
    height, width = images.shape[1:3]
    power = np.abs(np.fft.fft2(images, axes=(1, 2))) ** 2  # (N, H, W, C)
    power[:, 0, 0, :] = 0.0  # the mean colour is not structure
    nyquist = power[:, height // 2, :, :].sum(axis=(1, 2)) + power[:, :, width // 2, :].sum(axis=(1, 2)) \
        - power[:, height // 2, width // 2, :].sum(axis=1)
    total = power.sum(axis=(1, 2, 3))
    return float(np.mean(nyquist / np.maximum(total, 1e-12)))


def plot_reconstruction_crops(images, reconstructions: Mapping[str, np.ndarray], indices: Sequence[int] = (0, 1, 2),
                              box: tuple[int, int, int] = (8, 8, 12), cell: float = 1.8,
                              path: str | None = None) -> Figure:
    """Enlarge one square region of the originals and of each model's reconstructions, side by side.

    `reconstructions` maps a model name to its reconstructions of `images` (same shape); `box` is (top, left, size)
    in pixels. Pixels are drawn as blocks (no interpolation) so that a period-2 checkerboard stays visible. One row
    per index: the full original with the box outlined, then the crop of the original and of every model.
    """
    from matplotlib.patches import Rectangle

    images = np.asarray(images)
    if not (isinstance(box, (tuple, list)) and len(box) == 3 and all(_is_int(v) for v in box)):
        raise ValueError(f"box={box!r} must be three integers (top, left, size)")
    if not isinstance(reconstructions, Mapping):
        raise TypeError(f"reconstructions must map model names to arrays, got {type(reconstructions).__name__}")
    indices = list(_check_nonempty("indices", indices))
    if images.ndim == 4 and not all(_is_int(i) and 0 <= i < len(images) for i in indices):
        raise ValueError(f"indices={indices!r} must be integers in [0, {len(images)})")
    top, left, size = box
    if images.ndim != 4 or not (0 <= top and 0 <= left and size >= 1 and top + size <= images.shape[1]
                                and left + size <= images.shape[2]):
        raise ValueError(f"box={box} must lie inside the {images.shape[1:3]} images, and images be (N, H, W, C)")
    for name, recon in reconstructions.items():
        if np.shape(recon) != images.shape:
            raise ValueError(f"reconstructions[{name!r}] has shape {np.shape(recon)}, images have {images.shape}")
    columns = [("original", images)] + [(name, np.asarray(recon)) for name, recon in reconstructions.items()]
    figure = Figure(figsize=(cell * (len(columns) + 1), cell * len(indices) + 0.5))
    axes = figure.subplots(len(indices), len(columns) + 1, squeeze=False)
    for row, index in enumerate(indices):
        _show_image(axes[row, 0], images[index])
        axes[row, 0].add_patch(Rectangle((left - 0.5, top - 0.5), size, size, fill=False, color="red", lw=1.5))
        for column, (name, source) in enumerate(columns, start=1):
            crop = np.clip(source[index, top:top + size, left:left + size], 0.0, 1.0)
            axis = axes[row, column]
            if crop.shape[-1] == 1:
                axis.imshow(crop[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                axis.imshow(crop, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(name, fontsize=9)
    axes[0, 0].set_title("full image", fontsize=9)
    figure.suptitle(f"{size}x{size} crop at (row {top}, column {left}), enlarged")
    return _save(figure, path)


def plot_latent_moments(summaries: Mapping[str, dict], path: str | None = None) -> Figure:
    """Per-dimension mean and variance of the aggregate codes of each model (from `latent_distribution_summary`).

    The prior N(0, I) has mean 0 and variance 1 in every dimension (dashed lines); dimensions are sorted by variance.
    """
    if not isinstance(summaries, Mapping) or not summaries:
        raise ValueError("summaries must be a non-empty mapping from names to latent_distribution_summary results")
    for name, summary in summaries.items():
        if not isinstance(summary, Mapping) or not {"per_dim_mean", "per_dim_variance", "mmd_to_prior"} <= set(summary):
            raise ValueError(f"summaries[{name!r}] must be a latent_distribution_summary result")
    figure = Figure(figsize=(11, 3.8), layout="constrained")  # constrained: the axes' labels never overlap
    mean_axis, variance_axis = figure.subplots(1, 2)
    for name, summary in summaries.items():
        variances = np.asarray(summary["per_dim_variance"])
        order = np.argsort(variances)[::-1]
        label = f"{name} (MMD {summary['mmd_to_prior']:.3g})"
        mean_axis.plot(np.asarray(summary["per_dim_mean"])[order], marker=".", label=label)
        variance_axis.plot(variances[order], marker=".", label=label)
    mean_axis.axhline(0.0, color="black", ls="--", lw=1)
    variance_axis.axhline(1.0, color="black", ls="--", lw=1)
    mean_axis.set(title="mean of each code dimension", xlabel="dimension (sorted by variance)", ylabel="mean")
    variance_axis.set(title="variance of each code dimension", xlabel="dimension (sorted by variance)",
                      ylabel="variance", yscale="log")
    for axis in (mean_axis, variance_axis):
        axis.grid(alpha=0.3)
    variance_axis.legend(fontsize=8)
    return _save(figure, path)


def plot_prior_samples_by_model(models: Mapping[str, CVAE], num_samples: int = 10, seed: int = 0,
                                title: str = "The same prior codes decoded by each model",
                                path: str | None = None) -> Figure:
    """Decode the same codes drawn from N(0, I) with each model (all of one latent size): one labelled row each."""
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models is empty or not a mapping; pass a mapping from names to models")
    for name, model in models.items():
        _check_model(f"models[{name!r}]", model)
    seed = _check_int("seed", seed, 0)
    latent_dims = {model.config.latent_dim for model in models.values()}
    if len(latent_dims) != 1:
        raise ValueError(f"the models have latent sizes {sorted(latent_dims)}; the same codes need one latent size")
    num_samples = _check_int("num_samples", num_samples, 1)
    eps = tf.random.stateless_normal((num_samples, latent_dims.pop()), seed=(seed, 1))
    rows = [model.sample(eps).numpy() for model in models.values()]
    return plot_image_grid(np.concatenate(rows), ncols=num_samples, row_labels=list(models), cell=1.0,
                           suptitle=title, path=path)


def plot_reconstructions_by_model(models: Mapping[str, CVAE], images, title: str = "Test images and reconstructions",
                                  path: str | None = None) -> Figure:
    """The test images in the first row, then each model's reconstructions from the mean code: one labelled row each."""
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models is empty or not a mapping; pass a mapping from names to models")
    for name, model in models.items():
        images = check_images(images, _check_model(f"models[{name!r}]", model).config)
    rows = [np.asarray(images)] + [reconstruct(model, images) for model in models.values()]
    return plot_image_grid(np.concatenate(rows), ncols=len(images), row_labels=["test images"] + list(models),
                           cell=1.3, suptitle=title, path=path)


def prior_mmd_noise_floor(num_codes: int, latent_dim: int, seed: int = 0) -> float:
    """MMD^2 (as `mmd_to_prior` computes it) between two independent samples of N(0, I): what "matches" looks like."""
    num_codes, latent_dim = _check_int("num_codes", num_codes, 2), _check_int("latent_dim", latent_dim, 1)
    seed = _check_int("seed", seed, 0)
    return mmd_to_prior(np.random.default_rng(seed + 1).standard_normal((num_codes, latent_dim)), seed=seed)


@dataclasses.dataclass
class MMDSweep:
    """What `mmd_weight_sweep` measured: a row per MMD weight and one for the ELBO reference, and the chosen weight."""

    rows: list[dict]  # mmd_weight, psnr_db, test_elbo, mmd_to_prior: one per weight
    reference: dict  # the same measures of an ELBO model trained the same way
    noise_floor: float  # MMD^2 of two samples of N(0, I) of the same size
    chosen_weight: float
    models: dict[str, CVAE]  # "ELBO" and "weight <w>"
    histories: dict[str, list[dict]]

    @property
    def chosen_name(self) -> str:
        return f"weight {self.chosen_weight:g}"


def mmd_weight_sweep(weights: Sequence[float], model_config: VAEConfig, data: DataSplits, config: TrainConfig, *,
                     strategy=None, checkpoint_root: str | None = None, num_codes: int = 2000) -> MMDSweep:
    """Train an ELBO model and one MMD model per weight on `data`, alike, and choose the weight (`choose_mmd_weight`).

    Each model is measured by the PSNR of its reconstructions of `num_codes` test images and by the MMD^2 of their codes
    z ~ q(z|x) to as many prior samples.
    """
    weights = list(_check_nonempty("weights", weights))
    losses = [compute_loss] + [MMDLoss(weight) for weight in weights]  # checks every weight before any training
    _check_type("model_config", model_config, VAEConfig)
    _check_type("data", data, DataSplits, "prepare_data")
    _check_type("config", config, TrainConfig)
    num_codes = _check_int("num_codes", num_codes, 2)
    checkpoint_root = _check_path("checkpoint_root", checkpoint_root)
    test_images = data.test_images[:num_codes]
    rows, models, histories = [], {}, {}
    for loss in losses:
        name = "ELBO" if loss is compute_loss else f"weight {loss.mmd_weight:g}"
        model = build_model(model_config, config, strategy)
        checkpoint_dir = None if checkpoint_root is None else os.path.join(checkpoint_root, slug(name))
        history = main_train_loop(model, data.train_images, data.test_images, config, loss, strategy=strategy,
                                  checkpoint_dir=checkpoint_dir, verbose=False)
        row = {"mmd_weight": getattr(loss, "mmd_weight", None),
               "psnr_db": psnr(test_images, reconstruct(model, test_images)), "test_elbo": history[-1]["test_elbo"],
               "mmd_to_prior": mmd_to_prior(aggregate_posterior_samples(model, test_images))}
        print(f"{'ELBO loss' if loss is compute_loss else f'MMD weight {loss.mmd_weight:g}'}: PSNR "
              f"{row['psnr_db']:.2f} dB, test ELBO {row['test_elbo']:.1f} nats, MMD^2 of the codes to N(0, I) "
              f"{row['mmd_to_prior']:.2e} (trained in {sum(r['seconds'] for r in history):.0f} s)")
        rows.append(row)
        models[name], histories[name] = model, history
    reference, rows = rows[0], rows[1:]
    noise_floor = prior_mmd_noise_floor(len(test_images), model_config.latent_dim)
    return MMDSweep(rows, reference, noise_floor, choose_mmd_weight(rows, reference["mmd_to_prior"]), models,
                    histories)


def choose_mmd_weight(rows: Sequence[dict], reference_mmd: float) -> float:
    """The smallest weight whose codes are at least as close to N(0, I) as the ELBO model's (MMD^2 <= reference).

    A larger weight pulls the codes closer to the prior at the cost of reconstruction, and past a point the encoder
    gives up on the image (every q(z|x) becomes N(0, I), which matches the prior and carries nothing). So this takes
    the least weight at which the MMD term does at least the KL term's job on the aggregate codes; when no weight
    does, the one whose codes come closest.
    """
    if not rows or not all(isinstance(row, Mapping) and {"mmd_weight", "mmd_to_prior"} <= set(row) for row in rows):
        raise ValueError("rows must be non-empty rows with 'mmd_weight' and 'mmd_to_prior', as mmd_weight_sweep makes")
    reference_mmd = _check_number("reference_mmd", reference_mmd, minimum=0.0)
    matching = [row["mmd_weight"] for row in rows if row["mmd_to_prior"] <= reference_mmd]
    return min(matching) if matching else min(rows, key=lambda row: row["mmd_to_prior"])["mmd_weight"]


def plot_mmd_sweep(sweep: MMDSweep, title: str = "MMD weight sweep", path: str | None = None) -> Figure:
    """Reconstruction (PSNR) against the codes' MMD^2 to the prior, one point per weight and one for the ELBO model,
    and MMD^2 against the weight."""
    if not isinstance(sweep, MMDSweep) or not sweep.rows:
        raise ValueError(f"sweep must be a non-empty MMDSweep (the result of mmd_weight_sweep), got {_short(sweep)}")
    weights = [row["mmd_weight"] for row in sweep.rows]
    mmds = [row["mmd_to_prior"] for row in sweep.rows]
    psnrs = [row["psnr_db"] for row in sweep.rows]
    reference = sweep.reference
    figure = Figure(figsize=(11, 3.8), layout="constrained")
    trade_axis, mmd_axis = figure.subplots(1, 2)
    trade_axis.plot(mmds, psnrs, marker="o", label="MMD loss (labels: weights)")
    for weight, mmd, value in zip(weights, mmds, psnrs):
        trade_axis.annotate(f"{weight:g}", (mmd, value), xytext=(4, 4), textcoords="offset points", fontsize=8,
                            color="C3" if weight == sweep.chosen_weight else "black")
    trade_axis.scatter([reference["mmd_to_prior"]], [reference["psnr_db"]], marker="*", s=160, color="C2",
                       label="ELBO loss", zorder=3)
    trade_axis.set(xscale="log", xlabel="MMD^2 of the test codes to N(0, I)", ylabel="test PSNR (dB)",
                   title="reconstruction against the match to the prior")
    trade_axis.legend(fontsize=8)
    mmd_axis.plot(weights, mmds, marker="o", label="MMD models' codes")
    mmd_axis.axhline(reference["mmd_to_prior"], color="C2", lw=1.5, label="ELBO model's codes")
    mmd_axis.axhline(sweep.noise_floor, color="black", ls="--", lw=1, label="two samples of N(0, I)")
    mmd_axis.axvline(sweep.chosen_weight, color="C3", lw=1, label=f"chosen: {sweep.chosen_weight:g}")
    mmd_axis.set(xscale="log", yscale="log", xlabel="MMD weight", ylabel="MMD^2 to N(0, I)",
                 title="distance of the codes to the prior")
    for axis in (trade_axis, mmd_axis):
        axis.grid(alpha=0.3)
    mmd_axis.legend(fontsize=8)
    figure.suptitle(title)
    return _save(figure, path)