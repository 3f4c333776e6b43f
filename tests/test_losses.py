"""Losses section: log-density, analytic KL, MMD, ELBO and IWAE bounds, and gradients through every loss."""

import math

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

import vae_utils
from conftest import TINY, synthetic_images


def test_log_normal_pdf_matches_closed_form():
    rng = np.random.default_rng(0)
    sample, mean = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    logvar = rng.uniform(-3, 3, size=(5, 4))
    expected = stats.norm.logpdf(sample, loc=mean, scale=np.exp(0.5 * logvar)).sum(axis=1)
    got = vae_utils.log_normal_pdf(*(tf.constant(a, tf.float32) for a in (sample, mean, logvar)))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    # Standard normal with scalar parameters, as the ELBO calls it, and another reduction axis.
    np.testing.assert_allclose(vae_utils.log_normal_pdf(tf.constant(sample, tf.float32), 0.0, 0.0).numpy(),
                               stats.norm.logpdf(sample).sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(vae_utils.log_normal_pdf(tf.constant(sample, tf.float32), 0.0, 0.0, raxis=0).numpy(),
                               stats.norm.logpdf(sample).sum(axis=0), rtol=1e-5)


def test_analytic_kl_known_values():
    kl = vae_utils.kl_divergence_to_standard_normal
    np.testing.assert_allclose(kl(tf.zeros((3, 4)), tf.zeros((3, 4))).numpy(), 0.0, atol=1e-7)
    np.testing.assert_allclose(kl(tf.ones((3, 4)), tf.zeros((3, 4))).numpy(), 0.5 * 4, rtol=1e-6)
    # sigma^2 = e: 0.5 (e - 1 - 1) per dimension.
    np.testing.assert_allclose(kl(tf.zeros((1, 2)), tf.ones((1, 2))).numpy(), [math.e - 2.0], rtol=1e-6)


def test_analytic_kl_matches_monte_carlo():
    """The closed form equals E_q[log q(z) - log p(z)], estimated from 200 000 samples within 4 standard errors."""
    rng = np.random.default_rng(1)
    mean = tf.constant([[0.5, -1.0, 2.0]], tf.float32)
    logvar = tf.constant([[-1.0, 0.7, 0.0]], tf.float32)
    eps = tf.constant(rng.standard_normal((200_000, 3)), tf.float32)
    z = mean + tf.exp(0.5 * logvar) * eps
    log_ratio = (vae_utils.log_normal_pdf(z, mean, logvar) - vae_utils.log_normal_pdf(z, 0.0, 0.0)).numpy()
    analytic = float(vae_utils.kl_divergence_to_standard_normal(mean, logvar)[0])
    standard_error = log_ratio.std() / math.sqrt(len(log_ratio))
    assert abs(log_ratio.mean() - analytic) < 4 * standard_error, (log_ratio.mean(), analytic, standard_error)


def test_kernel_bandwidth_convention():
    x = tf.constant([[0.0, 0.0, 0.0, 0.0]])
    y = tf.constant([[2.0, 0.0, 0.0, 0.0]])  # squared distance 4 = dim: k = exp(-1)
    np.testing.assert_allclose(vae_utils.compute_kernel(x, y).numpy(), [[math.exp(-1.0)]], rtol=1e-6)
    points = tf.random.stateless_normal((7, 3), seed=(1, 2))
    kernel = vae_utils.compute_kernel(points, points).numpy()
    assert kernel.shape == (7, 7)
    np.testing.assert_allclose(np.diag(kernel), 1.0)
    np.testing.assert_allclose(kernel, kernel.T, rtol=1e-6)


def test_mmd_of_sample_with_itself_vs_shifted():
    x = tf.random.stateless_normal((200, 4), seed=(3, 4))
    y = tf.random.stateless_normal((200, 4), seed=(5, 6))  # another sample of the same distribution
    same = float(vae_utils.compute_mmd(x, x))
    other_sample = float(vae_utils.compute_mmd(x, y))
    shifted = [float(vae_utils.compute_mmd(x, x + shift)) for shift in (0.5, 1.0, 2.0)]
    assert abs(same) < 1e-6
    assert other_sample < 0.05
    assert shifted[0] > 3 * other_sample and shifted[0] < shifted[1] < shifted[2]


def test_reconstruction_sums_over_height_width_and_channels(seeded):
    model = vae_utils.CVAE(vae_utils.VAEConfig(img_size=32, channels=3, latent_dim=2, **TINY))
    x = tf.constant(np.random.default_rng(0).random((2, 32, 32, 3)), tf.float32)
    logits = tf.constant(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), tf.float32)
    expected = -np.sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=x, logits=logits).numpy(), axis=(1, 2, 3))
    np.testing.assert_allclose(vae_utils.reconstruction_log_prob(model, x, logits).numpy(), expected, rtol=1e-5)


