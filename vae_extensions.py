"""Beyond the homework, built on `vae_utils`: better likelihoods and decoders (2.2), KL warm-up, the scores of every
model (IWAE bound, bits/dim, PSNR, probes), code diagnostics (3.2), the MMD weight sweep (3.1) and the course's
conditional VAE."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure

import vae_runtime as vr
import vae_utils as vu

# ---------------------------------------------------------------------------------------------------------------------
# Model: a discretized logistic likelihood (optionally autoregressive), a resize decoder, a spatial code
# ---------------------------------------------------------------------------------------------------------------------

LIKELIHOODS = ("bernoulli", "logistic", "logistic_ar")
UPSAMPLINGS = ("transpose", "resize")
# Causal neighbours (row, column offsets) whose residuals a "logistic_ar" pixel sees: left, up-left, up and up-right.
AR_NEIGHBOURS = ((0, -1), (-1, -1), (-1, 0), (-1, 1))
LOGISTIC_LOG_SCALE_SHIFT = 2.0  # log_scale = decoder output - shift, for the discretized logistic
LOGISTIC_MIN_LOG_SCALE = -7.0  # keeps the bin probabilities representable in float32


@dataclasses.dataclass(frozen=True)
class ExtendedVAEConfig(vu.VAEConfig):
    """A `VAEConfig` with the 2.2 options: the likelihood, the decoder's upsampling, a spatial code."""

    likelihood: str = "bernoulli"  # "logistic": discretized logistic; "logistic_ar": plus an autoregressive term
    upsampling: str = "transpose"  # "resize": nearest-neighbour upsampling then a convolution
    spatial_latent: bool = False  # the code is a (grid, grid, latent_dim / grid**2) map that convolutions make

    def __post_init__(self):
        super().__post_init__()
        if self.likelihood not in LIKELIHOODS or self.upsampling not in UPSAMPLINGS:
            raise ValueError(f"likelihood={self.likelihood!r} must be one of {LIKELIHOODS} and "
                             f"upsampling={self.upsampling!r} one of {UPSAMPLINGS}")
        if self.spatial_latent and (self.encoder_padding != "same" or self.latent_dim % self.grid_size ** 2):
            raise ValueError(f"spatial_latent=True needs encoder_padding='same' and latent_dim divisible by "
                             f"grid_size**2 = {self.grid_size ** 2}, got latent_dim={self.latent_dim}")

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


class ExtendedCVAE(vu.CVAE):
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

    def reconstruction_log_prob(self, x, decoder_output, training=False):
        """log p(x|z) per example under the configured likelihood; with `training`, a "logistic_ar" model adds the
        log-probability of its factorized mean model."""
        config, channels = self.config, self.config.channels
        if config.likelihood == "bernoulli":
            return vu.bernoulli_log_prob(x, decoder_output)
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

    def likelihood_is_proper(self, images) -> bool:
        """A discretized logistic is a distribution over 8-bit pixels; the Bernoulli only over binary ones."""
        return self.config.likelihood != "bernoulli" or super().likelihood_is_proper(images)


def discretized_logistic_log_prob(x, loc, log_scale):
    """Log-probability of 8-bit pixels `x` in [0, 1] under a logistic discretized into 256 bins, per pixel.

    The discretized logistic of PixelCNN++ (Salimans et al. 2017). `loc` is on the [-1, 1] scale; the outer bins
    (pixel values 0 and 255) take all the tail mass, so the 256 probabilities of one pixel sum to one.
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
    log_prob_mid = log_cdf_plus + log_one_minus_cdf_minus + tf.math.log(-tf.math.expm1(-bin_width))
    return tf.where(x < -0.999, log_cdf_plus, tf.where(x > 0.999, log_one_minus_cdf_minus, log_prob_mid))


def _log_scale(raw_log_scale):
    # The shift starts the scale at e^-2 rather than e^0 (the decoder's raw outputs start near 0), so that the few
    # epochs of a CPU run are not spent shrinking it; the floor keeps the bin probabilities representable.
    return tf.maximum(raw_log_scale - LOGISTIC_LOG_SCALE_SHIFT, LOGISTIC_MIN_LOG_SCALE)


def _ar_locations(loc, coefficients, x):
    """Locations on [-1, 1] shifted by a linear prediction from the residuals x - loc earlier in raster order.

    Each channel sees the residuals of all channels at the `AR_NEIGHBOURS` pixels and of the earlier channels of its
    own pixel, weighted by per-pixel coefficients that depend on z only.
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


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------

