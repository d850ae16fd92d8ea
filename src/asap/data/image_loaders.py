"""Readers for the image benchmarks, in their official binary formats.

Layout under the data directory:

==================  ==========================================================================
``cifar100``        ``cifar-100-binary/{train,test}.bin`` and ``fine_label_names.txt``
                    (the official *binary* version, cifar-100-binary.tar.gz)
``fashion_mnist``   ``fashion_mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
``digits``          none: ships with scikit-learn (``sklearn.datasets.load_digits``)
==================  ==========================================================================

All return :class:`ImageData` with uint8 ``(N, C, H, W)`` images. Nothing is
ever unpickled: the Python versions of CIFAR are pickles, and unpickling a file
can execute arbitrary code, so only the plain binary version is read.
"""

from __future__ import annotations

import gzip
import math
import pathlib
import zlib

import numpy as np
import torch

from asap.data.containers import ImageData
from asap.data.paths import find_first
from asap.data.splits import stratified_split

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DIGITS_CLASSES = tuple(str(d) for d in range(10))

CIFAR100_NUM_CLASSES = 100
CIFAR100_NUM_COARSE = 20
_CIFAR_SIDE = 32
_CIFAR_RECORD = 2 + 3 * _CIFAR_SIDE * _CIFAR_SIDE  # coarse byte, fine byte, R, G, B planes

#: The digits data set has no official split: this seed and fraction define ours, once and for all.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def _read_bytes(path: pathlib.Path) -> bytes:
    """The file's content, decompressed if it ends in ``.gz`` (errors name the file)."""
    raw = path.read_bytes()
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{path}: truncated or corrupt gzip file: {err}") from err


def read_cifar100_binary(path: pathlib.Path, *, classes: tuple[str, ...]) -> ImageData:
    """Read a CIFAR-100 binary batch (``train.bin`` or ``test.bin``).

    Each record is 3,074 bytes: the coarse label (0..19), the fine label
    (0..99), then 3,072 pixels, the 32x32 red plane, green plane and blue plane,
    each row-major. The fine label is returned; the coarse one is checked and dropped.
    """
    raw = np.frombuffer(_read_bytes(path), dtype=np.uint8)
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise ValueError(
            f"{path}: size {raw.size} bytes is not a positive multiple of the {_CIFAR_RECORD}-byte "
            "CIFAR-100 record (truncated or not a CIFAR-100 binary file)"
        )
    records = raw.reshape(-1, _CIFAR_RECORD)
    coarse, fine = records[:, 0], records[:, 1]
    if coarse.max() >= CIFAR100_NUM_COARSE or fine.max() >= CIFAR100_NUM_CLASSES:
        bad = int(np.argmax((coarse >= CIFAR100_NUM_COARSE) | (fine >= CIFAR100_NUM_CLASSES)))
        raise ValueError(
            f"{path}: record {bad} has labels (coarse {coarse[bad]}, fine {fine[bad]}) outside "
            f"0..{CIFAR100_NUM_COARSE - 1} / 0..{CIFAR100_NUM_CLASSES - 1} (is this the CIFAR-10 file?)"
        )
    images = records[:, 2:].reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE)
    return ImageData(torch.from_numpy(images.copy()), torch.from_numpy(fine.astype(np.int64)), classes)


def load_cifar100(root: pathlib.Path, split: str) -> ImageData:
    """CIFAR-100 (Krizhevsky 2009): 50,000 train / 10,000 test, 32x32 RGB, 100 fine classes.

    Class names come from ``fine_label_names.txt`` when present, else ``"0"`` .. ``"99"``.
    """
    folder = root / "cifar-100-binary"
    path = find_first(
        [folder / f"{split}.bin", folder / f"{split}.bin.gz"],
        what=f"CIFAR-100 split {split!r}",
        official=f"cifar-100-binary/{split}.bin from cifar-100-binary.tar.gz (the binary version, not the pickles)",
    )
    names_file = folder / "fine_label_names.txt"
    classes = tuple(str(c) for c in range(CIFAR100_NUM_CLASSES))
    if names_file.exists():
        classes = tuple(line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip())
        if len(classes) != CIFAR100_NUM_CLASSES:
            raise ValueError(f"{names_file}: expected {CIFAR100_NUM_CLASSES} class names, found {len(classes)}")
    return read_cifar100_binary(path, classes=classes)


def read_idx_ubyte(path: pathlib.Path, *, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (the MNIST format), optionally gzipped.

    Header: two zero bytes, the type code ``0x08`` (unsigned byte), the number
    of dimensions, then each size as a big-endian uint32; the data follows.
    The magic number and the payload size are checked, so a truncated file
    raises ``ValueError`` instead of yielding a short array.
    """
    data = _read_bytes(path)
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"{path}: {len(data)} bytes, too short for an IDX header (truncated?)")
    magic = int.from_bytes(data[:4], "big")
    expected_magic = 0x0800 | ndim
    if magic != expected_magic:
        raise ValueError(
            f"{path}: IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(unsigned bytes, {ndim} dimension(s))"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(shape)  # Python ints: np.prod's int64 wraps round (2^64 -> 0) on a hostile header
    actual = len(data) - header_size
    if actual != expected:
        state = "truncated" if actual < expected else "has trailing bytes"
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but the file holds {actual}: {state}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def load_fashion_mnist(root: pathlib.Path, split: str) -> ImageData:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 train / 10,000 test, 28x28 grey, 10 classes."""
    stem = {"train": "train", "test": "t10k"}[split]
    folder = root / "fashion_mnist"
    arrays = {}
    for part, ndim in (("images-idx3", 3), ("labels-idx1", 1)):
        name = f"{stem}-{part}-ubyte"
        path = find_first(
            [folder / f"{name}.gz", folder / name],
            what=f"Fashion-MNIST {split} {part.split('-')[0]}",
            official=f"fashion_mnist/{name}.gz (github.com/zalandoresearch/fashion-mnist)",
        )
        arrays[part] = (path, read_idx_ubyte(path, ndim=ndim))
    (images_path, images), (labels_path, labels) = arrays["images-idx3"], arrays["labels-idx1"]
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_path} holds {images.shape[0]} images but {labels_path} {labels.shape[0]} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{labels_path}: label {labels.max()} outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
    return ImageData(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        FASHION_MNIST_CLASSES,
    )


def load_digits(root: pathlib.Path | None, split: str) -> ImageData:
    """The scikit-learn digits (UCI optical digits): 1,797 8x8 grey images, 10 classes.

    The pixel values 0..16 are scaled to 0..255 (``round(v * 255 / 16)``). As
    the set has no official split, a stratified one is fixed here: 20 % of each
    class (seed :data:`DIGITS_SPLIT_SEED`) is "test", the rest "train". It ships
    with scikit-learn, so ``root`` is ignored.
    """
    try:  # an optional dependency (the "cli" extra), imported on use
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as err:
        raise ModuleNotFoundError(
            "the digits data set ships with scikit-learn: pip install scikit-learn (or asap-attention[cli])"
        ) from err

    bunch = sklearn_load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    images = torch.from_numpy(pixels).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train, test = stratified_split(labels, test_fraction=DIGITS_TEST_FRACTION, seed=DIGITS_SPLIT_SEED)
    index = train if split == "train" else test
    return ImageData(images[index], labels[index], DIGITS_CLASSES)