def test_compute_loss_is_negative_single_sample_elbo(tiny_model, mnist_like):
    x = tf.constant(mnist_like[0][:16])
    tf.random.set_seed(7)
    loss = float(vae_utils.compute_loss(tiny_model, x))
    tf.random.set_seed(7)  # the same epsilon
    mean, logvar = tiny_model.encode(x)
    z = tiny_model.reparameterize(mean, logvar)
    logpx_z = -tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(logits=tiny_model.decode(z), labels=x), [1, 2, 3])
    expected = -tf.reduce_mean(logpx_z + vae_utils.log_normal_pdf(z, 0.0, 0.0) - vae_utils.log_normal_pdf(z, mean, logvar))
    np.testing.assert_allclose(loss, float(expected), rtol=1e-6)
    # The analytic-KL ELBO estimates the same quantity with less variance.
    analytic = -float(tf.reduce_mean(vae_utils.elbo_per_example(tiny_model, x, analytic_kl=True)))
    assert abs(analytic - loss) < 0.05 * abs(loss)


def test_iwae_bound_is_at_least_the_elbo(tiny_model, mnist_like):
    """log p(x) >= IWAE_k >= ELBO in expectation (Burda et al. 2016); checked on average over images, seeded.

    The encoder is pushed to a narrow, shifted q(z|x) (a poor posterior, as early in training), where the bounds
    differ by many nats; for an untrained encoder q is close to the prior and the gap is only hundredths of a nat.
    """
    dense = tiny_model.encoder.layers[-1]
    kernel, _ = dense.get_weights()
    dense.set_weights([kernel * 0.1, np.array([1.5, -1.0, -3.0, -3.0], np.float32)])  # mean (1.5, -1), logvar -3
    x = tf.constant(mnist_like[2][:32])
    tf.random.set_seed(3)
    iwae = vae_utils.iwae_log_likelihood(tiny_model, x, num_samples=32).numpy()
    elbo = np.mean([vae_utils.elbo_per_example(tiny_model, x).numpy() for _ in range(8)], axis=0)
    assert iwae.shape == elbo.shape == (32,)
    assert iwae.mean() >= elbo.mean() + 0.5, (iwae.mean(), elbo.mean())
    assert np.mean(iwae >= elbo) > 0.9
    # One sample: the IWAE bound is the ELBO's estimator itself.
    tf.random.set_seed(5)
    one = vae_utils.iwae_log_likelihood(tiny_model, x, num_samples=1).numpy()
    tf.random.set_seed(5)
    np.testing.assert_allclose(one, vae_utils.elbo_per_example(tiny_model, x).numpy(), rtol=1e-5)


def test_iwae_nll_and_bits_per_dim(tiny_model, mnist_like):
    nll = vae_utils.iwae_nll(tiny_model, mnist_like[2][:16], num_samples=8, batch_size=16)
    assert 0 < nll < 28 * 28 * math.log(2) * 2
    assert vae_utils.bits_per_dim(784 * math.log(2.0), 784) == pytest.approx(1.0)


LOSSES = {
    "elbo": vae_utils.compute_loss,
    "mmd": vae_utils.mmd_loss(100.0),
}


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("overrides", [dict(img_size=28, channels=1),
                                       dict(img_size=32, channels=3, likelihood="logistic", upsampling="resize")],
                         ids=["mnist", "cifar-logistic-resize"])
def test_gradients_reach_every_variable_and_are_finite(seeded, loss_name, overrides):
    model = vae_utils.CVAE(vae_utils.VAEConfig(latent_dim=3, **TINY, **overrides))
    images, _ = synthetic_images(8, overrides["img_size"], overrides["channels"])
    with tf.GradientTape() as tape:
        loss = LOSSES[loss_name](model, tf.constant(images))
    gradients = tape.gradient(loss, model.trainable_variables)
    assert np.isfinite(float(loss))
    assert len(gradients) == len(model.trainable_variables) > 0
    for variable, gradient in zip(model.trainable_variables, gradients):
        assert gradient is not None, f"no gradient reaches {variable.path}"
        gradient = tf.convert_to_tensor(gradient).numpy()
        assert np.isfinite(gradient).all(), f"non-finite gradient for {variable.path}"
        assert np.abs(gradient).max() > 0, f"zero gradient for {variable.path}"
