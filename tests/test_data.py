"""Data section: load_dataset from keras-format .npz files (and its errors), preprocess_images, make_dataset,
prepare_data and DataSplits."""

import io

import numpy as np
import pytest
import tensorflow as tf

import vae_utils
from conftest import REAL_DATA_DIR, real_data_available


def small_arrays(name: str, n_train: int = 20, n_test: int = 10, seed: int = 0):
    """Random uint8 images and labels shaped as tf.keras.datasets.<name>.load_data() returns them."""
    rng = np.random.default_rng(seed)
    if name == "mnist":
        image_shape, label_shape = (28, 28), ()
    else:  # CIFAR-10's labels are a column, (N, 1)
        image_shape, label_shape = (32, 32, 3), (1,)
    return (rng.integers(0, 256, (n_train, *image_shape), dtype=np.uint8),
            rng.integers(0, 10, (n_train, *label_shape)).astype(np.uint8),
            rng.integers(0, 256, (n_test, *image_shape), dtype=np.uint8),
            rng.integers(0, 10, (n_test, *label_shape)).astype(np.uint8))


def write_npz(path, x_train, y_train, x_test, y_test, compressed: bool = False):
    (np.savez_compressed if compressed else np.savez)(path, x_train=x_train, y_train=y_train, x_test=x_test,
                                                      y_test=y_test)
    return path


@pytest.fixture
def no_download(monkeypatch):
    """No VAE_DATA_DIR, and tf.keras.datasets fails the test if called: every test here reads files only."""
    monkeypatch.delenv("VAE_DATA_DIR", raising=False)

    def download():
        raise AssertionError("load_dataset must not download when it is given a folder")

    for name in vae_utils.DATASETS:
        monkeypatch.setattr(getattr(tf.keras.datasets, name), "load_data", download)


# ---------------------------------------------------------------------------------------------------------------------
# load_dataset
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_load_dataset_reads_the_keras_format_npz_in_data_dir(tmp_path, no_download, name):
    arrays = small_arrays(name)
    write_npz(tmp_path / f"{name}.npz", *arrays)
    (x_train, y_train), (x_test, y_test) = vae_utils.load_dataset(name, data_dir=str(tmp_path))
    for loaded, written in zip((x_train, y_train, x_test, y_test), arrays):
        assert loaded.dtype == written.dtype and loaded.shape == written.shape
        np.testing.assert_array_equal(loaded, written)


def test_load_dataset_reads_the_folder_named_by_vae_data_dir(tmp_path, no_download, monkeypatch):
    arrays = small_arrays("mnist", n_train=7)
    write_npz(tmp_path / "mnist.npz", *arrays, compressed=True)
    monkeypatch.setenv("VAE_DATA_DIR", str(tmp_path))
    (x_train, _), _ = vae_utils.load_dataset("mnist")
    np.testing.assert_array_equal(x_train, arrays[0])


def test_data_dir_without_the_file_raises_even_when_vae_data_dir_has_one(tmp_path, no_download, monkeypatch):
    """data_dir wins over VAE_DATA_DIR: a data_dir lacking the file is an error, not a silent read of the other."""
    other, empty = tmp_path / "other", tmp_path / "empty"
    other.mkdir()
    empty.mkdir()
    write_npz(other / "mnist.npz", *small_arrays("mnist"))
    monkeypatch.setenv("VAE_DATA_DIR", str(other))
    with pytest.raises(vae_utils.DatasetError) as error:
        vae_utils.load_dataset("mnist", data_dir=str(empty))
    message = str(error.value)
    assert str(empty / "mnist.npz") in message and "data_dir" in message and str(other) not in message


def test_vae_data_dir_without_the_file_raises_naming_the_variable(tmp_path, no_download, monkeypatch):
    monkeypatch.setenv("VAE_DATA_DIR", str(tmp_path))
    with pytest.raises(vae_utils.DatasetError, match="VAE_DATA_DIR") as error:
        vae_utils.load_dataset("cifar10")
    assert str(tmp_path / "cifar10.npz") in str(error.value)


def _npz_bytes(compressed: bool = False, **overrides) -> bytes:
    x_train, y_train, x_test, y_test = small_arrays("mnist")
    arrays = {**dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test), **overrides}
    arrays = {key: value for key, value in arrays.items() if value is not None}
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def _flip_middle_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x55]) + data[middle + 1:]


