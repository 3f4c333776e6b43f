"""Plots section: every helper returns a matplotlib Figure (never calls plt.show()) and saves a PNG when given a path;
the latent space on the code's own axes (2-d) or its first two principal components, walks between class means,
prior samples, the training history and the architecture diagrams."""

import shutil

import matplotlib.pyplot as plt
import numpy as np
import pytest
import tensorflow as tf
from matplotlib.figure import Figure

import vae_utils
from conftest import synthetic_images

NAMES = ("top left", "top right", "bottom left", "bottom right")  # the four classes of synthetic_images


@pytest.fixture(autouse=True)
def no_show(monkeypatch):
    """A helper that calls plt.show() fails the test."""
    def show(*args, **kwargs):
        raise AssertionError("plot helpers must return the Figure, not call plt.show()")
    monkeypatch.setattr(plt, "show", show)


@pytest.fixture
def class_means(tiny_model, mnist_like):
    return vae_utils.get_allClass_encodings(tiny_model, mnist_like[2], mnist_like[3])[1]


def shown_images(figure: Figure) -> list[np.ndarray]:
    """The image drawn in each axis of a grid, in order (axes without an image left out)."""
    return [np.asarray(axis.images[0].get_array()) for axis in figure.axes if axis.images]


HELPERS = {
    "plot_image_grid": lambda model, data, path: vae_utils.plot_image_grid(
        data[2][:12], ncols=5, titles=[str(i) for i in range(12)], row_labels=["a", "b", "c"], path=path),
    "plot_one_image_per_class": lambda model, data, path: vae_utils.plot_one_image_per_class(
        data[0], data[1], NAMES, path=path),
    "generate_and_display_images": lambda model, data, path: vae_utils.generate_and_display_images(
        model, 3, data[2][:6], path=path),
    "plot_latent_space": lambda model, data, path: vae_utils.plot_latent_space(
        vae_utils.get_allClass_encodings(model, data[2], data[3])[0], NAMES, max_points_per_class=10, path=path),
    "walk_src_to_dst": lambda model, data, path: vae_utils.walk_src_to_dst(
        model, 0, 3, vae_utils.get_allClass_encodings(model, data[2], data[3])[1], NAMES, steps=5, path=path),
    "plot_prior_samples": lambda model, data, path: vae_utils.plot_prior_samples(
        model, num_samples=8, ncols=4, path=path),
    "plot_history": lambda model, data, path: vae_utils.plot_history(
        {"ELBO": [{"epoch": 1, "test_elbo": -540.0}, {"epoch": 2, "test_elbo": -530.0}]}, path=path),
}


@pytest.mark.parametrize("helper", list(HELPERS))
def test_each_helper_returns_a_figure_and_saves_a_png_when_given_a_path(tiny_model, mnist_like, tmp_path, helper):
    figure = HELPERS[helper](tiny_model, mnist_like, None)
    assert isinstance(figure, Figure) and figure.axes
    assert list(tmp_path.iterdir()) == []
    path = tmp_path / "figures" / f"{helper}.png"  # the folder is made
    figure = HELPERS[helper](tiny_model, mnist_like, str(path))
    assert isinstance(figure, Figure)
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 1000


@pytest.mark.parametrize("helper", list(HELPERS))
def test_each_helper_titles_its_figure_by_default(tiny_model, mnist_like, helper):
    figure = HELPERS[helper](tiny_model, mnist_like, None)
    assert figure.get_suptitle().strip() or figure.axes[0].get_title().strip()


def test_image_grid_has_a_default_title_and_drops_it_when_asked(mnist_like):
    assert vae_utils.plot_image_grid(mnist_like[2][:3]).get_suptitle() == "Images"
    assert vae_utils.plot_image_grid(mnist_like[2][:3], suptitle=None).get_suptitle() == ""


# ---------------------------------------------------------------------------------------------------------------------
# Image grids
# ---------------------------------------------------------------------------------------------------------------------

def test_image_grid_shows_each_image_titled_and_turns_off_the_spare_axes(mnist_like):
    images = mnist_like[2][:7]
    figure = vae_utils.plot_image_grid(images, ncols=3, titles=list("abcdefg"))
    assert len(figure.axes) == 9 and [axis.get_title() for axis in figure.axes[:7]] == list("abcdefg")
    assert not figure.axes[8].axison
    for shown, image in zip(shown_images(figure), images):
        np.testing.assert_array_equal(shown, image[..., 0])


def test_colour_images_are_shown_in_colour():
    images, labels = synthetic_images(8, img_size=32, channels=3)
    figure = vae_utils.plot_one_image_per_class(images, labels, NAMES)
    assert len(figure.axes) == 4 and all(shown.shape == (32, 32, 3) for shown in shown_images(figure))


