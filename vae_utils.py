"""Convolutional variational autoencoders for MNIST and CIFAR-10: data, model, losses, training, evaluation, plots.

The homework's own pieces come first, in the form of the TensorFlow CVAE tutorial; the last section holds what goes
beyond the homework (better likelihoods and decoders, code diagnostics), built on them.
Importing this module has no side effects: it downloads nothing, trains nothing and reads no arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
import zipfile
from typing import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure

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
    if name not in DATASETS:
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
            missing = [key for key in _NPZ_KEYS if key not in archive.files]
            if missing:
                raise DatasetError(f"{path} lacks the keys {missing}; a keras-format .npz holds {list(_NPZ_KEYS)}")
            arrays = {key: archive[key] for key in _NPZ_KEYS}
    except DatasetError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise DatasetError(f"{path} is not a readable .npz file ({type(error).__name__}: {error}); "
                           f"replace it with a copy of the keras-format archive") from None
    _validate_arrays(name, arrays, path)
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


def load_dataset(name: str, data_dir: str | None = None):
    """Return `(x_train, y_train), (x_test, y_test)` as `tf.keras.datasets.<name>.load_data()` does."""
    dataset_spec(name)
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
    if not 1 <= batch_size <= len(images):
        raise ValueError(f"batch_size={batch_size} must be between 1 and the number of images ({len(images)})")
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

    @property
    def class_names(self) -> tuple[str, ...]:
        return dataset_spec(self.name).class_names


def prepare_data(name: str, data_dir: str | None = None, max_train: int | None = None,
                 max_test: int | None = None) -> DataSplits:
    """Load a data set and preprocess it as the homework does: MNIST binarized at 0.5, CIFAR-10 scaled to [0, 1].

    `max_train` / `max_test` keep only the first images of each split (the notebook's QUICK smoke run).
    """
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
            value = getattr(self, field)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{field}={value!r} must be a positive integer")
        decoder_grid_size(self.img_size, self.num_convolutions, self.strides)
        if self.encoder_padding not in ("same", "valid"):
            raise ValueError(f"encoder_padding={self.encoder_padding!r} must be 'same' or 'valid'")
        _check_number("logvar_bound", self.logvar_bound, minimum=0.0, inclusive=False)

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
            # One logit per pixel and channel; stride 1 keeps the image size. No activation: these are logits,
            # kept in float32 even under mixed precision because the loss reads them.
            + [tf.keras.layers.Conv2DTranspose(config.channels, config.kernel_size, strides=1, padding="same",
                                               dtype="float32")],
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
        logits = self.decoder(z)
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
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an integer >= 0")
    tf.keras.utils.set_random_seed(int(seed))


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

    def __post_init__(self):
        for field in ("epochs", "batch_size", "steps_per_execution", "eval_batch_size"):
            value = getattr(self, field)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{field}={value!r} must be an integer >= 1")
            object.__setattr__(self, field, int(value))  # a NumPy integer would not survive JSON
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be an integer >= 0")
        object.__setattr__(self, "seed", int(self.seed))
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


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> tf.keras.optimizers.Optimizer:
    """Adam at the configured learning rate, constant or decayed along a cosine over all the run's steps."""
    if config.lr_schedule == "constant":
        return tf.keras.optimizers.Adam(config.learning_rate)
    # The schedule is a function of the optimizer's step count, which the checkpoint restores.
    return tf.keras.optimizers.Adam(tf.keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=config.epochs * steps_per_epoch, alpha=0.05))


def make_train_function(model: CVAE, optimizer, loss_fn: Callable, strategy: tf.distribute.Strategy):
    """Build a `tf.function` that runs `num_steps` GradientTape steps from a distributed iterator.

    Returns the per-step mean loss over replicas, so the caller synchronises with the device once per call.
    """
    replicas = strategy.num_replicas_in_sync

    def train_step(x):
        with tf.GradientTape() as tape:
            loss = loss_fn(model, x)
            # Each replica sees an equal share of a fixed global batch, so dividing by the replica count makes the
            # summed gradients those of the global-batch mean.
            scaled_loss = loss / replicas
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
                    checkpoint_dir: str | None = None, on_epoch_end: Callable | None = None,
                    verbose: bool = True) -> list[dict]:
    """Train `model` with Adam as `config` says, show per epoch its time and test ELBO, and return the history.

    With `checkpoint_dir`, each epoch is checkpointed and a new call resumes after the last completed one.
    `on_epoch_end(epoch, model, row)` runs after each epoch (e.g. to show reconstructions).
    """
    train_images, test_images, strategy = _check_training_inputs(model, train_images, test_images, config, loss_fn,
                                                                 strategy)
    steps_per_epoch = len(train_images) // config.batch_size  # whole batches: static shapes, equal replica shares
    with strategy.scope():
        optimizer = make_optimizer(config, steps_per_epoch)
        optimizer.build(model.trainable_variables)
    train_steps = make_train_function(model, optimizer, loss_fn, strategy)
    signature = run_signature(model.config, config, loss_fn, train_images)
    with CheckpointedRun(checkpoint_dir, model, optimizer, signature, verbose=verbose) as run:
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


