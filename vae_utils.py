"""Convolutional variational autoencoders for MNIST and CIFAR-10: data, model, losses, training, evaluation, plots.

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


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------

# "logistic_ar" adds to the logistic's location and log-scale per pixel channel a second log-scale and one coefficient
# per residual it sees (`_ar_locations`).
LIKELIHOODS = ("bernoulli", "logistic", "logistic_ar")
# Causal neighbours (row, column offsets) whose residuals a "logistic_ar" pixel sees: left, up-left, up, up-right.
AR_NEIGHBOURS = ((0, -1), (-1, -1), (-1, 0), (-1, 1))
UPSAMPLINGS = ("transpose", "resize")


def _is_int(value) -> bool:
    """True for Python and NumPy integers, but not for booleans (which Python counts as integers)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


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
    encoder_padding: str = "same"
    upsampling: str = "transpose"
    likelihood: str = "bernoulli"
    spatial_latent: bool = False  # True: the code is a (grid, grid, latent_dim / grid**2) map that convolutions make
    logvar_bound: float = 10.0

    def __post_init__(self):
        for field in ("img_size", "channels", "latent_dim", "num_convolutions", "filters", "kernel_size", "strides"):
            value = getattr(self, field)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{field}={value!r} must be a positive integer")
        decoder_grid_size(self.img_size, self.num_convolutions, self.strides)
        if self.encoder_padding not in ("same", "valid"):
            raise ValueError(f"encoder_padding={self.encoder_padding!r} must be 'same' or 'valid'")
        if self.upsampling not in UPSAMPLINGS:
            raise ValueError(f"upsampling={self.upsampling!r} must be one of {UPSAMPLINGS}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood={self.likelihood!r} must be one of {LIKELIHOODS}")
        if self.spatial_latent:
            if self.encoder_padding != "same":
                raise ValueError("spatial_latent=True must use encoder_padding='same', so that the code grid is the "
                                 "decoder's grid")
            cells = self.grid_size ** 2
            if self.latent_dim % cells:
                raise ValueError(f"spatial_latent=True needs latent_dim divisible by grid_size**2 = {cells} "
                                 f"(channels per grid cell), got latent_dim={self.latent_dim}")
        if not self.logvar_bound > 0:
            raise ValueError(f"logvar_bound={self.logvar_bound!r} must be positive")

    @property
    def grid_size(self) -> int:
        return decoder_grid_size(self.img_size, self.num_convolutions, self.strides)

    @property
    def image_dims(self) -> int:
        return self.img_size * self.img_size * self.channels

    @property
    def decoder_outputs(self) -> int:
        """Channels of the decoder's output: the likelihood's parameters for every image channel of a pixel."""
        if self.likelihood == "logistic_ar":  # location, two log-scales, and a coefficient per residual it sees
            return self.channels * (3 + (len(AR_NEIGHBOURS) + 1) * self.channels)
        return self.channels * {"bernoulli": 1, "logistic": 2}[self.likelihood]


class _AutoregressiveHead(tf.keras.layers.Layer):
    """Decoder output of "logistic_ar": the mean model's maps from a k x k convolution, the rest from a 1 x 1 one."""

    def __init__(self, config: VAEConfig, **kwargs):
        super().__init__(**kwargs)
        self.mean_model = tf.keras.layers.Conv2DTranspose(2 * config.channels, config.kernel_size, strides=1,
                                                          padding="same")
        # 1 x 1, because the 45 coefficient maps of an RGB image would make a k x k layer 6 times wider.
        self.autoregressive = tf.keras.layers.Conv2D(config.decoder_outputs - 2 * config.channels, 1)

    def call(self, features):
        # The autoregressive maps read the features without training them: the encoder and decoder are trained by
        # the mean model alone, so that the code keeps carrying the image (see `reconstruction_log_prob`).
        return tf.concat([self.mean_model(features), self.autoregressive(tf.stop_gradient(features))], axis=-1)


def _likelihood_head(config: VAEConfig) -> tf.keras.layers.Layer:
    """The decoder's last layer: one output map per image channel times the likelihood's parameters, at stride 1."""
    if config.likelihood == "logistic_ar":
        return _AutoregressiveHead(config)
    return tf.keras.layers.Conv2DTranspose(config.decoder_outputs, config.kernel_size, strides=1, padding="same")


