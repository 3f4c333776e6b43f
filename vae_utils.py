"""Convolutional variational autoencoders for MNIST and CIFAR-10: data, model, losses, training, evaluation, plots.

The homework's pieces, in the form of the TensorFlow CVAE tutorial (https://www.tensorflow.org/tutorials/generative/cvae).
What goes beyond the homework lives in `vae_extensions.py`, built on this module.
Importing this module has no side effects: it downloads nothing, trains nothing and reads no arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import numbers
import os
import platform
import re
import sys
import tempfile
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure

# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------

MNIST_CLASS_NAMES = tuple(str(digit) for digit in range(10))
CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DATASETS = {  # name -> (image shape, class names), as tf.keras.datasets.<name>.load_data() returns them
    "mnist": ((28, 28), MNIST_CLASS_NAMES),
    "cifar10": ((32, 32, 3), CIFAR10_CLASS_NAMES),
}
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DatasetError(ValueError):
    """A data set file is missing, unreadable, or holds arrays of the wrong shape or type."""


def _read_npz(name: str, path: str) -> dict[str, np.ndarray]:
    """The four arrays of a keras-format .npz file, checked; DatasetError naming the file otherwise."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in _NPZ_KEYS}
    except Exception as error:  # noqa: BLE001 - KeyError, BadZipFile, zlib.error (a flipped bit), EOFError, OSError
        raise DatasetError(f"{path} is not a keras-format {name}.npz with the arrays {list(_NPZ_KEYS)} "
                           f"({type(error).__name__}: {str(error)[:160]}); replace the file") from None
    image_shape, class_names = DATASETS[name]
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.shape[1:] != image_shape or len(x) == 0:
            raise DatasetError(f"{path}: x_{split} has shape {x.shape} and dtype {x.dtype}; {name} needs uint8 "
                               f"images of shape (N, {', '.join(map(str, image_shape))}), N >= 1")
        if not np.issubdtype(y.dtype, np.integer) or y.size != len(x) or y.min() < 0 or y.max() >= len(class_names):
            raise DatasetError(f"{path}: y_{split} must hold one integer label in 0..{len(class_names) - 1} per image, "
                               f"got shape {y.shape} and dtype {y.dtype}")
    return arrays


def load_dataset(name: str, data_dir: str | None = None):
    """Return `(x_train, y_train), (x_test, y_test)` as `tf.keras.datasets.<name>.load_data()` does.

    Reads `<data_dir>/<name>.npz` when `data_dir` is given, else `$VAE_DATA_DIR/<name>.npz` when that is set, else
    downloads with `tf.keras.datasets`.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set name={name!r}; expected one of {sorted(DATASETS)}")
    directory = data_dir or os.environ.get("VAE_DATA_DIR")
    if directory:
        path = os.path.join(os.path.expanduser(directory), f"{name}.npz")
        if not os.path.isfile(path):
            source = "data_dir" if data_dir else "VAE_DATA_DIR"
            raise DatasetError(f"no file {path} ({source}={directory!r}); put the keras-format {name}.npz there")
        arrays = _read_npz(name, path)
        return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])
    return getattr(tf.keras.datasets, name).load_data()


def preprocess_images(images: np.ndarray, binarize: bool = False) -> np.ndarray:
    """Scale uint8 images to float32 in [0, 1] with a channel axis; optionally binarize at 0.5 (static binarization)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"images must be a uint8 (N, H, W) or (N, H, W, C) array, got {images.dtype} {images.shape}")
    images = images.astype(np.float32) / 255.0
    if images.ndim == 3:
        images = images[..., np.newaxis]
    if binarize:
        images = np.where(images > 0.5, 1.0, 0.0).astype(np.float32)
    return images


def make_dataset(images: np.ndarray, batch_size: int, shuffle_seed: int | None = None,
                 drop_remainder: bool = False) -> tf.data.Dataset:
    """Batch images into a `tf.data` pipeline; shuffled with `shuffle_seed` when one is given, then prefetched."""
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
        return DATASETS[self.name][1]

    def take_train(self, count: int) -> DataSplits:
        """The same data set with only its first `count` training images (the test split unchanged)."""
        return dataclasses.replace(self, train_images=self.train_images[:count], train_labels=self.train_labels[:count])


def prepare_data(name: str, data_dir: str | None = None, max_train: int | None = None,
                 max_test: int | None = None) -> DataSplits:
    """Load a data set and preprocess it as the homework does: MNIST binarized at 0.5, CIFAR-10 scaled to [0, 1].

    `max_train` / `max_test` keep only the first images of each split (the notebook's QUICK smoke run).
    """
    for argument, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and not (_is_int(value) and value >= 1):
            raise ValueError(f"{argument}={value!r} must be None or an integer >= 1")
    (x_train, y_train), (x_test, y_test) = load_dataset(name, data_dir)
    binarize = name == "mnist"  # binary pixels make the Bernoulli likelihood a proper model of the data
    return DataSplits(name, preprocess_images(x_train[:max_train], binarize), np.ravel(y_train[:max_train]),
                      preprocess_images(x_test[:max_test], binarize), np.ravel(y_test[:max_test]))


# Checks of what users hand in: images, labels and codes. Each names the argument, before any TensorFlow work.

