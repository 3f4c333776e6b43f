"""Data section: load_dataset from keras-format .npz files (and its errors), preprocessing, model-ready checks,
tf.data pipelines, and prepare_data's DataSplits."""

import numpy as np
import pytest
import tensorflow as tf

import vae_utils
from conftest import REAL_DATA_DIR, TINY_CONFIG, real_data_available


def write_npz(path, x_train, y_train, x_test, y_test, **extra):
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, **extra)
    return path


def small_mnist(n_train=20, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_train).astype(np.uint8),
            rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_test).astype(np.uint8))


def small_cifar(n_train=12, n_test=6, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, (n_train, 1)).astype(np.uint8),
            rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, (n_test, 1)).astype(np.uint8))


@pytest.fixture
def offline(monkeypatch):
    """No VAE_DATA_DIR, and tf.keras.datasets fails as it does without internet (the test never downloads)."""
    monkeypatch.delenv("VAE_DATA_DIR", raising=False)
    calls = []

    def no_internet():
        calls.append(1)
        raise OSError("URL fetch failure: no internet in this test")

    for name in vae_utils.DATASETS:
        monkeypatch.setattr(getattr(tf.keras.datasets, name), "load_data", no_internet)
    return calls


@pytest.mark.parametrize("name, make", [("mnist", small_mnist), ("cifar10", small_cifar)])
def test_load_dataset_reads_keras_format_npz(tmp_path, offline, name, make):
    arrays = make()
    write_npz(tmp_path / f"{name}.npz", *arrays)
    (x_train, y_train), (x_test, y_test) = vae_utils.load_dataset(name, data_dir=str(tmp_path))
    for loaded, written in zip((x_train, y_train, x_test, y_test), arrays):
        assert loaded.dtype == written.dtype and loaded.shape == written.shape
        np.testing.assert_array_equal(loaded, written)
    assert not offline, "tf.keras.datasets must not be called when the .npz is there"


def test_load_dataset_uses_vae_data_dir(tmp_path, offline, monkeypatch):
    write_npz(tmp_path / "mnist.npz", *small_mnist())
    monkeypatch.setenv("VAE_DATA_DIR", str(tmp_path))
    (x_train, _), _ = vae_utils.load_dataset("mnist")
    assert x_train.shape == (20, 28, 28)


def test_missing_file_offline_says_what_was_tried(tmp_path, offline):
    with pytest.raises(vae_utils.DatasetError) as error:
        vae_utils.load_dataset("mnist", data_dir=str(tmp_path))
    message = str(error.value)
    assert str(tmp_path / "mnist.npz") in message  # what was tried ...
    assert "tf.keras.datasets.mnist.load_data()" in message and "OSError" in message
    assert "VAE_DATA_DIR" in message and "data_dir" in message  # ... and how to provide the data
    assert "\n" not in message
    assert offline == [1]


def test_falls_back_to_keras_download_when_no_file(tmp_path, monkeypatch):
    monkeypatch.delenv("VAE_DATA_DIR", raising=False)
    arrays = small_mnist()
    monkeypatch.setattr(tf.keras.datasets.mnist, "load_data", lambda: ((arrays[0], arrays[1]), (arrays[2], arrays[3])))
    (x_train, _), (x_test, _) = vae_utils.load_dataset("mnist", data_dir=str(tmp_path))
    assert x_train.shape == (20, 28, 28) and x_test.shape == (10, 28, 28)


def corrupt(path):
    path.write_bytes(b"PK\x03\x04 this is not really a zip archive" * 10)


def truncated(path):
    write_npz(path, *small_mnist())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def wrong_shape(path):
    x_train, y_train, x_test, y_test = small_mnist()
    write_npz(path, np.zeros((20, 32, 32), np.uint8), y_train, x_test, y_test)


def wrong_dtype(path):
    x_train, y_train, x_test, y_test = small_mnist()
    write_npz(path, x_train.astype(np.float32), y_train, x_test, y_test)


def missing_key(path):
    x_train, y_train, x_test, _ = small_mnist()
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test)


def labels_out_of_range(path):
    x_train, y_train, x_test, y_test = small_mnist()
    write_npz(path, x_train, y_train, x_test, np.full_like(y_test, 10))


def too_few_labels(path):
    x_train, y_train, x_test, y_test = small_mnist()
    write_npz(path, x_train, y_train[:5], x_test, y_test)


def empty(path):
    x_train, y_train, x_test, y_test = small_mnist()
    write_npz(path, x_train[:0], y_train[:0], x_test, y_test)


@pytest.mark.parametrize("damage, expected", [
    (corrupt, "not a readable .npz"),
    (truncated, "not a readable .npz"),
    (wrong_shape, "x_train has shape (20, 32, 32)"),
    (wrong_dtype, "dtype float32"),
    (missing_key, "lacks the keys ['y_test']"),
    (labels_out_of_range, "y_test holds labels in [10, 10]"),
    (too_few_labels, "y_train has shape (5,)"),
    (empty, "x_train"),
])
def test_bad_npz_gives_one_clear_error(tmp_path, offline, damage, expected):
    path = tmp_path / "mnist.npz"
    damage(path)
    with pytest.raises(vae_utils.DatasetError) as error:
        vae_utils.load_dataset("mnist", data_dir=str(tmp_path))
    message = str(error.value)
    assert expected in message and str(path) in message and "\n" not in message
    assert not offline, "a broken file is reported, not silently replaced by a download"


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match=r"name='fashion'.*\['cifar10', 'mnist'\]"):
        vae_utils.load_dataset("fashion")


