"""vae_extensions: the discretized logistic and autoregressive likelihoods, ExtendedVAEConfig / ExtendedCVAE (spatial
code, resize-convolution decoder), KL warm-up, the scores, the aggregate-code diagnostics and the MMD weight sweep.
Tiny models, seeded, fast."""

import dataclasses
import json
import math
import types

import numpy as np
import pytest
import tensorflow as tf
from matplotlib.figure import Figure

import vae_extensions as vx
import vae_utils as vu
from conftest import TINY, TINY_CONFIG, assert_gradients_reach_every_variable, synthetic_images, tiny_images

LEVELS = np.arange(256, dtype=np.float32) / 255.0  # the 256 pixel values, scaled to [0, 1]


def logistic_cdf(t):
    return 1.0 / (1.0 + np.exp(-t))


def log_logistic_cdf(t):
    """log(1 / (1 + exp(-t))) without cancellation; log(1 - cdf(t)) is log_logistic_cdf(-t)."""
    return -np.logaddexp(0.0, -t)


def level_log_probs(loc, log_scale):
    """log P(pixel = k) for k = 0..255 from `discretized_logistic_log_prob`, as float64 NumPy."""
    x = tf.constant(LEVELS)
    return vx.discretized_logistic_log_prob(x, tf.fill([256], loc), tf.fill([256], log_scale)).numpy().astype(float)


# --- discretized logistic likelihood ---------------------------------------------------------------------------------

@pytest.mark.parametrize("loc, log_scale", [(0.0, -2.0), (0.3, -4.0), (-0.9, -1.0), (0.99, -6.5), (-0.5, 0.5),
                                            (1.0, -7.0), (0.0, -7.0)])
def test_discretized_logistic_levels_sum_to_one(loc, log_scale):
    probabilities = np.exp(level_log_probs(loc, log_scale))
    assert np.all(probabilities >= 0.0)
    assert probabilities.sum() == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("loc, log_scale", [(0.0, -2.0), (-0.8, -3.0), (0.95, -1.5)])
def test_discretized_logistic_edges_and_middle_match_closed_form(loc, log_scale):
    scale = math.exp(log_scale)
    log_probs = level_log_probs(loc, log_scale)
    # Pixel 0 takes all mass below the first bin's upper edge, pixel 255 all mass above the last bin's lower edge.
    expected_0 = log_logistic_cdf((-1.0 + 1.0 / 255.0 - loc) / scale)
    expected_255 = log_logistic_cdf(-(1.0 - 1.0 / 255.0 - loc) / scale)
    assert log_probs[0] == pytest.approx(expected_0, abs=1e-4)
    assert log_probs[255] == pytest.approx(expected_255, abs=1e-4)
    k = 100  # an interior bin: CDF difference over [x - 1/255, x + 1/255] on the [-1, 1] scale
    centre = 2.0 * k / 255.0 - 1.0
    expected_k = math.log(logistic_cdf((centre + 1 / 255 - loc) / scale) - logistic_cdf((centre - 1 / 255 - loc) / scale))
    assert log_probs[k] == pytest.approx(expected_k, rel=1e-3)


def test_discretized_logistic_sharp_distribution_puts_mass_on_its_bin():
    log_probs = level_log_probs(2.0 * 77 / 255.0 - 1.0, -7.0)  # scale far below the bin width, centred on level 77
    assert int(np.argmax(log_probs)) == 77
    assert math.exp(log_probs[77]) > 0.95  # sigmoid(4.3) - sigmoid(-4.3): the floor e^-7 on the scale caps it
    assert np.all(np.isfinite(log_probs))


@pytest.mark.parametrize("level, loc, log_scale", [(200, -0.9, -5.0), (20, 0.8, -4.0), (128, 0.0, -7.0)])
def test_discretized_logistic_far_in_a_tail_matches_float64(level, loc, log_scale):
    """A bin hundreds of scales from the location keeps its exact log-probability (no cancellation, no cut-off)."""
    centre = 2.0 * level / 255.0 - 1.0
    upper, lower = [(centre + sign / 255.0 - loc) / math.exp(log_scale) for sign in (1.0, -1.0)]
    # sigmoid(u) - sigmoid(l) = sigmoid(-l) - sigmoid(-u): both tiny when the bin lies far above the location.
    tail = -1.0 if upper > 0 else 1.0
    expected = math.log(abs(logistic_cdf(tail * lower) - logistic_cdf(tail * upper)))
    assert level_log_probs(loc, log_scale)[level] == pytest.approx(expected, rel=1e-4)