def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_images(images, config: VAEConfig | None = None, name: str = "images") -> np.ndarray:
    """`images` as float32 after checking they are model-ready: (N, H, W, C), finite, in [0, 1], the model's shape."""
    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0 or not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{name} must be a non-empty float (N, H, W, C) array, got {images.dtype} {images.shape}; "
                         f"use preprocess_images() on raw uint8 images")
    images = images.astype(np.float32, copy=False)
    if not np.isfinite(images).all() or images.min() < 0.0 or images.max() > 1.0:
        raise ValueError(f"{name} must be finite and lie in [0, 1]; use preprocess_images() on raw uint8 images")
    if config is not None and images.shape[1:] != (config.img_size, config.img_size, config.channels):
        raise ValueError(f"{name} have shape {images.shape[1:]} but the model expects "
                         f"({config.img_size}, {config.img_size}, {config.channels})")
    return images


def _check_labels(labels, count: int, name: str = "labels") -> np.ndarray:
    """`labels` as a flat int64 array after checking: integer class indices >= 0, one per image."""
    labels = np.asarray(labels)
    labels = labels.reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer) or (count and labels.min() < 0):
        raise ValueError(f"{name} must be {count} integer class indices >= 0, one per image, got {labels.dtype} "
                         f"{labels.shape}")
    return labels.astype(np.int64)


