"""Image classification from a folder of class subfolders (``imagefolder:PATH``).

Two layouts::

    PATH/train/<class>/*.png              PATH/<class>/*.png
    PATH/test/<class>/*.png               (one level: a stratified split, see below)
    PATH/validation/<class>/... (optional)

The first is used when every subfolder of ``PATH`` is named ``train``,
``validation`` or ``test`` (and ``train`` is one of them). In the second,
``test_fraction`` of each class (default :data:`DEFAULT_IMAGE_TEST_FRACTION`)
is held out as "test" with :func:`asap.data.splits.stratified_split` and
``split_seed``: the same split on every machine.

Classes are the subfolder names, sorted (by code point), over every split;
files are read in name order. Image files are those ending in
:data:`IMAGE_SUFFIXES` (any case); other files and hidden entries (names
starting with ``.``) are ignored, and a class folder without images is refused.

Pixels are read with PIL (Pillow, a matplotlib dependency) into the container
of the built-in image sets: :class:`ImageData`, ``(N, C, H, W)`` uint8. Every
image is converted to one mode, ``DataOptions.image_mode``: ``"L"`` (C = 1),
``"RGB"`` (C = 3, alpha dropped), or ``"auto"`` (grey when every image of every
split is grey, else RGB), so train and test always get the same channels.
16-bit and float images (PIL modes ``I*``, ``F``) are refused rather than
clipped. All images must share one size, unless ``image_size`` asks for a
bilinear resize to ``image_size x image_size``. A bad file is named.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from asap.data.containers import ImageData
from asap.data.custom import (
    DEFAULT_IMAGE_TEST_FRACTION,
    SPLITS,
    DataFileError,
    DataNotFoundError,
    DataOptions,
    check_split,
    missing_split,
)
from asap.data.splits import stratified_split
from asap.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: PIL modes read as grey by ``image_mode="auto"``.
GREY_MODES = ("1", "L", "LA")

#: An image to read: its name for messages, and a function opening it (lazily) as a PIL image.
ImageSource = tuple[str, Callable[[], Any]]


def pil_image_module():
    """PIL's ``Image`` module, or a clear error when Pillow is missing."""
    try:
        from PIL import Image
    except ImportError as err:  # Pillow comes with matplotlib (the "cli" extra)
        raise ModuleNotFoundError("reading images needs Pillow: pip install pillow (or asap-attention[cli])") from err
    return Image


def _open(source: ImageSource):
    name, opener = source
    try:
        return opener()
    except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise DataFileError(f"{name}: not a readable image: {err}") from err


def image_layout(sources: Sequence[ImageSource], options: DataOptions) -> tuple[str, tuple[int, int]]:
    """The mode (``"L"``/``"RGB"``) and size ``(width, height)`` every image will get.

    Reads only the headers. Pass the images of *every* split, so that all
    splits get the same channels and a size mismatch between them is caught.
    """
    grey = True
    first: tuple[str, tuple[int, int]] | None = None
    for source in sources:
        with _open(source) as image:
            mode, size = image.mode, image.size
        if mode.startswith(("I", "F")):
            raise DataFileError(f"{source[0]}: 16-bit or float image (PIL mode {mode}); convert it to 8 bits")
        grey = grey and mode in GREY_MODES
        if first is None:
            first = (source[0], size)
        elif options.image_size is None and size != first[1]:
            (w, h), (w0, h0) = size, first[1]
            raise DataFileError(
                f"{source[0]}: image is {w}x{h} (width x height) but {first[0]} is {w0}x{h0}; all images "
                "must share one size (or set image_size to resize them)"
            )
    if first is None:
        raise DataFileError("no images to read")
    mode = options.image_mode if options.image_mode != "auto" else ("L" if grey else "RGB")
    size = first[1] if options.image_size is None else (options.image_size, options.image_size)
    return mode, size


def read_images(sources: Sequence[ImageSource], *, mode: str, size: tuple[int, int]) -> torch.Tensor:
    """``(N, C, H, W)`` uint8 pixels of ``sources``, converted to ``mode`` and, where needed, resized to ``size``."""
    Image = pil_image_module()
    width, height = size
    channels = 1 if mode == "L" else 3
    pixels = np.empty((len(sources), height, width, channels), dtype=np.uint8)
    for i, source in enumerate(sources):
        with _open(source) as image:
            try:
                converted = image.convert(mode) if image.mode != mode else image
                if converted.size != size:
                    converted = converted.resize(size, Image.Resampling.BILINEAR)
                array = np.asarray(converted, dtype=np.uint8)
            except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt pixel data
                raise DataFileError(f"{source[0]}: not a readable image: {err}") from err
        pixels[i] = array.reshape(height, width, channels)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------ folders


def _visible_dirs(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def class_files(folder: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    """``{class name: image files}`` of a folder of class subfolders, names sorted."""
    classes = {}
    for class_dir in _visible_dirs(folder):
        files = sorted(
            (p for p in class_dir.iterdir()
             if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda p: p.name,
        )  # fmt: skip
        if not files:
            raise DataFileError(f"{class_dir}: class folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        classes[class_dir.name] = files
    if not classes:
        raise DataFileError(f"{folder}: no class subfolders (expected {folder}/<class>/*.png)")
    return classes


def _file_source(path: pathlib.Path) -> ImageSource:
    Image = pil_image_module()
    return str(path), lambda: Image.open(path)


def load_image_folder(path: pathlib.Path, *, split: str, options: DataOptions) -> ImageData:
    """``imagefolder:PATH``: one split of a folder of class subfolders (see the module docstring)."""
    source = f"imagefolder:{path}"
    check_split(split, source)
    if not path.is_dir():
        raise DataNotFoundError(f"{source}: no such folder")
    subdirs = {p.name for p in _visible_dirs(path)}
    if "train" in subdirs and subdirs <= set(SPLITS):
        if options.test_fraction is not None:
            raise ConfigError(f"{source}: test_fraction is for one level of class folders; this one has split folders")
        splits = {name: class_files(path / name) for name in SPLITS if name in subdirs}
        if split not in splits:
            raise missing_split(split, source, list(splits))
        classes = tuple(sorted({name for per_class in splits.values() for name in per_class}))
        every = [file for per_class in splits.values() for files in per_class.values() for file in files]
        chosen = [(file, classes.index(name)) for name, files in splits[split].items() for file in files]
    else:
        per_class = class_files(path)
        classes = tuple(per_class)
        every = [file for files in per_class.values() for file in files]
        labels = torch.tensor([c for c, files in enumerate(per_class.values()) for _ in files], dtype=torch.int64)
        if split == "validation":
            raise missing_split(split, source, ["train", "test"])
        fraction = DEFAULT_IMAGE_TEST_FRACTION if options.test_fraction is None else options.test_fraction
        train, test = stratified_split(labels, test_fraction=fraction, seed=options.split_seed)
        index = (train if split == "train" else test).tolist()
        chosen = [(every[i], int(labels[i])) for i in index]
        if not chosen:
            raise DataFileError(f"{source}: test_fraction={fraction} leaves no {split!r} images")
    mode, size = image_layout([_file_source(file) for file in every], options)
    images = read_images([_file_source(file) for file, _ in chosen], mode=mode, size=size)
    return ImageData(images, torch.tensor([label for _, label in chosen], dtype=torch.int64), classes)