def _check_training_inputs(model, train_images, test_images, config, loss_fn, strategy):
    """Check everything `main_train_loop` is given before any TensorFlow work; return the images and the strategy."""
    if not isinstance(model, CVAE):
        raise TypeError(f"model must be a CVAE, got {type(model).__name__}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn={loss_fn!r} must be callable as loss_fn(model, x)")
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
                                 + (f" (last checkpoint: epoch {epoch - 1})" if checkpoint_dir else "")
                                 + ". Lower the learning rate or check the inputs.")


class CheckpointMismatchError(ValueError):
    """A checkpoint directory holds a run of another architecture, data set or loss."""


def describe_loss(loss_fn: Callable) -> str:
    """A stable description of a loss function: its `description` if it has one, else its module and name."""
    description = getattr(loss_fn, "description", None)
    if description:
        return str(description)
    return f"{getattr(loss_fn, '__module__', '?')}.{getattr(loss_fn, '__qualname__', type(loss_fn).__name__)}"


def data_fingerprint(images: np.ndarray) -> str:
    """Shape, dtype and a hash of the images' bytes."""
    digest = hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
    return f"{images.shape}:{images.dtype}:{digest}"


def run_signature(model_config: VAEConfig, train_config: TrainConfig, loss_fn: Callable,
                  train_images: np.ndarray) -> dict:
    """What identifies a training run: architecture, training configuration, loss and data."""
    return {"model": {"class": type(model_config).__name__, **dataclasses.asdict(model_config)},
            "training": dataclasses.asdict(train_config), "loss": describe_loss(loss_fn),
            "train_data": data_fingerprint(train_images)}


def _read_json(path: str):
    with open(path) as handle:
        return json.load(handle)


def _write_json_atomically(path: str, payload) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w") as handle:
        json.dump(payload, handle, indent=1)
    os.replace(temporary, path)  # a reader never sees half a file, even if this process is killed


class CheckpointedRun:
    """Checkpointed state of a run (model, optimizer, completed epochs, history), restored on entry."""

    def __init__(self, checkpoint_dir: str | None, model, optimizer, signature: dict, *, verbose: bool = True):
        self.checkpoint_dir = None if checkpoint_dir is None else os.path.expanduser(checkpoint_dir)
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="completed_epochs")
        self.history: list[dict] = []
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=self.epoch)
        self.signature, self.verbose, self.manager = signature, verbose, None

    @property
    def completed_epochs(self) -> int:
        return int(self.epoch.numpy())

    def __enter__(self) -> "CheckpointedRun":
        if self.checkpoint_dir is None:
            return self
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        self.history_path = os.path.join(self.checkpoint_dir, "history.json")
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.checkpoint_dir, max_to_keep=2)
        signature_path = os.path.join(self.checkpoint_dir, "run.json")
        if self.manager.latest_checkpoint:
            saved = _read_json(signature_path) if os.path.exists(signature_path) else {}
            saved_epochs = saved.get("training", {}).get("epochs")
            differences = [f"{key}: checkpoint has {saved.get(key)!r}, this run has {value!r}"
                           for key, value in self.signature.items()
                           if saved.get(key) != value and not (key == "training" and saved_epochs is not None and {
                               **saved[key], "epochs": value["epochs"]} == value)]
            if differences:
                raise CheckpointMismatchError(f"checkpoint_dir={self.checkpoint_dir!r} holds another run ("
                                              + "; ".join(differences) + "); use a new directory or delete it")
            self.checkpoint.restore(self.manager.latest_checkpoint).assert_existing_objects_matched()
            if os.path.exists(self.history_path):
                # The history is written before the checkpoint, so it may hold one epoch the checkpoint lacks.
                self.history = _read_json(self.history_path)[: self.completed_epochs]
        _write_json_atomically(signature_path, self.signature)
        return self

    def save(self, epoch: int, row: dict) -> None:
        self.history.append(row)
        self.epoch.assign(epoch)
        if self.manager is not None:
            _write_json_atomically(self.history_path, self.history)
            self.manager.save(checkpoint_number=epoch)

    def __exit__(self, *exc_info) -> None:
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------