class CVAE(tf.keras.Model):
    """Convolutional VAE: strided Conv2D encoder to (mean, log-variance), Dense + transposed-conv decoder to logits."""

    def __init__(self, config: VAEConfig | None = None, **overrides):
        config = dataclasses.replace(config or VAEConfig(), **overrides)  # validates before any layer is built
        super().__init__()
        self.config = config
        c = self.config
        widths = [c.filters * 2 ** i for i in range(c.num_convolutions)]
        g = c.grid_size
        if c.spatial_latent:
            # Mean and log-variance maps of latent_dim / g**2 channels each; channel-major flattening puts every mean
            # before every log-variance, so `encode` splits them as it does a dense code.
            code_channels = c.latent_dim // (g * g)
            encoder_head = [tf.keras.layers.Conv2D(2 * code_channels, c.kernel_size, padding="same"),
                            tf.keras.layers.Permute((3, 1, 2)), tf.keras.layers.Flatten()]
            decoder_head = [tf.keras.layers.Reshape((code_channels, g, g)), tf.keras.layers.Permute((2, 3, 1)),
                            tf.keras.layers.Conv2D(c.filters, c.kernel_size, padding="same", activation="relu")]
        else:
            encoder_head = [tf.keras.layers.Flatten(), tf.keras.layers.Dense(2 * c.latent_dim)]  # mean and logvar
            decoder_head = [tf.keras.layers.Dense(g * g * c.filters, activation="relu"),
                            tf.keras.layers.Reshape((g, g, c.filters))]
        self.encoder = tf.keras.Sequential(
            [tf.keras.Input(shape=(c.img_size, c.img_size, c.channels))]
            + [tf.keras.layers.Conv2D(w, c.kernel_size, strides=c.strides, padding=c.encoder_padding,
                                      activation="relu") for w in widths]
            + encoder_head,  # no activation: mean and log-variance are any real numbers
            name="encoder")
        upsampling_blocks = []
        for w in reversed(widths):
            if c.upsampling == "transpose":
                upsampling_blocks.append(tf.keras.layers.Conv2DTranspose(
                    w, c.kernel_size, strides=c.strides, padding="same", activation="relu"))
            else:  # resize then convolve, which has no uneven kernel overlap and so no checkerboard (Odena et al. 2016)
                upsampling_blocks += [tf.keras.layers.UpSampling2D(c.strides, interpolation="nearest"),
                                      tf.keras.layers.Conv2D(w, c.kernel_size, padding="same", activation="relu")]
        self.decoder = tf.keras.Sequential(
            [tf.keras.Input(shape=(c.latent_dim,))]
            + decoder_head
            + upsampling_blocks
            + [_likelihood_head(c)],
            name="decoder")

    def encode(self, x):
        """Return the mean and the (softly bounded) log-variance of q(z|x)."""
        mean, raw_logvar = tf.split(self.encoder(x), num_or_size_splits=2, axis=1)
        # tanh keeps logvar in (-bound, bound) so exp(logvar) cannot overflow, with gradients everywhere.
        bound = self.config.logvar_bound
        return mean, bound * tf.tanh(raw_logvar / bound)

    def reparameterize(self, mean, logvar):
        """Draw z = mean + sigma * eps with eps ~ N(0, I), so the randomness sits outside the trainable path."""
        eps = tf.random.normal(shape=tf.shape(mean))
        return eps * tf.exp(logvar * 0.5) + mean

    def decode(self, z, apply_sigmoid=False):
        """Return the decoder's logits, or the mean image in [0, 1] when `apply_sigmoid` is true."""
        logits = self.decoder(z)
        if apply_sigmoid:
            return mean_image(self.config, logits)
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
    tf.keras.utils.set_random_seed(seed)


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------

LOG_2PI = math.log(2.0 * math.pi)
LOGISTIC_LOG_SCALE_SHIFT = 2.0  # log_scale = decoder output - shift, for the discretized logistic


def log_normal_pdf(sample, mean, logvar, raxis=1):
    """Log-density of a diagonal Gaussian N(mean, exp(logvar)) at `sample`, summed over `raxis`."""
    return tf.reduce_sum(-0.5 * ((sample - mean) ** 2.0 * tf.exp(-logvar) + logvar + LOG_2PI), axis=raxis)


def discretized_logistic_log_prob(x, loc, log_scale):
    """Log-probability of 8-bit pixels `x` in [0, 1] under a logistic discretized into 256 bins, per pixel.

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


def _logistic_parameters(config: VAEConfig, decoder_output):
    """Locations on [-1, 1] and log-scales of the factorized logistic, from the decoder's first 2 x channels maps."""
    c = config.channels
    return 2.0 * tf.sigmoid(decoder_output[..., :c]) - 1.0, _log_scale(decoder_output[..., c:2 * c])


def _log_scale(raw_log_scale):
    """Log-scale of a discretized logistic from a raw decoder output."""
    # The shift starts the scale at e^-2 rather than e^0 (the decoder's raw outputs start near 0), so the few epochs
    # a CPU allows are not spent shrinking it (3 CIFAR-10 epochs on 10k images, resize decoder: 6.9 instead of 7.1
    # bits/dim, 18.8 instead of 17.4 dB PSNR).
    # The floor e^-7 keeps the bin probabilities representable.
    return tf.maximum(raw_log_scale - LOGISTIC_LOG_SCALE_SHIFT, -7.0)


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


def mean_image(config: VAEConfig, decoder_output):
    """The decoder's image in [0, 1]: Bernoulli means, or logistic locations.

    For "logistic_ar" the locations are the image too: decoding pixel by pixel, each at its predicted location,
    leaves every residual at zero, and the mean of x given z is the same map up to the rounding to 256 levels.
    """
    return tf.sigmoid(decoder_output[..., :config.channels])