def test_logistic_reconstruction_is_summed_over_pixels_and_channels():
    vu.set_seed(0)
    model = vx.ExtendedCVAE(vx.ExtendedVAEConfig(img_size=8, channels=3, latent_dim=2, num_convolutions=1, filters=4,
                                                 likelihood="logistic"))
    x = tf.constant(np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)) / 255.0, tf.float32)
    output = model.decode(tf.zeros((2, 2)))
    assert output.shape == (2, 8, 8, 6)  # location and log-scale per channel
    per_example = model.reconstruction_log_prob(x, output).numpy()
    logits, raw = tf.split(output, 2, axis=-1)
    log_scale = tf.maximum(raw - vx.LOGISTIC_LOG_SCALE_SHIFT, vx.LOGISTIC_MIN_LOG_SCALE)
    per_pixel = vx.discretized_logistic_log_prob(x, 2.0 * tf.sigmoid(logits) - 1.0, log_scale).numpy()
    np.testing.assert_allclose(per_example, per_pixel.sum(axis=(1, 2, 3)), rtol=1e-5)
    assert np.all(per_example < 0.0)


def test_logistic_gradients_are_finite_at_the_edges():
    x = tf.constant([0.0, 1.0, 0.5, 3 / 255], tf.float32)
    loc = tf.Variable([0.9, -0.9, 0.0, -1.0])
    log_scale = tf.Variable([-7.0, -7.0, -7.0, 1.0])
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(vx.discretized_logistic_log_prob(x, loc, log_scale))
    for gradient in tape.gradient(total, [loc, log_scale]):
        assert np.all(np.isfinite(gradient.numpy()))


def reconstruction_log_prob(config, x, decoder_output, training=False):
    """`ExtendedCVAE.reconstruction_log_prob` for a config alone (it reads nothing else of the model)."""
    return vx.ExtendedCVAE.reconstruction_log_prob(types.SimpleNamespace(config=config), x, decoder_output, training)


def ar_inputs(height=4, width=4, channels=3, seed=0):
    """Random locations, coefficients and an image for `_ar_locations`, batch 1, float32."""
    rng = np.random.default_rng(seed)
    seen = (len(vx.AR_NEIGHBOURS) + 1) * channels
    loc = rng.uniform(-0.8, 0.8, (1, height, width, channels))
    coefficients = np.tanh(rng.normal(size=(1, height, width, seen * channels)))
    x = rng.uniform(-1.0, 1.0, (1, height, width, channels))
    return [tf.constant(a, tf.float32) for a in (loc, coefficients, x)]


