"""Convolutional variational autoencoders for MNIST and CIFAR-10: data, model, losses, training, evaluation, plots.

The homework's pieces, in the form of the TensorFlow CVAE tutorial (https://www.tensorflow.org/tutorials/generative/cvae).
What goes beyond the homework lives in `vae_extensions.py`, built on this module.
Importing this module has no side effects: it downloads nothing, trains nothing and reads no arguments.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
import tempfile
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure

import vae_runtime as vr

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
    downloads with `tf.keras.datasets` (a DatasetError if the download fails).
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
    try:
        return getattr(tf.keras.datasets, name).load_data()
    except Exception as error:  # noqa: BLE001 - offline, Keras raises a bare Exception ("URL fetch failure on ...")
        first_line = (str(error).splitlines() or [""])[0]
        raise DatasetError(f"the download of {name} failed ({type(error).__name__}: {first_line}); to give the file "
                           f"instead, put the keras-format {name}.npz (arrays {', '.join(_NPZ_KEYS)}) in a folder and "
                           f"pass data_dir= or set VAE_DATA_DIR") from error


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
        if value is not None and not (vr.is_int(value) and value >= 1):
            raise ValueError(f"{argument}={value!r} must be None or an integer >= 1")
    (x_train, y_train), (x_test, y_test) = load_dataset(name, data_dir)
    binarize = name == "mnist"  # binary pixels make the Bernoulli likelihood a proper model of the data
    return DataSplits(name, preprocess_images(x_train[:max_train], binarize), np.ravel(y_train[:max_train]),
                      preprocess_images(x_test[:max_test], binarize), np.ravel(y_test[:max_test]))


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
            if not (vr.is_int(getattr(self, field)) and getattr(self, field) >= 1):
                raise ValueError(f"{field}={getattr(self, field)!r} must be an integer >= 1")
            object.__setattr__(self, field, int(getattr(self, field)))  # Keras layers and JSON refuse NumPy integers
        decoder_grid_size(self.img_size, self.num_convolutions, self.strides)
        if self.encoder_padding not in ("same", "valid"):
            raise ValueError(f"encoder_padding={self.encoder_padding!r} must be 'same' or 'valid'")
        if isinstance(self.logvar_bound, bool) or not 0 < self.logvar_bound < math.inf:
            raise ValueError(f"logvar_bound={self.logvar_bound!r} must be a finite number > 0")
        object.__setattr__(self, "logvar_bound", float(self.logvar_bound))  # JSON refuses a NumPy float32

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
        # The model's own source of noise, saved with its weights; main_train_loop keys it on (seed, epoch), so that
        # a resumed run draws what an uninterrupted one drew.
        self.rng = tf.random.Generator.from_seed(0)

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
        eps = self.rng.normal(shape=tf.shape(mean))
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
            eps = self.rng.normal(shape=(num_samples, self.config.latent_dim))
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
    prior_samples = model.rng.normal(shape=tf.shape(z))
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
            if not (vr.is_int(getattr(self, field)) and getattr(self, field) >= (field != "seed")):
                raise ValueError(f"{field}={getattr(self, field)!r} must be an integer >= {int(field != 'seed')}")
            object.__setattr__(self, field, int(getattr(self, field)))  # the run record is JSON, which refuses NumPy
        if isinstance(self.learning_rate, bool) or not 0 < self.learning_rate < math.inf:
            raise ValueError(f"learning_rate={self.learning_rate!r} must be a finite number > 0")
        object.__setattr__(self, "learning_rate", float(self.learning_rate))  # Adam refuses a NumPy float
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule={self.lr_schedule!r} must be 'constant' or 'cosine'")
        if self.precision not in vr.PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of {vr.PRECISIONS}")


def build_model(config: VAEConfig, train_config: TrainConfig = TrainConfig(),
                strategy: tf.distribute.Strategy | None = None, model_class: type[CVAE] = CVAE) -> CVAE:
    """Build `model_class(config)`: seeded, in the strategy's scope, computing in the precision `train_config` picks."""
    if not isinstance(config, VAEConfig) or not isinstance(train_config, TrainConfig):
        raise TypeError(f"build_model needs a VAEConfig and a TrainConfig, got {type(config).__name__} and "
                        f"{type(train_config).__name__}")
    set_seed(train_config.seed)
    previous_policy = tf.keras.mixed_precision.global_policy()
    # Layers take the global policy when they are built; restore it so that nothing else is affected.
    tf.keras.mixed_precision.set_global_policy(vr.choose_precision(train_config.precision))
    try:
        with (strategy or tf.distribute.get_strategy()).scope():
            return model_class(config)
    finally:
        tf.keras.mixed_precision.set_global_policy(previous_policy)



