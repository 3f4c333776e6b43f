"""Model section: VAEConfig and the decoder grid, the CVAE's shapes for MNIST and CIFAR-10, the reparameterization
trick's gradient, the soft log-variance bound, the Bernoulli likelihood, and build_model's seeding."""

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf

import vae_utils
from conftest import TINY, TINY_CONFIG, tiny_images

MNIST_CONFIG = vae_utils.VAEConfig(img_size=28, channels=1, latent_dim=2, **TINY)
CIFAR_CONFIG = vae_utils.VAEConfig(img_size=32, channels=3, latent_dim=5, **TINY)


# ---------------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("img_size, num_convolutions, strides, grid", [
    (28, 2, 2, 7), (32, 2, 2, 8), (32, 3, 2, 4), (32, 5, 2, 1), (27, 3, 3, 1), (28, 1, 4, 7), (28, 3, 1, 28)])
def test_decoder_grid_size_is_img_size_over_strides_to_the_number_of_convolutions(img_size, num_convolutions,
                                                                                    strides, grid):
    assert vae_utils.decoder_grid_size(img_size, num_convolutions, strides) == grid


def test_decoder_grid_size_refuses_an_image_the_strides_do_not_divide():
    with pytest.raises(ValueError, match=r"img_size=28 is not divisible by strides\*\*num_convolutions = 2\*\*3 = 8"):
        vae_utils.decoder_grid_size(28, 3, 2)


def test_config_derived_sizes():
    assert TINY_CONFIG.widths == [4, 8] and TINY_CONFIG.grid_size == 7 and TINY_CONFIG.image_dims == 784
    assert CIFAR_CONFIG.grid_size == 8 and CIFAR_CONFIG.image_dims == 32 * 32 * 3


@pytest.mark.parametrize("overrides, field", [
    (dict(latent_dim=0), "latent_dim=0"),
    (dict(latent_dim=2.5), "latent_dim=2.5"),
    (dict(img_size=-28), "img_size=-28"),
    (dict(channels=0), "channels=0"),
    (dict(filters=0), "filters=0"),
    (dict(num_convolutions=0), "num_convolutions=0"),
    (dict(kernel_size=0), "kernel_size=0"),
    (dict(strides=0), "strides=0"),
    (dict(num_convolutions=3), "img_size=28 is not divisible"),
    (dict(encoder_padding="full"), "encoder_padding='full'"),
    (dict(logvar_bound=0.0), "logvar_bound=0.0"),
    (dict(logvar_bound=float("inf")), "logvar_bound=inf"),
    (dict(logvar_bound=float("nan")), "logvar_bound=nan"),
    (dict(logvar_bound=True), "logvar_bound=True"),
    (dict(latent_dim=True), "latent_dim=True"),
    (dict(latent_dim=np.float64(2.0)), "latent_dim=np.float64(2.0)"),
    (dict(filters=np.int64(0)), "filters=np.int64(0)"),
])
def test_config_refuses_a_bad_value_naming_the_field(overrides, field):
    with pytest.raises(ValueError) as error:
        vae_utils.VAEConfig(**{**TINY, **overrides})
    assert field in str(error.value)


def test_numpy_scalars_in_the_configs_become_python_numbers(seeded):
    config = vae_utils.VAEConfig(img_size=np.int64(28), channels=np.int32(1), latent_dim=np.int64(3),
                                 num_convolutions=np.int64(2), filters=np.int64(4), kernel_size=np.int16(3),
                                 strides=np.uint8(2), logvar_bound=np.float32(5.0))
    train = vae_utils.TrainConfig(epochs=np.int64(2), batch_size=np.int64(32), learning_rate=np.float32(0.5),
                                  steps_per_execution=np.int32(1), seed=np.int64(0), eval_batch_size=np.int64(100))
    vae_ints = ("img_size", "channels", "latent_dim", "num_convolutions", "filters", "kernel_size", "strides")
    train_ints = ("epochs", "batch_size", "steps_per_execution", "seed", "eval_batch_size")
    assert [type(getattr(config, name)) for name in vae_ints] == [int] * 7 and type(config.logvar_bound) is float
    assert [type(getattr(train, name)) for name in train_ints] == [int] * 5 and type(train.learning_rate) is float
    for settings in (config, train):  # a checkpoint's run record holds them as JSON
        assert json.loads(json.dumps(dataclasses.asdict(settings))) == dataclasses.asdict(settings)
    assert (config.latent_dim, config.logvar_bound, train.batch_size, train.learning_rate) == (3, 5.0, 32, 0.5)
    model = vae_utils.CVAE(vae_utils.VAEConfig(latent_dim=np.int64(3), filters=np.int64(4)))
    mean, logvar = model.encode(tiny_images(2, img_size=28))
    assert mean.shape == logvar.shape == (2, 3)