def test_one_image_per_class_shows_the_first_image_of_each_class_titled(mnist_like):
    train, train_labels = mnist_like[0], mnist_like[1]
    order = np.argsort(-train_labels, kind="stable")  # class 3 first: the first of each class is not at index c
    figure = vae_utils.plot_one_image_per_class(train[order], train_labels[order], NAMES)
    assert [axis.get_title() for axis in figure.axes] == list(NAMES)
    for label, shown in enumerate(shown_images(figure)):
        first = np.flatnonzero(train_labels[order] == label)[0]
        np.testing.assert_array_equal(shown, train[order][first, ..., 0])


def test_one_image_per_class_refuses_labels_without_some_class(mnist_like):
    train, train_labels = mnist_like[0], mnist_like[1]
    keep = train_labels != 2
    with pytest.raises(ValueError, match="bottom left"):
        vae_utils.plot_one_image_per_class(train[keep], train_labels[keep], NAMES)


def test_generate_and_display_images_shows_the_test_images_above_their_reconstructions(tiny_model, mnist_like):
    sample = mnist_like[2][:4]
    figure = vae_utils.generate_and_display_images(tiny_model, 3, sample)
    shown = shown_images(figure)
    assert len(figure.axes) == 8 and "epoch 3" in figure._suptitle.get_text()
    for top, image in zip(shown[:4], sample):
        np.testing.assert_array_equal(top, image[..., 0])
    assert all(0.0 <= bottom.min() and bottom.max() <= 1.0 for bottom in shown[4:])


# ---------------------------------------------------------------------------------------------------------------------
# Latent space
# ---------------------------------------------------------------------------------------------------------------------

def class_mean_markers(axis) -> np.ndarray:
    """Centres of the markers that plot_latent_space puts at the class means, in class order."""
    markers = [collection for collection in axis.collections if collection.get_gid() == "class means"]
    return np.asarray(markers[0].get_offsets(), dtype=float)


def name_boxes(figure: Figure, axis) -> list:
    """The drawn extents of the texts of `axis`, after a layout."""
    figure.draw_without_rendering()
    return [text.get_window_extent() for text in axis.texts]


def clustered_codes(spread_of_means: float, dims: int, seed: int = 0) -> dict[int, np.ndarray]:
    """Ten classes of 300 codes: N(0, 3^2 I) around means whose distances from 0 are `spread_of_means`."""
    rng = np.random.default_rng(seed)
    offsets = rng.normal(size=(10, dims))
    means = spread_of_means * offsets / np.linalg.norm(offsets, axis=1, keepdims=True)
    return {c: means[c] + 3.0 * rng.normal(size=(300, dims)) for c in range(10)}


def test_two_dimensional_codes_are_drawn_on_their_own_axes():
    rng = np.random.default_rng(0)
    codes = {0: np.array([10.0, 0.0]) + 0.01 * rng.normal(size=(20, 2)),
             1: np.array([0.0, 10.0]) + 0.01 * rng.normal(size=(20, 2))}
    axis = vae_utils.plot_latent_space(codes, ["zero", "one"]).axes[0]
    assert axis.get_xlabel() == "z[0]" and axis.get_ylabel() == "z[1]"
    np.testing.assert_allclose(class_mean_markers(axis), [codes[0].mean(axis=0), codes[1].mean(axis=0)], rtol=1e-9)
    np.testing.assert_allclose(np.sort(axis.collections[0].get_offsets(), axis=0), np.sort(codes[0], axis=0))
    # Each name once, written at its mean (offset by a few points), with no line or arrow to it.
    assert [text.get_text() for text in axis.texts] == ["zero", "one"]
    np.testing.assert_allclose([text.xy for text in axis.texts], [codes[0].mean(axis=0), codes[1].mean(axis=0)])
    assert all(text.arrow_patch is None and text.get_path_effects() for text in axis.texts)
    assert not axis.child_axes  # no zoom: the means are far apart


@pytest.mark.parametrize("spread_of_means, dims, zoomed", [(12.0, 16, False), (0.3, 64, True)],
                         ids=["MNIST-like: means far apart", "CIFAR-like: means within 0.3, spread 3"])
