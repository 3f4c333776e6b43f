"""Model section: the homework's CVAE for MNIST- and CIFAR-sized images (shapes, the decoder's logits layer, the
soft log-variance bound), the decoder grid, invalid configurations, and build_model."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

import vae_utils
from conftest import LOGICAL_CPUS, TINY, TINY_CONFIG


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


@pytest.mark.parametrize("overrides, message", [
    (dict(latent_dim=0), "latent_dim=0"),
    (dict(latent_dim=-2), "latent_dim=-2"),
    (dict(latent_dim=2.5), "latent_dim=2.5"),
    (dict(latent_dim=True), "latent_dim=True"),
    (dict(img_size=28, num_convolutions=3), "img_size=28 is not divisible by strides**num_convolutions = 2**3 = 8"),
    (dict(img_size=32, strides=3), "img_size=32 is not divisible by strides**num_convolutions = 3**2 = 9"),
    (dict(filters=0), "filters=0"),
    (dict(encoder_padding="full"), "encoder_padding='full'"),
    (dict(logvar_bound=0.0), "logvar_bound=0.0"),
])
def test_invalid_configuration_names_the_numbers(overrides, message):
    with pytest.raises(ValueError) as error:
        vae_utils.VAEConfig(**{**TINY, **overrides})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_config_holds_only_the_homework_fields():
    """The likelihood, upsampling and spatial-code options belong to ExtendedVAEConfig (the last section)."""
    fields = {field.name for field in dataclasses.fields(vae_utils.VAEConfig)}
    assert fields == {"img_size", "channels", "latent_dim", "num_convolutions", "filters", "kernel_size", "strides",
                      "encoder_padding", "logvar_bound"}
    with pytest.raises(TypeError):
        vae_utils.VAEConfig(likelihood="logistic")
    with pytest.raises(TypeError):
        vae_utils.CVAE(TINY_CONFIG, latent_dim=3)  # no keyword overrides: the config says it all
    assert TINY_CONFIG.widths == [4, 8] and TINY_CONFIG.grid_size == 7 and TINY_CONFIG.image_dims == 784


def test_decoder_ends_in_a_linear_stride_one_layer_of_logits(seeded):
    """Question 1.3: the last layer is a Conv2DTranspose with `channels` filters, stride 1 and no activation."""
    model = vae_utils.CVAE(vae_utils.VAEConfig(img_size=32, channels=3, latent_dim=2, **TINY))
    last = model.decoder.layers[-1]
    assert isinstance(last, tf.keras.layers.Conv2DTranspose)
    assert last.filters == 3 and last.strides == (1, 1) and last.activation is tf.keras.activations.linear
    z = tf.random.normal((4, 2))
    logits = model.decode(z)
    assert logits.numpy().min() < 0.0  # logits, not probabilities ...
    np.testing.assert_allclose(model.decode(z, apply_sigmoid=True).numpy(), tf.sigmoid(logits).numpy(), rtol=1e-6)
    np.testing.assert_allclose(model.sample(z).numpy(), tf.sigmoid(logits).numpy(), rtol=1e-6)  # ... sigmoid: 1.7


def test_build_model_seeds_and_builds_the_config_class():
    first = vae_utils.build_model(TINY_CONFIG, vae_utils.TrainConfig(seed=3))
    again = vae_utils.build_model(TINY_CONFIG, vae_utils.TrainConfig(seed=3))
    other = vae_utils.build_model(TINY_CONFIG, vae_utils.TrainConfig(seed=4))
    assert type(first) is vae_utils.CVAE and first.config == TINY_CONFIG
    for a, b in zip(first.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.get_weights()[0], other.get_weights()[0])
    extended = vae_utils.build_model(vae_utils.ExtendedVAEConfig(**dataclasses.asdict(TINY_CONFIG)))
    assert type(extended) is vae_utils.ExtendedCVAE
    with pytest.raises(TypeError, match="config must be a VAEConfig"):
        vae_utils.build_model(dataclasses.asdict(TINY_CONFIG))


def test_build_model_builds_in_the_strategy_scope():
    if LOGICAL_CPUS < 2:
        pytest.skip("the CPU could not be split into two logical devices")
    strategy = tf.distribute.MirroredStrategy(["/CPU:0", "/CPU:1"])
    model = vae_utils.build_model(TINY_CONFIG, strategy=strategy)
    assert all(strategy.extended.variable_created_in_scope(getattr(v, "value", v)) for v in model.variables)


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