BAD_FILES = {
    "not a zip archive": lambda: b"PK\x03\x04 this is not really a zip archive" * 10,
    "empty file": lambda: b"",
    "truncated archive": lambda: _npz_bytes(compressed=True)[:len(_npz_bytes(compressed=True)) // 2],
    "flipped bit in a compressed archive": lambda: _flip_middle_byte(_npz_bytes(compressed=True)),
    "flipped bit in a stored archive (CRC)": lambda: _flip_middle_byte(_npz_bytes()),
    "missing key y_test": lambda: _npz_bytes(y_test=None),
    "object arrays (pickles)": lambda: _npz_bytes(x_train=np.array([{"a": 1}], dtype=object)),
    "CIFAR-shaped images in mnist.npz": lambda: _npz_bytes(x_train=np.zeros((20, 32, 32, 3), np.uint8)),
    "float images": lambda: _npz_bytes(x_test=np.zeros((10, 28, 28), np.float32)),
    "no training images": lambda: _npz_bytes(x_train=np.zeros((0, 28, 28), np.uint8),
                                             y_train=np.zeros(0, np.uint8)),
    "fewer labels than images": lambda: _npz_bytes(y_train=np.zeros(5, np.uint8)),
    "label 10 in a 10-class data set": lambda: _npz_bytes(y_test=np.full(10, 10, np.uint8)),
    "float labels": lambda: _npz_bytes(y_test=np.zeros(10, np.float32)),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_npz_file_is_a_dataset_error_naming_the_file(tmp_path, no_download, case):
    path = tmp_path / "mnist.npz"
    path.write_bytes(BAD_FILES[case]())
    with pytest.raises(vae_utils.DatasetError) as error:
        vae_utils.load_dataset("mnist", data_dir=str(tmp_path))
    assert str(path) in str(error.value)


def test_a_failed_download_is_a_dataset_error_saying_how_to_give_the_file(monkeypatch):
    monkeypatch.delenv("VAE_DATA_DIR", raising=False)

    def offline():  # what Keras raises without a network, and a second line the message leaves out
        raise Exception("URL fetch failure on https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz: "
                        "None -- [Errno -3] Temporary failure in name resolution\nsecond line")

    monkeypatch.setattr(tf.keras.datasets.mnist, "load_data", offline)
    with pytest.raises(vae_utils.DatasetError) as error:
        vae_utils.load_dataset("mnist")
    message = str(error.value)
    assert message.startswith("the download of mnist failed (Exception: URL fetch failure on https://storage")
    assert "second line" not in message
    assert "mnist.npz (arrays x_train, y_train, x_test, y_test)" in message
    assert "data_dir=" in message and "VAE_DATA_DIR" in message


def test_unknown_data_set_name_is_a_value_error_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"name='fashion_mnist'.*\['cifar10', 'mnist'\]"):
        vae_utils.load_dataset("fashion_mnist")


@pytest.mark.skipif(not real_data_available("mnist"), reason="real MNIST not available")
def test_real_mnist_has_the_keras_shapes():
    (x_train, y_train), (x_test, y_test) = vae_utils.load_dataset("mnist", data_dir=REAL_DATA_DIR)
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28) and x_train.dtype == np.uint8
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    assert set(np.unique(y_test)) == set(range(10))


@pytest.mark.skipif(not real_data_available("cifar10"), reason="real CIFAR-10 not available")
def test_real_cifar10_has_the_keras_shapes():
    (x_train, y_train), (x_test, y_test) = vae_utils.load_dataset("cifar10", data_dir=REAL_DATA_DIR)
    assert x_train.shape == (50000, 32, 32, 3) and x_test.shape == (10000, 32, 32, 3) and x_test.dtype == np.uint8
    assert y_train.shape == (50000, 1) and y_test.shape == (10000, 1)
    assert set(np.unique(y_test)) == set(range(10))


# ---------------------------------------------------------------------------------------------------------------------
# preprocess_images, make_dataset
# ---------------------------------------------------------------------------------------------------------------------

def test_preprocess_scales_uint8_to_float32_in_0_1_and_adds_a_channel_axis():
    raw = np.array([[[0, 127], [128, 255]]], dtype=np.uint8)
    images = vae_utils.preprocess_images(raw)
    assert images.dtype == np.float32 and images.shape == (1, 2, 2, 1)
    np.testing.assert_allclose(images[0, :, :, 0], [[0.0, 127 / 255], [128 / 255, 1.0]], rtol=1e-6)
    colour = vae_utils.preprocess_images(np.full((3, 32, 32, 3), 51, np.uint8))
    assert colour.shape == (3, 32, 32, 3) and colour.dtype == np.float32
    np.testing.assert_allclose(colour, 0.2, rtol=1e-6)


def test_preprocess_binarizes_at_one_half():
    raw = np.array([[[0, 127], [128, 255]]], dtype=np.uint8)  # 127/255 < 0.5 < 128/255
    binary = vae_utils.preprocess_images(raw, binarize=True)
    assert binary.dtype == np.float32
    np.testing.assert_array_equal(binary[0, :, :, 0], [[0.0, 0.0], [1.0, 1.0]])


