"""Image loaders on tiny files written in the official binary formats, and the digits split."""

import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch

from asap.data import DEFAULT_DATA_ENV, load_dataset


# ------------------------------------------------------------------------------------------------
# CIFAR-100 binary
# ------------------------------------------------------------------------------------------------


def _cifar_records(num, *, seed=0):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 20, num)
    fine = rng.integers(0, 100, num)
    pixels = rng.integers(0, 256, (num, 3072))
    blob = b"".join(bytes([coarse[i], fine[i]]) + bytes(pixels[i].tolist()) for i in range(num))
    return blob, fine, pixels


def test_cifar100_binary_layout(tmp_path):
    blob, fine, pixels = _cifar_records(5)
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    (folder / "train.bin").write_bytes(blob)
    names = [f"name{i}" for i in range(100)]
    (folder / "fine_label_names.txt").write_text("\n".join(names) + "\n")
    data = load_dataset("cifar100", split="train", data_dir=tmp_path)
    assert data.images.shape == (5, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == fine.tolist()
    assert data.classes == tuple(names)
    # Record layout from the CIFAR page: byte 2 + channel * 1024 + row * 32 + column.
    for i, c, y, x in [(0, 0, 0, 0), (1, 1, 5, 7), (4, 2, 31, 31), (3, 2, 0, 31)]:
        assert int(data.images[i, c, y, x]) == blob[i * 3074 + 2 + c * 1024 + y * 32 + x]


def test_cifar100_default_class_names(tmp_path):
    blob, _, _ = _cifar_records(2)
    (tmp_path / "cifar-100-binary").mkdir()
    (tmp_path / "cifar-100-binary" / "test.bin").write_bytes(blob)
    data = load_dataset("cifar100", split="test", data_dir=tmp_path)
    assert len(data.classes) == 100


def test_cifar100_truncated(tmp_path):
    blob, _, _ = _cifar_records(3)
    (tmp_path / "cifar-100-binary").mkdir()
    (tmp_path / "cifar-100-binary" / "test.bin").write_bytes(blob[:-10])
    with pytest.raises(ValueError, match=r"test\.bin: size .* not a positive multiple of the 3074-byte"):
        load_dataset("cifar100", split="test", data_dir=tmp_path)


def test_cifar100_label_out_of_range(tmp_path):
    blob = bytearray(_cifar_records(3)[0])
    blob[3074 + 1] = 100  # fine label of record 1
    (tmp_path / "cifar-100-binary").mkdir()
    (tmp_path / "cifar-100-binary" / "test.bin").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="record 1 has labels"):
        load_dataset("cifar100", split="test", data_dir=tmp_path)


def test_cifar100_missing_names_binary_version(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-100-binary.tar.gz"):
        load_dataset("cifar100", split="train", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)
# ------------------------------------------------------------------------------------------------


def _idx(array):
    """IDX bytes written from the format description: 0, 0, 0x08, ndim, big-endian sizes, data."""
    return bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape) + array.tobytes()


def _write_fashion(folder, split, images, labels, *, compress=True, image_bytes=None, label_bytes=None):
    stem = "train" if split == "train" else "t10k"
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for name, blob in (
        (f"{stem}-images-idx3-ubyte", image_bytes if image_bytes is not None else _idx(images)),
        (f"{stem}-labels-idx1-ubyte", label_bytes if label_bytes is not None else _idx(labels)),
    ):
        (folder / (name + suffix)).write_bytes(gzip.compress(blob) if compress else blob)


def _fashion_arrays(num=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (num, 28, 28), dtype=np.uint8), rng.integers(0, 10, num, dtype=np.uint8)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_round_trip(tmp_path, compress):
    images, labels = _fashion_arrays()
    _write_fashion(tmp_path / "fashion_mnist", "test", images, labels, compress=compress)
    data = load_dataset("fashion_mnist", split="test", data_dir=tmp_path)
    assert data.images.shape == (6, 1, 28, 28)
    assert np.array_equal(data.images[:, 0].numpy(), images)
    assert data.labels.tolist() == labels.tolist()
    assert data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"


