"""Losses section: log-density, the tutorial's compute_loss, the Gaussian kernel, MMD and the MMD loss, and gradients
through every loss."""

import math

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

import vae_utils
from conftest import TINY, assert_gradients_reach_every_variable, synthetic_images


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


def test_compute_loss_is_the_tutorials_single_sample_elbo(tiny_model, mnist_like):
    x = tf.constant(mnist_like[0][:16])
    tf.random.set_seed(7)
    loss = float(vae_utils.compute_loss(tiny_model, x))
    tf.random.set_seed(7)  # the same epsilon
    mean, logvar = tiny_model.encode(x)
    z = tiny_model.reparameterize(mean, logvar)
    logpx_z = -tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(logits=tiny_model.decode(z), labels=x), [1, 2, 3])
    expected = -tf.reduce_mean(logpx_z + vae_utils.log_normal_pdf(z, 0.0, 0.0)
                               - vae_utils.log_normal_pdf(z, mean, logvar))
    np.testing.assert_allclose(loss, float(expected), rtol=1e-6)
    # The Evaluation section's per-example ELBO is the same estimator, epsilon for epsilon.
    tf.random.set_seed(7)
    np.testing.assert_allclose(loss, -float(tf.reduce_mean(vae_utils.elbo_per_example(tiny_model, x))), rtol=1e-6)
    # The analytic-KL ELBO estimates the same quantity with less variance.
    analytic = -float(tf.reduce_mean(vae_utils.elbo_per_example(tiny_model, x, analytic_kl=True)))
    assert abs(analytic - loss) < 0.05 * abs(loss)


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


def test_mmd_loss_is_reconstruction_plus_weighted_mmd(tiny_model, mnist_like):
    x = tf.constant(mnist_like[0][:16])
    losses = {}
    for weight in (0.0, 10.0, 20.0):
        tf.random.set_seed(3)  # the same codes and prior samples for every weight
        losses[weight] = float(vae_utils.MMDLoss(weight)(tiny_model, x))
    tf.random.set_seed(3)
    assert losses[10.0] == pytest.approx(float(vae_utils.compute_mmd_loss(tiny_model, x, 10.0)), rel=1e-6)
    # Linear in the weight, and the weight-0 loss is the Bernoulli reconstruction term alone.
    assert losses[20.0] - losses[10.0] == pytest.approx(losses[10.0] - losses[0.0], rel=1e-4)
    assert losses[20.0] > losses[10.0] > losses[0.0]
    tf.random.set_seed(3)
    mean, logvar = tiny_model.encode(x)
    logits = tiny_model.decode(tiny_model.reparameterize(mean, logvar))
    reconstruction = -tf.reduce_mean(vae_utils.bernoulli_log_prob(x, logits))
    assert losses[0.0] == pytest.approx(float(reconstruction), rel=1e-6)


def test_mmd_loss_description_is_stable_and_the_weight_checked():
    assert vae_utils.MMDLoss(1000.0).description == "compute_mmd_loss(mmd_weight=1000)"
    assert vae_utils.MMDLoss(2.5).description == vae_utils.MMDLoss(2.5).description == "compute_mmd_loss(mmd_weight=2.5)"
    assert vae_utils.describe_loss(vae_utils.MMDLoss(10)) == vae_utils.describe_loss(vae_utils.MMDLoss(10.0))
    assert vae_utils.describe_loss(vae_utils.MMDLoss(10)) != vae_utils.describe_loss(vae_utils.MMDLoss(20))
    assert vae_utils.MMDLoss().mmd_weight == 1000.0
    for bad in (-1.0, float("nan"), float("inf"), "10", True):
        with pytest.raises(ValueError, match="mmd_weight="):
            vae_utils.MMDLoss(bad)


@pytest.mark.parametrize("loss_fn", [vae_utils.compute_loss, vae_utils.MMDLoss(100.0)], ids=["elbo", "mmd"])
@pytest.mark.parametrize("img_size, channels", [(28, 1), (32, 3)], ids=["mnist", "cifar"])
def test_gradients_reach_every_variable_and_are_finite(seeded, loss_fn, img_size, channels):
    model = vae_utils.CVAE(vae_utils.VAEConfig(img_size=img_size, channels=channels, latent_dim=3, **TINY))
    images, _ = synthetic_images(8, img_size, channels)
    assert_gradients_reach_every_variable(model, loss_fn, tf.constant(images))

