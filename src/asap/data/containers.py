"""In-memory splits: raw texts or images with integer labels.

These are what the loaders return, before any tokenisation or normalisation,
so that a tokenizer can be trained on exactly the training texts and image
statistics computed on exactly the training images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _check_labels(labels: torch.Tensor, num_items: int, classes: tuple[str, ...], kind: str) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
        raise TypeError(f"{kind}.labels must be a 1-D int64 tensor, got {getattr(labels, 'dtype', type(labels))}")
    if labels.shape[0] != num_items:
        raise ValueError(f"{kind} has {num_items} items but {labels.shape[0]} labels")
    if len(classes) == 0:
        raise ValueError(f"{kind}.classes is empty")
    if num_items and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
        low, high = int(labels.min()), int(labels.max())
        raise ValueError(f"{kind}.labels must lie in [0, {len(classes)}), got values in [{low}, {high}]")


def _as_index(indices: torch.Tensor | list[int], size: int) -> torch.Tensor:
    index = torch.as_tensor(indices, dtype=torch.int64)
    if index.dim() != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(index.shape)}")
    if index.numel() and (int(index.min()) < -size or int(index.max()) >= size):
        raise IndexError(f"indices out of range for {size} items")
    return index


@dataclass(frozen=True)
class TextData:
    """A split of a text-classification data set.

    Attributes:
        texts: the cleaned documents, one string each.
        labels: ``(N,)`` int64 class indices in ``[0, len(classes))``.
        classes: class names, indexed by label.
    """

    texts: list[str]
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_labels(self.labels, len(self.texts), self.classes, "TextData")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: torch.Tensor | list[int]) -> TextData:
        """The items at ``indices`` (e.g. from :func:`train_val_split`), in that order."""
        index = _as_index(indices, len(self))
        return TextData([self.texts[i] for i in index.tolist()], self.labels[index], self.classes)


@dataclass(frozen=True)
class ImageData:
    """A split of an image-classification data set.

    Attributes:
        images: ``(N, C, H, W)`` uint8 pixels, 0..255, channels first.
        labels: ``(N,)`` int64 class indices in ``[0, len(classes))``.
        classes: class names, indexed by label.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            found = getattr(self.images, "dtype", type(self.images))
            shape = tuple(getattr(self.images, "shape", ()))
            raise TypeError(f"ImageData.images must be a (N, C, H, W) uint8 tensor, got {found} of shape {shape}")
        _check_labels(self.labels, self.images.shape[0], self.classes, "ImageData")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: torch.Tensor | list[int]) -> ImageData:
        """The items at ``indices`` (e.g. from :func:`train_val_split`), in that order."""
        index = _as_index(indices, len(self))
        return ImageData(self.images[index], self.labels[index], self.classes)