def test_autoregressive_location_depends_only_on_earlier_pixels_and_channels():
    loc, coefficients, x = ar_inputs()
    _, height, width, channels = x.shape
    with tf.GradientTape() as tape:
        tape.watch(x)
        shifted = vx._ar_locations(loc, coefficients, x)
    jacobian = tape.jacobian(shifted, x).numpy().reshape(height * width * channels, height * width * channels)
    # Raster order: row by row, pixel by pixel, channel by channel; a location may use only the values before it.
    assert np.all(np.triu(jacobian) == 0.0)
    neighbours = {(0, -1), (-1, -1), (-1, 0), (-1, 1)}
    for out in range(jacobian.shape[0]):
        row, col = divmod(out // channels, width)
        for src in np.flatnonzero(jacobian[out]):
            src_row, src_col = divmod(src // channels, width)
            assert (src_row - row, src_col - col) in neighbours | {(0, 0)}
    assert np.count_nonzero(jacobian) > jacobian.shape[0]  # the coefficients do couple pixels


def test_autoregressive_greedy_decode_is_the_location_map():
    """Filling pixels one by one at their predicted location leaves every residual at zero: the result is `loc`."""
    loc, coefficients, _ = ar_inputs(seed=1)
    _, height, width, channels = loc.shape
    image = np.zeros(loc.shape, np.float32)
    for row in range(height):
        for col in range(width):
            for k in range(channels):
                image[0, row, col, k] = vx._ar_locations(loc, coefficients, tf.constant(image))[0, row, col, k]
    np.testing.assert_allclose(image, loc.numpy(), atol=1e-6)


def test_autoregressive_logistic_sums_to_the_first_pixel_probability():
    """A 1 x 2 grey image: summing p(x0, x1) over the 256 levels of x1 leaves p(x0), in closed form."""
    config = vx.ExtendedVAEConfig(img_size=2, channels=1, latent_dim=2, num_convolutions=1, likelihood="logistic_ar")
    rng = np.random.default_rng(2)
    raw = rng.normal(size=(1, 1, 2, config.decoder_outputs)).astype(np.float32)  # one image row of two pixels
    output = tf.constant(np.repeat(raw, 256, axis=0))
    first_level = 180
    x = np.stack([np.full(256, first_level / 255.0), LEVELS], -1).reshape(256, 1, 2, 1).astype(np.float32)
    joint = reconstruction_log_prob(config, tf.constant(x), output).numpy().astype(float)
    loc_first = 2.0 / (1.0 + math.exp(-raw[0, 0, 0, 0])) - 1.0
    # The first pixel sees no residual, so its location is the mean model's; its scale is the autoregressive one.
    first = level_log_probs(loc_first, raw[0, 0, 0, 2] - vx.LOGISTIC_LOG_SCALE_SHIFT)[first_level]
    np.testing.assert_allclose(np.logaddexp.reduce(joint), first, atol=1e-3)


def test_autoregressive_training_adds_the_mean_model_which_alone_trains_the_locations():
    config = vx.ExtendedVAEConfig(img_size=4, channels=3, latent_dim=2, num_convolutions=1, likelihood="logistic_ar")
    rng = np.random.default_rng(3)
    output = tf.constant(rng.normal(size=(2, 4, 4, config.decoder_outputs)), tf.float32)
    x = tf.constant(rng.integers(0, 256, (2, 4, 4, 3)) / 255.0, tf.float32)
    mean_model = dataclasses.replace(config, likelihood="logistic")
    factorized = reconstruction_log_prob(mean_model, x, output[..., :6])  # locations and their log-scales
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(output)
        autoregressive = reconstruction_log_prob(config, x, output)
        both = reconstruction_log_prob(config, x, output, training=True)
    np.testing.assert_allclose(both.numpy(), (autoregressive + factorized).numpy(), rtol=1e-6)
    gradient = tape.gradient(autoregressive, output).numpy()
    assert np.all(gradient[..., :3] == 0.0)  # no gradient from the neighbours' prediction into the locations
    used = np.abs(gradient).sum(axis=(0, 1, 2)) > 0.0
    assert used[6:9].all()  # but into its log-scales and coefficients: 4 neighbours x 3 x 3, and 3 within the pixel
    assert used[9:].sum() == len(vx.AR_NEIGHBOURS) * 9 + 3


@pytest.mark.parametrize("channels", [1, 3])
def test_autoregressive_decoder_shapes(channels):
    vu.set_seed(0)
    config = vx.ExtendedVAEConfig(img_size=8, channels=channels, latent_dim=2, num_convolutions=1, filters=4,
                                  likelihood="logistic_ar")
    model = vx.ExtendedCVAE(config)
    assert isinstance(model.decoder.layers[-1], vx.AutoregressiveHead)
    per_channel = 3 + (len(vx.AR_NEIGHBOURS) + 1) * channels  # location, 2 log-scales, a coefficient per residual
    assert model.decode(tf.zeros((2, 2))).shape == (2, 8, 8, channels * per_channel)
    sample = model.sample(num_samples=2).numpy()
    assert sample.shape == (2, 8, 8, channels) and sample.min() >= 0.0 and sample.max() <= 1.0
    x = tf.random.uniform((2, 8, 8, channels), seed=1)
    assert vx.KLWarmup()(model, x).shape == ()


# --- resize-convolution decoder --------------------------------------------------------------------------------------

@pytest.mark.parametrize("img_size, channels, num_convolutions, likelihood, outputs", [
    (28, 1, 2, "bernoulli", 1), (32, 3, 3, "bernoulli", 3), (32, 3, 2, "logistic", 6), (28, 1, 2, "logistic", 2)])
def test_resize_decoder_output_shapes(img_size, channels, num_convolutions, likelihood, outputs):
    vu.set_seed(0)
    config = vx.ExtendedVAEConfig(img_size=img_size, channels=channels, latent_dim=3,
                                  num_convolutions=num_convolutions, filters=4, upsampling="resize",
                                  likelihood=likelihood)
    model = vx.ExtendedCVAE(config)
    assert model.decode(tf.zeros((2, 3))).shape == (2, img_size, img_size, outputs)
    assert model.sample(num_samples=2).shape == (2, img_size, img_size, channels)
    x = tf.random.uniform((2, img_size, img_size, channels), seed=1)
    assert model(x).shape == (2, img_size, img_size, outputs)
    layer_types = [type(layer).__name__ for layer in model.decoder.layers]
    assert layer_types.count("UpSampling2D") == num_convolutions
    assert not any(type(layer).__name__ == "Conv2DTranspose" and layer.strides != (1, 1)
                   for layer in model.decoder.layers)


def test_transpose_decoder_has_strided_transposed_convolutions():
    model = vx.ExtendedCVAE(vx.ExtendedVAEConfig(img_size=32, channels=3, num_convolutions=3, filters=4))
    strided = [layer for layer in model.decoder.layers if type(layer).__name__ == "Conv2DTranspose"
               and layer.strides == (2, 2)]
    assert len(strided) == 3
    assert model.decode(tf.zeros((1, 2))).shape == (1, 32, 32, 3)


# --- ExtendedVAEConfig / ExtendedCVAE --------------------------------------------------------------------------------

def extended_config(**changes) -> vx.ExtendedVAEConfig:
    return vx.ExtendedVAEConfig(**{**dataclasses.asdict(TINY_CONFIG), **changes})


@pytest.mark.parametrize("changes, message", [
    (dict(upsampling="bilinear"), "upsampling='bilinear'"),
    (dict(likelihood="gaussian"), "likelihood='gaussian'"),
    (dict(spatial_latent=True, latent_dim=50), "latent_dim divisible by grid_size**2 = 49"),
    (dict(spatial_latent=True, latent_dim=98, encoder_padding="valid"), "needs encoder_padding='same'"),
    (dict(latent_dim=0), "latent_dim=0"),  # the homework's checks still apply
])
def test_extended_config_rejects(changes, message):
    with pytest.raises(ValueError) as error:
        extended_config(**changes)
    assert message in str(error.value)


def test_extended_config_and_kl_warmup_turn_numpy_integers_into_python_ints():
    config = extended_config(latent_dim=np.int64(98), filters=np.int32(4), spatial_latent=True)
    assert type(config.latent_dim) is int and type(config.filters) is int and type(config.logvar_bound) is float
    assert json.loads(json.dumps(dataclasses.asdict(config))) == dataclasses.asdict(config)
    warmup = vx.KLWarmup(warmup_epochs=np.int64(1))
    assert type(warmup.warmup_epochs) is int and warmup.description == "KLWarmup(warmup_epochs=1)"


def test_extended_cvae_with_bernoulli_likelihood_is_the_homework_cvae(mnist_like):
    """Same layers, same weights: the same logits, and the same loss as the homework's CVAE, epsilon for epsilon."""
    vu.set_seed(0)
    homework = vu.CVAE(TINY_CONFIG)
    model = vx.ExtendedCVAE(extended_config())
    assert [type(layer) for layer in model.decoder.layers] == [type(layer) for layer in homework.decoder.layers]
    model.set_weights(homework.get_weights())
    x = tf.constant(mnist_like[0][:16])
    z = tf.random.normal((16, 2))
    np.testing.assert_allclose(model.decode(z).numpy(), homework.decode(z).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.sample(z).numpy(), homework.sample(z).numpy(), rtol=1e-6, atol=1e-6)
    losses = []
    for loss_fn, m in [(vu.compute_loss, homework), (vu.compute_loss, model), (vx.KLWarmup(), model)]:
        m.rng.reset_from_seed(11)  # the same noise for each
        losses.append(float(loss_fn(m, x)))
    assert losses[1] == pytest.approx(losses[0], rel=1e-6) and losses[2] == pytest.approx(losses[0], rel=1e-6)
    logits = homework.decode(z)
    np.testing.assert_allclose(model.reconstruction_log_prob(x, logits).numpy(),
                               homework.reconstruction_log_prob(x, logits).numpy(), rtol=1e-6)


@pytest.mark.parametrize("changes, channels_out", [
    (dict(likelihood="logistic"), 6), (dict(upsampling="resize"), 3), (dict(num_convolutions=3), 3),
    (dict(encoder_padding="valid"), 3)])
def test_variants_keep_image_shape(seeded, changes, channels_out):
    model = vx.ExtendedCVAE(vx.ExtendedVAEConfig(img_size=32, channels=3, latent_dim=4, **{**TINY, **changes}))
    x = tf.random.uniform((2, 32, 32, 3))
    assert model(x).shape == (2, 32, 32, channels_out)  # logistic: location and log-scale per channel
    assert model.sample(num_samples=2).shape == (2, 32, 32, 3)


@pytest.mark.parametrize("img_size, channels, latent_dim, upsampling", [(28, 1, 98, "transpose"),
                                                                        (32, 3, 128, "resize")])
def test_spatial_latent_shapes(seeded, img_size, channels, latent_dim, upsampling):
    config = vx.ExtendedVAEConfig(img_size=img_size, channels=channels, latent_dim=latent_dim, spatial_latent=True,
                                  upsampling=upsampling, **TINY)
    model = vx.ExtendedCVAE(config)
    x = tf.random.uniform((3, img_size, img_size, channels))
    mean, logvar = model.encode(x)
    assert mean.shape == logvar.shape == (3, latent_dim)
    assert model.decode(mean).shape == (3, img_size, img_size, channels)
    assert model.sample(num_samples=2).shape == (2, img_size, img_size, channels)
    assert not [layer for layer in model.decoder.layers if isinstance(layer, tf.keras.layers.Dense)]


def test_spatial_latent_splits_mean_and_logvar_by_channel_and_keeps_locality(seeded):
    """The first half of the code holds the mean maps, and a code cell only sees (and shapes) its part of the image."""
    model = vx.ExtendedCVAE(vx.ExtendedVAEConfig(img_size=32, channels=3, latent_dim=128, spatial_latent=True,
                                                 **TINY))  # 8 x 8 grid, 2 channels per cell
    head = model.encoder.layers[-3]  # the Conv2D that outputs 2 mean and 2 log-variance maps
    kernel, bias = head.get_weights()
    head.set_weights([np.zeros_like(kernel), np.array([1.0, 2.0, -3.0, -4.0], np.float32)])
    mean, logvar = model.encode(tf.zeros((1, 32, 32, 3)))
    np.testing.assert_allclose(mean.numpy().reshape(2, 64), [[1.0] * 64, [2.0] * 64])
    bound = model.config.logvar_bound
    np.testing.assert_allclose(logvar.numpy().reshape(2, 64), bound * np.tanh(np.array([[-3.0], [-4.0]]) / bound)
                               * np.ones((2, 64)), rtol=1e-6)
    head.set_weights([kernel, bias])
    x = tf.random.uniform((1, 32, 32, 3), seed=2)
    changed = tf.tensor_scatter_nd_update(x, [[0, 31, 31, 0]], [5.0])  # one pixel in the bottom-right corner
    difference = (model.encode(changed)[0] - model.encode(x)[0]).numpy().reshape(2, 8, 8)
    assert np.abs(difference[:, :4, :4]).max() == 0.0 and np.abs(difference).max() > 0.0


@pytest.mark.parametrize("likelihood", ["logistic", "logistic_ar"])
def test_gradients_of_the_extended_likelihoods(seeded, likelihood):
    model = vx.ExtendedCVAE(vx.ExtendedVAEConfig(img_size=32, channels=3, latent_dim=3, likelihood=likelihood,
                                                 upsampling="resize", **TINY))
    images, _ = synthetic_images(8, 32, 3)
    assert_gradients_reach_every_variable(model, vx.KLWarmup(), tf.constant(images))


# --- KL warm-up ------------------------------------------------------------------------------------------------------

def test_kl_warmup_schedule_values():
    warmup = vx.KLWarmup(3)
    assert [warmup.weight(epoch) for epoch in range(1, 7)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert float(warmup.kl_weight.numpy()) == pytest.approx(0.25)  # the first epoch's weight before training
    warmup.start_epoch(2)
    assert float(warmup.kl_weight.numpy()) == pytest.approx(0.5)
    assert vx.KLWarmup(0).weight(1) == 1.0  # no warm-up: the plain ELBO from the first epoch
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="warmup_epochs="):
            vx.KLWarmup(bad)


def test_kl_warmup_description_is_stable():
    """The description names the schedule only, not the weight it has reached: a resumed run keeps its signature."""
    warmup = vx.KLWarmup(5)
    before = warmup.description
    warmup.start_epoch(3)
    assert before == warmup.description == vx.KLWarmup(5).description == "KLWarmup(warmup_epochs=5)"
    assert vx.KLWarmup(4).description != before


def test_kl_warmup_loss_interpolates_between_reconstruction_and_elbo():
    vu.set_seed(0)
    model = vu.CVAE(vu.VAEConfig(img_size=8, latent_dim=2, num_convolutions=1, filters=4))
    x = tf.random.uniform((4, 8, 8, 1), seed=2)
    warmup = vx.KLWarmup(1)
    losses = {}
    for weight in (0.0, 0.5, 1.0):
        warmup.kl_weight.assign(weight)
        model.rng.reset_from_seed(5)  # the same reparameterization noise for every weight
        losses[weight] = float(warmup(model, x))
    model.rng.reset_from_seed(5)
    assert losses[1.0] == pytest.approx(float(vu.compute_loss(model, x)), rel=1e-5)
    assert losses[0.5] == pytest.approx(0.5 * (losses[0.0] + losses[1.0]), rel=1e-5)


class _WeightAsLoss(vx.KLWarmup):
    """A warm-up whose loss is its current KL weight (plus a zero that touches every weight, for gradients)."""

    def __call__(self, model, x):
        return self.kl_weight + 0.0 * tf.add_n([tf.reduce_sum(v) for v in model.trainable_variables])


def test_main_train_loop_applies_the_warmup_weight_each_epoch():
    vu.set_seed(0)
    model = vu.CVAE(vu.VAEConfig(img_size=8, latent_dim=2, num_convolutions=1, filters=4))
    images = np.random.default_rng(0).random((16, 8, 8, 1)).astype(np.float32)
    loss_fn = _WeightAsLoss(2)
    seen = []
    history = vu.main_train_loop(model, images, images[:8], vu.TrainConfig(epochs=3, batch_size=8), loss_fn,
                                 verbose=False,
                                 on_epoch_end=lambda epoch, m, row: seen.append(float(loss_fn.kl_weight.numpy())))
    expected = [1 / 3, 2 / 3, 1.0]
    assert seen == pytest.approx(expected)
    # The traced training step read the variable's current value, not the one it was traced with.
    assert [row["train_loss"] for row in history] == pytest.approx(expected, rel=1e-6)


# --- ELBO versus MMD: aggregate code distribution ----------------------------------------------------------------------

def test_mmd_to_prior_matches_compute_mmd_and_separates_distributions():
    rng = np.random.default_rng(0)
    codes = rng.normal(size=(200, 4)).astype(np.float32)
    prior = np.random.default_rng(7).standard_normal((200, 4))
    expected = float(vu.compute_mmd(tf.constant(codes, tf.float64), tf.constant(prior, tf.float64)))
    assert vx.mmd_to_prior(codes, seed=7) == pytest.approx(expected, rel=1e-6)
    shifted = vx.mmd_to_prior(codes + 2.0, seed=1)
    matched = vx.mmd_to_prior(codes, seed=1)
    assert shifted > 10 * matched
    with pytest.raises(ValueError):
        vx.mmd_to_prior(np.zeros(5))


def test_latent_distribution_summary_moments():
    codes = np.random.default_rng(0).normal(loc=[0.0, 3.0], scale=[1.0, 0.1], size=(2000, 2))
    summary = vx.latent_distribution_summary(codes)
    np.testing.assert_allclose(summary["per_dim_mean"], [0.0, 3.0], atol=0.05)
    np.testing.assert_allclose(summary["per_dim_variance"], [1.0, 0.01], rtol=0.06)
    assert summary["mean_abs_mean"] == pytest.approx(1.5, abs=0.05)
    expected_kl = 0.5 * (0.01 + 9.0 - 1.0 - math.log(0.01))  # the second dimension; the first matches the prior
    assert summary["moment_kl_nats"] == pytest.approx(expected_kl, rel=0.02)
    assert summary["mmd_to_prior"] > 0.1
    standard = vx.latent_distribution_summary(np.random.default_rng(1).standard_normal((1000, 2)))
    assert standard["mmd_to_prior"] < 0.01 and standard["moment_kl_nats"] < 0.01


def test_aggregate_posterior_samples_shape_and_seed():
    vu.set_seed(0)
    model = vu.CVAE(vu.VAEConfig(img_size=8, latent_dim=3, num_convolutions=1, filters=4))
    images = np.random.default_rng(0).random((10, 8, 8, 1)).astype(np.float32)
    first = vx.aggregate_posterior_samples(model, images, batch_size=4, seed=3)
    assert first.shape == (10, 3)
    np.testing.assert_array_equal(first, vx.aggregate_posterior_samples(model, images, batch_size=4, seed=3))
    assert not np.allclose(first, vu.encode_means(model, images))  # sampled, not the means


@pytest.mark.parametrize("scales", [(1.0, 0.5), (2.0, 0.55), (1.0, 1.1), (1.4, 0.8), (30.0, 0.03)],
                         ids=["0.25 to 1", "0.3 to 4", "1 to 1.1", "0.8 to 1.4", "0.03 to 30"])
def test_plot_latent_moments_draws_points_and_plain_variance_ticks(scales):
    rng = np.random.default_rng(0)
    summaries = {name: vx.latent_distribution_summary(rng.normal(size=(300, 6)) * np.geomspace(*scales, 6) ** 0.5)
                 for name in ("ELBO", "MMD")}
    figure = vx.plot_latent_moments(summaries)
    assert figure.get_suptitle().strip() and all(axis.get_title() for axis in figure.axes)
    for axis in figure.axes:  # per model a point per dimension, not joined by lines; and the prior's value, dashed
        points = [line for line in axis.lines if line.get_marker() == "o"]
        assert len(points) == 2 and len(axis.lines) == 3
        assert all(line.get_linestyle() == "None" and len(line.get_xdata()) == 6 for line in points)
    figure.draw_without_rendering()
    variance_axis = figure.axes[1]
    low, high = variance_axis.get_ylim()
    shown = [label.get_text() for label in variance_axis.get_yticklabels(which="both")
             if label.get_text() and low <= label.get_position()[1] <= high]
    assert len(shown) >= 2, shown
    for text in shown:  # plain numbers such as 0.3, 1, 10: no 3×10⁻¹ or 10^0
        assert float(text) > 0 and "times" not in text and "^" not in text and "$" not in text
    assert vx.plot_latent_moments(summaries, title="MNIST").get_suptitle() == "MNIST"


# --- The MMD weight sweep ----------------------------------------------------------------------------------------------

def test_prior_mmd_noise_floor_is_the_mmd_of_two_prior_samples():
    floor = vx.prior_mmd_noise_floor(300, 4, seed=2)
    expected = vx.mmd_to_prior(np.random.default_rng(3).standard_normal((300, 4)), seed=2)
    assert floor == pytest.approx(expected, rel=1e-12) and floor > 0.0
    assert vx.prior_mmd_noise_floor(3000, 4) < vx.prior_mmd_noise_floor(100, 4)  # a biased estimator: ~1/N


@pytest.mark.parametrize("mmds, chosen", [
    ((0.5, 0.03, 0.01, 0.001), 100.0),  # the smallest weight at or below the ELBO model's 0.01
    ((0.005, 0.03, 0.01, 0.001), 1.0),  # already the smallest
    ((0.5, 0.3, 0.2, 0.25), 100.0),  # none: the weight whose codes come closest
])
def test_choose_mmd_weight_takes_the_smallest_weight_that_matches_the_elbo_model(mmds, chosen):
    sweep = [{"mmd_weight": weight, "mmd_to_prior": mmd} for weight, mmd in zip((1.0, 10.0, 100.0, 1000.0), mmds)]
    assert vx.choose_mmd_weight(sweep, reference_mmd=0.01) == chosen


def test_mmd_weight_sweep_trains_one_model_per_weight_and_chooses(capsys, tmp_path):
    images = (tiny_images(48, seed=4) > 0.5).astype(np.float32)
    labels = np.arange(48) % 2
    data = vu.DataSplits("mnist", images[:32], labels[:32], images[32:], labels[32:])
    config = vu.TrainConfig(epochs=1, batch_size=16)
    model_config = vu.VAEConfig(img_size=8, latent_dim=2, num_convolutions=1, filters=4)
    sweep = vx.mmd_weight_sweep([1.0, 100.0], model_config, data, config, checkpoint_root=str(tmp_path),
                                num_codes=12)
    assert [row["mmd_weight"] for row in sweep.rows] == [1.0, 100.0]
    for row in sweep.rows:
        assert {"psnr_db", "test_elbo", "mmd_to_prior"} <= set(row)
        assert math.isfinite(row["psnr_db"]) and row["mmd_to_prior"] >= 0.0
    assert list(sweep.models) == ["ELBO", "weight 1", "weight 100"]
    assert all(isinstance(model, vu.CVAE) for model in sweep.models.values())
    assert sweep.noise_floor == pytest.approx(vx.prior_mmd_noise_floor(12, 2))
    assert sweep.chosen_weight == vx.choose_mmd_weight(sweep.rows, sweep.reference["mmd_to_prior"])
    assert {"psnr_db", "test_elbo", "mmd_to_prior"} <= set(sweep.reference) and sweep.reference["mmd_weight"] is None
    assert len([folder for folder in tmp_path.iterdir() if folder.is_dir()]) == 3  # a checkpoint per model
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 3
    assert printed[0].startswith("ELBO loss: on the first 12 test images PSNR ")
    assert printed[1].startswith("MMD weight 1: on the first 12 test images PSNR ")
    assert not any("(s)" in line or "^" in line for line in printed)
    figure = vx.plot_mmd_sweep(sweep)
    assert isinstance(figure, Figure) and len(figure.axes) == 2
    assert figure.get_suptitle() == "MMD weight sweep" and all(axis.get_title() for axis in figure.axes)
    assert any(line.get_label() == f"chosen: {sweep.chosen_weight:g}" for line in figure.axes[1].lines)
    for bad in ([], [1.0, -1.0]):
        with pytest.raises(ValueError, match="weights is empty|mmd_weight="):
            vx.mmd_weight_sweep(bad, model_config, data, config)


def test_results_table_shows_a_dash_where_a_measure_does_not_apply():
    row = {"epochs": 2, "train_seconds": 100.26, "test_elbo": -2003.34, "iwae_nll_nats": 1990.0, "psnr_db": 19.123,
           "active_units": 40, "probe_accuracy": 0.4125}
    results = [{"name": "CIFAR-10 ELBO (homework)", **row, "bits_per_dim": None},
               {"name": "CIFAR-10 improved", **row, "bits_per_dim": 6.23733}]
    table = vx.results_table(results, vx.SUMMARY_COLUMNS)
    assert table.loc["CIFAR-10 ELBO (homework)", "bits/dim"] == "–"
    assert table.loc["CIFAR-10 improved", "bits/dim"] == "6.237"
    assert table.loc["CIFAR-10 improved"].tolist() == ["2", "100", "-2003.3", "1990.0", "6.237", "19.12", "40", "0.412"]
    assert "nan" not in repr(table).lower() and "None" not in repr(table)
    full = vx.results_table(results)
    assert full.loc["CIFAR-10 ELBO (homework)", "bits_per_dim"] == "–"
    assert full.loc["CIFAR-10 improved", "bits_per_dim"] == 6.23733


@pytest.mark.parametrize("plot", [
    lambda models, images: vx.plot_reconstructions_by_model(models, images[:3]),
], ids=["plot_reconstructions_by_model"])
def test_image_figures_are_titled_by_default(seeded, plot):
    models = {name: vu.CVAE(vu.VAEConfig(img_size=8, latent_dim=3, num_convolutions=1, filters=4))
              for name in ("ELBO", "MMD")}
    assert plot(models, tiny_images(3, seed=5)).get_suptitle().strip()


# --- scores of a trained model and the results table ------------------------------------------------------------------

def test_iwae_bound_is_tighter_than_the_elbo_and_bits_per_dim_converts(tiny_model, mnist_like):
    images = mnist_like[2][:16]
    elbo = vu.evaluate_elbo(tiny_model, np.repeat(images, 64, axis=0))  # the expected 1-sample bound, closely
    assert vx.iwae_nll(tiny_model, images, num_samples=1) == pytest.approx(-elbo, rel=0.01)
    assert vx.iwae_nll(tiny_model, images, 64) < -elbo  # log of a mean of weights >= mean of their logs (Jensen)
    assert vx.bits_per_dim(784 * math.log(2.0), 784) == pytest.approx(1.0)


def test_probes_separate_separable_codes_and_refuse_one_class():
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 2
    codes = rng.normal(size=(200, 3)) + 4.0 * labels[:, None]
    assert vx.linear_probe_accuracy(codes, labels, codes, labels) == 1.0
    assert vx.active_units(np.c_[codes[:, :2], np.full(200, 3.0)]) == 2
    with pytest.raises(ValueError, match="one class"):
        vx.linear_probe_accuracy(codes, np.zeros(200, int), codes, labels)


def test_train_and_score_refuses_what_scoring_cannot_use_before_training(splits):
    one_dim = vu.CVAE(vu.VAEConfig(latent_dim=1, **TINY))
    with pytest.raises(ValueError, match="latent_dim=1"):
        vx.train_and_score("one", one_dim, splits, vu.TrainConfig(epochs=1, batch_size=32))
    single_class = dataclasses.replace(splits, train_labels=np.zeros_like(splits.train_labels))
    with pytest.raises(ValueError, match="one class"):
        vx.train_and_score("single", vu.CVAE(TINY_CONFIG), single_class, vu.TrainConfig(epochs=1, batch_size=32))


def test_score_model_results_table_and_written_results(splits, tmp_path):
    config = vu.TrainConfig(epochs=1, batch_size=64, precision="float32")
    run = vx.train_and_score("tiny ELBO", vu.build_model(TINY_CONFIG, config), splits, config, iwae_samples=4,
                             iwae_images=16, checkpoint_root=str(tmp_path), verbose=False)
    result = run.result
    assert result["test_elbo"] == run.history[-1]["test_elbo"] and result["loss"] == "vae_utils.compute_loss"
    assert result["bits_per_dim"] == pytest.approx(result["iwae_nll_nats"] / (784 * math.log(2.0)))  # binary images
    assert (tmp_path / "tiny_elbo").is_dir()
    table = vx.results_table([result], vx.SUMMARY_COLUMNS)
    assert list(table.columns) == [heading for heading, _ in vx.SUMMARY_COLUMNS.values()]
    assert table.loc["tiny ELBO", "test ELBO"] == f"{result['test_elbo']:.1f}"
    vx.write_results(str(tmp_path / "results.json"), [result], quick=True)
    assert json.loads((tmp_path / "results.json").read_text())["models"][0]["name"] == "tiny ELBO"
    assert 0.0 <= result["probe_accuracy"] <= 1.0