class KLWarmup:
    """ELBO loss whose KL weight rises linearly over the first epochs, against posterior collapse (Bowman et al. 2016).

    The weight in epoch e is min(1, e / (warmup_epochs + 1)); `main_train_loop` calls `start_epoch(e)` each epoch.
    It also trains the factorized mean model of a "logistic_ar" likelihood (`training=True`).
    """

    def __init__(self, warmup_epochs: int = 0):
        if not vr.is_int(warmup_epochs) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={warmup_epochs!r} must be an integer >= 0")
        self.warmup_epochs = int(warmup_epochs)
        self.kl_weight = tf.Variable(self.weight(1), trainable=False, dtype=tf.float32, name="kl_weight")
        self.description = f"KLWarmup(warmup_epochs={self.warmup_epochs})"

    def weight(self, epoch: int) -> float:
        return min(1.0, epoch / (self.warmup_epochs + 1))

    def start_epoch(self, epoch: int) -> None:
        self.kl_weight.assign(self.weight(epoch))

    def __call__(self, model: vu.CVAE, x):
        return -tf.reduce_mean(vu.elbo_per_example(model, x, kl_weight=self.kl_weight, training=True))


class ExtendedMMDLoss(vu.MMDLoss):
    """`vu.MMDLoss` with the model's own likelihood (`reconstruction_log_prob`) in place of the Bernoulli one."""

    def __init__(self, mmd_weight: float = 1000.0):
        super().__init__(mmd_weight)
        self.description = f"ExtendedMMDLoss(mmd_weight={self.mmd_weight:g})"

    def __call__(self, model: vu.CVAE, x):
        mean, logvar = model.encode(x)
        z = model.reparameterize(mean, logvar)
        reconstruction_nll = -model.reconstruction_log_prob(x, model.decode(z), training=True)
        prior_samples = model.rng.normal(shape=tf.shape(z))
        return tf.reduce_mean(reconstruction_nll) + self.mmd_weight * vu.compute_mmd(z, prior_samples)


# ---------------------------------------------------------------------------------------------------------------------
# Conditional VAE: the label's one-hot vector joins the encoder's features and the decoder's code
# ---------------------------------------------------------------------------------------------------------------------

class ConditionalCVAE(vu.CVAE):
    """The homework's `CVAE` with a one-hot label joined to the encoder's last features and to the decoder's code."""

    def __init__(self, config: vu.VAEConfig, num_classes: int = 10):
        if not vr.is_int(num_classes) or num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r} must be an integer >= 1")
        self.num_classes = int(num_classes)  # before the base class builds the encoder and decoder, which read it
        super().__init__(config)

    def build_encoder(self, config: vu.VAEConfig) -> tf.keras.Model:
        image = tf.keras.Input(shape=(config.img_size, config.img_size, config.channels))
        label = tf.keras.Input(shape=(self.num_classes,))
        features = image
        for width in config.widths:
            features = tf.keras.layers.Conv2D(width, config.kernel_size, strides=config.strides,
                                              padding=config.encoder_padding, activation="relu")(features)
        # The label joins only here, right before mean and log-variance: the convolutions see the image alone.
        features = tf.keras.layers.Concatenate()([tf.keras.layers.Flatten()(features), label])  # (B, flat + classes)
        output = tf.keras.layers.Dense(2 * config.latent_dim, dtype="float32")(features)  # as in vu.CVAE
        return tf.keras.Model([image, label], output, name="encoder")

    def build_decoder(self, config: vu.VAEConfig) -> tf.keras.Model:
        grid = config.grid_size
        code = tf.keras.Input(shape=(config.latent_dim,))
        label = tf.keras.Input(shape=(self.num_classes,))
        features = tf.keras.layers.Concatenate()([code, label])  # (B, latent_dim + num_classes): the longer code
        features = tf.keras.layers.Dense(grid * grid * config.filters, activation="relu")(features)
        features = tf.keras.layers.Reshape((grid, grid, config.filters))(features)
        for width in reversed(config.widths):
            features = tf.keras.layers.Conv2DTranspose(width, config.kernel_size, strides=config.strides,
                                                       padding="same", activation="relu")(features)
        # One logit per pixel and channel: stride 1 keeps the image size.
        logits = tf.keras.layers.Conv2DTranspose(config.channels, config.kernel_size, padding="same")(features)
        return tf.keras.Model([code, label], logits, name="decoder")

    # The base methods hand their argument straight to the Keras model, which takes the pair: same bound, same cast.
    # Both as tensors, because Keras refuses a pair that mixes a NumPy array and a tensor.
    def encode(self, x, y):
        """Return the mean and the (softly bounded) log-variance of q(z|x, y); `y` is one-hot, (B, num_classes)."""
        return super().encode([tf.convert_to_tensor(x), tf.convert_to_tensor(y)])

    def decode(self, z, y, apply_sigmoid=False):
        """Return the decoder's float32 logits for codes `z` and one-hot labels `y`, or sigmoid(logits)."""
        return super().decode([tf.convert_to_tensor(z), tf.convert_to_tensor(y)], apply_sigmoid)

    def sample(self, y, eps=None):
        """Decode codes `eps` (drawn from the prior N(0, I) when not given) with one-hot labels `y` into images."""
        if eps is None:
            zeros = tf.zeros((tf.shape(y)[0], self.config.latent_dim))
            eps = self.reparameterize(zeros, zeros)  # N(0, I), drawn where the model draws all its noise
        return self.decode(eps, y, apply_sigmoid=True)

    def call(self, inputs):
        x, y = inputs
        mean, logvar = self.encode(x, y)
        return self.decode(self.reparameterize(mean, logvar), y)