def reconstruction_log_prob(model: CVAE, x, decoder_output, training: bool = False):
    """log p(x|z) per example, summed over height, width and channels, for the model's likelihood.

    With `training`, a "logistic_ar" model adds the log-probability of its factorized mean model (see below).
    """
    config = model.config
    if config.likelihood == "bernoulli":
        cross_entropy = tf.nn.sigmoid_cross_entropy_with_logits(logits=decoder_output, labels=x)
        return -tf.reduce_sum(cross_entropy, axis=[1, 2, 3])
    loc, log_scale = _logistic_parameters(config, decoder_output)
    factorized = tf.reduce_sum(discretized_logistic_log_prob(x, loc, log_scale), axis=[1, 2, 3])
    if config.likelihood != "logistic_ar":
        return factorized
    # "logistic_ar": x = loc + residual, each residual predicted from the residuals before it. Trained on this alone,
    # the prediction from neighbours does the work of `loc` and the code carries less of the image (3 CIFAR-10
    # epochs: 4.3 bits/dim but 12.5 dB PSNR). So `loc` is trained by the factorized likelihood only, and the
    # autoregressive one takes it as given.
    c = config.channels
    raw_log_scale, raw_coefficients = tf.split(decoder_output[..., 2 * c:], [c, config.decoder_outputs - 3 * c], -1)
    ar_loc = _ar_locations(tf.stop_gradient(loc), tf.tanh(raw_coefficients), 2.0 * x - 1.0)
    autoregressive = tf.reduce_sum(discretized_logistic_log_prob(x, ar_loc, _log_scale(raw_log_scale)), axis=[1, 2, 3])
    return autoregressive + factorized if training else autoregressive


def kl_divergence_to_standard_normal(mean, logvar):
    """Analytic KL(N(mean, exp(logvar)) || N(0, I)) per example (Kingma & Welling 2014, appendix B)."""
    return 0.5 * tf.reduce_sum(tf.exp(logvar) + tf.square(mean) - 1.0 - logvar, axis=1)


def elbo_per_example(model: CVAE, x, analytic_kl: bool = False, kl_weight=1.0, training: bool = False):
    """Single-sample ELBO log p(x|z) - KL per example; KL by Monte Carlo (default) or in closed form."""
    mean, logvar = model.encode(x)
    z = model.reparameterize(mean, logvar)
    logpx_z = reconstruction_log_prob(model, x, model.decode(z), training)  # (a) reconstruction
    if analytic_kl:
        kl = kl_divergence_to_standard_normal(mean, logvar)
    else:
        logpz = log_normal_pdf(z, 0.0, 0.0)
        logqz_x = log_normal_pdf(z, mean, logvar)
        kl = logqz_x - logpz  # (b) one-sample Monte-Carlo estimate of KL(q(z|x) || p(z))
    return logpx_z - kl_weight * kl


def compute_loss(model: CVAE, x):
    """Negative single-sample Monte-Carlo ELBO, -mean(log p(x|z) + log p(z) - log q(z|x)), averaged over the batch."""
    return -tf.reduce_mean(elbo_per_example(model, x, training=True))


class KLWarmup:
    """ELBO loss whose KL weight rises linearly over the first epochs, against posterior collapse (Bowman et al. 2016).

    The weight in epoch e is min(1, e / (warmup_epochs + 1)); `main_train_loop` calls `start_epoch(e)` each epoch.
    """

    def __init__(self, warmup_epochs: int):
        if not _is_int(warmup_epochs) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={warmup_epochs!r} must be an integer >= 0")
        self.warmup_epochs = int(warmup_epochs)
        self.kl_weight = tf.Variable(self.weight(1), trainable=False, dtype=tf.float32, name="kl_weight")
        self.__name__ = f"kl_warmup(epochs={self.warmup_epochs})"

    def weight(self, epoch: int) -> float:
        return min(1.0, epoch / (self.warmup_epochs + 1))

    def start_epoch(self, epoch: int) -> None:
        self.kl_weight.assign(self.weight(epoch))

    def __call__(self, model: CVAE, x):
        return -tf.reduce_mean(elbo_per_example(model, x, kl_weight=self.kl_weight, training=True))


def compute_kernel(x, y):
    """Gaussian kernel matrix k(x_i, y_j) = exp(-||x_i - y_j||^2 / dim), i.e. bandwidth 2 sigma^2 = latent dim."""
    dim = tf.cast(tf.shape(x)[1], x.dtype)
    squared_distances = tf.reduce_sum(tf.square(x[:, tf.newaxis, :] - y[tf.newaxis, :, :]), axis=2)
    return tf.exp(-squared_distances / dim)


def compute_mmd(x, y):
    """Biased (V-statistic) estimate of the squared maximum mean discrepancy between samples `x` and `y`."""
    return (tf.reduce_mean(compute_kernel(x, x)) + tf.reduce_mean(compute_kernel(y, y))
            - 2.0 * tf.reduce_mean(compute_kernel(x, y)))