def map_batches(model: CVAE, function: Callable, images: np.ndarray, batch_size: int = 1000, **kwargs) -> np.ndarray:
    """Apply `function(model, x, **kwargs)` to `images` in batches and concatenate the per-example results.

    The compiled function is kept on the model, keyed by `function` and `kwargs`, with the batch size left open, so
    each evaluation traces once per model however often it runs.
    """
    images = check_images(images, model.config)
    batch_size = _check_batch_size("batch_size", batch_size)
    # A plain attribute, set past Keras's attribute tracking: the functions live and die with their model.
    compiled = model.__dict__.setdefault("_compiled_evaluations", {})
    key = (function, tuple(sorted(kwargs.items())))
    if key not in compiled:
        signature = [tf.TensorSpec((None,) + images.shape[1:], tf.float32)]
        compiled[key] = tf.function(functools.partial(function, model, **kwargs), input_signature=signature)
    outputs = [compiled[key](batch).numpy() for batch in make_dataset(images, min(batch_size, len(images)))]
    return np.concatenate(outputs)


def _check_batch_size(name: str, value) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")
    return int(value)


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
    return float(np.mean(map_batches(model, elbo_per_example, images, batch_size, analytic_kl=bool(analytic_kl))))


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
    mse = np.mean((images - reconstructions) ** 2, axis=(1, 2, 3))
    return float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))))


def active_units(latent_means: np.ndarray, threshold: float = 0.01) -> int:
    """Number of latent dimensions whose mean code varies over the data by more than `threshold` (Burda et al.)."""
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

    train_labels, test_labels = np.ravel(train_labels), np.ravel(test_labels)
    if len(train_labels) != len(train_codes) or len(test_labels) != len(test_codes):
        raise ValueError(f"labels ({len(train_labels)}, {len(test_labels)}) and codes ({len(train_codes)}, "
                         f"{len(test_codes)}) must have one label per code")
    chosen = np.random.default_rng(seed).permutation(len(train_codes))[:max_train]
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    # One BLAS thread: these small products gain nothing from two, and threads that spin while TensorFlow's own
    # threads hold the cores slow the fit down many times.
    with threadpool_limits(limits=1, user_api="blas"):
        probe.fit(train_codes[chosen], train_labels[chosen])
    return float(probe.score(test_codes, test_labels))


def class_separability(train_codes, train_labels, test_codes, test_labels, seed: int = 0) -> dict[str, float]:
    """Linear-probe test accuracy on all latent dimensions and on the 2-D PCA projection a latent plot shows."""
    from sklearn.decomposition import PCA

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
    if not _is_int(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} must be an integer >= 1")
    return -float(np.mean(map_batches(model, iwae_log_likelihood, images, batch_size, num_samples=int(num_samples))))


def bits_per_dim(nll_nats: float, dims: int) -> float:
    """Convert a negative log-likelihood per image in nats to bits per dimension."""
    return nll_nats / (dims * math.log(2.0))


def likelihood_is_proper(model: CVAE, images: np.ndarray) -> bool:
    """Whether log p(x|z) is a distribution over these images: Bernoulli on binary pixels, or a discretized one."""
    if isinstance(model, ExtendedCVAE) and model.config.likelihood != "bernoulli":
        return True
    return bool(np.isin(images, (0.0, 1.0)).all())