def test_class_names():
    assert vae_utils.dataset_spec("mnist").class_names == tuple("0123456789")
    names = vae_utils.dataset_spec("cifar10").class_names
    assert len(names) == 10 and names[0] == "airplane" and names[-1] == "truck"


@pytest.mark.skipif(not real_data_available("mnist"), reason="real MNIST not available")
def test_real_mnist_file_loads():
    (x_train, y_train), (x_test, y_test) = vae_utils.load_dataset("mnist", data_dir=REAL_DATA_DIR)
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28) and x_train.dtype == np.uint8
    assert y_train.shape == (60000,) and set(np.unique(y_test)) == set(range(10))


def test_preprocess_scales_adds_channel_and_binarizes():
    raw = np.array([[[0, 127], [128, 255]]], dtype=np.uint8)
    images = vae_utils.preprocess_images(raw)
    assert images.dtype == np.float32 and images.shape == (1, 2, 2, 1)
    np.testing.assert_allclose(images[0, :, :, 0], [[0.0, 127 / 255], [128 / 255, 1.0]])
    binary = vae_utils.preprocess_images(raw, binarize=True)
    np.testing.assert_array_equal(binary[0, :, :, 0], [[0.0, 0.0], [1.0, 1.0]])
    colour = vae_utils.preprocess_images(np.zeros((3, 32, 32, 3), np.uint8))
    assert colour.shape == (3, 32, 32, 3)


@pytest.mark.parametrize("images, error", [
    (np.zeros((2, 4, 4), np.int32), TypeError),
    (np.full((2, 4, 4), 2.0), ValueError),
    (np.full((2, 4, 4), np.nan), ValueError),
    (np.zeros((0, 4, 4), np.uint8), ValueError),
    (np.zeros((4, 4), np.uint8), ValueError),
])
def test_preprocess_rejects_bad_images(images, error):
    with pytest.raises(error):
        vae_utils.preprocess_images(images)


def test_make_dataset_batches_shuffles_and_drops_remainder():
    images = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    batches = [b.numpy() for b in vae_utils.make_dataset(images, 4)]
    assert [len(b) for b in batches] == [4, 4, 2]
    assert [len(b) for b in vae_utils.make_dataset(images, 4, drop_remainder=True)] == [4, 4]
    first = np.concatenate([b.numpy() for b in vae_utils.make_dataset(images, 4, shuffle_seed=3)]).ravel()
    again = np.concatenate([b.numpy() for b in vae_utils.make_dataset(images, 4, shuffle_seed=3)]).ravel()
    np.testing.assert_array_equal(first, again)
    assert sorted(first) == list(range(10)) and list(first) != list(range(10))
    with pytest.raises(ValueError, match="batch_size=11"):
        vae_utils.make_dataset(images, 11)


@pytest.mark.parametrize("images, error, message", [
    (np.zeros((2, 28, 28), np.float32), ValueError, "(N, H, W, C)"),
    (np.zeros((0, 28, 28, 1), np.float32), ValueError, "non-empty"),
    (np.zeros((2, 28, 28, 1), np.uint8), TypeError, "preprocess_images"),
    (np.full((2, 28, 28, 1), np.nan, np.float32), ValueError, "NaN"),
    (np.full((2, 28, 28, 1), 2.0, np.float32), ValueError, "got values in [2, 2]"),
    (np.zeros((2, 32, 32, 3), np.float32), ValueError, "(32, 32, 3) but the model expects (28, 28, 1)"),
])
def test_check_images_names_the_problem(images, error, message):
    with pytest.raises(error) as raised:
        vae_utils.check_images(images, TINY_CONFIG, "test_images")
    assert message in str(raised.value) and "test_images" in str(raised.value)


def test_check_images_accepts_tensors_and_returns_float32():
    images = vae_utils.check_images(tf.zeros((2, 28, 28, 1), tf.float64), TINY_CONFIG)
    assert isinstance(images, np.ndarray) and images.dtype == np.float32 and images.shape == (2, 28, 28, 1)


@pytest.mark.parametrize("name, make, binary", [("mnist", small_mnist, True), ("cifar10", small_cifar, False)])
def test_prepare_data_preprocesses_as_the_homework_does(tmp_path, offline, name, make, binary):
    x_train, y_train, x_test, y_test = make()
    write_npz(tmp_path / f"{name}.npz", x_train, y_train, x_test, y_test)
    data = vae_utils.prepare_data(name, data_dir=str(tmp_path), max_train=8, max_test=4)
    assert isinstance(data, vae_utils.DataSplits) and data.name == name
    assert data.class_names == vae_utils.dataset_spec(name).class_names
    channels = 1 if name == "mnist" else 3
    side = x_train.shape[1]
    assert data.train_images.shape == (8, side, side, channels) and data.test_images.shape == (4, side, side, channels)
    assert data.train_images.dtype == data.test_images.dtype == np.float32
    assert data.train_labels.shape == (8,) and data.test_labels.shape == (4,)  # CIFAR's (N, 1) labels flattened
    np.testing.assert_array_equal(data.train_labels, np.ravel(y_train)[:8])
    expected = vae_utils.preprocess_images(x_test[:4], binarize=binary)
    np.testing.assert_array_equal(data.test_images, expected)
    assert np.isin(data.train_images, (0.0, 1.0)).all() == binary  # MNIST binarized at 0.5, CIFAR-10 only scaled
