"""Evaluation section: the ELBO and IWAE bounds (against a model whose likelihood is known exactly), bits/dim,
map_batches' compiled-function cache (one trace per model), model_metrics and its argument checks, the linear probes,
label checks, class encodings, and train_and_score."""

import math

import numpy as np
import pytest
import tensorflow as tf

import vae_utils
from conftest import TINY, TINY_CONFIG, tiny_images


# ---------------------------------------------------------------------------------------------------------------------
# A model whose likelihood is known: the decoder ignores z and the encoder returns the prior
# ---------------------------------------------------------------------------------------------------------------------

def known_likelihood_model(img_size: int = 28, channels: int = 1, logits=(0.7,)) -> vae_utils.CVAE:
    """A CVAE with p(x|z) = p(x), independent Bernoulli pixels with logit `logits[c]` in channel c, and q(z|x) = p(z).

    The decoder's last layer has a zero kernel and the logits as its bias; the encoder's last layer is all zeros, so
    q(z|x) = N(0, I). Every importance weight p(x|z) p(z) / q(z|x) is then p(x): the ELBO and the IWAE bound with any
    number of samples equal log p(x).
    """
    model = vae_utils.build_model(vae_utils.VAEConfig(img_size=img_size, channels=channels, latent_dim=3, **TINY),
                                  vae_utils.TrainConfig(precision="float32"))
    encoder_head, decoder_head = model.encoder.layers[-1], model.decoder.layers[-1]
    encoder_head.set_weights([np.zeros_like(w) for w in encoder_head.get_weights()])
    kernel, _ = decoder_head.get_weights()
    decoder_head.set_weights([np.zeros_like(kernel), np.asarray(logits, np.float32)])
    return model


def exact_log_likelihood(images: np.ndarray, logits) -> np.ndarray:
    """log p(x) per image under independent Bernoulli pixels with logit `logits[c]` in channel c, in float64."""
    logits = np.asarray(logits, np.float64)
    log_p1, log_p0 = -np.logaddexp(0.0, -logits), -np.logaddexp(0.0, logits)  # log sigmoid(l), log sigmoid(-l)
    return (images * log_p1 + (1.0 - images) * log_p0).sum(axis=(1, 2, 3))


def binary_images(count: int, img_size: int = 28, channels: int = 1, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((count, img_size, img_size, channels)) < 0.3).astype(np.float32)


@pytest.mark.parametrize("img_size, channels, logits", [(28, 1, (0.7,)), (32, 3, (-1.5, 0.2, 2.0))])
@pytest.mark.parametrize("num_samples", [1, 7, 64])
def test_iwae_equals_the_exact_log_likelihood_when_it_is_known(img_size, channels, logits, num_samples):
    model = known_likelihood_model(img_size, channels, logits)
    images = binary_images(12, img_size, channels)
    exact = exact_log_likelihood(images, logits)
    tf.random.set_seed(0)
    np.testing.assert_allclose(vae_utils.iwae_log_likelihood(model, images, num_samples).numpy(), exact, rtol=1e-5)
    # The mean over images in batches (one partial), in nats, and in bits per dimension: nll / (D ln 2).
    nll = vae_utils.iwae_nll(model, images, num_samples=num_samples, batch_size=5)
    assert nll == pytest.approx(-exact.mean(), rel=1e-5)
    dims = img_size * img_size * channels
    assert vae_utils.bits_per_dim(nll, dims) == pytest.approx(-exact.mean() / (dims * math.log(2.0)), rel=1e-5)
    # q = prior: the KL is 0 by Monte Carlo and in closed form, so the ELBO is exact too.
    for analytic_kl in (False, True):
        elbo = vae_utils.elbo_per_example(model, images, analytic_kl=analytic_kl).numpy()
        np.testing.assert_allclose(elbo, exact, rtol=1e-5)


def test_bits_per_dim_of_a_fair_coin_per_pixel_is_one():
    model = known_likelihood_model(logits=(0.0,))  # p(x) = 2^-784 for every binary image
    nll = vae_utils.iwae_nll(model, binary_images(4), num_samples=3)
    assert nll == pytest.approx(784 * math.log(2.0), rel=1e-6)
    assert vae_utils.bits_per_dim(nll, 784) == pytest.approx(1.0, rel=1e-6)


# Every code of the known model is 0: the PCA of the probe divides 0 variance by 0.
ZERO_CODES = pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")