def conditional_elbo_per_example(model: ConditionalCVAE, x, y):
    """Single-sample ELBO log p(x|z, y) - KL per example, the KL by Monte Carlo as in `vu.compute_loss`."""
    mean, logvar = model.encode(x, y)
    z = model.reparameterize(mean, logvar)
    logpx_z = vu.bernoulli_log_prob(x, model.decode(z, y))
    return logpx_z - (vu.log_normal_pdf(z, mean, logvar) - vu.log_normal_pdf(z, 0.0, 0.0))


def conditional_loss(model: ConditionalCVAE, batch):
    """Negative mean ELBO of a batch `(x, y_onehot)`."""
    x, y = batch
    return -tf.reduce_mean(conditional_elbo_per_example(model, x, y))


def train_conditional(model: ConditionalCVAE, data: vu.DataSplits, config: vu.TrainConfig, *, strategy=None,
                      checkpoint_dir: str | None = None, verbose: bool = True) -> list[dict]:
    """Train a `ConditionalCVAE` on the images and labels of `data` as `vu.main_train_loop` trains a `CVAE`."""
    run = vr.TrainingRun(model, data.train_images, data.test_images, config, conditional_loss, vu.train_step,
                         train_labels=data.train_labels, strategy=strategy, checkpoint_dir=checkpoint_dir,
                         verbose=verbose)
    for row in run.history:  # epochs restored from a checkpoint
        vu.report_epoch(row, config.epochs, verbose=verbose)
    for epoch in range(len(run.history) + 1, config.epochs + 1):
        start_time = time.perf_counter()
        train_loss = run.train_epoch(epoch)
        end_time = time.perf_counter()
        test_elbo = evaluate_conditional_elbo(model, data.test_images, data.test_labels, config.eval_batch_size)
        row = {"epoch": epoch, "seconds": round(end_time - start_time, 2), "train_loss": train_loss,
               "test_elbo": test_elbo}
        run.save(row)
        vu.report_epoch(row, config.epochs, verbose=verbose)
    return run.history


def _check_class_labels(model: ConditionalCVAE, labels, count: int, name: str = "labels") -> np.ndarray:
    """`labels` as int64 after checking: `count` integer class indices in [0, num_classes)."""
    labels = vr.check_labels(labels, count, name)
    if count and labels.max() >= model.num_classes:
        raise ValueError(f"{name} must be class indices in [0, {model.num_classes}), got {labels.max()}")
    return labels


def _check_class_names(model: ConditionalCVAE, class_names: Sequence[str]) -> list[str]:
    if len(class_names) != model.num_classes:
        raise ValueError(f"class_names has {len(class_names)} names for the model's {model.num_classes} classes")
    return list(class_names)