def _check_codes(codes, name: str = "codes", min_dims: int = 1) -> np.ndarray:
    """Latent codes: a finite real (N, D) array with N >= 1 and D >= `min_dims`."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or len(codes) == 0 or codes.shape[1] < min_dims or not np.issubdtype(codes.dtype, np.number):
        raise ValueError(f"{name} must be a real (N, D) array, N >= 1, D >= {min_dims}: {codes.dtype} {codes.shape}")
    if not np.isfinite(codes).all():
        raise ValueError(f"{name} hold NaN or infinite values (a class without images has a NaN mean)")
    return codes


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------

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
            if not (_is_int(getattr(self, field)) and getattr(self, field) >= 1):
                raise ValueError(f"{field}={getattr(self, field)!r} must be an integer >= 1")
        decoder_grid_size(self.img_size, self.num_convolutions, self.strides)
        if self.encoder_padding not in ("same", "valid"):
            raise ValueError(f"encoder_padding={self.encoder_padding!r} must be 'same' or 'valid'")
        if not self.logvar_bound > 0 or not math.isfinite(self.logvar_bound):
            raise ValueError(f"logvar_bound={self.logvar_bound!r} must be a finite number > 0")

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

    # The likelihood, for the evaluation functions; vae_extensions.ExtendedCVAE overrides both.
    def reconstruction_log_prob(self, x, decoder_output, training=False):
        """log p(x|z) per example: independent Bernoulli pixels with the decoder's logits."""
        return bernoulli_log_prob(x, decoder_output)

    def likelihood_is_proper(self, images) -> bool:
        """Whether log p(x|z) is a distribution over these images: a Bernoulli is one over binary pixels only."""
        return bool(np.isin(images, (0.0, 1.0)).all())


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow so that weights, shuffles and samples repeat."""
    tf.keras.utils.set_random_seed(seed)


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------

def log_normal_pdf(sample, mean, logvar, raxis=1):
    """Log-density of a diagonal Gaussian N(mean, exp(logvar)) at `sample`, summed over `raxis`."""
    log2pi = math.log(2.0 * math.pi)
    return tf.reduce_sum(-0.5 * ((sample - mean) ** 2.0 * tf.exp(-logvar) + logvar + log2pi), axis=raxis)


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
    """Gaussian kernel matrix k(x_i, y_j) = exp(-||x_i - y_j||^2 / dim), shape (Nx, Ny).

    The bandwidth grows with the code size, so that two prior samples (squared distance about 2 dim) stay at
    k = e^-2 in any dimension. Zhao et al.'s InfoVAE code averages the squared differences over the dimensions and
    then divides by dim again, i.e. ||x - y||^2 / dim^2: a kernel that flattens out as dim grows.
    """
    dim = tf.cast(tf.shape(x)[1], x.dtype)
    squared_distances = tf.reduce_sum(tf.square(x[:, tf.newaxis, :] - y[tf.newaxis, :, :]), axis=2)
    return tf.exp(-squared_distances / dim)


def compute_mmd(x, y):
    """Biased (V-statistic) estimate of the squared maximum mean discrepancy (Gretton et al. 2012)."""
    return (tf.reduce_mean(compute_kernel(x, x)) + tf.reduce_mean(compute_kernel(y, y))
            - 2.0 * tf.reduce_mean(compute_kernel(x, y)))


def compute_mmd_loss(model, x, mmd_weight=1000.0):
    """InfoVAE / MMD-VAE loss: mean reconstruction negative log-likelihood + mmd_weight * MMD(codes, N(0, I))."""
    _check_mmd_weight(mmd_weight)
    mean, logvar = model.encode(x)
    z = model.reparameterize(mean, logvar)
    x_logit = model.decode(z)
    cross_ent = tf.nn.sigmoid_cross_entropy_with_logits(logits=x_logit, labels=x)
    reconstruction_nll = tf.reduce_sum(cross_ent, axis=[1, 2, 3])
    prior_samples = tf.random.normal(shape=tf.shape(z))
    return tf.reduce_mean(reconstruction_nll) + mmd_weight * compute_mmd(z, prior_samples)


def _check_mmd_weight(mmd_weight) -> float:
    if isinstance(mmd_weight, bool) or not isinstance(mmd_weight, numbers.Real) or not 0 <= mmd_weight < math.inf:
        raise ValueError(f"mmd_weight={mmd_weight!r} must be a finite number >= 0")
    return float(mmd_weight)


class MMDLoss:
    """`compute_mmd_loss` with a fixed weight, in the `loss_fn(model, x)` form that `main_train_loop` takes."""

    def __init__(self, mmd_weight: float = 1000.0):
        self.mmd_weight = _check_mmd_weight(mmd_weight)
        self.description = f"compute_mmd_loss(mmd_weight={self.mmd_weight:g})"

    def __call__(self, model, x):
        return compute_mmd_loss(model, x, self.mmd_weight)


def bernoulli_log_prob(x, logits):
    """log p(x|z) per example under independent Bernoulli pixels, summed over height, width and channels."""
    return -tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(logits=logits, labels=x), axis=[1, 2, 3])


def kl_divergence_to_standard_normal(mean, logvar):
    """Analytic KL(N(mean, exp(logvar)) || N(0, I)) per example (Kingma & Welling 2014, appendix B)."""
    return 0.5 * tf.reduce_sum(tf.exp(logvar) + tf.square(mean) - 1.0 - logvar, axis=1)


def elbo_per_example(model: CVAE, x, analytic_kl: bool = False, kl_weight=1.0, training: bool = False):
    """Single-sample ELBO log p(x|z) - KL per example; KL by Monte Carlo (as `compute_loss`) or in closed form."""
    mean, logvar = model.encode(x)
    z = model.reparameterize(mean, logvar)
    logpx_z = model.reconstruction_log_prob(x, model.decode(z), training)
    if analytic_kl:
        kl = kl_divergence_to_standard_normal(mean, logvar)
    else:
        kl = log_normal_pdf(z, mean, logvar) - log_normal_pdf(z, 0.0, 0.0)
    return logpx_z - kl_weight * kl


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------

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
        for field in ("epochs", "batch_size", "steps_per_execution", "eval_batch_size", "seed"):
            if not (_is_int(getattr(self, field)) and getattr(self, field) >= (field != "seed")):
                raise ValueError(f"{field}={getattr(self, field)!r} must be an integer >= {int(field != 'seed')}")
        if isinstance(self.learning_rate, bool) or not 0 < self.learning_rate < math.inf:
            raise ValueError(f"learning_rate={self.learning_rate!r} must be a finite number > 0")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule={self.lr_schedule!r} must be 'constant' or 'cosine'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of {PRECISIONS}")


def get_strategy(verbose: bool = True) -> tf.distribute.Strategy:
    """TPUStrategy where TensorFlow lists TPUs or `TPU_NAME` names one, MirroredStrategy over several GPUs, else one
    device; say which and why. (Colab's TPU runtimes have no TensorFlow today.)"""
    strategy, reason = None, ""
    tpu_name = os.environ.get("TPU_NAME", "")
    if tpu_name or tf.config.list_physical_devices("TPU"):
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_name or "local")
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            strategy, reason = tf.distribute.TPUStrategy(resolver), f"TPU {tpu_name or 'local'}"
        except Exception as error:  # noqa: BLE001 - whatever the resolver raises, the next-best strategy is used
            print(f"TPU not used ({type(error).__name__}: {str(error).strip().partition(chr(10))[0][:160]}); trying "
                  f"the GPUs and the CPU.")
    gpus = tf.config.list_logical_devices("GPU")
    if strategy is None and len(gpus) > 1:
        strategy, reason = tf.distribute.MirroredStrategy(), f"{len(gpus)} GPUs, one replica each"
    if strategy is None:
        strategy = tf.distribute.get_strategy()
        reason = "one device: " + ("the GPU" if gpus else "the CPU, as TensorFlow sees no GPU or TPU")
    if verbose:
        print(f"Strategy: {type(strategy).__name__} with {strategy.num_replicas_in_sync} replica(s); {reason}")
    return strategy


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where there is no such file."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next((set(line.split(":", 1)[1].split()) for line in handle if line.startswith("flags")), set())
    except OSError:
        return set()


def _gpu_capabilities() -> list[tuple[int, int]]:
    return [tuple(tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0)))
            for gpu in tf.config.list_physical_devices("GPU")]


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
    policy, reason = requested, "as configured"
    if requested == "auto":
        tpu = bool(tf.config.list_logical_devices("TPU")) if tpu is None else tpu
        gpus = _gpu_capabilities() if gpu_capabilities is None else [tuple(c) for c in gpu_capabilities]
        flags = (_cpu_flags() if cpu_flags is None else set(cpu_flags)) & {"avx512_bf16", "amx_bf16"}
        if tpu:
            policy, reason = "mixed_bfloat16", "TPUs multiply bfloat16 natively"
        elif gpus and min(gpus) >= (8, 0):
            policy, reason = "mixed_bfloat16", f"GPU compute capability {min(gpus)[0]}.{min(gpus)[1]} >= 8.0"
        elif gpus and min(gpus) >= (7, 0):
            policy, reason = "mixed_float16", f"GPU compute capability {min(gpus)[0]}.{min(gpus)[1]}: float16, no bf16"
        elif gpus:
            policy, reason = "float32", "the GPU predates float16 tensor cores (compute capability < 7.0)"
        elif flags:
            policy, reason = "mixed_bfloat16", f"the CPU has {' and '.join(sorted(flags))}"
        else:
            policy, reason = "float32", "no bfloat16 or float16 hardware found"
    if verbose:
        print(f"Precision: {policy} ({reason})")
    return policy


