"""vae_extensions.ConditionalCVAE: the label's one-hot vector joins the encoder's features and the decoder's code; its
ELBO, its evaluation and its two plots. Tiny models, seeded, fast."""

import functools
import math

import numpy as np
import pytest
import tensorflow as tf
from matplotlib.figure import Figure

import vae_extensions as vx
import vae_runtime as vr
import vae_utils as vu
from conftest import TINY_CONFIG, assert_gradients_reach_every_variable, synthetic_images

CLASSES = 4  # synthetic_images draws 4 classes
NAMES = ["top left", "top right", "bottom left", "bottom right"]


@pytest.fixture
def model(seeded):
    return vx.ConditionalCVAE(TINY_CONFIG, num_classes=CLASSES)


@pytest.fixture
def batch():
    """(images, labels, one-hot labels) of 8 synthetic images, two of each class."""
    images, labels = synthetic_images(8)
    return images, labels, tf.one_hot(labels, CLASSES)


def image_axes(figure: Figure) -> list:
    return [axis for axis in figure.axes if axis.images]


def test_shapes_and_input_lengths(model, batch):
    images, _, one_hot = batch
    mean, logvar = model.encode(images, one_hot)
    assert mean.shape == logvar.shape == (8, TINY_CONFIG.latent_dim)
    logits = model.decode(mean, one_hot)
    assert logits.shape == images.shape and logits.dtype == tf.float32
    samples = model.sample(one_hot).numpy()
    assert samples.shape == images.shape and samples.min() >= 0.0 and samples.max() <= 1.0
    assert model.sample(one_hot, mean).shape == images.shape
    # The label joins the flattened features (7 x 7 x 8 after two strided convolutions of 4 and 8 filters) and z.
    encoder_dense = [layer for layer in model.encoder.layers if isinstance(layer, tf.keras.layers.Dense)]
    decoder_dense = [layer for layer in model.decoder.layers if isinstance(layer, tf.keras.layers.Dense)]
    assert encoder_dense[0].kernel.shape == (7 * 7 * 8 + CLASSES, 2 * TINY_CONFIG.latent_dim)
    assert decoder_dense[0].kernel.shape[0] == TINY_CONFIG.latent_dim + CLASSES


def test_build_model_makes_ten_classes_by_default():
    model = vu.build_model(TINY_CONFIG, vu.TrainConfig(precision="float32"), model_class=vx.ConditionalCVAE)
    assert model.num_classes == 10
    assert model.decoder.inputs[1].shape == (None, 10)


def test_the_label_changes_the_decoded_image_for_a_fixed_code(model):
    z = tf.constant([[0.5, -1.0]] * CLASSES)
    images = model.decode(z, tf.eye(CLASSES), apply_sigmoid=True).numpy()
    for a in range(CLASSES):
        for b in range(a):
            assert np.abs(images[a] - images[b]).max() > 1e-4, f"labels {a} and {b} decode alike"


def test_the_encoder_mean_depends_on_the_label(model, batch):
    images = np.repeat(batch[0][:1], CLASSES, axis=0)  # one image, once with every label
    mean, _ = model.encode(images, tf.eye(CLASSES))
    mean = mean.numpy()
    assert all(np.abs(mean[a] - mean[0]).max() > 1e-4 for a in range(1, CLASSES))


def test_gradients_reach_every_variable(model, batch):
    images, _, one_hot = batch
    assert_gradients_reach_every_variable(model, vx.conditional_loss, (images, one_hot))


def test_one_small_batch_can_be_overfitted(model, batch):
    images, _, one_hot = batch
    optimizer = tf.keras.optimizers.Adam(1e-2)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = vx.conditional_loss(model, (images, one_hot))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    first = float(step())
    for _ in range(200):
        last = float(step())
    assert last < first / 5, (first, last)  # from about 543 nats (784 pixels at log 2) to well under 110


def test_elbo_per_example_matches_the_closed_form_with_a_fixed_eps(model, batch, monkeypatch):
    images, _, one_hot = batch
    eps = np.array([0.7, -1.3], np.float32)  # one fixed draw, the same for every example: valid for any batch size
    monkeypatch.setattr(model, "reparameterize", lambda mean, logvar: mean + eps * tf.exp(0.5 * logvar))
    mean, logvar = (t.numpy().astype(np.float64) for t in model.encode(images, one_hot))
    z = mean + eps * np.exp(0.5 * logvar)
    logits = model.decode(tf.constant(z, tf.float32), one_hot).numpy().astype(np.float64)
    # Binary cross-entropy with logits, stably: max(l, 0) - l x + log(1 + e^-|l|), summed over every pixel.
    bce = np.sum(np.maximum(logits, 0) - logits * images + np.log1p(np.exp(-np.abs(logits))), axis=(1, 2, 3))
    log_q = np.sum(-0.5 * ((z - mean) ** 2 / np.exp(logvar) + logvar + math.log(2 * math.pi)), axis=1)
    log_p = np.sum(-0.5 * (z ** 2 + math.log(2 * math.pi)), axis=1)
    expected = -(bce + log_q - log_p)
    np.testing.assert_allclose(vx.conditional_elbo_per_example(model, images, one_hot).numpy(), expected, rtol=1e-5)
    assert float(vx.conditional_loss(model, (images, one_hot))) == pytest.approx(-expected.mean(), rel=1e-5)
    # Batches of 3, 3 and 2 give the same mean as the whole set at once.
    assert vx.evaluate_conditional_elbo(model, images, batch[1], batch_size=3) == pytest.approx(expected.mean(),
                                                                                               rel=1e-5)