def evaluate_conditional_elbo(model: ConditionalCVAE, images: np.ndarray, labels: np.ndarray,
                              batch_size: int = 1000) -> float:
    """Mean single-sample ELBO over `images` with their integer `labels`, in nats."""
    images = vr.check_images(images, model.config)
    one_hot = tf.one_hot(_check_class_labels(model, labels, len(images)), model.num_classes)
    batches = tf.data.Dataset.from_tensor_slices((images, one_hot)).batch(batch_size)
    return float(np.mean(np.concatenate([conditional_elbo_per_example(model, x, y).numpy() for x, y in batches])))


def plot_digits_on_demand(model: ConditionalCVAE, class_names: Sequence[str], samples_per_class: int = 8,
                          seed: int = 0, path: str | None = None) -> Figure:
    """Decode the same prior codes with each label: one row per class."""
    class_names = _check_class_names(model, class_names)
    eps = tf.random.stateless_normal((samples_per_class, model.config.latent_dim), seed=(seed, 0))
    codes = tf.tile(eps, [model.num_classes, 1])  # (classes * samples, latent_dim): every row the same codes
    labels = tf.one_hot(tf.repeat(tf.range(model.num_classes), samples_per_class), model.num_classes)
    return vu.plot_image_grid(model.sample(labels, codes).numpy(), ncols=samples_per_class, row_labels=class_names,
                              cell=0.9, suptitle="The same prior codes decoded with each label", path=path)


def plot_style_kept_label_changed(model: ConditionalCVAE, images, labels, class_names: Sequence[str],
                                  path: str | None = None) -> Figure:
    """Each image beside its latent mean (encoded with its own label) decoded with every label: one row per image."""
    images = vr.check_images(images, model.config)
    labels = _check_class_labels(model, labels, len(images))
    class_names = _check_class_names(model, class_names)
    means, _ = model.encode(images, tf.one_hot(labels, model.num_classes))
    codes = tf.repeat(means, model.num_classes, axis=0)  # (N * classes, latent_dim): each mean once per class
    all_labels = tf.one_hot(tf.tile(tf.range(model.num_classes), [len(images)]), model.num_classes)
    decoded = model.decode(codes, all_labels, apply_sigmoid=True).numpy()
    decoded = decoded.reshape((len(images), model.num_classes) + images.shape[1:])  # (N, classes, H, W, C)
    grid = np.concatenate([images[:, np.newaxis], decoded], axis=1).reshape((-1,) + images.shape[1:])
    titles = ["input"] + class_names + [""] * (len(grid) - model.num_classes - 1)
    return vu.plot_image_grid(grid, ncols=model.num_classes + 1, titles=titles, cell=1.0, path=path,
                              row_labels=[class_names[label] for label in labels],
                              suptitle="Style kept, label changed: each input's code decoded with every label")


# ---------------------------------------------------------------------------------------------------------------------
# Scores of a trained model: IWAE bound, bits/dim, PSNR, active units, linear probes; the results table
# ---------------------------------------------------------------------------------------------------------------------

def active_units(latent_means: np.ndarray, threshold: float = 0.01) -> int:
    """Number of latent dimensions whose mean code varies over the data by more than `threshold` (Burda et al.)."""
    return int(np.sum(np.var(vr.check_codes(latent_means, "latent_means"), axis=0) > threshold))


