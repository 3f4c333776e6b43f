"""Evaluation section: map_batches and its compiled-function cache, evaluate_elbo (against a model whose likelihood
is known exactly), encode_means, reconstruct, psnr, get_allClass_encodings, and the checks of the images, labels and
codes that users hand in."""

import math

import numpy as np
import pytest

import vae_runtime
import vae_utils
from conftest import TINY, TINY_CONFIG


def known_likelihood_model(logit: float = 0.7, posterior=np.zeros(6)) -> vae_utils.CVAE:
    """A float32 CVAE with p(x|z) = p(x), independent Bernoulli pixels of logit `logit`, and a q(z|x) that does not
    depend on x: N(mean, exp(logvar)) with [mean, logvar] = `posterior` (by default q(z|x) = p(z) = N(0, I)).

    The decoder's last layer has a zero kernel and `logit` as its bias, so log p(x|z) does not depend on z; the
    encoder's last layer has a zero kernel and `posterior` as its bias. With the default posterior the KL is 0 (by
    Monte Carlo and in closed form) and the ELBO is log p(x) exactly.
    """
    model = vae_utils.build_model(vae_utils.VAEConfig(latent_dim=3, **TINY), vae_utils.TrainConfig(precision="float32"))
    encoder_head, decoder_head = model.encoder.layers[-1], model.decoder.layers[-1]
    kernel, _ = encoder_head.get_weights()
    encoder_head.set_weights([np.zeros_like(kernel), np.asarray(posterior, np.float32)])
    kernel, _ = decoder_head.get_weights()
    decoder_head.set_weights([np.zeros_like(kernel), np.array([logit], np.float32)])
    return model


def exact_log_likelihood(images: np.ndarray, logit: float) -> np.ndarray:
    log_p1, log_p0 = -np.logaddexp(0.0, -logit), -np.logaddexp(0.0, logit)
    return (images * log_p1 + (1.0 - images) * log_p0).sum(axis=(1, 2, 3))


def binary_images(count: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((count, 28, 28, 1)) < 0.3).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# map_batches, evaluate_elbo
# ---------------------------------------------------------------------------------------------------------------------

