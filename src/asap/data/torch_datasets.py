"""``torch.utils.data`` datasets and collate functions over :class:`TextData` / :class:`ImageData`.

Items are ``(x, label)`` tuples; the collate functions turn a list of items
into the dict a training step consumes:

* text:  ``input_ids (B, T) int64``, ``padding_mask (B, T) bool`` (True = real
  token), ``labels (B,) int64``; ``T`` is the longest sequence in the batch.
* image: ``images (B, C, H, W) float32`` (normalised), ``labels (B,) int64``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from asap.data.containers import ImageData, TextData
from asap.data.tokenizer import PAD_ID, PretrainedTokenizer, SubwordTokenizer, pad_ids


class TextClassificationDataset(torch.utils.data.Dataset):
    """Tokenised texts with labels; item ``i`` is ``(input_ids (T_i,) int64, label () int64)``.

    All texts are tokenised once, here (the Rust tokenizer is fast in bulk and
    slow per call), and kept as one flat id tensor with offsets, which costs
    4 bytes a token instead of a Python list per text.

    Args:
        data: the split.
        tokenizer: a trained :class:`SubwordTokenizer`, or a model's :class:`PretrainedTokenizer`.
        max_length: the longest sequence, special tokens included; longer texts are truncated.
    """

    def __init__(self, data: TextData, tokenizer: SubwordTokenizer | PretrainedTokenizer, max_length: int) -> None:
        rows = tokenizer.encode_ids(data.texts, max_length=max_length)
        self.lengths = torch.tensor([len(row) for row in rows], dtype=torch.int64)
        self._offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(self.lengths, 0)])
        self._ids = torch.tensor([token for row in rows for token in row], dtype=torch.int32)
        self.labels = data.labels
        self.classes = data.classes
        self.max_length = max_length

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, stop = self._offsets[index], self._offsets[index + 1]
        return self._ids[start:stop].long(), self.labels[index]


def collate_text(batch: Sequence[tuple[torch.Tensor, torch.Tensor]], *, pad_id: int = PAD_ID) -> dict[str, torch.Tensor]:
    """Pad a list of ``(input_ids, label)`` items to the longest.

    Returns:
        ``dict(input_ids=(B, T) int64, padding_mask=(B, T) bool, labels=(B,) int64)``;
        padding uses ``pad_id`` (0, the subword tokenizer's; a pretrained
        tokenizer's own otherwise) and ``padding_mask`` is True on real tokens.
    """
    input_ids, padding_mask = pad_ids([ids for ids, _ in batch], pad_id=pad_id)
    return {"input_ids": input_ids, "padding_mask": padding_mask, "labels": torch.stack([label for _, label in batch])}


def _per_channel(name: str, value: float | Sequence[float], channels: int) -> torch.Tensor:
    values = torch.as_tensor(value, dtype=torch.float32).flatten()
    if values.numel() == 1:
        values = values.expand(channels)
    if values.numel() != channels:
        raise ValueError(f"{name} needs one value per channel ({channels}), got {values.numel()}")
    return values.reshape(channels, 1, 1).clone()


class ImageClassificationDataset(torch.utils.data.Dataset):
    """Normalised images with labels; item ``i`` is ``(image (C, H, W) float32, label () int64)``.

    ``image = (pixels / 255 - mean) / std`` per channel. With ``augment``, each
    item is first randomly shifted (zero-pad by ``crop_padding`` pixels on each
    side, then a random ``H x W`` crop) and, if ``hflip``, mirrored with
    probability 1/2: the light augmentation that ViTs on small data sets need
    to not over-fit. Use it for the training split only.

    The random draws depend only on ``(seed, epoch, index)``, not on a global
    RNG or on which DataLoader worker loads the item, so runs are reproducible
    for any ``num_workers``. Call :meth:`set_epoch` at the start of each epoch
    to get fresh draws (as with ``DistributedSampler``).

    Args:
        data: the split.
        mean, std: per-channel statistics on the 0..1 scale (one value, or one
            per channel); see :func:`channel_mean_std` to compute them from the
            training split.
        augment: apply the random shift and flip.
        seed: the augmentation seed.
        crop_padding: the largest shift in pixels; default ``max(1, H // 8)``
            (4 for CIFAR's 32 px, 3 for Fashion-MNIST, 1 for 8 px digits).
        hflip: also mirror left-right; turn off where mirroring changes the
            class (digits).
    """

    def __init__(
        self,
        data: ImageData,
        *,
        mean: float | Sequence[float],
        std: float | Sequence[float],
        augment: bool = False,
        seed: int = 0,
        crop_padding: int | None = None,
        hflip: bool = True,
    ) -> None:
        channels, height = data.images.shape[1], data.images.shape[2]
        self.images = data.images
        self.labels = data.labels
        self.classes = data.classes
        self.mean = _per_channel("mean", mean, channels)
        self.std = _per_channel("std", std, channels)
        if bool((self.std <= 0).any()):
            raise ValueError(f"std must be positive, got {self.std.flatten().tolist()}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.augment = augment
        self.seed = seed
        self.crop_padding = max(1, height // 8) if crop_padding is None else crop_padding
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be non-negative, got {self.crop_padding}")
        self.hflip = hflip
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch``."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index].float().div_(255.0)
        if self.augment:
            image = self._shift_and_flip(image, index)
        return (image - self.mean) / self.std, self.labels[index]

    def _shift_and_flip(self, image: torch.Tensor, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        pad = self.crop_padding
        height, width = image.shape[1:]
        top, left = (int(v) for v in rng.integers(0, 2 * pad + 1, size=2))
        image = F.pad(image, (pad, pad, pad, pad))[:, top : top + height, left : left + width]
        if self.hflip and rng.random() < 0.5:
            image = image.flip(-1)
        return image


def collate_image(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack ``(image, label)`` items: ``dict(images=(B, C, H, W) float32, labels=(B,) int64)``."""
    return {"images": torch.stack([image for image, _ in batch]), "labels": torch.stack([label for _, label in batch])}


def channel_mean_std(data: ImageData) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the pixels, on the 0..1 scale.

    Compute them on the training split and pass them to
    :class:`ImageClassificationDataset` for every split. Accumulated in float64
    over chunks, so 50,000 CIFAR images need no 1 GB temporary.
    """
    channels = data.images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for chunk in data.images.split(4096):
        pixels = chunk.double().div_(255.0).transpose(0, 1).reshape(channels, -1)
        total += pixels.sum(1)
        total_sq += pixels.square().sum(1)
    count = data.images.numel() // channels
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())