@pytest.mark.parametrize("images", [np.zeros((2, 28, 28), np.float32), np.zeros((2, 28, 28, 1), np.float64),
                                    np.zeros((2, 28, 28), np.int64)], ids=["float32", "float64", "int64"])
def test_preprocess_refuses_images_that_are_not_uint8(images):
    """Preprocessing twice (floats in [0, 1] divided by 255 again) would silently give near-black images."""
    with pytest.raises(ValueError, match=r"uint8.*" + str(images.dtype)):
        vae_utils.preprocess_images(images)


def test_preprocess_refuses_a_single_image_without_batch_axis():
    with pytest.raises(ValueError, match=r"\(28, 28\)"):
        vae_utils.preprocess_images(np.zeros((28, 28), np.uint8))


def test_make_dataset_batches_in_order_keeping_or_dropping_the_remainder():
    images = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    batches = [batch.numpy().ravel().tolist() for batch in vae_utils.make_dataset(images, 4)]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(batch) for batch in vae_utils.make_dataset(images, 4, drop_remainder=True)] == [4, 4]


def test_make_dataset_shuffle_is_a_permutation_fixed_by_the_seed():
    images = np.arange(32, dtype=np.float32).reshape(32, 1, 1, 1)

    def order(seed):
        return np.concatenate([b.numpy() for b in vae_utils.make_dataset(images, 8, shuffle_seed=seed)]).ravel()

    first = order(3)
    np.testing.assert_array_equal(first, order(3))
    assert sorted(first) == list(range(32)) and list(first) != list(range(32))
    assert list(order(4)) != list(first)


# ---------------------------------------------------------------------------------------------------------------------
# prepare_data, DataSplits
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, binary", [("mnist", True), ("cifar10", False)])
def test_prepare_data_preprocesses_as_the_homework_does_and_keeps_max_images(tmp_path, no_download, name, binary):
    x_train, y_train, x_test, y_test = small_arrays(name)
    write_npz(tmp_path / f"{name}.npz", x_train, y_train, x_test, y_test)
    data = vae_utils.prepare_data(name, data_dir=str(tmp_path), max_train=8, max_test=4)
    assert isinstance(data, vae_utils.DataSplits) and data.name == name
    assert data.class_names == vae_utils.DATASETS[name][1] and len(data.class_names) == 10
    side, channels = (28, 1) if name == "mnist" else (32, 3)
    assert data.train_images.shape == (8, side, side, channels) and data.test_images.shape == (4, side, side, channels)
    assert data.train_images.dtype == data.test_images.dtype == np.float32
    assert data.train_labels.shape == (8,) and data.test_labels.shape == (4,)  # CIFAR's (N, 1) labels flattened
    np.testing.assert_array_equal(data.train_labels, np.ravel(y_train)[:8])
    np.testing.assert_array_equal(data.test_images, vae_utils.preprocess_images(x_test[:4], binarize=binary))
    assert np.isin(data.train_images, (0.0, 1.0)).all() == binary  # MNIST binarized at 0.5, CIFAR-10 only scaled


def test_prepare_data_without_limits_keeps_every_image(tmp_path, no_download):
    write_npz(tmp_path / "mnist.npz", *small_arrays("mnist", n_train=13, n_test=5))
    data = vae_utils.prepare_data("mnist", data_dir=str(tmp_path))
    assert len(data.train_images) == len(data.train_labels) == 13 and len(data.test_images) == 5


@pytest.mark.parametrize("argument", ["max_train", "max_test"])
@pytest.mark.parametrize("value", [0, -5, 2.5])
def test_prepare_data_refuses_a_bad_limit_naming_it(tmp_path, no_download, argument, value):
    write_npz(tmp_path / "mnist.npz", *small_arrays("mnist"))
    with pytest.raises(ValueError, match=f"{argument}={value!r}"):
        vae_utils.prepare_data("mnist", data_dir=str(tmp_path), **{argument: value})


def test_take_train_keeps_the_first_training_images_and_the_whole_test_split(splits):
    smaller = splits.take_train(10)
    assert isinstance(smaller, vae_utils.DataSplits) and smaller.name == splits.name
    np.testing.assert_array_equal(smaller.train_images, splits.train_images[:10])
    np.testing.assert_array_equal(smaller.train_labels, splits.train_labels[:10])
    assert smaller.test_images is splits.test_images and smaller.test_labels is splits.test_labels
    assert len(splits.train_images) == 256  # the original is unchanged