@ZERO_CODES
def test_model_metrics_of_the_known_model(splits):
    logits = (-0.4,)
    model = known_likelihood_model(logits=logits)
    metrics = vae_utils.model_metrics(model, splits, iwae_samples=4, iwae_images=20, batch_size=16)
    subset_nll = -exact_log_likelihood(splits.test_images[:20], logits).mean()
    all_nll = -exact_log_likelihood(splits.test_images, logits).mean()
    assert metrics["iwae_images"] == 20
    assert metrics["iwae_nll_nats"] == pytest.approx(subset_nll, rel=1e-5)
    assert metrics["elbo_on_iwae_images"] == pytest.approx(-subset_nll, rel=1e-5)
    assert metrics["test_elbo"] == pytest.approx(-all_nll, rel=1e-5)
    assert metrics["test_elbo_analytic_kl"] == pytest.approx(-all_nll, rel=1e-5)
    assert metrics["bits_per_dim"] == pytest.approx(subset_nll / (784 * math.log(2.0)), rel=1e-5)
    # Every code is 0 and every reconstruction sigmoid(logit): no active unit, a known PSNR.
    assert metrics["active_units"] == 0
    expected_psnr = vae_utils.psnr(splits.test_images, np.full_like(splits.test_images, 1 / (1 + math.exp(0.4))))
    assert metrics["psnr_db"] == pytest.approx(expected_psnr, rel=1e-5)
    assert 0.0 <= metrics["probe_accuracy"] <= 1.0 and "majority_class_accuracy" in metrics


@ZERO_CODES
def test_model_metrics_has_no_bits_per_dim_for_bernoulli_on_continuous_pixels(splits):
    model = known_likelihood_model()
    grey = vae_utils.DataSplits("mnist", splits.train_images * 0.5, splits.train_labels, splits.test_images * 0.5,
                                splits.test_labels)
    metrics = vae_utils.model_metrics(model, grey, iwae_samples=2, iwae_images=8, batch_size=64)
    assert metrics["bits_per_dim"] is None and math.isfinite(metrics["iwae_nll_nats"])


@pytest.mark.parametrize("argument", ["iwae_samples", "iwae_images", "batch_size"])
@pytest.mark.parametrize("value", [0, -3, True, 2.0, "8", None])
def test_model_metrics_rejects_bad_counts_before_any_evaluation(tiny_model, splits, argument, value):
    with pytest.raises(ValueError) as error:
        vae_utils.model_metrics(tiny_model, splits, **{argument: value})
    assert f"{argument}={value!r}" in str(error.value)
    assert "_compiled_evaluations" not in tiny_model.__dict__  # nothing was evaluated


def test_model_metrics_rejects_other_data(tiny_model, mnist_like):
    with pytest.raises(TypeError, match="data must be a DataSplits"):
        vae_utils.model_metrics(tiny_model, mnist_like)
    colour = vae_utils.DataSplits("cifar10", *[a if a.ndim == 1 else np.zeros((4, 32, 32, 3), np.float32)
                                               for a in (np.zeros((4, 1)), np.arange(4), np.zeros((4, 1)), np.arange(4))])
    with pytest.raises(ValueError, match=r"data.test_images have shape \(32, 32, 3\)"):
        vae_utils.model_metrics(tiny_model, colour)


# ---------------------------------------------------------------------------------------------------------------------
# The evaluation cache: one compiled function per (model, function, options), traced once
# ---------------------------------------------------------------------------------------------------------------------

def tracing_counts(model) -> list[int]:
    return [function.experimental_get_tracing_count()
            for function in model.__dict__["_compiled_evaluations"].values()]


def test_each_evaluation_traces_once_per_model(tiny_model, splits):
    images = splits.test_images
    elbos = [vae_utils.evaluate_elbo(tiny_model, images[:count], batch_size=16) for count in (40, 25, 7)]
    assert all(math.isfinite(elbo) for elbo in elbos)
    assert tracing_counts(tiny_model) == [1]  # batches of 16 and 8, 16 and 9, and 7: one trace
    for count in (33, 10):
        vae_utils.encode_means(tiny_model, images[:count], batch_size=16)
        vae_utils.reconstruct(tiny_model, images[:count], batch_size=16)
        vae_utils.evaluate_elbo(tiny_model, images[:count], batch_size=16, analytic_kl=True)
    assert tracing_counts(tiny_model) == [1, 1, 1, 1]  # options are part of the key: analytic_kl=True is its own
    # model_metrics, twice on different numbers of images, adds only the IWAE bound, traced once.
    for iwae_images in (20, 13):
        vae_utils.model_metrics(tiny_model, splits, iwae_samples=3, iwae_images=iwae_images, batch_size=16)
    assert tracing_counts(tiny_model) == [1, 1, 1, 1, 1]
    # Another model has a cache of its own.
    other = vae_utils.CVAE(TINY_CONFIG)
    vae_utils.evaluate_elbo(other, images[:5])
    assert tracing_counts(other) == [1] and len(tracing_counts(tiny_model)) == 5