def train_step(model: CVAE, x, optimizer, loss_fn: Callable = compute_loss):
    """One optimizer step on the loss of the batch `x`; returns the loss."""
    with tf.GradientTape() as tape:
        loss = loss_fn(model, x)
        # Under float16 the optimizer multiplies the loss by its loss scale (and divides the gradients by it); in
        # every other precision this is the identity.
        scaled_loss = optimizer.scale_loss(loss)
    gradients = tape.gradient(scaled_loss, model.trainable_variables)
    optimizer.apply_gradients(zip(gradients, model.trainable_variables))
    return loss


def main_train_loop(model: CVAE, train_images: np.ndarray, test_images: np.ndarray, config: TrainConfig,
                    loss_fn: Callable = compute_loss, *, test_sample: np.ndarray | None = None,
                    strategy: tf.distribute.Strategy | None = None, checkpoint_dir: str | None = None,
                    allow_new_settings: bool = False, on_epoch_end: Callable | None = None,
                    verbose: bool = True) -> list[dict]:
    """Train `model` with Adam as `config` says; after each epoch show its time, its test ELBO and the reconstructions
    of `test_sample`, and return the history (one dict per epoch; `train_loss` is the epoch's mean of `loss_fn`).

    With `checkpoint_dir`, each epoch is checkpointed and a new call resumes after the last one saved, showing the
    epochs already done as they were shown (see `vae_runtime.TrainingRun`); `allow_new_settings=True` continues it
    with another learning rate or schedule. `on_epoch_end(epoch, model, row)` runs after each trained epoch.
    """
    run = vr.TrainingRun(model, train_images, test_images, config, loss_fn, train_step, test_sample=test_sample,
                         strategy=strategy, checkpoint_dir=checkpoint_dir, allow_new_settings=allow_new_settings,
                         on_epoch_end=on_epoch_end, verbose=verbose)
    for row in run.history:  # epochs restored from a checkpoint, shown as they were when trained
        report_epoch(row, config.epochs, run.saved_figure(row["epoch"]), verbose)
    for epoch in range(len(run.history) + 1, config.epochs + 1):
        start_time = time.perf_counter()
        train_loss = run.train_epoch(epoch)  # one shuffled pass of train_step over the training images
        end_time = time.perf_counter()
        test_elbo = evaluate_elbo(model, test_images, config.eval_batch_size)
        figure = None if test_sample is None else generate_and_display_images(model, epoch, test_sample)
        row = {"epoch": epoch, "seconds": round(end_time - start_time, 2), "train_loss": train_loss,
               "test_elbo": test_elbo}
        run.save(row, figure)  # the checkpoint of this epoch, and its figure
        report_epoch(row, config.epochs, figure, verbose)
        if on_epoch_end is not None:
            on_epoch_end(epoch, model, row)
    return run.history


def report_epoch(row: dict, epochs: int, figure=None, verbose: bool = True) -> None:
    """Print an epoch's training time and test ELBO, and show its figure (a Figure or a saved PNG)."""
    if not verbose:
        return
    print(f"Epoch {row['epoch']}/{epochs}: {row['seconds']:.1f} s training, test ELBO {row['test_elbo']:.2f} nats")
    if figure is not None:
        vr.show(figure)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------

def evaluate_elbo(model: CVAE, images: np.ndarray, batch_size: int = 1000, analytic_kl: bool = False) -> float:
    """Mean single-sample ELBO over `images` in nats (KL by Monte Carlo, or in closed form when `analytic_kl`)."""
    return float(np.mean(vr.map_batches(model, elbo_per_example, images, batch_size, analytic_kl=analytic_kl)))


def _latent_mean(model, x):
    return model.encode(x)[0]


def _reconstruction(model, x):
    return model.decode(model.encode(x)[0], apply_sigmoid=True)