def compute_mmd_loss(model: CVAE, x, mmd_weight=1000.0):
    """InfoVAE / MMD-VAE loss: mean reconstruction negative log-likelihood + mmd_weight * MMD(q(z) codes, N(0, I))."""
    mean, logvar = model.encode(x)
    z = model.reparameterize(mean, logvar)
    reconstruction_nll = -reconstruction_log_prob(model, x, model.decode(z), training=True)
    prior_samples = tf.random.normal(shape=tf.shape(z))
    return tf.reduce_mean(reconstruction_nll) + mmd_weight * compute_mmd(z, prior_samples)


def mmd_loss(mmd_weight: float = 1000.0) -> Callable:
    """Return `compute_mmd_loss` with its weight fixed, in the `loss_fn(model, x)` form that training takes."""
    loss_fn = functools.partial(compute_mmd_loss, mmd_weight=mmd_weight)
    loss_fn.__name__ = f"mmd_loss(weight={mmd_weight:g})"
    return loss_fn


def iwae_log_likelihood(model: CVAE, x, num_samples: int = 64):
    """Importance-weighted bound on log p(x) per example with `num_samples` samples (Burda et al. 2016)."""
    mean, logvar = model.encode(x)
    batch = tf.shape(x)[0]
    mean_k = tf.repeat(mean, num_samples, axis=0)  # (batch * k, latent), example-major
    logvar_k = tf.repeat(logvar, num_samples, axis=0)
    z = model.reparameterize(mean_k, logvar_k)
    logpx_z = reconstruction_log_prob(model, tf.repeat(x, num_samples, axis=0), model.decode(z))
    log_weights = logpx_z + log_normal_pdf(z, 0.0, 0.0) - log_normal_pdf(z, mean_k, logvar_k)
    log_weights = tf.reshape(log_weights, (batch, num_samples))
    return tf.reduce_logsumexp(log_weights, axis=1) - math.log(num_samples)


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------

class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


class CheckpointMismatchError(ValueError):
    """A checkpoint directory holds a run of another architecture, data set or loss."""


def get_strategy(verbose: bool = True) -> tf.distribute.Strategy:
    """Return TPUStrategy when a TPU is reachable, MirroredStrategy for several GPUs, else the default strategy."""
    strategy = None
    if os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_NAME") or os.path.exists("/dev/accel0"):
        try:
            tpu = os.environ.get("TPU_NAME") or ("local" if os.path.exists("/dev/accel0") else "")
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            strategy = tf.distribute.TPUStrategy(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as error:
            print(f"A TPU was advertised but could not be used ({type(error).__name__}); falling back.")
    gpus = tf.config.list_logical_devices("GPU")
    if strategy is None and len(gpus) > 1:
        strategy = tf.distribute.MirroredStrategy()
    if strategy is None:
        strategy = tf.distribute.get_strategy()
    if verbose:
        devices = "TPU" if isinstance(strategy, tf.distribute.TPUStrategy) else (
            f"{len(gpus)} GPU(s)" if gpus else "CPU")
        print(f"Strategy: {type(strategy).__name__} with {strategy.num_replicas_in_sync} replica(s) on {devices}")
    return strategy


def _data_fingerprint(images: np.ndarray) -> str:
    digest = hashlib.sha1(np.ascontiguousarray(images[:256]).tobytes()).hexdigest()[:16]
    return f"{images.shape}:{digest}"


def _run_signature(model: CVAE, train_images: np.ndarray, loss_fn: Callable, batch_size: int,
                   learning_rate: float) -> dict:
    return {"config": dataclasses.asdict(model.config), "train_data": _data_fingerprint(train_images),
            # A memory address in a repr (e.g. of a functools.partial) differs between processes: leave it out.
            "loss": getattr(loss_fn, "__name__", None) or re.sub(r" at 0x[0-9a-fA-F]+", "", repr(loss_fn)),
            "batch_size": batch_size,
            "learning_rate": learning_rate}


def _read_json(path: str):
    with open(path) as handle:
        return json.load(handle)


def _write_json_atomically(path: str, payload) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w") as handle:
        json.dump(payload, handle, indent=1)
    os.replace(temporary, path)  # a reader never sees half a file, even if this process is killed


class _TrainingState:
    """Checkpointed state of a run: model, optimizer, completed epochs, and the history beside them as JSON."""

    def __init__(self, checkpoint_dir, model, optimizer, signature):
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="completed_epochs")
        self.history: list[dict] = []
        self.manager = None
        if checkpoint_dir is None:
            return
        os.makedirs(checkpoint_dir, exist_ok=True)
        self.history_path = os.path.join(checkpoint_dir, "history.json")
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=self.epoch)
        self.manager = tf.train.CheckpointManager(checkpoint, checkpoint_dir, max_to_keep=2)
        signature_path = os.path.join(checkpoint_dir, "run.json")
        if self.manager.latest_checkpoint:
            saved = _read_json(signature_path) if os.path.exists(signature_path) else {}
            differences = [f"{key}: checkpoint has {saved.get(key)!r}, this run has {value!r}"
                           for key, value in signature.items() if saved.get(key) != value]
            if differences:
                raise CheckpointMismatchError(f"checkpoint_dir={checkpoint_dir!r} holds another run ("
                                              + "; ".join(differences) + "); use a new directory or delete it")
            checkpoint.restore(self.manager.latest_checkpoint).assert_existing_objects_matched()
            if os.path.exists(self.history_path):
                # The history is written before the checkpoint, so it may hold one epoch the checkpoint lacks.
                self.history = _read_json(self.history_path)[: int(self.epoch.numpy())]
        else:
            _write_json_atomically(signature_path, signature)

    def save(self, epoch: int, row: dict) -> None:
        self.history.append(row)
        self.epoch.assign(epoch)
        if self.manager is not None:
            _write_json_atomically(self.history_path, self.history)
            self.manager.save(checkpoint_number=epoch)