def model_precision(model: CVAE) -> str:
    """The dtype policy the model's layers compute in (what the losses read, codes and logits, is float32)."""
    return model.encoder.layers[0].dtype_policy.name


def build_model(config: VAEConfig, train_config: TrainConfig = TrainConfig(),
                strategy: tf.distribute.Strategy | None = None, model_class: type[CVAE] = CVAE) -> CVAE:
    """Build `model_class(config)`: seeded, in the strategy's scope, computing in the precision `train_config` picks."""
    if not isinstance(config, VAEConfig) or not isinstance(train_config, TrainConfig):
        raise TypeError(f"build_model needs a VAEConfig and a TrainConfig, got {type(config).__name__} and "
                        f"{type(train_config).__name__}")
    set_seed(train_config.seed)
    previous_policy = tf.keras.mixed_precision.global_policy()
    # Layers take the global policy when they are built; restore it so that nothing else is affected.
    tf.keras.mixed_precision.set_global_policy(choose_precision(train_config.precision))
    try:
        with (strategy or tf.distribute.get_strategy()).scope():
            return model_class(config)
    finally:
        tf.keras.mixed_precision.set_global_policy(previous_policy)


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


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


def main_train_loop(model: CVAE, train_images: np.ndarray, test_images: np.ndarray, config: TrainConfig,
                    loss_fn: Callable = compute_loss, *, strategy: tf.distribute.Strategy | None = None,
                    checkpoint_dir: str | None = None, allow_new_settings: bool = False,
                    on_epoch_end: Callable | None = None, verbose: bool = True) -> list[dict]:
    """Train `model` with Adam as `config` says, show each epoch's time and test ELBO, and return the history.

    With `checkpoint_dir`, each epoch is checkpointed and a new call resumes after the last completed one (see
    `RunCheckpoint`); `allow_new_settings=True` continues it with another learning rate, schedule or fewer epochs.
    `on_epoch_end(epoch, model, row)` runs after each epoch (e.g. to show reconstructions).
    """
    strategy = strategy or tf.distribute.get_strategy()
    train_images, test_images = _check_training_inputs(model, train_images, test_images, config, strategy)
    steps_per_epoch = len(train_images) // config.batch_size  # whole batches: static shapes, equal replica shares
    with strategy.scope():
        optimizer = make_optimizer(config, steps_per_epoch)
        if model_precision(model) == "mixed_float16":  # float16 gradients underflow without a loss scale
            optimizer = tf.keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
    train_steps = make_train_function(model, optimizer, loss_fn, strategy)
    run = RunCheckpoint(checkpoint_dir, model, optimizer, run_record(model, config, loss_fn, train_images),
                        allow_new_settings, verbose)
    history = run.history
    for epoch in range(len(history) + 1, config.epochs + 1):
        if verbose:
            print(f"Epoch {epoch}/{config.epochs}")
        progress = tf.keras.utils.Progbar(steps_per_epoch, stateful_metrics=["loss"], verbose=int(verbose))
        started = time.perf_counter()
        # A shuffle seeded by the epoch makes a resumed run see the same batches as an uninterrupted one.
        dataset = make_dataset(train_images, config.batch_size, shuffle_seed=config.seed * 100_003 + epoch,
                               drop_remainder=True)
        iterator = iter(strategy.experimental_distribute_dataset(dataset))
        if hasattr(loss_fn, "start_epoch"):
            loss_fn.start_epoch(epoch)  # e.g. the KL weight of a warm-up schedule
        loss_sum, done = 0.0, 0
        while done < steps_per_epoch:
            losses = train_steps(iterator, tf.constant(min(config.steps_per_execution, steps_per_epoch - done))).numpy()
            _check_finite(losses, epoch, done, steps_per_epoch, checkpoint_dir)
            loss_sum, done = loss_sum + float(losses.sum()), done + len(losses)
            progress.update(done, [("loss", loss_sum / done)])  # the bar's time: this epoch's training so far
        train_seconds = time.perf_counter() - started
        test_elbo = evaluate_elbo(model, test_images, config.eval_batch_size)
        if verbose:
            print(f"Epoch {epoch}/{config.epochs}: {train_seconds:.1f} s training, test ELBO {test_elbo:.2f} nats")
        history.append({"epoch": epoch, "seconds": round(train_seconds, 2), "train_loss": loss_sum / done,
                        "test_elbo": test_elbo})
        run.save(history)
        if on_epoch_end is not None:
            on_epoch_end(epoch, model, history[-1])
    return history


def _check_finite(losses, epoch, done, steps_per_epoch, checkpoint_dir) -> None:
    if not np.isfinite(losses).all():  # name the epoch and step of the first NaN or infinite loss
        bad = int(np.flatnonzero(~np.isfinite(losses))[0])
        kept = f" (the checkpoint of epoch {epoch - 1} is kept)" if checkpoint_dir and epoch > 1 else ""
        raise NonFiniteLossError(f"loss became {losses[bad]} at epoch {epoch}, step {done + bad + 1} of "
                                 f"{steps_per_epoch}; training stopped{kept}. Lower the learning rate "
                                 f"(allow_new_settings=True continues the checkpoint with it) or check the inputs.")