def test_plot_digits_on_demand_decodes_the_same_codes_in_every_row(model, tmp_path):
    path = tmp_path / "on_demand.png"
    figure = vx.plot_digits_on_demand(model, NAMES, samples_per_class=3, seed=1, path=str(path))
    assert isinstance(figure, Figure) and path.is_file()
    axes = image_axes(figure)
    assert len(axes) == CLASSES * 3
    assert [axes[3 * row].get_ylabel() for row in range(CLASSES)] == NAMES
    # Row c shows sample(one-hot c, eps) for the same seeded eps in every row.
    eps = tf.random.stateless_normal((3, TINY_CONFIG.latent_dim), seed=(1, 0))
    for row in range(CLASSES):
        expected = model.sample(tf.one_hot([row] * 3, CLASSES), eps).numpy()[..., 0]
        shown = np.stack([axes[3 * row + column].images[0].get_array() for column in range(3)])
        np.testing.assert_allclose(shown, expected, atol=1e-6)


def test_plot_style_kept_label_changed_shows_each_input_then_every_label(model, batch):
    images, labels, _ = batch
    figure = vx.plot_style_kept_label_changed(model, images[:3], labels[:3], NAMES)
    axes = image_axes(figure)
    assert len(axes) == 3 * (CLASSES + 1)
    assert [axis.get_title() for axis in axes[:CLASSES + 1]] == ["input"] + NAMES
    for row in range(3):
        np.testing.assert_array_equal(axes[row * (CLASSES + 1)].images[0].get_array(), images[row, ..., 0])
    # The second row's cells decode the second image's mean (encoded with its own label) with labels 0, 1, 2, 3.
    mean, _ = model.encode(images[1:2], tf.one_hot(labels[1:2], CLASSES))
    expected = model.decode(tf.repeat(mean, CLASSES, axis=0), tf.eye(CLASSES), apply_sigmoid=True).numpy()[..., 0]
    shown = np.stack([axis.images[0].get_array() for axis in axes[CLASSES + 2:2 * CLASSES + 2]])
    np.testing.assert_allclose(shown, expected, atol=1e-6)


@pytest.mark.parametrize("labels", [[0, 1, CLASSES], [0, -1, 2], [0, 1], [0.0, 1.0, 2.0]],
                         ids=["out of range", "negative", "wrong count", "not integers"])
def test_bad_labels_raise_value_errors_naming_the_argument(model, batch, labels):
    images = batch[0][:3]
    with pytest.raises(ValueError, match="labels"):
        vx.plot_style_kept_label_changed(model, images, labels, NAMES)
    with pytest.raises(ValueError, match="labels"):
        vx.evaluate_conditional_elbo(model, images, labels)


def test_class_names_must_name_every_class(model, batch):
    with pytest.raises(ValueError, match="class_names"):
        vx.plot_digits_on_demand(model, NAMES[:3])
    with pytest.raises(ValueError, match="class_names"):
        vx.plot_style_kept_label_changed(model, batch[0][:2], batch[1][:2], NAMES + ["extra"])


def test_train_conditional_trains_checkpoints_and_resumes_exactly(tmp_path):
    train, train_labels = synthetic_images(128, seed=1)
    test, test_labels = synthetic_images(32, seed=2)
    data = vu.DataSplits("mnist", train, train_labels, test, test_labels)
    config = vu.TrainConfig(epochs=2, batch_size=32, precision="float32")

    def model():
        return vu.build_model(TINY_CONFIG, config, model_class=functools.partial(vx.ConditionalCVAE, num_classes=4))

    uninterrupted = model()
    expected = vx.train_conditional(uninterrupted, data, config, verbose=False)
    assert expected[1]["test_elbo"] > expected[0]["test_elbo"] and np.isfinite(expected[1]["train_loss"])
    folder = str(tmp_path / "run")
    vx.train_conditional(model(), data, vu.TrainConfig(epochs=1, batch_size=32, precision="float32"),
                         checkpoint_dir=folder, verbose=False)
    resumed = model()
    history = vx.train_conditional(resumed, data, config, checkpoint_dir=folder, verbose=False)
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in history] == [
        {k: v for k, v in row.items() if k != "seconds"} for row in expected]
    for weight, reference in zip(resumed.get_weights(), uninterrupted.get_weights(), strict=True):
        np.testing.assert_array_equal(weight, reference)
    other_labels = vu.DataSplits("mnist", train, (train_labels + 1) % 4, test, test_labels)
    with pytest.raises(vr.CheckpointMismatchError, match="data: "):
        vx.train_conditional(model(), other_labels, config, checkpoint_dir=folder, verbose=False)