def test_class_names_are_written_at_their_means_without_overlapping(spread_of_means, dims, zoomed):
    codes = clustered_codes(spread_of_means, dims)
    names = [f"class {c}" for c in range(10)]
    figure = vae_utils.plot_latent_space(codes, names)
    axis = figure.axes[0]
    # Means that nearly coincide are named in a zoom on them (an inset of the plot), not over the data.
    named = axis.child_axes[0] if zoomed else axis
    assert len(axis.child_axes) == int(zoomed) and len(axis.texts) == 10 * (not zoomed)
    assert [text.get_text() for text in named.texts] == names
    means = class_mean_markers(named)
    np.testing.assert_allclose([text.xy for text in named.texts], means)
    assert all(text.arrow_patch is None for text in named.texts)  # no leader lines
    boxes = name_boxes(figure, named)
    frame = named.get_window_extent()
    assert all(frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1) for box in boxes)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    # Each name sits next to its own mean: within a few lines of text of it.
    centres = named.transData.transform(means)
    distances = [np.hypot(*(centre - [box.x0, (box.y0 + box.y1) / 2])) for centre, box in zip(centres, boxes)]
    assert max(distances) < 5 * boxes[0].height + max(box.width for box in boxes)
    legend = axis.get_legend()
    assert [text.get_text() for text in legend.get_texts()] == names
    assert all(handle.get_alpha() == 1.0 for handle in legend.legend_handles)


def test_codes_of_more_dimensions_are_projected_on_two_principal_components():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    codes = {c: rng.normal(size=(30, 6)) + 3 * c for c in range(3)}
    axis = vae_utils.plot_latent_space(codes, ["a", "b", "c"]).axes[0]
    assert axis.get_xlabel().startswith("PC 1 (") and axis.get_ylabel().startswith("PC 2 (")
    pca = PCA(n_components=2, random_state=0).fit(np.concatenate(list(codes.values())))
    expected = pca.transform(np.stack([c.mean(axis=0) for c in codes.values()]))
    np.testing.assert_allclose(class_mean_markers(axis), expected, rtol=1e-6, atol=1e-9)


def test_at_most_max_points_per_class_are_drawn():
    codes = {0: np.random.default_rng(0).normal(size=(50, 2))}
    axis = vae_utils.plot_latent_space(codes, ["a"], max_points_per_class=7).axes[0]
    assert len(axis.collections[0].get_offsets()) == 7


@pytest.mark.parametrize("codes", [{0: np.zeros((5, 1)), 1: np.ones((5, 1))}, {0: np.zeros(5)}],
                         ids=["(n, 1)", "(n,)"])
def test_one_dimensional_codes_are_refused(codes):
    with pytest.raises(ValueError, match="D >= 2"):
        vae_utils.plot_latent_space(codes, ["a", "b"])


# ---------------------------------------------------------------------------------------------------------------------
# Walks between class means, prior samples
# ---------------------------------------------------------------------------------------------------------------------

