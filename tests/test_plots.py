"""Evaluation and plots: metrics on known values, class encodings, and plot helpers that return (and save) Figures."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
import tensorflow as tf
from matplotlib.figure import Figure

import vae_utils
from conftest import synthetic_images


@pytest.fixture(autouse=True)
def no_show(monkeypatch):
    """A helper that calls plt.show() fails the test."""
    def show(*args, **kwargs):
        raise AssertionError("plot helpers must return the Figure, not call plt.show()")
    monkeypatch.setattr(plt, "show", show)


@pytest.fixture
def counted_decode(tiny_model, monkeypatch):
    """Count the calls of tiny_model.decode (a grid must be decoded in one batched call)."""
    calls = []
    decode = tiny_model.decode

    def counting(z, apply_sigmoid=False):
        calls.append(int(tf.shape(z)[0]))
        return decode(z, apply_sigmoid=apply_sigmoid)

    monkeypatch.setattr(tiny_model, "decode", counting)
    return calls


def test_psnr_active_units_bits_per_dim():
    images = np.zeros((2, 4, 4, 1), np.float32)
    assert vae_utils.psnr(images, images + 0.1) == pytest.approx(20.0, abs=1e-4)  # MSE 0.01 -> 20 dB
    codes = np.stack([np.linspace(-1, 1, 100), np.full(100, 3.0), 0.01 * np.linspace(-1, 1, 100)], axis=1)
    assert vae_utils.active_units(codes) == 1


def test_linear_probe_separates_separable_codes():
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 2
    codes = rng.normal(size=(200, 2)) + 5.0 * labels[:, None]
    assert vae_utils.linear_probe_accuracy(codes[:100], labels[:100], codes[100:], labels[100:]) > 0.95


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


def test_plot_helpers_return_figures_and_save(tiny_model, mnist_like, counted_decode, tmp_path):
    train, train_labels, test, test_labels = mnist_like
    names = ("top left", "top right", "bottom left", "bottom right")
    codes_by_class, class_means = vae_utils.get_allClass_encodings(tiny_model, test, test_labels)
    figures = {
        "grid": vae_utils.plot_image_grid(test[:12], ncols=5, titles=[str(i) for i in range(12)], suptitle="grid"),
        "per_class": vae_utils.plot_one_image_per_class(train, train_labels, names),
        "reconstructions": vae_utils.generate_and_display_images(tiny_model, 3, test[:6]),
        "latent_2d": vae_utils.plot_latent_space(codes_by_class, names, max_points_per_class=10),
        "history": vae_utils.plot_history({"elbo": [{"epoch": 1, "test_elbo": -540.0},
                                                    {"epoch": 2, "test_elbo": -530.0}]}),
    }
    counted_decode.clear()
    figures["walk"] = vae_utils.walk_src_to_dst(tiny_model, 0, "bottom right", class_means, names, steps=7)
    assert counted_decode == [7]  # the whole walk in one batched decode
    counted_decode.clear()
    figures["prior"] = vae_utils.plot_prior_samples(tiny_model, num_samples=12, ncols=6)
    assert counted_decode == [12]
    for name, figure in figures.items():
        assert isinstance(figure, Figure), name
        assert figure.axes, name
    assert len(figures["walk"].axes) == 7 and figures["walk"].axes[-1].get_title() == "bottom right"
    assert len(figures["reconstructions"].axes) == 12
    assert "epoch 3" in figures["reconstructions"]._suptitle.get_text()
    legend = figures["latent_2d"].axes[0].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == list(names)

    path = tmp_path / "figures" / "walk.png"
    figure = vae_utils.walk_src_to_dst(tiny_model, 1, 2, class_means, names, steps=3, path=str(path))
    assert isinstance(figure, Figure) and path.stat().st_size > 1000


def test_latent_space_with_many_dimensions_uses_pca():
    rng = np.random.default_rng(0)
    codes = {c: rng.normal(size=(30, 6)) + 3 * c for c in range(3)}
    figure = vae_utils.plot_latent_space(codes, ["a", "b", "c"])
    assert isinstance(figure, Figure) and "PC 1" in figure.axes[0].get_xlabel()


def test_colour_images_plot(seeded):
    images, labels = synthetic_images(10, img_size=32, channels=3)
    figure = vae_utils.plot_one_image_per_class(images, labels, ["a", "b", "c", "d"])
    assert isinstance(figure, Figure) and len(figure.axes) == 4
