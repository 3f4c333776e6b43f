"""Model section: shapes of the CVAE for MNIST- and CIFAR-sized images, the decoder grid, invalid configurations."""

import numpy as np
import pytest
import tensorflow as tf

import vae_utils
from conftest import TINY


@pytest.mark.parametrize("img_size, num_convolutions, strides, grid", [
    (28, 2, 2, 7), (32, 2, 2, 8), (32, 3, 2, 4), (32, 5, 2, 1), (27, 3, 3, 1), (28, 1, 4, 7)])
def test_decoder_grid_size(img_size, num_convolutions, strides, grid):
    assert vae_utils.decoder_grid_size(img_size, num_convolutions, strides) == grid


@pytest.mark.parametrize("img_size, channels", [(28, 1), (32, 3)])
@pytest.mark.parametrize("latent_dim", [1, 2, 8])
def test_shapes(seeded, img_size, channels, latent_dim):
    model = vae_utils.CVAE(vae_utils.VAEConfig(img_size=img_size, channels=channels, latent_dim=latent_dim, **TINY))
    x = tf.random.uniform((3, img_size, img_size, channels))
    mean, logvar = model.encode(x)
    assert mean.shape == logvar.shape == (3, latent_dim)
    z = model.reparameterize(mean, logvar)
    assert z.shape == (3, latent_dim)
    logits = model.decode(z)
    assert logits.shape == (3, img_size, img_size, channels)
    images = model.decode(z, apply_sigmoid=True).numpy()
    assert images.shape == (3, img_size, img_size, channels) and images.min() >= 0.0 and images.max() <= 1.0
    assert model.sample(num_samples=5).shape == (5, img_size, img_size, channels)
    assert model.sample(tf.zeros((2, latent_dim))).shape == (2, img_size, img_size, channels)
    assert model(x).shape == (3, img_size, img_size, channels)
    # The decoder reshapes to the grid img_size / strides**num_convolutions.
    reshape = next(layer for layer in model.decoder.layers if isinstance(layer, tf.keras.layers.Reshape))
    assert reshape.target_shape == (img_size // 4, img_size // 4, TINY["filters"])


@pytest.mark.parametrize("overrides, channels_out", [
    (dict(likelihood="logistic"), 6), (dict(upsampling="resize"), 3), (dict(num_convolutions=3), 3),
    (dict(encoder_padding="valid"), 3)])
def test_variants_keep_image_shape(seeded, overrides, channels_out):
    config = vae_utils.VAEConfig(img_size=32, channels=3, latent_dim=4, **{**TINY, **overrides})
    model = vae_utils.CVAE(config)
    x = tf.random.uniform((2, 32, 32, 3))
    assert model(x).shape == (2, 32, 32, channels_out)  # logistic: location and log-scale per channel
    assert model.sample(num_samples=2).shape == (2, 32, 32, 3)


def test_reparameterize_uses_dynamic_shape_and_statistics(seeded):
    model = vae_utils.CVAE(vae_utils.VAEConfig(latent_dim=3, **TINY))
    reparameterize = tf.function(model.reparameterize,
                                 input_signature=[tf.TensorSpec((None, 3)), tf.TensorSpec((None, 3))])
    mean = tf.fill((20000, 3), 2.0)
    logvar = tf.fill((20000, 3), np.log(0.25).astype(np.float32))
    z = reparameterize(mean, logvar).numpy()
    assert z.shape == (20000, 3)
    np.testing.assert_allclose(z.mean(axis=0), 2.0, atol=0.02)
    np.testing.assert_allclose(z.std(axis=0), 0.5, atol=0.02)


def test_overrides_and_config_object_agree():
    config = vae_utils.VAEConfig(img_size=32, channels=3, latent_dim=5, **TINY)
    model = vae_utils.CVAE(vae_utils.VAEConfig(**TINY), img_size=32, channels=3, latent_dim=5)
    assert model.config == config


@pytest.mark.parametrize("overrides, message", [
    (dict(latent_dim=0), "latent_dim=0"),
    (dict(latent_dim=-2), "latent_dim=-2"),
    (dict(latent_dim=2.5), "latent_dim=2.5"),
    (dict(img_size=28, num_convolutions=3), "img_size=28 is not divisible by strides**num_convolutions = 2**3 = 8"),
    (dict(img_size=32, strides=3), "img_size=32 is not divisible by strides**num_convolutions = 3**2 = 9"),
    (dict(filters=0), "filters=0"),
    (dict(upsampling="bilinear"), "upsampling='bilinear'"),
    (dict(likelihood="gaussian"), "likelihood='gaussian'"),
    (dict(logvar_bound=0.0), "logvar_bound=0.0"),
    (dict(spatial_latent=True, latent_dim=50), "latent_dim divisible by grid_size**2 = 49"),
    (dict(spatial_latent=True, latent_dim=98, encoder_padding="valid"), "must use encoder_padding='same'"),
])
def test_invalid_configuration_names_the_numbers(overrides, message):
    with pytest.raises(ValueError) as error:
        vae_utils.VAEConfig(**{**TINY, **overrides})
    assert message in str(error.value)
    with pytest.raises(ValueError, match="must|divisible"):
        vae_utils.CVAE(**{**TINY, **overrides})


def test_logvar_is_softly_bounded(seeded):
    model = vae_utils.CVAE(vae_utils.VAEConfig(latent_dim=2, logvar_bound=5.0, **TINY))
    dense = model.encoder.layers[-1]
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel, np.concatenate([np.zeros(2), [1e6, -1e6]]).astype(np.float32)])
    _, logvar = model.encode(tf.zeros((1, 28, 28, 1)))
    np.testing.assert_allclose(logvar.numpy(), [[5.0, -5.0]], rtol=1e-6)
    dense.set_weights([kernel, np.zeros_like(bias)])
    _, logvar = model.encode(tf.zeros((1, 28, 28, 1)))
    np.testing.assert_allclose(logvar.numpy(), 0.0, atol=1e-6)  # tanh(0) = 0: near zero the clamp is the identity


@pytest.mark.parametrize("img_size, channels, latent_dim, upsampling", [(28, 1, 98, "transpose"),
                                                                        (32, 3, 128, "resize")])
def test_spatial_latent_shapes(seeded, img_size, channels, latent_dim, upsampling):
    config = vae_utils.VAEConfig(img_size=img_size, channels=channels, latent_dim=latent_dim, spatial_latent=True,
                                 upsampling=upsampling, **TINY)
    model = vae_utils.CVAE(config)
    x = tf.random.uniform((3, img_size, img_size, channels))
    mean, logvar = model.encode(x)
    assert mean.shape == logvar.shape == (3, latent_dim)
    assert model.decode(mean).shape == (3, img_size, img_size, channels)
    assert model.sample(num_samples=2).shape == (2, img_size, img_size, channels)
    assert not [layer for layer in model.decoder.layers if isinstance(layer, tf.keras.layers.Dense)]


def test_spatial_latent_splits_mean_and_logvar_by_channel_and_keeps_locality(seeded):
    """The first half of the code holds the mean maps, and a code cell only sees (and shapes) its part of the image."""
    model = vae_utils.CVAE(vae_utils.VAEConfig(img_size=32, channels=3, latent_dim=128, spatial_latent=True,
                                               **{**TINY, "num_convolutions": 2}))  # 8 x 8 grid, 2 channels per cell
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