def model_metrics(model: CVAE, data: DataSplits, *, iwae_samples: int = 64, iwae_images: int = 2000,
                  batch_size: int = 1000) -> dict:
    """Test-set metrics of a trained model: ELBO, IWAE bound, bits/dim, PSNR, active units, linear probes.

    The IWAE bound is computed on the first `iwae_images` test images, and the ELBO on the same images beside it, so
    that the two can be compared; bits/dim only where the likelihood is a distribution over the pixels.
    """
    if not isinstance(data, DataSplits):
        raise TypeError(f"data must be a DataSplits (see prepare_data), got {type(data).__name__}")
    for name, value in (("iwae_samples", iwae_samples), ("iwae_images", iwae_images), ("batch_size", batch_size)):
        _check_batch_size(name, value)
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
    """Build the model for `config` (a `CVAE`, or an `ExtendedCVAE` for an `ExtendedVAEConfig`), seeded, in scope."""
    if not isinstance(config, VAEConfig):
        raise TypeError(f"config must be a VAEConfig, got {type(config).__name__}")
    set_seed(train_config.seed)
    model_class = ExtendedCVAE if isinstance(config, ExtendedVAEConfig) else CVAE
    with (strategy or tf.distribute.get_strategy()).scope():
        return model_class(config)


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
    """Train `model` on `data` (checkpointed under `checkpoint_root/<name>`), score it, and return both.

    The result row's test ELBO is the one printed after the last epoch, so that the table and the log agree.
    """
    checkpoint_dir = None if checkpoint_root is None else os.path.join(os.path.expanduser(checkpoint_root),
                                                                       slug(name))
    history = main_train_loop(model, data.train_images, data.test_images, config, loss_fn, strategy=strategy,
                              checkpoint_dir=checkpoint_dir, on_epoch_end=on_epoch_end, verbose=verbose)
    started = time.perf_counter()
    metrics = model_metrics(model, data, iwae_samples=iwae_samples, iwae_images=iwae_images,
                            batch_size=config.eval_batch_size)
    metrics["test_elbo"] = history[-1]["test_elbo"]
    result = {"name": name, "dataset": data.name, "loss": describe_loss(loss_fn), "epochs": len(history),
              "train_seconds": round(sum(row["seconds"] for row in history), 1), **metrics}
    if verbose:
        print(f"{name}: scored in {time.perf_counter() - started:.0f} s")
    return TrainedModel(name, model, history, result)


def results_table(results: Sequence[dict]):
    """The results rows as a pandas DataFrame indexed by model name, with readable column names."""
    import pandas as pd

    return pd.DataFrame(list(results)).set_index("name")


def write_results(path: str, results: Sequence[dict], **extra) -> None:
    """Write the results rows, and `extra` items such as the run's wall time, to a JSON file."""
    path = os.path.expanduser(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump({**extra, "models": list(results)}, handle, indent=1, default=float)


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
    images = check_images(images, model.config)
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
    if path:
        path = os.path.expanduser(path)
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
    if not _is_int(ncols) or ncols < 1:
        raise ValueError(f"ncols={ncols!r} must be an integer >= 1")
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
    labels = check_labels(labels, len(images), len(class_names))
    missing = [name for c, name in enumerate(class_names) if not np.any(labels == c)]
    if missing:
        raise ValueError(f"labels hold no image of the classes {missing}")
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in range(len(class_names))]
    return plot_image_grid(images[firsts], ncols=len(class_names), titles=list(class_names), cell=1.2, path=path)


def generate_and_display_images(model: CVAE, epoch: int, test_sample, path: str | None = None) -> Figure:
    """Show `test_sample` (top row) above its reconstructions through a sampled code (bottom row)."""
    test_sample = check_images(test_sample, model.config, "test_sample")
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

    if not codes_by_class:
        raise ValueError("codes_by_class is empty; pass the first result of get_allClass_encodings")
    codes = np.concatenate([np.asarray(c) for c in codes_by_class.values()])
    if codes.ndim != 2 or len(codes) == 0:
        raise ValueError(f"codes_by_class must map classes to (n, latent_dim) arrays, got {codes.shape} in all")
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
    if not _is_int(steps) or steps < 2:
        raise ValueError(f"steps={steps!r} must be an integer >= 2 (the start and the end)")
    codes = np.linspace(start, end, int(steps)).astype(np.float32)  # (steps, latent_dim)
    return model.decode(codes, apply_sigmoid=True).numpy()


def walk_src_to_dst(model: CVAE, src_class, dst_class, class_means: np.ndarray, class_names: Sequence[str],
                    steps: int = 10, path: str | None = None) -> Figure:
    """Decode `steps` codes evenly spaced from the mean code of `src_class` to that of `dst_class`."""
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
    pair = check_images(np.stack([np.asarray(src_image), np.asarray(dst_image)]), model.config, "src/dst image")
    start, end = encode_means(model, pair)
    images = np.concatenate([pair[:1], _decode_line(model, start, end, steps), pair[1:]])
    titles = [f"{names[0]} (input)"] + [f"{t:.2f}" for t in np.linspace(0, 1, steps)] + [f"{names[1]} (input)"]
    return plot_image_grid(images, ncols=steps + 2, titles=titles, cell=1.1, path=path,
                           suptitle=f"Walk between two test images: {names[0]} to {names[1]}")