def encode_means(model: CVAE, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Latent means E_q[z|x] of all `images`, shape (N, latent_dim)."""
    return vr.map_batches(model, _latent_mean, images, batch_size)


def reconstruct(model: CVAE, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Mean images decoded from the latent means of `images` (no sampling), in [0, 1]."""
    return vr.map_batches(model, _reconstruction, images, batch_size)


def psnr(images: np.ndarray, reconstructions: np.ndarray) -> float:
    """Mean over images of the peak signal-to-noise ratio 10 log10(1 / MSE) in dB, for values in [0, 1]."""
    images = vr.check_images(images)
    reconstructions = vr.check_images(reconstructions, name="reconstructions")
    if images.shape != reconstructions.shape:
        raise ValueError(f"images {images.shape} and reconstructions {reconstructions.shape} differ in shape")
    mse = np.mean((images.astype(np.float64) - reconstructions) ** 2, axis=(1, 2, 3))
    return float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))))


def slug(name: str) -> str:
    """A file-name-safe form of a model or figure name: lower case, runs of other characters as one underscore."""
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")


def get_allClass_encodings(model: CVAE, images: np.ndarray, labels: np.ndarray):  # noqa: N802 - the homework's name
    """Group the latent means of `images` by class: ({class: (n_c, latent_dim) codes}, (classes, latent_dim) means)."""
    labels = vr.check_labels(labels, len(images))
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
    labels = vr.check_labels(labels, len(images))
    missing = [name for c, name in enumerate(class_names) if not np.any(labels == c)]
    if missing:
        raise ValueError(f"labels hold no image of the classes {missing}")
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in range(len(class_names))]
    return plot_image_grid(np.asarray(images)[firsts], ncols=len(class_names), titles=list(class_names), cell=1.2,
                           suptitle="The first image of each class", path=path)


def generate_and_display_images(model: CVAE, epoch: int, test_sample, path: str | None = None) -> Figure:
    """Show `test_sample` (top row) above its reconstructions through a sampled code (bottom row)."""
    test_sample = vr.check_images(test_sample, model.config, "test_sample")
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

    codes = vr.check_codes(np.concatenate(list(codes_by_class.values())), "codes_by_class", min_dims=2)
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

    scale = 72 / axis.figure.dpi  # points per pixel: the lengths below are in points
    centres = axis.transData.transform(points) * scale
    frame = axis.get_window_extent().extents[None] * scale
    radius, height = 5.0, 1.2 * fontsize  # a marker's (s=40) with a margin; a line of text
    taken = np.concatenate([centres - radius, centres + radius], axis=1)  # boxes (x0, y0, x1, y1)
    halo = [patheffects.withStroke(linewidth=3, foreground="white")]
    for point, centre, name, colour in zip(points, centres, names, colours):
        width = 0.65 * fontsize * len(name) + 3  # a bold character is about 0.65 em wide
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
                    steps: int = 10, title: str = "Walk between class means", path: str | None = None) -> Figure:
    """Decode `steps` codes evenly spaced from the mean code of `src_class` to that of `dst_class` (name or index)."""
    if not (vr.is_int(steps) and steps >= 2):
        raise ValueError(f"steps={steps!r} must be an integer >= 2: the walk shows both class means")
    class_means = vr.check_codes(class_means, "class_means")
    if len(class_means) != len(class_names):
        raise ValueError(f"class_means has {len(class_means)} rows for {len(class_names)} class names; pass the means "
                         f"of get_allClass_encodings on images of every class")
    indices = []
    for argument, value in (("src_class", src_class), ("dst_class", dst_class)):
        index = list(class_names).index(value) if isinstance(value, str) and value in class_names else value
        if not (vr.is_int(index) and 0 <= index < len(class_names)):  # a negative index would count from the end
            raise ValueError(f"{argument}={value!r} must be one of the class names {tuple(class_names)} or an index "
                             f"in [0, {len(class_names)})")
        indices.append(int(index))
    src, dst = indices
    images = decode_line(model, class_means[src], class_means[dst], steps)
    titles = [class_names[src]] + [f"{t:.2f}" for t in np.linspace(0, 1, steps)[1:-1]] + [class_names[dst]]
    return plot_image_grid(images, ncols=steps, titles=titles, cell=1.1, path=path,
                           suptitle=f"{title}: {class_names[src]} to {class_names[dst]}")


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