def _check_training_inputs(model, train_images, test_images, config, strategy):
    """The images as float32 after checking everything `main_train_loop` is given, before any TensorFlow work."""
    if not isinstance(model, CVAE) or not isinstance(config, TrainConfig):
        raise TypeError(f"main_train_loop needs a CVAE (see build_model) and a TrainConfig, got "
                        f"{type(model).__name__} and {type(config).__name__}")
    train_images = _check_images(train_images, model.config, "train_images")
    test_images = _check_images(test_images, model.config, "test_images")
    if config.batch_size > len(train_images) or config.batch_size % strategy.num_replicas_in_sync:
        raise ValueError(f"batch_size={config.batch_size} must be at most the {len(train_images)} training images and "
                         f"divisible by the {strategy.num_replicas_in_sync} replica(s)")
    return train_images, test_images


# Checkpoints: tf.train.CheckpointManager writes, rotates and finds them; each holds the run's record and history.

class CheckpointMismatchError(ValueError):
    """The checkpoint folder holds another run, or this run with other optimisation settings."""


NEW_SETTINGS = ("training.learning_rate", "training.lr_schedule", "training.epochs")  # allow_new_settings=True


def describe_loss(loss_fn) -> str:
    """The loss's `description` attribute, else its module-qualified name: the same in every Python and TensorFlow."""
    description = getattr(loss_fn, "description", None)
    if isinstance(description, str):
        return description
    return f"{loss_fn.__module__}.{getattr(loss_fn, '__qualname__', type(loss_fn).__qualname__)}"


def run_record(model: CVAE, config: TrainConfig, loss_fn: Callable, train_images: np.ndarray) -> dict:
    """What a run trains, flat: the model and training configurations, the loss, the data's shape and fingerprint.

    The settings that change nothing that is trained (steps per call, evaluation batch, precision) are left out.
    """
    training = {key: value for key, value in dataclasses.asdict(config).items()
                if key not in ("steps_per_execution", "eval_batch_size", "precision")}
    fingerprint = hashlib.sha256(np.ascontiguousarray(train_images)).hexdigest()[:16]
    architecture = dataclasses.asdict(model.config)
    record = {"model.class": type(model).__name__, **{f"model.{k}": v for k, v in architecture.items()},
              **{f"training.{k}": v for k, v in training.items()}, "loss": describe_loss(loss_fn),
              "data": f"{train_images.dtype} {list(train_images.shape)} sha256 {fingerprint}"}
    return json.loads(json.dumps(record))  # as a checkpoint reads it back: tuples as lists


class _JSONState(tf.train.experimental.PythonState):
    """A JSON value saved inside the checkpoint: the run record and the history."""

    def __init__(self):
        self.value = {}

    def serialize(self) -> str:
        return json.dumps(self.value)

    def deserialize(self, string_value) -> None:
        self.value = json.loads(string_value)


class _OptimizerState(tf.Module):
    """An optimizer's step count and slot variables (Adam's moments), but not its learning rate, which comes from the
    call that resumes; a LossScaleOptimizer is saved as its inner optimizer, so every precision writes the same."""

    def __init__(self, optimizer):
        super().__init__()
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        self.iterations = inner.iterations
        self.slots = [v for v in inner.variables if v is not inner.iterations and v is not inner._learning_rate]


class RunCheckpoint:
    """One checkpoint per epoch of model, optimizer state, run record and history; the newest two are kept.

    On creation it restores the newest checkpoint that restores completely (trying the older one when the newest is
    damaged) after checking that its record is this run's. With `directory=None` nothing is read or written.
    """

    def __init__(self, directory: str | None, model: CVAE, optimizer, record: dict, allow_new_settings: bool = False,
                 verbose: bool = True):
        self.record, self.history = record, []
        self._state = _JSONState()
        self._checkpoint = tf.train.Checkpoint(model=model, optimizer=_OptimizerState(optimizer), run=self._state)
        self._manager = None
        if directory is not None:
            directory = os.path.expanduser(directory)
            self._manager = tf.train.CheckpointManager(self._checkpoint, directory, max_to_keep=2)
            self._restore(allow_new_settings, verbose)

    def _restore(self, allow_new_settings: bool, verbose: bool) -> None:
        damaged = []
        for path in reversed(self._manager.checkpoints):
            try:
                saved = json.loads(tf.train.load_checkpoint(path).get_tensor("run/.ATTRIBUTES/py_state"))
                _compare_records(saved["record"], self.record, allow_new_settings, self._manager.directory)
                self._checkpoint.read(path).assert_existing_objects_matched().expect_partial()
            except (tf.errors.OpError, ValueError, KeyError, AssertionError) as error:
                if isinstance(error, CheckpointMismatchError):
                    raise
                damaged.append(os.path.basename(path))
                print(f"{path} does not restore ({type(error).__name__}); trying the older checkpoint.")
                continue
            self.history = saved["history"]
            if verbose:
                done = len(self.history)
                print(f"Restored {path}: {done} epoch(s) done, " + (f"resuming at epoch {done + 1}." if done <
                      self.record["training.epochs"] else "complete."))
            return
        if damaged:
            raise OSError(f"no checkpoint in {self._manager.directory} restores ({', '.join(damaged)}); move the "
                          f"folder away to train from the start")

    def save(self, history: list[dict]) -> None:
        """Checkpoint the epoch that `history` ends with; the manager deletes all but the newest two."""
        if self._manager is not None:
            self._state.value = {"record": self.record, "history": history}
            self._manager.save(checkpoint_number=len(history))