# ---------------------------------------------------------------------------------------------------------------------
# Shapes and the decoder's output
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [MNIST_CONFIG, CIFAR_CONFIG], ids=["mnist", "cifar10"])
def test_encoder_and_decoder_shapes(seeded, config):
    model = vae_utils.CVAE(config)
    shape = (config.img_size, config.img_size, config.channels)
    x = tf.constant(tiny_images(3, config.img_size, config.channels))
    assert model.encoder(x).shape == (3, 2 * config.latent_dim)  # [mean, log-variance]
    mean, logvar = model.encode(x)
    assert mean.shape == logvar.shape == (3, config.latent_dim)
    z = model.reparameterize(mean, logvar)
    assert z.shape == (3, config.latent_dim)
    assert model.decode(z).shape == (3, *shape)
    assert model(x).shape == (3, *shape)
    reshape = next(layer for layer in model.decoder.layers if isinstance(layer, tf.keras.layers.Reshape))
    assert reshape.target_shape == (config.grid_size, config.grid_size, config.filters)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_either_encoder_padding_gives_the_same_output_shapes(seeded, padding):
    config = vae_utils.VAEConfig(img_size=28, channels=1, latent_dim=3, encoder_padding=padding, **TINY)
    model = vae_utils.CVAE(config)
    mean, _ = model.encode(tf.constant(tiny_images(2, 28)))
    assert mean.shape == (2, 3) and model.decode(mean).shape == (2, 28, 28, 1)


def test_decode_gives_logits_and_with_apply_sigmoid_probabilities_in_0_1(seeded):
    model = vae_utils.CVAE(CIFAR_CONFIG)
    z = 3.0 * tf.random.normal((6, CIFAR_CONFIG.latent_dim), seed=1)
    logits = model.decode(z)
    probabilities = model.decode(z, apply_sigmoid=True).numpy()
    assert logits.dtype == tf.float32
    assert probabilities.min() >= 0.0 and probabilities.max() <= 1.0
    np.testing.assert_allclose(probabilities, tf.sigmoid(logits).numpy(), rtol=1e-6)
    # The last layer has no activation: its outputs are logits, with negative values.
    assert logits.numpy().min() < 0.0
    last = model.decoder.layers[-1]
    assert isinstance(last, tf.keras.layers.Conv2DTranspose) and last.strides == (1, 1) and last.filters == 3


@pytest.mark.parametrize("config", [MNIST_CONFIG, CIFAR_CONFIG], ids=["mnist", "cifar10"])
def test_sample_decodes_prior_draws_or_given_codes_into_images(seeded, config):
    model = vae_utils.CVAE(config)
    shape = (config.img_size, config.img_size, config.channels)
    drawn = model.sample(num_samples=5).numpy()
    assert drawn.shape == (5, *shape) and drawn.min() >= 0.0 and drawn.max() <= 1.0
    codes = tf.random.normal((2, config.latent_dim), seed=2)
    np.testing.assert_allclose(model.sample(codes).numpy(), model.decode(codes, apply_sigmoid=True).numpy())


# ---------------------------------------------------------------------------------------------------------------------
# Reparameterization and the log-variance bound
# ---------------------------------------------------------------------------------------------------------------------

def test_reparameterize_gradient_is_one_for_the_mean_and_half_sigma_eps_for_the_logvar(tiny_model):
    """z = mean + exp(logvar / 2) eps: dz/dmean = 1 and dz/dlogvar = sigma eps / 2 = (z - mean) / 2."""
    mean = tf.Variable([[0.5, -1.0], [2.0, 0.0]])
    logvar = tf.Variable([[0.0, -2.0], [1.0, 0.4]])
    with tf.GradientTape(persistent=True) as tape:
        z = tiny_model.reparameterize(mean, logvar)
    eps = ((z - mean) / tf.exp(0.5 * logvar)).numpy()
    assert np.all(eps != 0.0)
    # Each z_ij depends on mean_ij and logvar_ij only, so the gradient of sum(z) is the element-wise derivative.
    np.testing.assert_allclose(tape.gradient(z, mean).numpy(), 1.0)
    np.testing.assert_allclose(tape.gradient(z, logvar).numpy(), 0.5 * np.exp(0.5 * logvar.numpy()) * eps,
                               rtol=1e-5, atol=1e-7)