def test_decode_line_starts_and_ends_at_the_decoded_endpoints(tiny_model):
    start, end = np.array([-1.0, 2.0], np.float32), np.array([3.0, 0.5], np.float32)
    images = vae_utils.decode_line(tiny_model, start, end, steps=6)
    assert images.shape == (6, 28, 28, 1) and images.min() >= 0.0 and images.max() <= 1.0
    endpoints = tiny_model.decode(np.stack([start, end]), apply_sigmoid=True).numpy()
    np.testing.assert_allclose(images[0], endpoints[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(images[-1], endpoints[1], rtol=1e-5, atol=1e-6)
    middle = tiny_model.decode(((start + end) / 2)[None], apply_sigmoid=True).numpy()[0]
    images = vae_utils.decode_line(tiny_model, start, end, steps=3)
    np.testing.assert_allclose(images[1], middle, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("src, dst", [("top right", "bottom left"), (1, 2)], ids=["names", "indices"])
def test_walk_between_class_means_by_name_or_index(tiny_model, class_means, src, dst):
    figure = vae_utils.walk_src_to_dst(tiny_model, src, dst, class_means, NAMES, steps=5)
    titles = [axis.get_title() for axis in figure.axes]
    assert titles == ["top right", "0.25", "0.50", "0.75", "bottom left"]
    expected = vae_utils.decode_line(tiny_model, class_means[1], class_means[2], 5)
    for shown, image in zip(shown_images(figure), expected):
        np.testing.assert_allclose(shown, image[..., 0], rtol=1e-6)


def test_walk_refuses_a_nan_class_mean(tiny_model, class_means):
    class_means = class_means.copy()
    class_means[2] = np.nan  # what the mean of a class without images is
    with pytest.raises(ValueError, match="class_means hold NaN"):
        vae_utils.walk_src_to_dst(tiny_model, 0, 1, class_means, NAMES)


def test_walk_refuses_class_means_that_do_not_match_the_class_names(tiny_model, class_means):
    with pytest.raises(ValueError, match="class_means has 3 rows for 4 class names"):
        vae_utils.walk_src_to_dst(tiny_model, 0, 1, class_means[:3], NAMES)


@pytest.mark.parametrize("arguments, message", [
    (dict(src_class=-1), r"src_class=-1 must be one of the class names \('top left', .*\) or an index in \[0, 4\)"),
    (dict(dst_class=4), r"dst_class=4 must be one of the class names"),
    (dict(dst_class=np.int64(4)), r"dst_class=np.int64\(4\) must be one of the class names"),
    (dict(src_class=1.0), r"src_class=1.0 must be one of the class names"),
    (dict(src_class="middle"), r"src_class='middle' must be one of the class names"),
    (dict(steps=1), r"steps=1 must be an integer >= 2"),
    (dict(steps=0), r"steps=0 must be an integer >= 2"),
])
def test_walk_refuses_a_class_outside_the_names_and_fewer_than_two_steps(tiny_model, class_means, arguments, message):
    with pytest.raises(ValueError, match=message):
        vae_utils.walk_src_to_dst(tiny_model, **{"src_class": 0, "dst_class": 1, **arguments},
                                  class_means=class_means, class_names=NAMES)


def test_walk_takes_numpy_class_indices(tiny_model, class_means):
    figure = vae_utils.walk_src_to_dst(tiny_model, np.int64(1), np.int32(2), class_means, NAMES, steps=np.int64(3))
    assert [axis.get_title() for axis in figure.axes] == ["top right", "0.50", "bottom left"]


def test_prior_samples_are_the_same_for_a_seed_and_differ_between_seeds(tiny_model):
    first = shown_images(vae_utils.plot_prior_samples(tiny_model, num_samples=6, ncols=3, seed=4))
    tf.random.normal((3,))  # the global random state moves on: the samples do not depend on it
    again = shown_images(vae_utils.plot_prior_samples(tiny_model, num_samples=6, ncols=3, seed=4))
    other = shown_images(vae_utils.plot_prior_samples(tiny_model, num_samples=6, ncols=3, seed=5))
    assert len(first) == 6
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(first[0], other[0])


def test_history_plots_the_test_elbo_of_each_run():
    histories = {"ELBO": [{"epoch": 1, "test_elbo": -540.0}, {"epoch": 2, "test_elbo": -530.0}],
                 "MMD": [{"epoch": 1, "test_elbo": -560.0}]}
    axis = vae_utils.plot_history(histories).axes[0]
    lines = {line.get_label(): line for line in axis.get_lines()}
    assert set(lines) == {"ELBO", "MMD"}
    np.testing.assert_array_equal(lines["ELBO"].get_xydata(), [[1, -540.0], [2, -530.0]])
    assert axis.get_title() == "Test-set ELBO after each epoch"
    assert vae_utils.plot_history(histories, title="MNIST").axes[0].get_title() == "MNIST"


# ---------------------------------------------------------------------------------------------------------------------
# Architecture diagrams
# ---------------------------------------------------------------------------------------------------------------------

def _can_draw() -> bool:
    try:
        import pydot  # noqa: F401
    except ImportError:
        return False
    return shutil.which("dot") is not None


@pytest.mark.skipif(not _can_draw(), reason="needs pydot and graphviz's `dot` (apt-get install graphviz)")
def test_draw_architecture_draws_encoder_and_decoder_side_by_side(tiny_model, tmp_path):
    path = tmp_path / "architecture.png"
    figure = vae_utils.draw_architecture(tiny_model, path=str(path))
    assert isinstance(figure, Figure) and len(figure.axes) == 2
    assert figure.axes[0].get_title().startswith("Encoder") and figure.axes[1].get_title().startswith("Decoder")
    assert path.read_bytes().startswith(b"\x89PNG")


def _raise_import_error(*args, **kwargs):
    raise ImportError("You must install pydot (`pip install pydot`) for `plot_model` to work.")


def _print_and_return_none(*args, **kwargs):  # what Keras does inside IPython: a note, no file
    print("You must install pydot (`pip install pydot`) for `plot_model` to work.")


@pytest.mark.parametrize("plot_model", [_raise_import_error, _print_and_return_none], ids=["raises", "in_ipython"])
def test_draw_architecture_prints_the_text_summaries_when_plot_model_cannot_draw(tiny_model, monkeypatch, capsys,
                                                                                 plot_model):
    monkeypatch.setattr(tf.keras.utils, "plot_model", plot_model)
    assert vae_utils.draw_architecture(tiny_model) is None
    out = capsys.readouterr().out
    assert "No diagram" in out and "graphviz" in out
    assert "encoder" in out and "decoder" in out and out.count("Total params") == 2


def test_draw_architecture_without_graphviz_on_the_path_prints_the_text_summaries(tiny_model, tmp_path, monkeypatch,
                                                                                  capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` program to run
    assert vae_utils.draw_architecture(tiny_model) is None
    assert "No diagram" in capsys.readouterr().out