def make_train_function(model: CVAE, optimizer, loss_fn: Callable, strategy: tf.distribute.Strategy):
    """Build a `tf.function` that runs `num_steps` GradientTape steps from a distributed iterator.

    Returns the per-step mean loss over replicas, so the caller synchronises with the device once per call.
    """
    replicas = strategy.num_replicas_in_sync

    def replica_step(x):
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
            per_replica_loss = strategy.run(replica_step, args=(next(iterator),))
            losses = losses.write(step, strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica_loss, axis=None))
        return losses.stack()

    return train_steps


def map_batches(model: CVAE, function: Callable, images: np.ndarray, batch_size: int = 1000,
                key=None) -> np.ndarray:
    """Apply `function(model, x)` to `images` in batches and concatenate the per-example results.

    The compiled `tf.function` is kept per model under `key` (default: the function itself), so evaluating the same
    model every epoch traces once.
    """
    images = check_images(images, model.config)
    if "_compiled_evaluations" not in model.__dict__:
        # A plain attribute, set past Keras's attribute tracking: the functions live and die with their model.
        object.__setattr__(model, "_compiled_evaluations", {})
    compiled = model.__dict__["_compiled_evaluations"]
    key = function if key is None else key
    if key not in compiled:
        compiled[key] = tf.function(functools.partial(function, model), reduce_retracing=True)
    outputs = [compiled[key](batch).numpy() for batch in make_dataset(images, min(batch_size, len(images)))]
    return np.concatenate(outputs)


def evaluate_elbo(model: CVAE, images: np.ndarray, batch_size: int = 1000, analytic_kl: bool = False) -> float:
    """Mean single-sample ELBO over `images` in nats (KL by Monte Carlo, or in closed form when `analytic_kl`)."""
    return float(np.mean(map_batches(model, functools.partial(elbo_per_example, analytic_kl=analytic_kl), images,
                                     batch_size, key=("elbo", analytic_kl))))


class _ProgressBar:
    """A one-line text progress bar that is replaced by a summary line when the epoch ends."""

    def __init__(self, total: int, label: str, enabled: bool, width: int = 24):
        self.total, self.label, self.enabled, self.width = total, label, enabled, width
        self.last_draw = 0.0

    def update(self, done: int, loss: float) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last_draw < 0.5 and done < self.total):
            return
        self.last_draw = now
        filled = self.width * done // self.total
        bar = "=" * filled + ">" * (filled < self.width) + "." * (self.width - filled - 1)
        sys.stdout.write(f"\r{self.label} [{bar}] {done}/{self.total}  loss {loss:.2f}")
        sys.stdout.flush()

    def close(self, summary: str) -> None:
        if self.enabled:
            sys.stdout.write("\r" + summary.ljust(self.width + len(self.label) + 40) + "\n")
            sys.stdout.flush()