def linear_probe_accuracy(train_codes, train_labels, test_codes, test_labels, max_train: int | None = None,
                          seed: int = 0) -> float:
    """Test accuracy of a logistic regression fitted on the standardized training codes (`max_train` of them if set)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    train_codes, test_codes = vr.check_codes(train_codes, "train_codes"), vr.check_codes(test_codes, "test_codes")
    train_labels = vr.check_labels(train_labels, len(train_codes), "train_labels")
    test_labels = vr.check_labels(test_labels, len(test_codes), "test_labels")
    chosen = np.random.default_rng(seed).permutation(len(train_codes))[:max_train]
    _check_two_classes(train_labels[chosen])
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    # One BLAS thread: these small products gain nothing from two, and threads that spin while TensorFlow's own
    # threads hold the cores slow the fit down many times.
    with threadpool_limits(limits=1, user_api="blas"):
        probe.fit(train_codes[chosen], train_labels[chosen])
    return float(probe.score(test_codes, test_labels))


def _check_two_classes(labels) -> None:
    if len(np.unique(labels)) < 2:
        raise ValueError(f"the labels hold one class only ({np.unique(labels)}); a probe needs at least two")


def iwae_log_likelihood(model: vu.CVAE, x, num_samples: int = 64):
    """Importance-weighted bound on log p(x) per example with `num_samples` samples (Burda et al. 2016)."""
    mean, logvar = model.encode(x)
    batch = tf.shape(x)[0]
    mean_k = tf.repeat(mean, num_samples, axis=0)  # (B * k, latent_dim), example-major
    logvar_k = tf.repeat(logvar, num_samples, axis=0)
    z = model.reparameterize(mean_k, logvar_k)
    logpx_z = model.reconstruction_log_prob(tf.repeat(x, num_samples, axis=0), model.decode(z))
    log_weights = logpx_z + vu.log_normal_pdf(z, 0.0, 0.0) - vu.log_normal_pdf(z, mean_k, logvar_k)
    log_weights = tf.reshape(log_weights, (batch, num_samples))  # (B, k)
    return tf.reduce_logsumexp(log_weights, axis=1) - math.log(num_samples)


def iwae_nll(model: vu.CVAE, images: np.ndarray, num_samples: int = 64, batch_size: int = 50) -> float:
    """Mean negative importance-weighted bound -log p(x) over `images`, in nats."""
    return -float(np.mean(vr.map_batches(model, iwae_log_likelihood, images, batch_size, num_samples=num_samples)))


def bits_per_dim(nll_nats: float, dims: int) -> float:
    """Convert a negative log-likelihood per image in nats to bits per dimension."""
    return nll_nats / (dims * math.log(2.0))


def model_metrics(model: vu.CVAE, data: vu.DataSplits, *, iwae_samples: int = 64, iwae_images: int = 2000,
                  batch_size: int = 1000) -> dict:
    """Test-set metrics of a trained model: ELBO, IWAE bound, bits/dim, PSNR, active units, linear probes.

    The IWAE bound is computed on the first `iwae_images` test images, with the ELBO on the same images beside it;
    bits/dim only where the likelihood is a distribution over the pixels.
    """
    subset = data.test_images[:iwae_images]
    nll = iwae_nll(model, subset, iwae_samples)
    train_codes = vu.encode_means(model, data.train_images, batch_size)
    test_codes = vu.encode_means(model, data.test_images, batch_size)
    return {
        "test_elbo_analytic_kl": vu.evaluate_elbo(model, data.test_images, batch_size, analytic_kl=True),
        "iwae_images": len(subset),
        "elbo_on_iwae_images": vu.evaluate_elbo(model, subset, batch_size),
        "iwae_nll_nats": nll,
        "bits_per_dim": bits_per_dim(nll, model.config.image_dims) if model.likelihood_is_proper(subset) else None,
        "psnr_db": vu.psnr(data.test_images, vu.reconstruct(model, data.test_images, batch_size)),
        "active_units": active_units(test_codes),
        "probe_accuracy": linear_probe_accuracy(train_codes, data.train_labels, test_codes, data.test_labels),
    }


@dataclasses.dataclass
class TrainedModel:
    """A trained model, its history and its row of the results table."""

    name: str
    model: vu.CVAE
    history: list[dict]
    result: dict


def train_and_score(name: str, model: vu.CVAE, data: vu.DataSplits, config: vu.TrainConfig,
                    loss_fn: Callable = vu.compute_loss, *, strategy=None, checkpoint_root: str | None = None,
                    iwae_samples: int = 64, iwae_images: int = 2000, verbose: bool = True) -> TrainedModel:
    """Train `model` on `data` (checkpointed under `checkpoint_root/<name>`), score it (`score_model`), return both."""
    # What scoring needs, checked before the training it would otherwise waste.
    if not vu.slug(name):
        raise ValueError(f"name={name!r} must hold a letter or digit (it names the checkpoint folder)")
    if model.config.latent_dim < 2:
        raise ValueError(f"latent_dim={model.config.latent_dim}: the 2-D latent plots and probes need at least 2")
    _check_two_classes(data.train_labels)
    checkpoint_dir = None if checkpoint_root is None else os.path.join(checkpoint_root, vu.slug(name))
    history = vu.main_train_loop(model, data.train_images, data.test_images, config, loss_fn, strategy=strategy,
                                 checkpoint_dir=checkpoint_dir, verbose=verbose)
    return score_model(name, model, history, data, loss_fn, iwae_samples=iwae_samples, iwae_images=iwae_images,
                       batch_size=config.eval_batch_size)


def score_model(name: str, model: vu.CVAE, history: list[dict], data: vu.DataSplits,
                loss_fn: Callable = vu.compute_loss, *, iwae_samples: int = 64, iwae_images: int = 2000,
                batch_size: int = 1000) -> TrainedModel:
    """Score a model that `main_train_loop` trained and return it with its results row (test ELBO: the last epoch's)."""
    metrics = model_metrics(model, data, iwae_samples=iwae_samples, iwae_images=iwae_images, batch_size=batch_size)
    result = {"name": name, "dataset": data.name, "loss": vr.describe_loss(loss_fn), "epochs": len(history),
              "train_images": len(data.train_images), "train_seconds": round(sum(r["seconds"] for r in history), 1),
              **metrics, "test_elbo": history[-1]["test_elbo"]}
    return TrainedModel(name, model, history, result)


# The results table's narrow form: column -> (heading, decimals).
SUMMARY_COLUMNS = {"epochs": ("epochs", 0), "train_seconds": ("training s", 0), "test_elbo": ("test ELBO", 1),
                   "iwae_nll_nats": ("-log p(x) bound", 1), "bits_per_dim": ("bits/dim", 3), "psnr_db": ("PSNR dB", 2),
                   "active_units": ("active units", 0), "probe_accuracy": ("linear probe", 3)}


MISSING = "–"  # what the tables show where a measure does not apply, e.g. bits/dim of a Bernoulli model of CIFAR-10


def _text(value, spec: str) -> str:
    """`value` formatted with `spec`, or "–" when it is None or NaN."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return MISSING
    return format(value, spec)


def results_table(results: Sequence[dict], columns: Mapping[str, tuple[str, int]] | None = None):
    """The results rows indexed by model name, "–" where a measure does not apply; `columns` picks and rounds."""
    import pandas as pd

    table = pd.DataFrame(list(results)).set_index("name")
    if columns is None:
        return table.astype(object).where(table.notna(), MISSING)
    return pd.DataFrame({heading: table[key].map(lambda value, spec=f".{decimals}f": _text(value, spec))
                         for key, (heading, decimals) in columns.items()})


def write_results(path: str, results: Sequence[dict], **extra) -> None:
    """Write the results rows, and `extra` items such as the run's wall time, to a JSON file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump({**extra, "models": list(results)}, handle, indent=1, default=lambda value: value.item())


# ---------------------------------------------------------------------------------------------------------------------
# Code diagnostics: how far the aggregate posterior q(z) lies from the prior N(0, I)
# ---------------------------------------------------------------------------------------------------------------------

def aggregate_posterior_samples(model: vu.CVAE, images: np.ndarray, batch_size: int = 1000,
                                seed: int = 0) -> np.ndarray:
    """One code z ~ q(z|x) per image, i.e. samples of the aggregate posterior q(z) over `images`, (N, latent_dim)."""
    codes = []
    for index, batch in enumerate(vu.make_dataset(vr.check_images(images, model.config), batch_size)):
        mean, logvar = model.encode(batch)
        eps = tf.random.stateless_normal(tf.shape(mean), seed=(seed, index))  # seeded: repeatable summaries
        codes.append((mean + eps * tf.exp(0.5 * logvar)).numpy())
    return np.concatenate(codes)


def mmd_to_prior(codes: np.ndarray, num_prior_samples: int | None = None, seed: int = 0) -> float:
    """Squared MMD between `codes` (N, D) and as many N(0, I) samples, with the kernel of `vu.compute_kernel`.

    Computed in float64 NumPy through ||x||^2 + ||y||^2 - 2 x.y, so thousands of codes need no (N, N, D) tensor.
    """
    codes = vr.check_codes(codes).astype(np.float64)
    prior = np.random.default_rng(seed).standard_normal((num_prior_samples or len(codes), codes.shape[1]))

    def mean_kernel(x, y):
        squared = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
        return float(np.exp(-np.maximum(squared, 0.0) / codes.shape[1]).mean())

    return mean_kernel(codes, codes) + mean_kernel(prior, prior) - 2.0 * mean_kernel(codes, prior)


def prior_mmd_noise_floor(num_codes: int, latent_dim: int, seed: int = 0) -> float:
    """MMD^2 (as `mmd_to_prior` computes it) between two independent samples of N(0, I): what "matches" looks like."""
    return mmd_to_prior(np.random.default_rng(seed + 1).standard_normal((num_codes, latent_dim)), seed=seed)


def latent_distribution_summary(codes: np.ndarray, seed: int = 0) -> dict:
    """MMD^2 of samples of q(z) to the prior, their per-dimension means and variances, and summaries of both."""
    codes = vr.check_codes(codes).astype(np.float64)
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


# ---------------------------------------------------------------------------------------------------------------------
# The MMD weight sweep (3.1)
# ---------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class MMDSweep:
    """What `mmd_weight_sweep` measured: a row per MMD weight and one for the ELBO reference, and the chosen weight."""

    rows: list[dict]  # mmd_weight, psnr_db, test_elbo, mmd_to_prior: one per weight
    reference: dict  # the same measures of an ELBO model trained the same way
    noise_floor: float  # MMD^2 of two samples of N(0, I) of the same size
    chosen_weight: float
    models: dict[str, vu.CVAE]  # "ELBO" and "weight <w>"
    histories: dict[str, list[dict]]

    @property
    def chosen_name(self) -> str:
        return f"weight {self.chosen_weight:g}"


def mmd_weight_sweep(weights: Sequence[float], model_config: vu.VAEConfig, data: vu.DataSplits,
                     config: vu.TrainConfig, *, strategy=None, checkpoint_root: str | None = None,
                     num_codes: int = 2000) -> MMDSweep:
    """Train an ELBO model and one MMD model per weight on `data`, alike, and choose the weight (`choose_mmd_weight`).

    Each model is measured on the first `num_codes` test images (a subset): the PSNR of their reconstructions and the
    MMD^2 of their codes z ~ q(z|x) to as many prior samples.
    """
    if not weights:
        raise ValueError("weights is empty; pass at least one MMD weight")
    losses = [vu.compute_loss] + [vu.MMDLoss(weight) for weight in weights]  # checks every weight before training
    test_images = data.test_images[:num_codes]
    rows, models, histories = [], {}, {}
    for loss in losses:
        name = "ELBO" if loss is vu.compute_loss else f"weight {loss.mmd_weight:g}"
        model = vu.build_model(model_config, config, strategy)
        checkpoint_dir = None if checkpoint_root is None else os.path.join(checkpoint_root, vu.slug(name))
        history = vu.main_train_loop(model, data.train_images, data.test_images, config, loss, strategy=strategy,
                                     checkpoint_dir=checkpoint_dir, verbose=False)
        row = {"mmd_weight": getattr(loss, "mmd_weight", None),
               "psnr_db": vu.psnr(test_images, vu.reconstruct(model, test_images)),
               "test_elbo": history[-1]["test_elbo"],
               "mmd_to_prior": mmd_to_prior(aggregate_posterior_samples(model, test_images))}
        print(f"{'ELBO loss' if loss is vu.compute_loss else f'MMD weight {loss.mmd_weight:g}'}: on the first "
              f"{len(test_images)} test images PSNR {row['psnr_db']:.2f} dB and MMD² of the codes to N(0, I) "
              f"{row['mmd_to_prior']:.3g}; test ELBO {row['test_elbo']:.1f} nats "
              f"(trained in {sum(r['seconds'] for r in history):.0f} s)")
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
    matching = [row["mmd_weight"] for row in rows if row["mmd_to_prior"] <= reference_mmd]
    return min(matching) if matching else min(rows, key=lambda row: row["mmd_to_prior"])["mmd_weight"]


# ---------------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------------


def plot_latent_moments(summaries: Mapping[str, dict],
                        title: str = "Mean and variance of each code dimension, against the prior N(0, I)",
                        path: str | None = None) -> Figure:
    """Per-dimension mean and variance of each model's aggregate codes, sorted by variance, against N(0, I)."""
    from matplotlib import ticker

    figure = Figure(figsize=(11, 3.8), layout="constrained")
    mean_axis, variance_axis = figure.subplots(1, 2)
    for name, summary in summaries.items():
        variances = np.asarray(summary["per_dim_variance"])
        order = np.argsort(variances)[::-1]
        label = f"{name} (MMD² to the prior {summary['mmd_to_prior']:.2g})"
        # Points, not lines: neighbouring dimensions are unrelated.
        mean_axis.plot(np.asarray(summary["per_dim_mean"])[order], marker="o", ms=3, ls="none", alpha=0.8, label=label)
        variance_axis.plot(variances[order], marker="o", ms=3, ls="none", alpha=0.8, label=label)
    mean_axis.axhline(0.0, color="black", ls="--", lw=1)
    variance_axis.axhline(1.0, color="black", ls="--", lw=1)
    mean_axis.set(title="mean of each code dimension", xlabel="dimension (sorted by variance)", ylabel="mean")
    variance_axis.set(title="variance of each code dimension", xlabel="dimension (sorted by variance)",
                      ylabel="variance (log scale)", yscale="log")
    # Plain numbers (0.3, 1, 3), not 3×10⁻¹; the fewer powers of ten the axis spans, the more of them in between, and
    # evenly spaced ones (0.9, 1, 1.1) within less than 0.6 of a power of ten, where a log axis is close to linear.
    low, high = variance_axis.get_ylim()
    decades = np.log10(high / low)
    subs = (1.0,) if decades > 3.5 else (1.0, 3.0) if decades > 1.5 else (1.0, 2.0, 3.0, 5.0)
    variance_axis.yaxis.set_major_locator(ticker.LogLocator(subs=subs) if decades > 0.6 else
                                           ticker.MaxNLocator(5, steps=[1, 2, 5, 10]))
    variance_axis.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    variance_axis.yaxis.set_minor_formatter(ticker.NullFormatter())
    for axis in (mean_axis, variance_axis):
        axis.grid(alpha=0.3)
    variance_axis.legend(fontsize=8, markerscale=2)
    figure.suptitle(title)
    return vu._save(figure, path)


def plot_reconstructions_by_model(models: Mapping[str, vu.CVAE], images,
                                  title: str = "Test images and reconstructions", path: str | None = None) -> Figure:
    """The test images in the first row, then each model's reconstructions from the mean code: one labelled row each."""
    rows = [np.asarray(images)] + [vu.reconstruct(model, images) for model in models.values()]
    return vu.plot_image_grid(np.concatenate(rows), ncols=len(images), row_labels=["test images"] + list(models),
                              cell=1.3, suptitle=title, path=path)


def plot_mmd_sweep(sweep: MMDSweep, title: str = "MMD weight sweep", path: str | None = None) -> Figure:
    """Reconstruction (PSNR) against the codes' MMD^2 to the prior, a point per weight and one for the ELBO model;
    and MMD^2 against the weight."""
    weights = [row["mmd_weight"] for row in sweep.rows]
    mmds = [row["mmd_to_prior"] for row in sweep.rows]
    psnrs = [row["psnr_db"] for row in sweep.rows]
    reference = sweep.reference
    figure = Figure(figsize=(12, 4.2), layout="constrained")
    trade_axis, mmd_axis = figure.subplots(1, 2)
    trade_axis.plot(mmds, psnrs, marker="o", label="MMD loss (labels: weights)")
    for index, (weight, mmd, value) in enumerate(zip(weights, mmds, psnrs)):
        # Labels alternately above and below their points, so that neighbours with close MMD^2 do not overprint.
        trade_axis.annotate(f"{weight:g}", (mmd, value), xytext=(5, 8 if index % 2 else -14),
                            textcoords="offset points", fontsize=8,
                            color="C3" if weight == sweep.chosen_weight else "black")
    trade_axis.scatter([reference["mmd_to_prior"]], [reference["psnr_db"]], marker="*", s=160, color="C2",
                       label="ELBO loss", zorder=3)
    trade_axis.margins(x=0.15, y=0.15)  # room for the labels at the ends
    trade_axis.set(xscale="log", xlabel="MMD² of the test codes to N(0, I)", ylabel="PSNR (dB)",
                   title="reconstruction against the match to the prior")
    trade_axis.legend(fontsize=8)
    mmd_axis.plot(weights, mmds, marker="o", label="MMD models' codes")
    mmd_axis.axhline(reference["mmd_to_prior"], color="C2", lw=1.5, label="ELBO model's codes")
    mmd_axis.axhline(sweep.noise_floor, color="black", ls="--", lw=1, label="two samples of N(0, I)")
    mmd_axis.axvline(sweep.chosen_weight, color="C3", lw=1, label=f"chosen: {sweep.chosen_weight:g}")
    mmd_axis.set(xscale="log", yscale="log", xlabel="MMD weight", ylabel="MMD² to N(0, I)",
                 title="distance of the codes to the prior")
    for axis in (trade_axis, mmd_axis):
        axis.grid(alpha=0.3)
    mmd_axis.legend(fontsize=8)
    figure.suptitle(title)
    return vu._save(figure, path)