def _compare_records(saved: dict, current: dict, allow_new_settings: bool, directory: str) -> None:
    """Raise CheckpointMismatchError naming each difference, unless only allowed settings changed (or epochs grew)."""
    changed = [key for key in sorted(saved.keys() | current.keys()) if saved.get(key) != current.get(key)
               and not (key == "training.epochs" and current[key] > saved.get(key, math.inf))]
    if not changed:
        return
    listed = "; ".join(f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now" for key in changed)
    if any(key not in NEW_SETTINGS for key in changed):
        raise CheckpointMismatchError(f"{directory} holds another run ({listed}); use a new checkpoint_dir, or move "
                                      f"this one away to start again")
    if not allow_new_settings:
        raise CheckpointMismatchError(f"{directory} holds this model trained with other settings ({listed}); pass "
                                      f"allow_new_settings=True to continue it with the new ones")


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------

def map_batches(model: CVAE, function: Callable, images: np.ndarray, batch_size: int = 1000, **kwargs) -> np.ndarray:
    """Apply `function(model, x, **kwargs)` to `images` in batches and concatenate the per-example results.

    The compiled function is kept on the model, keyed by `function` and `kwargs`, with the batch size left open, so
    each evaluation traces once per model however often it runs.
    """
    images = _check_images(images, model.config)
    # A plain attribute, set past Keras's attribute tracking: the functions live and die with their model.
    compiled = model.__dict__.setdefault("_compiled_evaluations", {})
    key = (function, tuple(sorted(kwargs.items())))
    if key not in compiled:
        signature = [tf.TensorSpec((None,) + images.shape[1:], tf.float32)]
        compiled[key] = tf.function(functools.partial(function, model, **kwargs), input_signature=signature)
    return np.concatenate([compiled[key](batch).numpy() for batch in make_dataset(images, batch_size)])


def evaluate_elbo(model: CVAE, images: np.ndarray, batch_size: int = 1000, analytic_kl: bool = False) -> float:
    """Mean single-sample ELBO over `images` in nats (KL by Monte Carlo, or in closed form when `analytic_kl`)."""
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
    images = _check_images(images)
    reconstructions = _check_images(reconstructions, name="reconstructions")
    if images.shape != reconstructions.shape:
        raise ValueError(f"images {images.shape} and reconstructions {reconstructions.shape} differ in shape")
    mse = np.mean((images.astype(np.float64) - reconstructions) ** 2, axis=(1, 2, 3))
    return float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))))


def slug(name: str) -> str:
    """A file-name-safe form of a model or figure name: lower case, runs of other characters as one underscore."""
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")


def describe_machine() -> str:
    """One line naming the machine: Colab or not, CPU cores, accelerators, Python, TensorFlow and Keras versions."""
    accelerators = [device.device_type for device in tf.config.list_logical_devices() if device.device_type != "CPU"]
    devices = ", ".join(f"{accelerators.count(t)} {t}" for t in sorted(set(accelerators))) or "no accelerator"
    where = "Google Colab, " if "google.colab" in sys.modules else ""
    return (f"{where}{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, {devices}, Python "
            f"{platform.python_version()}, TensorFlow {tf.__version__}, Keras {tf.keras.__version__}")


def get_allClass_encodings(model: CVAE, images: np.ndarray, labels: np.ndarray):  # noqa: N802 - the homework's name
    """Group the latent means of `images` by class: ({class: (n_c, latent_dim) codes}, (classes, latent_dim) means)."""
    labels = _check_labels(labels, len(images))
    codes = encode_means(model, images)
    codes_by_class = {int(c): codes[labels == c] for c in np.unique(labels)}
    class_means = np.stack([class_codes.mean(axis=0) for class_codes in codes_by_class.values()])
    return codes_by_class, class_means


# ---------------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------------

def _save(figure: Figure, path: str | None) -> Figure:
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


def plot_image_grid(images, ncols: int = 10, titles: Sequence[str] | None = None, suptitle: str | None = "Images",
                    row_labels: Sequence[str] | None = None, cell: float = 1.1, path: str | None = None) -> Figure:
    """Show `images` (N, H, W, C) in a grid, with optional per-image titles and a label left of each row."""
    nrows = math.ceil(len(images) / ncols)
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
    labels = _check_labels(labels, len(images))
    missing = [name for c, name in enumerate(class_names) if not np.any(labels == c)]
    if missing:
        raise ValueError(f"labels hold no image of the classes {missing}")
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in range(len(class_names))]
    return plot_image_grid(np.asarray(images)[firsts], ncols=len(class_names), titles=list(class_names), cell=1.2,
                           suptitle="The first image of each class", path=path)


def generate_and_display_images(model: CVAE, epoch: int, test_sample, path: str | None = None) -> Figure:
    """Show `test_sample` (top row) above its reconstructions through a sampled code (bottom row)."""
    test_sample = _check_images(test_sample, model.config, "test_sample")
    mean, logvar = model.encode(test_sample)
    z = model.reparameterize(mean, logvar)
    predictions = model.sample(z)  # decode with apply_sigmoid=True: pixel probabilities in [0, 1] for display
    figure = plot_image_grid(np.concatenate([test_sample, predictions.numpy()]), ncols=len(test_sample), cell=0.8,
                             suptitle=f"Test images (top) and reconstructions (bottom), epoch {epoch}")
    return _save(figure, path)