def main_train_loop(model: CVAE, train_images: np.ndarray, test_images: np.ndarray, *, epochs: int,
                    batch_size: int = 128, learning_rate: float = 1e-3, loss_fn: Callable = compute_loss,
                    strategy: tf.distribute.Strategy | None = None, checkpoint_dir: str | None = None,
                    on_epoch_end: Callable | None = None, seed: int = 0, steps_per_execution: int = 1,
                    eval_batch_size: int = 1000, lr_schedule: str = "constant",
                    verbose: bool = True) -> list[dict]:
    """Train `model` with Adam for `epochs` epochs and return the per-epoch history.

    `lr_schedule="cosine"` decays the learning rate along a cosine to 5% of `learning_rate` at the last epoch.

    Each epoch shows a progress bar that ends in one line: epoch, seconds, mean training loss, test-set ELBO.
    With `checkpoint_dir`, model, optimizer and epoch are saved after every epoch and a new call resumes after the
    last completed one. `on_epoch_end(epoch, model, row)` runs after each epoch (e.g. to show reconstructions).
    """
    if not _is_int(epochs) or epochs < 1:
        raise ValueError(f"epochs={epochs!r} must be an integer >= 1")
    if not _is_int(steps_per_execution) or steps_per_execution < 1:
        raise ValueError(f"steps_per_execution={steps_per_execution!r} must be an integer >= 1")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate={learning_rate!r} must be positive")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule={lr_schedule!r} must be 'constant' or 'cosine'")
    train_images = check_images(train_images, model.config, "train_images")
    test_images = check_images(test_images, model.config, "test_images")
    if not _is_int(batch_size) or not 1 <= batch_size <= len(train_images):
        raise ValueError(f"batch_size={batch_size!r} must be an integer between 1 and the number of training "
                         f"images ({len(train_images)})")
    strategy = strategy or tf.distribute.get_strategy()
    if batch_size % strategy.num_replicas_in_sync:
        raise ValueError(f"batch_size={batch_size} must be divisible by the {strategy.num_replicas_in_sync} replicas")
    if tf.distribute.has_strategy() is False and not all(
            strategy.extended.variable_created_in_scope(getattr(v, "value", v)) for v in model.variables):
        raise ValueError(f"the model was not built under {type(strategy).__name__}.scope(); "
                         f"create it inside `with strategy.scope():`")

    steps_per_epoch = len(train_images) // batch_size  # drop_remainder: static shapes for TPUs, equal replica shares
    with strategy.scope():
        # The schedule is a function of the optimizer's step count, which the checkpoint restores.
        rate = learning_rate if lr_schedule == "constant" else tf.keras.optimizers.schedules.CosineDecay(
            learning_rate, decay_steps=epochs * steps_per_epoch, alpha=0.05)
        optimizer = tf.keras.optimizers.Adam(rate)
        optimizer.build(model.trainable_variables)
    signature = _run_signature(model, train_images, loss_fn, batch_size, learning_rate)
    signature["lr_schedule"] = lr_schedule
    state = _TrainingState(checkpoint_dir, model, optimizer, signature)
    start_epoch = int(state.epoch.numpy()) + 1
    if verbose and start_epoch > 1:
        done = "complete" if start_epoch > epochs else f"resuming at epoch {start_epoch}"
        print(f"Checkpoint in {checkpoint_dir}: {start_epoch - 1} epoch(s) done, {done}.")
    train_steps = make_train_function(model, optimizer, loss_fn, strategy)
    width = len(str(epochs))

    for epoch in range(start_epoch, epochs + 1):
        started = time.perf_counter()
        # A fresh shuffle seeded by the epoch makes a resumed run see the same batches as an uninterrupted one.
        dataset = make_dataset(train_images, batch_size, shuffle_seed=seed * 100_003 + epoch, drop_remainder=True)
        iterator = iter(strategy.experimental_distribute_dataset(dataset))
        if hasattr(loss_fn, "start_epoch"):
            loss_fn.start_epoch(epoch)  # e.g. the KL weight of a warm-up schedule
        progress = _ProgressBar(steps_per_epoch, f"Epoch {epoch:{width}d}/{epochs}", verbose)
        loss_sum, done = 0.0, 0
        while done < steps_per_epoch:
            num_steps = min(steps_per_execution, steps_per_epoch - done)
            losses = train_steps(iterator, tf.constant(num_steps)).numpy()
            bad = np.flatnonzero(~np.isfinite(losses))
            if bad.size:
                raise NonFiniteLossError(f"loss became {losses[bad[0]]} at epoch {epoch}, step {done + bad[0] + 1} "
                                         f"of {steps_per_epoch}; training stopped"
                                         + (f" (last checkpoint: epoch {epoch - 1})" if checkpoint_dir else "")
                                         + ". Lower the learning rate or check the inputs.")
            loss_sum += float(losses.sum())
            done += num_steps
            progress.update(done, loss_sum / done)
        train_seconds = time.perf_counter() - started
        test_elbo = evaluate_elbo(model, test_images, eval_batch_size)
        row = {"epoch": epoch, "seconds": train_seconds, "train_loss": loss_sum / steps_per_epoch,
               "test_elbo": test_elbo}
        progress.close(f"Epoch {epoch:{width}d}/{epochs} | {train_seconds:5.1f} s | train loss "
                       f"{row['train_loss']:8.2f} | test ELBO {test_elbo:8.2f}")
        state.save(epoch, row)
        if on_epoch_end is not None:
            on_epoch_end(epoch, model, row)
    return state.history


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------

def encode_means(model: CVAE, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Latent means E_q[z|x] of all `images`, shape (N, latent_dim)."""
    return map_batches(model, lambda m, x: m.encode(x)[0], images, batch_size, key="mean")


def reconstruct(model: CVAE, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Mean images decoded from the latent means of `images` (no sampling), in [0, 1]."""
    return map_batches(model, lambda m, x: m.decode(m.encode(x)[0], apply_sigmoid=True), images, batch_size,
                       key="reconstruction")


def psnr(images: np.ndarray, reconstructions: np.ndarray) -> float:
    """Mean over images of the peak signal-to-noise ratio 10 log10(1 / MSE) in dB, for values in [0, 1]."""
    mse = np.mean((np.asarray(images) - np.asarray(reconstructions)) ** 2, axis=(1, 2, 3))
    return float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))))


