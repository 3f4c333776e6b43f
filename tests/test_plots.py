"""Plots section: helpers return (and save) Figures without plt.show(), decode grids in one batched call, and draw the
latent space on the code's own axes (2-d) or its first two principal components."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
import tensorflow as tf
from matplotlib.figure import Figure

import vae_utils
from conftest import TINY, synthetic_images


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
    counted_decode.clear()
    figures["walk_images"] = vae_utils.walk_between_images(tiny_model, test[0], test[1], steps=5, names=("a", "b"))
    assert counted_decode == [5]
    for name, figure in figures.items():
        assert isinstance(figure, Figure), name
        assert figure.axes, name
    assert len(figures["walk"].axes) == 7 and figures["walk"].axes[-1].get_title() == "bottom right"
    assert len(figures["reconstructions"].axes) == 12
    assert "epoch 3" in figures["reconstructions"]._suptitle.get_text()
    walk_titles = [axis.get_title() for axis in figures["walk_images"].axes]
    assert len(walk_titles) == 7 and walk_titles[0] == "a (input)" and walk_titles[-1] == "b (input)"
    legend = figures["latent_2d"].axes[0].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == list(names)

    path = tmp_path / "figures" / "walk.png"
    figure = vae_utils.walk_src_to_dst(tiny_model, 1, 2, class_means, names, steps=3, path=str(path))
    assert isinstance(figure, Figure) and path.stat().st_size > 1000


def class_mean_markers(axis) -> np.ndarray:
    """Centres of the large "X" markers that plot_latent_space puts at the class means, in class order."""
    markers = [collection for collection in axis.collections if collection.get_sizes()[0] > 100]
    return np.array([collection.get_offsets()[0] for collection in markers], dtype=float)


def test_latent_space_with_two_dimensions_is_drawn_as_it_is():
    """Codes at (10, 0) and (0, 10): the class means sit at those points on axes z[0] and z[1], named."""
    rng = np.random.default_rng(0)
    codes = {0: np.array([10.0, 0.0]) + 0.01 * rng.normal(size=(20, 2)),
             1: np.array([0.0, 10.0]) + 0.01 * rng.normal(size=(20, 2))}
    axis = vae_utils.plot_latent_space(codes, ["zero", "one"]).axes[0]
    assert axis.get_xlabel() == "z[0]" and axis.get_ylabel() == "z[1]"
    np.testing.assert_allclose(class_mean_markers(axis), [codes[0].mean(axis=0), codes[1].mean(axis=0)], rtol=1e-9)
    np.testing.assert_allclose(class_mean_markers(axis), [[10.0, 0.0], [0.0, 10.0]], atol=0.02)
    # The points themselves are not projected either.
    np.testing.assert_allclose(np.sort(axis.collections[0].get_offsets(), axis=0), np.sort(codes[0], axis=0))
    annotations = {text.get_text(): text.xy for text in axis.texts}
    assert set(annotations) == {"zero", "one"}
    np.testing.assert_allclose(annotations["one"], codes[1].mean(axis=0), rtol=1e-9)


def test_latent_space_with_many_dimensions_uses_pca():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    codes = {c: rng.normal(size=(30, 6)) + 3 * c for c in range(3)}
    axis = vae_utils.plot_latent_space(codes, ["a", "b", "c"]).axes[0]
    assert axis.get_xlabel().startswith("PC 1 (") and axis.get_ylabel().startswith("PC 2 (")
    assert "of variance" in axis.get_xlabel()
    pca = PCA(n_components=2, random_state=0).fit(np.concatenate(list(codes.values())))
    expected = pca.transform(np.stack([c.mean(axis=0) for c in codes.values()]))
    np.testing.assert_allclose(class_mean_markers(axis), expected, rtol=1e-6, atol=1e-9)
    assert sorted(text.get_text() for text in axis.texts) == ["a", "b", "c"]


@pytest.mark.parametrize("codes, message", [
    ({}, "codes_by_class is empty"),
    ({0: np.zeros((3, 2)), 5: np.zeros((3, 2))}, "classes [5]"),
    ({0: np.zeros(3)}, "(n, latent_dim)"),
])
def test_latent_space_rejects(codes, message):
    with pytest.raises(ValueError) as error:
        vae_utils.plot_latent_space(codes, ["a", "b"])
    assert message in str(error.value)


def test_rows_of_several_models(tiny_model, mnist_like):
    test = mnist_like[2]
    other = vae_utils.CVAE(vae_utils.VAEConfig(latent_dim=2, **TINY))
    models = {"first": tiny_model, "second": other}
    prior = vae_utils.plot_prior_samples_by_model(models, num_samples=4)
    assert len(prior.axes) == 8 and prior.axes[0].get_ylabel() == "first" and prior.axes[4].get_ylabel() == "second"
    recons = vae_utils.plot_reconstructions_by_model(models, test[:3])
    assert len(recons.axes) == 9 and recons.axes[0].get_ylabel() == "test images"
    wider = vae_utils.CVAE(vae_utils.VAEConfig(latent_dim=3, **TINY))
    with pytest.raises(ValueError, match="latent sizes"):
        vae_utils.plot_prior_samples_by_model({"a": tiny_model, "b": wider})
    for helper in (vae_utils.plot_prior_samples_by_model, lambda m: vae_utils.plot_reconstructions_by_model(m, test)):
        with pytest.raises(ValueError, match="models is empty"):
            helper({})


def test_colour_images_plot(seeded):
    images, labels = synthetic_images(10, img_size=32, channels=3)
    figure = vae_utils.plot_one_image_per_class(images, labels, ["a", "b", "c", "d"])
    assert isinstance(figure, Figure) and len(figure.axes) == 4