def plot_latent_space(codes_by_class: Mapping[int, np.ndarray], class_names: Sequence[str],
                      max_points_per_class: int = 400, title: str = "Latent means", seed: int = 0,
                      path: str | None = None) -> Figure:
    """Scatter the codes (2-d, else their first two principal components) by class, each class mean marked and named."""
    from sklearn.decomposition import PCA

    codes = _check_codes(np.concatenate(list(codes_by_class.values())), "codes_by_class", min_dims=2)
    if codes.shape[1] > 2:
        pca = PCA(n_components=2, random_state=seed).fit(codes)
        project = pca.transform
        labels = [f"PC {i + 1} ({share:.0%} of variance)" for i, share in enumerate(pca.explained_variance_ratio_)]
    else:
        project, labels = np.asarray, ["z[0]", "z[1]"]  # nothing to project: the axes are the code's own
    rng = np.random.default_rng(seed)
    figure = Figure(figsize=(8.5, 6), layout="constrained")
    axis = figure.subplots()
    names = [class_names[label] for label in codes_by_class]
    colours = [f"C{index % 10}" for index in range(len(names))]
    shown = []
    for class_codes, name, colour in zip(codes_by_class.values(), names, colours):
        shown.append(project(class_codes[rng.permutation(len(class_codes))[:max_points_per_class]]))
        axis.scatter(shown[-1][:, 0], shown[-1][:, 1], s=6, alpha=0.4, linewidths=0, color=colour, label=name)
    centres = np.stack([project(class_codes.mean(axis=0, keepdims=True))[0] for class_codes in codes_by_class.values()])
    axis.scatter(centres[:, 0], centres[:, 1], s=40, c=colours, edgecolors="black", linewidths=1, zorder=3,
                 gid="class means")
    axis.set(xlabel=labels[0], ylabel=labels[1], title=title)
    legend = axis.legend(title="class", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, markerscale=3)
    for handle in legend.legend_handles:
        handle.set_alpha(1.0)
    figure.draw_without_rendering()  # the layout and limits that axes fractions refer to
    to_fraction = axis.transData + axis.transAxes.inverted()
    if len(centres) > 1 and np.ptp(to_fraction.transform(centres), axis=0).max() < 0.15:
        # Means that nearly coincide (CIFAR-10's) would print names over names: name them in a zoom on the means.
        axis = _zoom_on(axis, centres, to_fraction.transform(np.concatenate(shown)))
        axis.scatter(centres[:, 0], centres[:, 1], s=40, c=colours, edgecolors="black", linewidths=1, gid="class means")
        figure.draw_without_rendering()
    _name_points(axis, centres, names, colours)
    return _save(figure, path)


def _zoom_on(axis, points: np.ndarray, shown: np.ndarray):
    """An inset zoomed on `points`, in the corner of `axis` holding the fewest `shown` points (axes fractions)."""
    pad = 0.3 * np.ptp(points, axis=0).max()  # room around the points for their names
    low = points.min(axis=0) - pad
    high = points.max(axis=0) + pad
    corners = [(x, y) for y in (0.57, 0.07) for x in (0.57, 0.07)]
    crowding = [np.sum(np.all((shown > corner) & (shown < np.add(corner, 0.4)), axis=1)) for corner in corners]
    inset = axis.inset_axes([*corners[int(np.argmin(crowding))], 0.4, 0.38])
    inset.set(xlim=(low[0], high[0]), ylim=(low[1], high[1]))
    inset.set_title("class means, zoomed", fontsize=8, pad=3)
    inset.tick_params(labelsize=7)
    inset.locator_params(nbins=4)
    axis.indicate_inset([*low, *(high - low)], edgecolor="black", alpha=0.8)
    return inset