def test_reparameterize_draws_from_the_gaussian_and_follows_the_batch_size(tiny_model):
    reparameterize = tf.function(tiny_model.reparameterize,
                                 input_signature=[tf.TensorSpec((None, 2)), tf.TensorSpec((None, 2))])
    mean = tf.fill((20000, 2), 2.0)
    logvar = tf.fill((20000, 2), float(np.log(0.25)))
    z = reparameterize(mean, logvar).numpy()
    assert z.shape == (20000, 2)
    np.testing.assert_allclose(z.mean(axis=0), 2.0, atol=0.02)
    np.testing.assert_allclose(z.std(axis=0), 0.5, atol=0.02)
    assert reparameterize(mean[:3], logvar[:3]).shape == (3, 2)


def test_logvar_is_softly_bounded_and_the_identity_near_zero(seeded):
    model = vae_utils.CVAE(vae_utils.VAEConfig(latent_dim=2, logvar_bound=5.0, **TINY))
    head = model.encoder.layers[-1]
    kernel, _ = head.get_weights()
    x = tf.zeros((1, 28, 28, 1))
    head.set_weights([np.zeros_like(kernel), np.array([7.0, -7.0, 1e6, -1e6], np.float32)])
    mean, logvar = model.encode(x)
    np.testing.assert_allclose(mean.numpy(), [[7.0, -7.0]])  # the mean is not bounded
    np.testing.assert_allclose(logvar.numpy(), [[5.0, -5.0]], rtol=1e-6)
    head.set_weights([np.zeros_like(kernel), np.array([0.0, 0.0, 0.01, -0.02], np.float32)])
    _, logvar = model.encode(x)
    np.testing.assert_allclose(logvar.numpy(), [[0.01, -0.02]], rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Likelihood
# ---------------------------------------------------------------------------------------------------------------------

def test_reconstruction_log_prob_is_the_bernoulli_log_prob_summed_over_pixels_and_channels(seeded):
    model = vae_utils.CVAE(CIFAR_CONFIG)
    rng = np.random.default_rng(0)
    x = tf.constant((rng.random((2, 32, 32, 3)) < 0.4).astype(np.float32))
    logits = tf.constant(rng.normal(size=(2, 32, 32, 3)), tf.float32)
    got = model.reconstruction_log_prob(x, logits).numpy()
    np.testing.assert_allclose(got, vae_utils.bernoulli_log_prob(x, logits).numpy())
    p = 1.0 / (1.0 + np.exp(-logits.numpy().astype(np.float64)))
    expected = np.sum(np.where(x.numpy() == 1.0, np.log(p), np.log1p(-p)), axis=(1, 2, 3))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_bernoulli_likelihood_is_proper_on_binary_images_only(tiny_model):
    binary = (tiny_images(4, 28) < 0.5).astype(np.float32)
    assert tiny_model.likelihood_is_proper(binary) is True
    assert tiny_model.likelihood_is_proper(tiny_images(4, 28)) is False
    assert tiny_model.likelihood_is_proper(np.where(binary == 1.0, 0.5, 0.0)) is False


# ---------------------------------------------------------------------------------------------------------------------
# build_model
# ---------------------------------------------------------------------------------------------------------------------

def test_build_model_same_seed_same_weights_other_seed_other_weights():
    first = vae_utils.build_model(TINY_CONFIG, vae_utils.TrainConfig(seed=3))
    again = vae_utils.build_model(TINY_CONFIG, vae_utils.TrainConfig(seed=3))
    other = vae_utils.build_model(TINY_CONFIG, vae_utils.TrainConfig(seed=4))
    assert type(first) is vae_utils.CVAE and first.config == TINY_CONFIG
    for a, b in zip(first.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.get_weights()[0], other.get_weights()[0])


def test_build_model_builds_the_given_model_class():
    class Subclass(vae_utils.CVAE):
        pass

    assert type(vae_utils.build_model(TINY_CONFIG, model_class=Subclass)) is Subclass


def test_build_model_refuses_what_is_not_a_config():
    with pytest.raises(TypeError, match="VAEConfig"):
        vae_utils.build_model({"latent_dim": 2})
    with pytest.raises(TypeError, match="TrainConfig"):
        vae_utils.build_model(TINY_CONFIG, {"seed": 0})