def plot_prior_samples(model: CVAE, num_samples: int = 40, ncols: int = 10, seed: int = 0,
                       title: str = "Samples decoded from the prior N(0, I)", path: str | None = None) -> Figure:
    """Decode codes drawn from the prior N(0, I) in one batched call and show them in a grid."""
    if not _is_int(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} must be an integer >= 1")
    eps = tf.random.stateless_normal((int(num_samples), model.config.latent_dim), seed=(int(seed), 0))
    return plot_image_grid(model.sample(eps).numpy(), ncols=ncols, cell=0.9, path=path, suptitle=title)


def draw_architecture(model: CVAE, prefix: str, figures_dir: str) -> list[str]:
    """Draw the encoder and the decoder with `tf.keras.utils.plot_model` as `<figures_dir>/<prefix>_<part>.png`.

    Returns the paths of the PNGs written (show them with `IPython.display.Image`). The diagrams need the pydot
    package and graphviz's `dot` program. When either is missing, Keras 3's `plot_model` raises no error inside
    IPython: it prints a message and returns None. So this checks for both first, and that each file was written;
    when a diagram cannot be drawn it prints a one-line note and the text summary (`part.summary()`) instead, and
    returns only the paths written (none, normally).
    """
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
    if not histories or not all(len(history) for history in histories.values()):
        raise ValueError("histories must map each run's name to a non-empty history from main_train_loop")
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
               tf.keras.layers.Permute((3, 1, 2)),  # (B, 2 * code_channels, grid, grid)
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
        if not _is_int(warmup_epochs) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={warmup_epochs!r} must be an integer >= 0")
        self.warmup_epochs = int(warmup_epochs)
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
    images = check_images(images, model.config)
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
    codes = np.asarray(codes, dtype=np.float64)
    if codes.ndim != 2 or len(codes) < 2:
        raise ValueError(f"codes must be an (N, D) array with N >= 2, got shape {codes.shape}")
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
    codes = np.asarray(codes, dtype=np.float64)
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
    table = {name: {**{label: results[name][key] for key, label in metrics.items()},
                    **{label: summaries[name][key] for key, label in code_stats.items()}} for name in results}
    return pd.DataFrame(table)


def checkerboard_energy(images: np.ndarray) -> float:
    """Share of each image's non-constant spectral power at the period-2 frequencies (Nyquist rows/columns), mean.

    Strided transposed convolutions leave a period-2 checkerboard (Odena, Dumoulin & Olah 2016) that shows up
    exactly there; natural images have little power at these frequencies, so compare a model with the data.
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4 or images.shape[1] % 2 or images.shape[2] % 2:
        raise ValueError(f"images must be (N, H, W, C) with even H and W, got shape {images.shape}")
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
    if not models:
        raise ValueError("models is empty; pass a mapping from names to models")
    latent_dims = {model.config.latent_dim for model in models.values()}
    if len(latent_dims) != 1:
        raise ValueError(f"the models have latent sizes {sorted(latent_dims)}; the same codes need one latent size")
    if not _is_int(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} must be an integer >= 1")
    eps = tf.random.stateless_normal((int(num_samples), latent_dims.pop()), seed=(int(seed), 1))
    rows = [model.sample(eps).numpy() for model in models.values()]
    return plot_image_grid(np.concatenate(rows), ncols=num_samples, row_labels=list(models), cell=1.0,
                           suptitle=title, path=path)


def plot_reconstructions_by_model(models: Mapping[str, CVAE], images, title: str = "Test images and reconstructions",
                                  path: str | None = None) -> Figure:
    """The test images in the first row, then each model's reconstructions from the mean code: one labelled row each."""
    if not models:
        raise ValueError("models is empty; pass a mapping from names to models")
    rows = [np.asarray(images)] + [reconstruct(model, images) for model in models.values()]
    return plot_image_grid(np.concatenate(rows), ncols=len(images), row_labels=["test images"] + list(models),
                           cell=1.3, suptitle=title, path=path)


def prior_mmd_noise_floor(num_codes: int, latent_dim: int, seed: int = 0) -> float:
    """MMD^2 (as `mmd_to_prior` computes it) between two independent samples of N(0, I): what "matches" looks like."""
    return mmd_to_prior(np.random.default_rng(seed + 1).standard_normal((num_codes, latent_dim)), seed=seed)


@dataclasses.dataclass
class MMDSweep:
    """The rows of `mmd_weight_sweep` (weight, PSNR, ELBO, MMD^2 of the codes to the prior), the floor, the choice."""

    rows: list[dict]
    noise_floor: float
    chosen_weight: float
    models: dict[str, CVAE]


