"""Losses section: the Gaussian log-density, the tutorial's compute_loss (a one-sample ELBO), the KL in closed form
and by Monte Carlo, the Gaussian kernel and MMD, the MMD loss, and gradients through both losses."""

import math

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

import vae_utils
from conftest import TINY, assert_gradients_reach_every_variable, synthetic_images


def test_log_normal_pdf_matches_scipy():
    rng = np.random.default_rng(0)
    sample, mean = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    logvar = rng.uniform(-3, 3, size=(5, 4))
    expected = stats.norm.logpdf(sample, loc=mean, scale=np.exp(0.5 * logvar)).sum(axis=1)
    got = vae_utils.log_normal_pdf(*(tf.constant(a, tf.float32) for a in (sample, mean, logvar)))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_log_normal_pdf_with_scalar_standard_normal_parameters_and_another_axis():
    sample = np.random.default_rng(1).normal(size=(3, 6))
    z = tf.constant(sample, tf.float32)
    np.testing.assert_allclose(vae_utils.log_normal_pdf(z, 0.0, 0.0).numpy(), stats.norm.logpdf(sample).sum(axis=1),
                               rtol=1e-5)
    np.testing.assert_allclose(vae_utils.log_normal_pdf(z, 0.0, 0.0, raxis=0).numpy(),
                               stats.norm.logpdf(sample).sum(axis=0), rtol=1e-5)


def test_compute_loss_is_the_negative_one_sample_elbo_computed_by_hand(tiny_model, mnist_like):
    x = mnist_like[0][:8]
    tiny_model.rng.reset_from_seed(3)
    eps = tiny_model.rng.normal((8, 2)).numpy()  # the epsilon compute_loss draws next from the model's generator
    tiny_model.rng.reset_from_seed(3)
    loss = float(vae_utils.compute_loss(tiny_model, tf.constant(x)))
    # By hand, in float64: z = mean + sigma eps; log p(x|z) Bernoulli, log p(z) and log q(z|x) Gaussian.
    mean, logvar = (t.numpy().astype(np.float64) for t in tiny_model.encode(x))
    sigma = np.exp(0.5 * logvar)
    z = mean + sigma * eps
    logits = tiny_model.decode(z.astype(np.float32)).numpy().astype(np.float64)
    log_p1, log_p0 = -np.logaddexp(0.0, -logits), -np.logaddexp(0.0, logits)
    logpx_z = np.sum(x * log_p1 + (1.0 - x) * log_p0, axis=(1, 2, 3))
    logpz = stats.norm.logpdf(z).sum(axis=1)
    logqz_x = stats.norm.logpdf(z, loc=mean, scale=sigma).sum(axis=1)
    assert loss == pytest.approx(-np.mean(logpx_z + logpz - logqz_x), rel=1e-5)


def test_compute_loss_and_elbo_per_example_are_the_same_estimator(tiny_model, mnist_like):
    x = tf.constant(mnist_like[0][:16])
    tiny_model.rng.reset_from_seed(7)
    loss = float(vae_utils.compute_loss(tiny_model, x))
    tiny_model.rng.reset_from_seed(7)  # the same epsilon
    assert loss == pytest.approx(-float(tf.reduce_mean(vae_utils.elbo_per_example(tiny_model, x))), rel=1e-6)


def test_kl_to_standard_normal_closed_form_values():
    kl = vae_utils.kl_divergence_to_standard_normal
    np.testing.assert_allclose(kl(tf.zeros((3, 4)), tf.zeros((3, 4))).numpy(), 0.0, atol=1e-7)
    np.testing.assert_allclose(kl(tf.ones((3, 4)), tf.zeros((3, 4))).numpy(), 2.0, rtol=1e-6)  # 0.5 mean^2 each
    np.testing.assert_allclose(kl(tf.zeros((1, 2)), tf.ones((1, 2))).numpy(), [math.e - 2.0], rtol=1e-6)


def test_monte_carlo_kl_converges_to_the_closed_form():
    """E_q[log q(z) - log p(z)] from 100 000 samples is within 4 standard errors of the analytic KL."""
    mean = tf.constant([[0.5, -1.0, 2.0]])
    logvar = tf.constant([[-1.0, 0.7, 0.0]])
    eps = tf.constant(np.random.default_rng(1).standard_normal((100_000, 3)), tf.float32)
    z = mean + tf.exp(0.5 * logvar) * eps
    log_ratio = (vae_utils.log_normal_pdf(z, mean, logvar) - vae_utils.log_normal_pdf(z, 0.0, 0.0)).numpy()
    analytic = float(vae_utils.kl_divergence_to_standard_normal(mean, logvar)[0])
    standard_error = log_ratio.std() / math.sqrt(len(log_ratio))
    assert abs(log_ratio.mean() - analytic) < 4 * standard_error, (log_ratio.mean(), analytic, standard_error)


# ---------------------------------------------------------------------------------------------------------------------
# Kernel and MMD
# ---------------------------------------------------------------------------------------------------------------------