def test_fashion_mnist_wrong_magic(tmp_path):
    images, labels = _fashion_arrays()
    bad = bytearray(_idx(images))
    bad[2] = 0x0D  # float data
    _write_fashion(tmp_path / "fashion_mnist", "train", images, labels, image_bytes=bytes(bad))
    expected = r"train-images-idx3-ubyte\.gz: IDX magic number 0x00000d03, expected 0x00000803"
    with pytest.raises(ValueError, match=expected):
        load_dataset("fashion_mnist", split="train", data_dir=tmp_path)


def test_fashion_mnist_truncated_payload(tmp_path):
    images, labels = _fashion_arrays()
    _write_fashion(tmp_path / "fashion_mnist", "train", images, labels, image_bytes=_idx(images)[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_dataset("fashion_mnist", split="train", data_dir=tmp_path)


def test_fashion_mnist_truncated_gzip_stream(tmp_path):
    images, labels = _fashion_arrays(num=50)
    folder = tmp_path / "fashion_mnist"
    _write_fashion(folder, "train", images, labels)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: truncated or corrupt gzip"):
        load_dataset("fashion_mnist", split="train", data_dir=tmp_path)


def test_fashion_mnist_count_mismatch(tmp_path):
    images, labels = _fashion_arrays()
    _write_fashion(tmp_path / "fashion_mnist", "test", images, labels[:5])
    with pytest.raises(ValueError, match="6 images but .* 5 labels"):
        load_dataset("fashion_mnist", split="test", data_dir=tmp_path)


def test_fashion_mnist_label_out_of_range(tmp_path):
    images, labels = _fashion_arrays()
    labels[3] = 10
    _write_fashion(tmp_path / "fashion_mnist", "test", images, labels)
    with pytest.raises(ValueError, match="label 10 outside 0..9"):
        load_dataset("fashion_mnist", split="test", data_dir=tmp_path)


def test_fashion_mnist_missing_file_named(tmp_path):
    (tmp_path / "fashion_mnist").mkdir()
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte\.gz"):
        load_dataset("fashion_mnist", split="test", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------------
# digits (scikit-learn)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    bunch = sklearn_datasets.load_digits()
    return {split: load_dataset("digits", split=split) for split in ("train", "test")}, bunch


def test_digits_needs_no_data_dir(monkeypatch, digits):
    monkeypatch.delenv(DEFAULT_DATA_ENV, raising=False)
    assert len(load_dataset("digits", split="test")) == len(digits[0]["test"])


def test_digits_split_is_deterministic_stratified_and_complete(digits):
    splits, bunch = digits
    again = load_dataset("digits", split="test")
    assert torch.equal(again.images, splits["test"].images) and torch.equal(again.labels, splits["test"].labels)
    assert len(splits["train"]) + len(splits["test"]) == len(bunch.target)
    for c in range(10):
        n_c = int((bunch.target == c).sum())
        assert int((splits["test"].labels == c).sum()) == round(0.2 * n_c)


def test_digits_pixels_are_scaled_sklearn_images(digits):
    splits, bunch = digits
    scaled = np.rint(bunch.images * 255 / 16).astype(np.uint8)

    def key(image, label):
        return hashlib.sha1(image.tobytes() + bytes([label])).hexdigest()

    expected = sorted(key(img, int(lab)) for img, lab in zip(scaled, bunch.target))
    found = sorted(
        key(data.images[i, 0].numpy(), int(data.labels[i])) for data in splits.values() for i in range(len(data))
    )
    assert found == expected  # the two splits are exactly the data set, each image once
    assert splits["train"].images.shape[1:] == (1, 8, 8) and int(splits["train"].images.max()) == 255