def mmd_weight_sweep(weights: Sequence[float], model_config: VAEConfig, data: DataSplits, config: TrainConfig, *,
                     max_train: int | None = None, strategy=None, checkpoint_root: str | None = None,
                     num_codes: int = 2000) -> MMDSweep:
    """Train one MMD model per weight (on the first `max_train` training images) and choose the weight.

    Each model is scored by the PSNR of its reconstructions of `num_codes` test images and by the MMD^2 of their codes
    z ~ q(z|x) to as many prior samples; `choose_mmd_weight` picks the weight from these.
    """
    if not weights:
        raise ValueError("weights is empty; pass the MMD weights to try")
    losses = [MMDLoss(weight) for weight in weights]  # checks every weight before any training
    train = DataSplits(data.name, data.train_images[:max_train], data.train_labels[:max_train], data.test_images,
                       data.test_labels)
    test_images = data.test_images[:num_codes]
    rows, models = [], {}
    for loss in losses:
        model = build_model(model_config, config, strategy)
        checkpoint_dir = None if checkpoint_root is None else os.path.join(
            os.path.expanduser(checkpoint_root), f"mmd_weight_{loss.mmd_weight:g}")
        history = main_train_loop(model, train.train_images, train.test_images, config, loss, strategy=strategy,
                                  checkpoint_dir=checkpoint_dir, verbose=False)
        row = {"mmd_weight": loss.mmd_weight, "psnr_db": psnr(test_images, reconstruct(model, test_images)),
               "test_elbo": history[-1]["test_elbo"],
               "mmd_to_prior": mmd_to_prior(aggregate_posterior_samples(model, test_images))}
        print(f"MMD weight {loss.mmd_weight:g}: PSNR {row['psnr_db']:.2f} dB, test ELBO {row['test_elbo']:.1f} nats, "
              f"MMD^2 of the codes to N(0, I) {row['mmd_to_prior']:.2e} "
              f"(trained in {sum(r['seconds'] for r in history):.0f} s)")
        rows.append(row)
        models[f"weight {loss.mmd_weight:g}"] = model
    noise_floor = prior_mmd_noise_floor(len(test_images), model_config.latent_dim)
    return MMDSweep(rows, noise_floor, choose_mmd_weight(rows, noise_floor), models)


def choose_mmd_weight(rows: Sequence[dict], noise_floor: float) -> float:
    """The smallest weight whose codes are as close to N(0, I) as a second prior sample is (MMD^2 <= 2 x the floor).

    A smaller weight favours reconstruction, a larger one the match to the prior; this takes the best reconstruction
    among the weights whose codes a sampler cannot tell from the prior. Without one, the weight closest to the prior.
    """
    matching = [row for row in rows if row["mmd_to_prior"] <= 2.0 * noise_floor]
    if matching:
        return min(row["mmd_weight"] for row in matching)
    return min(rows, key=lambda row: row["mmd_to_prior"])["mmd_weight"]


def plot_mmd_sweep(sweep: MMDSweep, title: str = "MMD weight sweep", path: str | None = None) -> Figure:
    """Reconstruction PSNR and the codes' MMD^2 to the prior against the MMD weight, the chosen weight marked."""
    weights = [row["mmd_weight"] for row in sweep.rows]
    figure = Figure(figsize=(11, 3.6), layout="constrained")
    psnr_axis, mmd_axis = figure.subplots(1, 2)
    psnr_axis.plot(weights, [row["psnr_db"] for row in sweep.rows], marker="o")
    psnr_axis.set(xscale="log", xlabel="MMD weight", ylabel="test PSNR (dB)", title="reconstruction")
    mmd_axis.plot(weights, [row["mmd_to_prior"] for row in sweep.rows], marker="o", label="test codes")
    mmd_axis.axhline(sweep.noise_floor, color="black", ls="--", lw=1, label="two samples of N(0, I)")
    mmd_axis.set(xscale="log", yscale="log", xlabel="MMD weight", ylabel="MMD^2 to N(0, I)",
                 title="distance of the codes to the prior")
    for axis in (psnr_axis, mmd_axis):
        axis.axvline(sweep.chosen_weight, color="C3", lw=1, label=f"chosen: {sweep.chosen_weight:g}")
        axis.grid(alpha=0.3)
    mmd_axis.legend(fontsize=8)
    figure.suptitle(title)
    return _save(figure, path)