def test_kernel_is_exp_of_minus_squared_distance_over_dim():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(4, 3)), rng.normal(size=(5, 3))
    expected = np.exp(-((x[:, None, :] - y[None, :, :]) ** 2).sum(axis=2) / 3)
    got = vae_utils.compute_kernel(tf.constant(x, tf.float32), tf.constant(y, tf.float32)).numpy()
    assert got.shape == (4, 5)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Squared distance 4 in 4 dimensions: exp(-1).
    k = vae_utils.compute_kernel(tf.constant([[0.0, 0.0, 0.0, 0.0]]), tf.constant([[2.0, 0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(k.numpy(), [[math.exp(-1.0)]], rtol=1e-6)


def test_kernel_of_identical_points_is_one_and_symmetric():
    points = tf.random.stateless_normal((7, 3), seed=(1, 2))
    kernel = vae_utils.compute_kernel(points, points).numpy()
    np.testing.assert_allclose(np.diag(kernel), 1.0)
    np.testing.assert_allclose(kernel, kernel.T, rtol=1e-6)


def test_mmd_of_two_single_points_is_two_minus_twice_their_kernel():
    x, y = tf.constant([[1.0, 2.0]]), tf.constant([[0.0, 0.0]])  # squared distance 5 in 2 dimensions
    assert float(vae_utils.compute_mmd(x, y)) == pytest.approx(2.0 - 2.0 * math.exp(-2.5), rel=1e-6)


def test_mmd_is_zero_for_identical_samples_and_grows_with_a_shift():
    x = tf.random.stateless_normal((200, 4), seed=(3, 4))
    y = tf.random.stateless_normal((200, 4), seed=(5, 6))  # another sample of the same distribution
    assert abs(float(vae_utils.compute_mmd(x, x))) < 1e-6
    same_distribution = float(vae_utils.compute_mmd(x, y))
    shifted = [float(vae_utils.compute_mmd(x, x + shift)) for shift in (0.5, 1.0, 2.0)]
    assert 0.0 <= same_distribution < 0.05
    assert shifted[0] > 3 * same_distribution and shifted[0] < shifted[1] < shifted[2]


# ---------------------------------------------------------------------------------------------------------------------
# The MMD loss
# ---------------------------------------------------------------------------------------------------------------------

def test_mmd_loss_is_the_reconstruction_term_plus_the_weighted_mmd(tiny_model, mnist_like):
    x = tf.constant(mnist_like[0][:16])
    losses = {}
    for weight in (0.0, 10.0, 20.0):
        tiny_model.rng.reset_from_seed(3)  # the same codes and prior samples for every weight
        losses[weight] = float(vae_utils.compute_mmd_loss(tiny_model, x, weight))
    tiny_model.rng.reset_from_seed(3)
    assert float(vae_utils.MMDLoss(10.0)(tiny_model, x)) == pytest.approx(losses[10.0], rel=1e-6)
    assert losses[20.0] > losses[10.0] > losses[0.0]
    assert losses[20.0] - losses[10.0] == pytest.approx(losses[10.0] - losses[0.0], rel=1e-4)  # linear in the weight
    tiny_model.rng.reset_from_seed(3)
    mean, logvar = tiny_model.encode(x)
    logits = tiny_model.decode(tiny_model.reparameterize(mean, logvar))
    assert losses[0.0] == pytest.approx(-float(tf.reduce_mean(vae_utils.bernoulli_log_prob(x, logits))), rel=1e-6)


def test_mmd_loss_description_names_its_weight():
    assert vae_utils.MMDLoss().mmd_weight == 1000.0
    assert vae_utils.MMDLoss(1000.0).description == "compute_mmd_loss(mmd_weight=1000)"
    assert vae_utils.MMDLoss(10).description == vae_utils.MMDLoss(10.0).description != vae_utils.MMDLoss(20).description


@pytest.mark.parametrize("weight", [float("nan"), -1.0, float("inf"), -float("inf")], ids=["nan", "-1", "inf", "-inf"])
def test_mmd_losses_refuse_a_weight_that_is_not_finite_and_non_negative(tiny_model, weight):
    with pytest.raises(ValueError, match="mmd_weight="):
        vae_utils.MMDLoss(weight)
    with pytest.raises(ValueError, match="mmd_weight="):
        vae_utils.compute_mmd_loss(tiny_model, tf.zeros((2, 28, 28, 1)), weight)


# ---------------------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_fn", [vae_utils.compute_loss, vae_utils.MMDLoss(100.0)], ids=["elbo", "mmd"])
@pytest.mark.parametrize("img_size, channels", [(28, 1), (32, 3)], ids=["mnist", "cifar10"])
def test_gradients_reach_every_variable_and_are_finite(seeded, loss_fn, img_size, channels):
    model = vae_utils.CVAE(vae_utils.VAEConfig(img_size=img_size, channels=channels, latent_dim=3, **TINY))
    images, _ = synthetic_images(8, img_size, channels)
    assert_gradients_reach_every_variable(model, loss_fn, tf.constant(images))


def test_losses_and_gradients_stay_finite_when_the_encoder_saturates(seeded):
    """Encoder outputs of +-500 (exp(500) overflows float32): the log-variance bound keeps everything finite."""
    model = vae_utils.CVAE(vae_utils.VAEConfig(latent_dim=2, **TINY))
    head = model.encoder.layers[-1]
    kernel, _ = head.get_weights()
    head.set_weights([kernel * 50.0, np.array([300.0, -300.0, 500.0, -500.0], np.float32)])
    x = tf.ones((4, 28, 28, 1))
    for loss_fn in (vae_utils.compute_loss, vae_utils.MMDLoss(1000.0)):
        with tf.GradientTape() as tape:
            loss = loss_fn(model, x)
        gradients = tape.gradient(loss, model.trainable_variables)
        assert np.isfinite(float(loss))
        assert all(np.isfinite(tf.convert_to_tensor(g).numpy()).all() for g in gradients)