def test_map_batches_equals_the_function_on_the_whole_array(tiny_model, splits):
    images = splits.test_images[:23]
    means = vae_utils.map_batches(tiny_model, lambda model, x: model.encode(x)[0], images, batch_size=5)
    np.testing.assert_allclose(means, tiny_model.encode(images)[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vae_utils.encode_means(tiny_model, images, batch_size=4), means, rtol=1e-5, atol=1e-6)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size="):
            vae_utils.map_batches(tiny_model, vae_utils.elbo_per_example, images, batch_size=bad)
    with pytest.raises(ValueError, match=r"\(8, 8, 1\)"):
        vae_utils.evaluate_elbo(tiny_model, tiny_images(3))


# ---------------------------------------------------------------------------------------------------------------------
# KL, reconstruction term, ELBO and IWAE bounds
# ---------------------------------------------------------------------------------------------------------------------

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


def test_reconstruction_sums_over_height_width_and_channels(seeded):
    model = vae_utils.CVAE(vae_utils.VAEConfig(img_size=32, channels=3, latent_dim=2, **TINY))
    x = tf.constant(np.random.default_rng(0).random((2, 32, 32, 3)), tf.float32)
    logits = tf.constant(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), tf.float32)
    expected = -np.sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=x, logits=logits).numpy(), axis=(1, 2, 3))
    np.testing.assert_allclose(vae_utils.reconstruction_log_prob(model, x, logits).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(vae_utils.bernoulli_log_prob(x, logits).numpy(), expected, rtol=1e-5)


def test_elbo_kl_weight_scales_the_kl_term(tiny_model, mnist_like):
    x = tf.constant(mnist_like[2][:8])
    elbos = {}
    for weight in (0.0, 1.0, 2.0):
        tf.random.set_seed(4)
        elbos[weight] = vae_utils.elbo_per_example(tiny_model, x, kl_weight=weight).numpy()
    np.testing.assert_allclose(elbos[2.0] - elbos[1.0], elbos[1.0] - elbos[0.0], rtol=1e-3, atol=1e-3)


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
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="num_samples="):
            vae_utils.iwae_nll(tiny_model, mnist_like[2][:4], num_samples=bad)


# ---------------------------------------------------------------------------------------------------------------------
# Reconstruction quality, codes, probes and labels
# ---------------------------------------------------------------------------------------------------------------------

def test_psnr_and_active_units():
    images = np.zeros((2, 4, 4, 1), np.float32)
    assert vae_utils.psnr(images, images + 0.1) == pytest.approx(20.0, abs=1e-4)  # MSE 0.01 -> 20 dB
    with pytest.raises(ValueError):
        vae_utils.psnr(images, images[:1])
    codes = np.stack([np.linspace(-1, 1, 100), np.full(100, 3.0), 0.01 * np.linspace(-1, 1, 100)], axis=1)
    assert vae_utils.active_units(codes) == 1


def test_linear_probe_and_class_separability():
    rng = np.random.default_rng(0)
    labels = np.arange(300) % 3
    codes = np.concatenate([rng.normal(size=(300, 2)) + 5.0 * np.eye(3)[labels][:, :2], rng.normal(size=(300, 4))],
                           axis=1)  # classes apart in the first two dimensions, noise in four more
    assert vae_utils.linear_probe_accuracy(codes[:150], labels[:150], codes[150:], labels[150:]) > 0.9
    with pytest.raises(ValueError, match=r"train_labels.*\(10,\)"):
        vae_utils.linear_probe_accuracy(codes[:150], labels[:10], codes[150:], labels[150:])
    separability = vae_utils.class_separability(codes[:150], labels[:150], codes[150:], labels[150:])
    assert set(separability) == {"probe_accuracy", "probe_accuracy_pca2", "majority_class_accuracy"}
    assert separability["probe_accuracy"] > 0.9 and separability["probe_accuracy_pca2"] > 0.6
    assert separability["majority_class_accuracy"] == pytest.approx(1 / 3, abs=0.02)