def active_units(latent_means: np.ndarray, threshold: float = 0.01) -> int:
    """Number of latent dimensions whose mean code varies over the data by more than `threshold` (Burda et al.)."""
    return int(np.sum(np.var(latent_means, axis=0) > threshold))


def linear_probe_accuracy(train_codes, train_labels, test_codes, test_labels, max_train: int | None = None,
                          seed: int = 0) -> float:
    """Test accuracy of a logistic regression fitted on the standardized training codes (`max_train` of them if set)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    train_labels, test_labels = np.ravel(train_labels), np.ravel(test_labels)
    chosen = np.random.default_rng(seed).permutation(len(train_codes))[:max_train]
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    # One BLAS thread: these small products gain nothing from two, and threads that spin while TensorFlow's own
    # threads hold the cores made the fit 20 times slower here.
    with threadpool_limits(limits=1, user_api="blas"):
        probe.fit(train_codes[chosen], train_labels[chosen])
    return float(probe.score(test_codes, test_labels))


def iwae_nll(model: CVAE, images: np.ndarray, num_samples: int = 64, batch_size: int = 50) -> float:
    """Mean negative importance-weighted bound -log p(x) over `images`, in nats."""
    bounds = map_batches(model, functools.partial(iwae_log_likelihood, num_samples=num_samples), images, batch_size,
                         key=("iwae", num_samples))
    return -float(np.mean(bounds))


def bits_per_dim(nll_nats: float, dims: int) -> float:
    """Convert a negative log-likelihood per image in nats to bits per dimension."""
    return nll_nats / (dims * math.log(2.0))


def model_metrics(model: CVAE, train_images, train_labels, test_images, test_labels, *, iwae_samples: int = 64,
                  iwae_images: int = 2000, likelihood_is_proper: bool = True) -> dict:
    """Test-set metrics of a trained model: ELBO (MC and analytic KL), IWAE NLL, bits/dim, PSNR, active units, probe.

    `likelihood_is_proper` is false for a Bernoulli decoder on continuous pixels, where bits/dim has no meaning.
    """
    test_codes = encode_means(model, test_images)
    nll = iwae_nll(model, test_images[:iwae_images], iwae_samples)
    return {
        "test_elbo": evaluate_elbo(model, test_images),
        "test_elbo_analytic": evaluate_elbo(model, test_images, analytic_kl=True),
        "iwae_nll_nats": nll,
        "bits_per_dim": bits_per_dim(nll, model.config.image_dims) if likelihood_is_proper else None,
        "psnr_db": psnr(test_images, reconstruct(model, test_images)),
        "active_units": active_units(test_codes),
        "probe_accuracy": linear_probe_accuracy(encode_means(model, train_images), train_labels, test_codes,
                                                test_labels),
    }


def describe_machine() -> str:
    """One line naming the CPU count, accelerators and TensorFlow version."""
    accelerators = [d.device_type for d in tf.config.list_logical_devices() if d.device_type in ("GPU", "TPU")]
    devices = ", ".join(f"{accelerators.count(t)} {t}" for t in sorted(set(accelerators))) or "no accelerator"
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, {devices}, "
            f"Python {platform.python_version()}, TensorFlow {tf.__version__}")


def get_allClass_encodings(model: CVAE, images: np.ndarray, labels: np.ndarray):  # noqa: N802 - the homework's name
    """Group the latent means of `images` by class; return ({class: (n_c, latent_dim) codes}, (classes, latent) means)."""
    labels = np.ravel(labels)
    if len(labels) != len(images):
        raise ValueError(f"labels has {len(labels)} entries for {len(images)} images")
    codes = encode_means(model, images)
    classes = np.unique(labels)
    codes_by_class = {int(c): codes[labels == c] for c in classes}
    class_means = np.stack([codes_by_class[int(c)].mean(axis=0) for c in classes])
    return codes_by_class, class_means


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


def compare_code_distributions(models: Mapping[str, CVAE], images: np.ndarray, seed: int = 0) -> dict[str, dict]:
    """Per model, `latent_distribution_summary` of its aggregate posterior on `images`, plus its mean posterior std."""
    summaries = {}
    for name, model in models.items():
        summary = latent_distribution_summary(aggregate_posterior_samples(model, images, seed=seed), seed=seed)
        logvars = map_batches(model, lambda m, x: m.encode(x)[1], images, key="logvar")
        summaries[name] = {**summary, "mean_posterior_std": float(np.exp(0.5 * logvars).mean())}
    return summaries


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


def plot_image_grid(images, ncols: int = 10, titles: Sequence[str] | None = None, suptitle: str | None = None,
                    cell: float = 1.1, path: str | None = None) -> Figure:
    """Show `images` (N, H, W, C) in a grid with optional per-image titles."""
    images = np.asarray(images)
    nrows = math.ceil(len(images) / ncols)
    figure = Figure(figsize=(cell * ncols, cell * nrows + (0.4 if suptitle else 0)))
    axes = figure.subplots(nrows, ncols, squeeze=False)
    for index, axis in enumerate(axes.flat):
        if index < len(images):
            _show_image(axis, images[index])
            if titles is not None:
                axis.set_title(titles[index], fontsize=8)
        else:
            axis.axis("off")
    if suptitle:
        figure.suptitle(suptitle)
    return _save(figure, path)


def plot_one_image_per_class(images, labels, class_names: Sequence[str], path: str | None = None) -> Figure:
    """Show the first image of every class, titled with its class name."""
    labels = np.ravel(labels)
    missing = [name for c, name in enumerate(class_names) if not np.any(labels == c)]
    if missing:
        raise ValueError(f"labels hold no image of the classes {missing}")
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in range(len(class_names))]
    return plot_image_grid(np.asarray(images)[firsts], ncols=len(class_names), titles=list(class_names),
                           cell=1.2, path=path)


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
                      max_points_per_class: int = 400, title: str = "Latent means, first two principal components",
                      seed: int = 0, path: str | None = None) -> Figure:
    """Scatter the latent codes projected to 2-D by PCA, one colour per class, class means marked."""
    from sklearn.decomposition import PCA

    codes = np.concatenate(list(codes_by_class.values()))
    pca = PCA(n_components=2, random_state=seed).fit(codes)
    rng = np.random.default_rng(seed)
    figure = Figure(figsize=(7.5, 6))
    axis = figure.subplots()
    colours = [f"C{i}" for i in range(10)]
    for index, (label, class_codes) in enumerate(codes_by_class.items()):
        chosen = class_codes[rng.permutation(len(class_codes))[:max_points_per_class]]
        points = pca.transform(chosen) if codes.shape[1] > 2 else chosen
        colour = colours[index % 10]
        axis.scatter(points[:, 0], points[:, 1], s=6, alpha=0.5, color=colour, label=class_names[label])
        centre = pca.transform(class_codes.mean(axis=0, keepdims=True))[0]
        axis.scatter(*centre, s=140, color=colour, edgecolors="black", marker="X")
    explained = pca.explained_variance_ratio_
    axis.set_xlabel(f"PC 1 ({explained[0]:.0%} of variance)")
    axis.set_ylabel(f"PC 2 ({explained[1]:.0%} of variance)")
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


def walk_src_to_dst(model: CVAE, src_class, dst_class, class_means: np.ndarray, class_names: Sequence[str],
                    steps: int = 10, path: str | None = None) -> Figure:
    """Decode `steps` codes evenly spaced (np.linspace) from the mean code of `src_class` to that of `dst_class`."""
    if not _is_int(steps) or steps < 2:
        raise ValueError(f"steps={steps!r} must be an integer >= 2 (the source and the destination)")
    src = _class_index(src_class, class_names, "src_class")
    dst = _class_index(dst_class, class_names, "dst_class")
    if np.ndim(class_means) != 2 or len(class_means) != len(class_names):
        raise ValueError(f"class_means has shape {np.shape(class_means)}; walk_src_to_dst needs one mean code per "
                         f"class name ({len(class_names)} rows), as get_allClass_encodings returns for all classes")
    codes = np.linspace(class_means[src], class_means[dst], steps).astype(np.float32)
    images = model.decode(codes, apply_sigmoid=True).numpy()  # one batched call for the whole walk
    titles = [class_names[src]] + [f"{t:.2f}" for t in np.linspace(0, 1, steps)[1:-1]] + [class_names[dst]]
    return plot_image_grid(images, ncols=steps, titles=titles, cell=1.1, path=path,
                           suptitle=f"Walk in latent space: {class_names[src]} to {class_names[dst]}")


def plot_prior_samples(model: CVAE, num_samples: int = 40, ncols: int = 10, seed: int = 0,
                       title: str = "Samples decoded from the prior N(0, I)", path: str | None = None) -> Figure:
    """Decode codes drawn from the prior N(0, I) in one batched call and show them in a grid."""
    eps = tf.random.stateless_normal((num_samples, model.config.latent_dim), seed=(seed, 0))
    return plot_image_grid(model.sample(eps).numpy(), ncols=ncols, cell=0.9, path=path, suptitle=title)


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
    figure = Figure(figsize=(10, 3.5))
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


def plot_history(histories: Mapping[str, Sequence[dict]], path: str | None = None) -> Figure:
    """Plot the test-set ELBO per epoch for each named run."""
    figure = Figure(figsize=(6, 3.5))
    axis = figure.subplots()
    for name, history in histories.items():
        axis.plot([row["epoch"] for row in history], [row["test_elbo"] for row in history], marker="o", label=name)
    axis.set_xlabel("epoch")
    axis.set_ylabel("test ELBO (nats)")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(figure, path)