def _overlap_area(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Area that `box` shares with each of `boxes`, all given as (x0, y0, x1, y1)."""
    sides = np.minimum(box[2:], boxes[:, 2:]) - np.maximum(box[:2], boxes[:, :2])
    return np.prod(np.clip(sides, 0.0, None), axis=-1)


def _name_points(axis, points: np.ndarray, names: Sequence[str], colours: Sequence[str], fontsize: float = 9) -> None:
    """Write each name beside its point on a white halo, at the nearest spot clear of the other names and points."""
    from matplotlib import colors, patheffects
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath

    scale = 72 / axis.figure.dpi  # points per pixel: the lengths below are in points
    centres = axis.transData.transform(points) * scale
    frame = axis.get_window_extent().extents[None] * scale
    radius, height = 5.0, 1.2 * fontsize  # a marker's (s=40) with a margin; a line of text
    taken = np.concatenate([centres - radius, centres + radius], axis=1)  # boxes (x0, y0, x1, y1)
    halo = [patheffects.withStroke(linewidth=3, foreground="white")]
    for point, centre, name, colour in zip(points, centres, names, colours):
        width = TextPath((0, 0), name, size=fontsize, prop=FontProperties(weight="bold")).get_extents().width + 3
        spots = []  # lower-left corners, ring by ring farther out: right, left, above, below, then the diagonals
        for r in radius + 1 + height * np.arange(4):
            spots += [(r, -height / 2), (-r - width, -height / 2), (-width / 2, r), (-width / 2, -r - height),
                      (0.7 * r, 0.7 * r), (0.7 * r, -0.7 * r - height), (-0.7 * r - width, 0.7 * r),
                      (-0.7 * r - width, -0.7 * r - height)]
        boxes = [np.r_[centre + spot, centre + spot + (width, height)] for spot in spots]
        costs = [_overlap_area(box, taken).sum() + width * height - _overlap_area(box, frame)[0] for box in boxes]
        # The first spot clear of everything, else the least covered one (rounded: the areas' differences leave ~1e-14).
        best = int(np.argmin(np.round(costs, 6)))
        taken = np.vstack([taken, boxes[best]])
        dark = 0.65 * np.asarray(colors.to_rgb(colour))  # the class colour, dark enough to read on the halo
        axis.annotate(name, point, xytext=(spots[best][0], spots[best][1] + height / 2),
                      textcoords="offset points", va="center", fontsize=fontsize, weight="bold", color=dark,
                      path_effects=halo, zorder=4, in_layout=False)


def decode_line(model: CVAE, start, end, steps: int) -> np.ndarray:
    """Decode `steps` codes evenly spaced on the straight line from `start` to `end` into images in [0, 1]."""
    codes = np.linspace(start, end, steps).astype(np.float32)  # (steps, latent_dim): row t is start + t (end - start)
    return model.decode(codes, apply_sigmoid=True).numpy()


def walk_src_to_dst(model: CVAE, src_class, dst_class, class_means: np.ndarray, class_names: Sequence[str],
                    steps: int = 10, path: str | None = None) -> Figure:
    """Decode `steps` codes evenly spaced from the mean code of `src_class` to that of `dst_class` (name or index)."""
    class_means = _check_codes(class_means, "class_means")
    if len(class_means) != len(class_names):
        raise ValueError(f"class_means has {len(class_means)} rows for {len(class_names)} class names; pass the means "
                         f"of get_allClass_encodings on images of every class")
    src, dst = (list(class_names).index(c) if isinstance(c, str) else c for c in (src_class, dst_class))
    images = decode_line(model, class_means[src], class_means[dst], steps)
    titles = [class_names[src]] + [f"{t:.2f}" for t in np.linspace(0, 1, steps)[1:-1]] + [class_names[dst]]
    return plot_image_grid(images, ncols=steps, titles=titles, cell=1.1, path=path,
                           suptitle=f"Walk between class means: {class_names[src]} to {class_names[dst]}")


def plot_prior_samples(model: CVAE, num_samples: int = 40, ncols: int = 10, seed: int = 0,
                       title: str = "Samples decoded from the prior N(0, I)", path: str | None = None) -> Figure:
    """Decode codes drawn from the prior N(0, I) in one batched call and show them in a grid."""
    eps = tf.random.stateless_normal((num_samples, model.config.latent_dim), seed=(seed, 0))
    return plot_image_grid(model.sample(eps).numpy(), ncols=ncols, cell=0.9, path=path, suptitle=title)


def draw_architecture(model: CVAE, path: str | None = None) -> Figure | None:
    """The encoder and the decoder as `tf.keras.utils.plot_model` draws them, side by side and titled.

    Needs pydot and graphviz's `dot`; without them, prints the text summaries instead and returns None.
    """
    import matplotlib.image

    titles = {model.encoder: f"Encoder: image → [mean, log-variance] as one vector of 2 × {model.config.latent_dim}",
              model.decoder: f"Decoder: code of {model.config.latent_dim} → one logit per pixel and channel"}
    diagrams = []
    with tempfile.TemporaryDirectory() as folder:
        for part in titles:
            file = os.path.join(folder, f"{part.name}.png")
            try:
                tf.keras.utils.plot_model(part, to_file=file, show_shapes=True, show_layer_names=True, dpi=70)
            except ImportError:  # outside IPython; inside it, Keras prints a note and writes no file
                pass
            if not os.path.exists(file):
                print("No diagram (it needs pydot and graphviz's `dot`: apt-get install graphviz); text summaries:")
                model.encoder.summary()
                model.decoder.summary()
                return None
            diagrams.append(matplotlib.image.imread(file))
    heights, widths = [d.shape[0] for d in diagrams], [d.shape[1] for d in diagrams]
    figure = Figure(figsize=(sum(widths) / 70 + 1, max(heights) / 70 + 0.8), layout="constrained")
    for axis, diagram, title in zip(figure.subplots(1, 2, width_ratios=widths), diagrams, titles.values()):
        axis.imshow(diagram)
        axis.set_title(title, fontsize=14, weight="bold")
        axis.axis("off")
    return _save(figure, path)


def plot_history(histories: Mapping[str, Sequence[dict]], title: str = "Test-set ELBO after each epoch",
                 path: str | None = None) -> Figure:
    """Plot the test-set ELBO per epoch for each named run."""
    figure = Figure(figsize=(6, 3.5), layout="constrained")
    axis = figure.subplots()
    for name, history in histories.items():
        axis.plot([row["epoch"] for row in history], [row["test_elbo"] for row in history], marker="o", label=name)
    axis.set(xlabel="epoch", ylabel="test ELBO (nats)", title=title)
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(figure, path)