def test_map_batches_is_the_function_on_the_whole_array_for_any_batch_size(tiny_model, splits):
    images = splits.test_images[:23]
    whole = tiny_model.encode(images)[0].numpy()
    for batch_size in (1, 5, 23, 100):
        means = vae_runtime.map_batches(tiny_model, lambda model, x: model.encode(x)[0], images, batch_size)
        assert means.shape == (23, 2)
        np.testing.assert_allclose(means, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("analytic_kl", [False, True], ids=["monte_carlo_kl", "analytic_kl"])
def test_evaluate_elbo_is_the_exact_log_likelihood_of_the_known_model_for_any_batch_size(analytic_kl):
    model, images, logit = known_likelihood_model(0.7), binary_images(30), 0.7
    expected = exact_log_likelihood(images, logit).mean()
    for batch_size in (7, 30, 1000):
        elbo = vae_utils.evaluate_elbo(model, images, batch_size=batch_size, analytic_kl=analytic_kl)
        assert elbo == pytest.approx(expected, rel=1e-5)


def test_each_evaluation_is_traced_once_per_model(tiny_model, splits):
    images = splits.test_images
    for count in (40, 25, 7):  # batches of 16 and 8, 16 and 9, and 7
        assert math.isfinite(vae_utils.evaluate_elbo(tiny_model, images[:count], batch_size=16))
        vae_utils.evaluate_elbo(tiny_model, images[:count], batch_size=16, analytic_kl=True)
        vae_utils.encode_means(tiny_model, images[:count], batch_size=16)
    compiled = tiny_model.__dict__["_compiled_evaluations"]
    assert len(compiled) == 3  # the ELBO with each KL, and the means
    assert all(function.experimental_get_tracing_count() == 1 for function in compiled.values())
    other = vae_utils.CVAE(TINY_CONFIG)  # another model has functions of its own
    vae_utils.evaluate_elbo(other, images[:5])
    assert len(other.__dict__["_compiled_evaluations"]) == 1 and len(compiled) == 3


def test_elbo_with_analytic_kl_is_log_likelihood_minus_kl_weight_times_the_closed_form_kl():
    mean, logvar = np.array([1.0, 2.0, -1.0]), np.array([0.5, -0.5, 0.0])
    model = known_likelihood_model(-0.3, posterior=np.concatenate([mean, logvar]))
    images = binary_images(4)
    logvar = model.config.logvar_bound * np.tanh(logvar / model.config.logvar_bound)  # the soft bound, ~ logvar
    kl = 0.5 * np.sum(np.exp(logvar) + mean ** 2 - 1.0 - logvar)
    for weight in (0.0, 1.0, 2.5):
        elbo = vae_utils.elbo_per_example(model, images, analytic_kl=True, kl_weight=weight).numpy()
        np.testing.assert_allclose(elbo, exact_log_likelihood(images, -0.3) - weight * kl, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# encode_means, reconstruct, psnr
# ---------------------------------------------------------------------------------------------------------------------

def test_encode_means_are_the_encoder_means_in_batches(tiny_model, splits):
    images = splits.test_images[:11]
    means = vae_utils.encode_means(tiny_model, images, batch_size=4)
    assert means.shape == (11, 2) and means.dtype == np.float32
    np.testing.assert_allclose(means, tiny_model.encode(images)[0].numpy(), rtol=1e-5, atol=1e-6)


def test_reconstruct_decodes_the_means_into_images_in_0_1(tiny_model, splits):
    images = splits.test_images[:9]
    reconstructions = vae_utils.reconstruct(tiny_model, images, batch_size=4)
    assert reconstructions.shape == images.shape
    assert reconstructions.min() >= 0.0 and reconstructions.max() <= 1.0
    expected = tiny_model.decode(tiny_model.encode(images)[0], apply_sigmoid=True).numpy()
    np.testing.assert_allclose(reconstructions, expected, rtol=1e-5, atol=1e-6)


def test_psnr_closed_form():
    images = np.full((2, 8, 8, 1), 0.5, np.float32)
    assert vae_utils.psnr(images, images + 0.1) == pytest.approx(20.0, abs=1e-4)  # MSE 0.01: 10 log10(100)
    # The mean over images of each image's PSNR: 20 dB and 40 dB give 30 dB.
    offsets = np.array([0.1, 0.01], np.float32).reshape(2, 1, 1, 1)
    assert vae_utils.psnr(images, images + offsets) == pytest.approx(30.0, abs=1e-3)
    assert vae_utils.psnr(images, images) == pytest.approx(100.0)  # MSE floored at 1e-10


def test_psnr_refuses_raw_uint8_images_instead_of_giving_minus_45_db():
    raw = np.full((2, 8, 8, 1), 200, np.uint8)
    reconstructions = np.full((2, 8, 8, 1), 0.8, np.float32)
    with pytest.raises(ValueError, match=r"images must be a non-empty float.*preprocess_images"):
        vae_utils.psnr(raw, reconstructions)
    with pytest.raises(ValueError, match="reconstructions"):
        vae_utils.psnr(reconstructions, raw)
    with pytest.raises(ValueError, match=r"reconstructions must be finite and lie in \[0, 1\]"):
        vae_utils.psnr(reconstructions, raw.astype(np.float32))  # unscaled floats: 200 is not in [0, 1]


def test_psnr_refuses_images_of_another_shape():
    with pytest.raises(ValueError, match=r"differ in shape"):
        vae_utils.psnr(np.zeros((2, 8, 8, 1), np.float32), np.zeros((3, 8, 8, 1), np.float32))


# ---------------------------------------------------------------------------------------------------------------------
# get_allClass_encodings
# ---------------------------------------------------------------------------------------------------------------------

def test_class_encodings_group_the_means_by_class(tiny_model, mnist_like):
    _, _, test, test_labels = mnist_like
    codes_by_class, class_means = vae_utils.get_allClass_encodings(tiny_model, test, test_labels)
    codes = vae_utils.encode_means(tiny_model, test)
    assert sorted(codes_by_class) == [0, 1, 2, 3] and class_means.shape == (4, 2)
    for label in range(4):
        np.testing.assert_array_equal(codes_by_class[label], codes[test_labels == label])
        np.testing.assert_allclose(class_means[label], codes[test_labels == label].mean(axis=0), rtol=1e-6)


def test_class_encodings_take_column_labels_as_cifar_has_them(tiny_model, mnist_like):
    _, _, test, test_labels = mnist_like
    codes_by_class, class_means = vae_utils.get_allClass_encodings(tiny_model, test, test_labels[:, None])
    assert sorted(codes_by_class) == [0, 1, 2, 3] and class_means.shape == (4, 2)
    assert sum(len(codes) for codes in codes_by_class.values()) == len(test)


@pytest.mark.parametrize("labels, shown", [
    (np.zeros(5, np.int64), "(5,)"),  # one label per image is needed
    (np.full(64, -1), "int64"),
    (np.zeros(64, np.float32), "float32"),
])
def test_class_encodings_refuse_bad_labels_naming_them(tiny_model, mnist_like, labels, shown):
    with pytest.raises(ValueError, match=r"labels must be 64 integer class indices") as error:
        vae_utils.get_allClass_encodings(tiny_model, mnist_like[2], labels)
    assert shown in str(error.value)


# ---------------------------------------------------------------------------------------------------------------------
# Images that are not model-ready are refused, naming the argument
# ---------------------------------------------------------------------------------------------------------------------

BAD_IMAGES = {
    "raw uint8": (np.zeros((2, 28, 28, 1), np.uint8), "float"),
    "no channel axis": (np.zeros((2, 28, 28), np.float32), "(N, H, W, C)"),
    "empty": (np.zeros((0, 28, 28, 1), np.float32), "non-empty"),
    "unscaled 0..255 floats": (np.full((2, 28, 28, 1), 255.0, np.float32), "[0, 1]"),
    "NaN": (np.full((2, 28, 28, 1), np.nan, np.float32), "finite"),
    "CIFAR-sized for an MNIST model": (np.zeros((2, 32, 32, 3), np.float32), "expects (28, 28, 1)"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
@pytest.mark.parametrize("call, name", [
    (lambda model, x: vae_utils.evaluate_elbo(model, x), "images"),
    (lambda model, x: vae_utils.encode_means(model, x), "images"),
    (lambda model, x: vae_utils.reconstruct(model, x), "images"),
    (lambda model, x: vae_utils.get_allClass_encodings(model, x, np.zeros(len(x), np.int64)), "images"),
    (lambda model, x: vae_utils.generate_and_display_images(model, 1, x), "test_sample"),
], ids=["evaluate_elbo", "encode_means", "reconstruct", "get_allClass_encodings", "generate_and_display_images"])
def test_images_that_are_not_model_ready_are_refused_naming_the_argument(tiny_model, call, name, case):
    images, problem = BAD_IMAGES[case]
    with pytest.raises(ValueError) as error:
        call(tiny_model, images)
    message = str(error.value)
    assert message.startswith(name) and problem in message
    assert "_compiled_evaluations" not in tiny_model.__dict__  # refused before any TensorFlow work


def test_slug_is_a_file_name_safe_form():
    assert vae_utils.slug("MMD-VAE (weight 1000)") == "mmd_vae_weight_1000"
    assert vae_utils.slug("  Q1.8: Encoder ") == "q1_8_encoder"