@pytest.mark.parametrize("labels, message", [
    (np.array([0, 1, 2]), "expected one label per image (4)"),
    (np.array([0, 1, 2, 9]), "holds values in [0, 9]"),
    (np.array([0, 1, 2, -1]), "holds values in [-1, 2]"),
    (np.array([0.0, 1.5, 2.0, 3.0]), "integer class indices"),
    (np.array(["0", "1", "2", "3"]), "integer class indices"),
])
def test_check_labels_rejects(labels, message):
    with pytest.raises(ValueError) as error:
        vae_utils.check_labels(labels, 4, 5, "test_labels")
    assert message in str(error.value) and "test_labels" in str(error.value)


def test_check_labels_flattens_column_labels_and_accepts_integral_floats():
    np.testing.assert_array_equal(vae_utils.check_labels(np.array([[3], [1]], np.uint8), 2, 10), [3, 1])
    labels = vae_utils.check_labels(np.array([3.0, 1.0]), 2, 10)
    assert labels.dtype == np.int64 and labels.tolist() == [3, 1]


def test_likelihood_is_proper():
    binary, grey = binary_images(3), np.full((3, 28, 28, 1), 0.5, np.float32)
    model = known_likelihood_model()
    assert vae_utils.likelihood_is_proper(model, binary) and not vae_utils.likelihood_is_proper(model, grey)
    for likelihood in vae_utils.LIKELIHOODS:
        extended = vae_utils.ExtendedCVAE(vae_utils.ExtendedVAEConfig(likelihood=likelihood, **TINY))
        # A Bernoulli likelihood is a distribution over binary pixels only, in either class; the discretized ones
        # over any 8-bit image.
        assert vae_utils.likelihood_is_proper(extended, binary)
        assert vae_utils.likelihood_is_proper(extended, grey) == (likelihood != "bernoulli")


def test_class_encodings_means_and_reconstructions(tiny_model, mnist_like):
    _, _, test, test_labels = mnist_like
    codes_by_class, class_means = vae_utils.get_allClass_encodings(tiny_model, test, test_labels)
    assert sorted(codes_by_class) == [0, 1, 2, 3] and class_means.shape == (4, 2)
    assert sum(len(codes) for codes in codes_by_class.values()) == len(test)
    means = vae_utils.encode_means(tiny_model, test)
    np.testing.assert_allclose(class_means[1], means[test_labels == 1].mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(means[:3], tiny_model.encode(test[:3])[0].numpy(), rtol=1e-5, atol=1e-6)
    reconstructions = vae_utils.reconstruct(tiny_model, test[:8])
    assert reconstructions.shape == (8, 28, 28, 1) and 0 <= reconstructions.min() and reconstructions.max() <= 1
    mean = tiny_model.encode(test[:8])[0]
    np.testing.assert_allclose(reconstructions, tiny_model.decode(mean, apply_sigmoid=True).numpy(), rtol=1e-5,
                               atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# One call per model: train_and_score, the results table
# ---------------------------------------------------------------------------------------------------------------------

def test_train_and_score_trains_checkpoints_and_scores(splits, tmp_path, capsys):
    config = vae_utils.TrainConfig(epochs=1, batch_size=64, eval_batch_size=32)
    model = vae_utils.build_model(TINY_CONFIG, config)
    trained = vae_utils.train_and_score("Tiny ELBO, 2-d", model, splits, config, checkpoint_root=str(tmp_path),
                                        iwae_samples=2, iwae_images=16, verbose=False)
    assert isinstance(trained, vae_utils.TrainedModel) and trained.model is model and len(trained.history) == 1
    result = trained.result
    assert result["name"] == "Tiny ELBO, 2-d" and result["dataset"] == "mnist" and result["epochs"] == 1
    assert "compute_loss" in result["loss"] and result["iwae_images"] == 16
    assert result["test_elbo"] == trained.history[-1]["test_elbo"]  # the table agrees with the training log
    assert result["bits_per_dim"] == pytest.approx(result["iwae_nll_nats"] / (784 * math.log(2.0)))
    assert (tmp_path / vae_utils.slug("Tiny ELBO, 2-d") / "history.json").is_file()
    assert capsys.readouterr().out == ""
    table = vae_utils.results_table([result, {**result, "name": "again"}])
    assert list(table.index) == ["Tiny ELBO, 2-d", "again"] and "psnr_db" in table.columns


def test_slug():
    assert vae_utils.slug("CIFAR-10: spatial, autoregressive (3 epochs)") == "cifar_10_spatial_autoregressive_3_epochs"
    assert vae_utils.slug("MMD, weight 1e3") == "mmd_weight_1e3"
