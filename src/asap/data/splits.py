"""Deterministic index splits and subsets.

Every function here returns sorted int64 index tensors and depends only on its
arguments (a seeded ``torch.Generator``, never the global RNG), so a run can be
repeated exactly and two runs with the same seed see the same examples.
"""

from __future__ import annotations

import torch


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value}")


def _held_out_count(num: int, fraction: float) -> int:
    """``round(num * fraction)``, but at least one held-out and one kept item when possible.

    The floor/ceiling keep a tiny set (``--limit`` runs) from producing an empty
    validation set for a non-zero fraction, or an empty training set.
    """
    if fraction == 0.0 or num == 0:
        return 0
    count = round(num * fraction)
    return min(max(count, 1), max(num - 1, 0))


def train_val_split(num: int, *, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(num)`` at random into training and validation indices.

    ``round(num * val_fraction)`` indices (at least one if the fraction is
    positive and ``num >= 2``) go to validation. The permutation comes from a
    ``torch.Generator`` seeded with ``seed``: same arguments, same split, on any
    machine. The two sets are disjoint, cover ``range(num)``, and are sorted.

    Returns:
        ``(train_idx, val_idx)``, int64 1-D tensors.
    """
    if num < 0:
        raise ValueError(f"num must be non-negative, got {num}")
    _check_fraction("val_fraction", val_fraction)
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num, generator=generator)
    num_val = _held_out_count(num, val_fraction)
    return perm[num_val:].sort().values, perm[:num_val].sort().values


def stratified_split(labels: torch.Tensor, *, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices so that each class keeps the same fraction in both parts.

    For each class ``c`` (in increasing order, sharing one seeded generator),
    ``round(n_c * test_fraction)`` of its ``n_c`` items, drawn at random, go to
    the test part. Used to give data sets without an official split (digits)
    a fixed, class-balanced one.

    Args:
        labels: ``(N,)`` int64 class indices.

    Returns:
        ``(train_idx, test_idx)``, sorted, disjoint, covering ``range(N)``.
    """
    _check_fraction("test_fraction", test_fraction)
    generator = torch.Generator().manual_seed(seed)
    train_parts, test_parts = [], []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        num_test = round(members.numel() * test_fraction)
        test_parts.append(members[:num_test])
        train_parts.append(members[num_test:])
    empty = torch.empty(0, dtype=torch.int64)
    train = torch.cat(train_parts) if train_parts else empty
    test = torch.cat(test_parts) if test_parts else empty
    return train.sort().values, test.sort().values


def stratified_head(labels: torch.Tensor, limit: int) -> torch.Tensor:
    """Indices of a ``limit``-item subset with the class proportions of ``labels``.

    Each class gets ``floor(limit * n_c / N)`` items, and the remaining ones go
    to the classes with the largest fractional parts (ties to the lower label).
    Within a class the *first* items in file order are taken, so no seed is
    needed and a larger limit gives a superset. Stratified rather than a plain
    "first ``limit`` rows" because several official files are sorted by class
    (IMDb lists all negative reviews first).

    Returns:
        Sorted int64 indices (file order); all of them if ``limit >= N``.
    """
    if limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit}")
    total = labels.numel()
    if limit >= total:
        return torch.arange(total)
    counts = torch.bincount(labels)
    exact = counts.double() * limit / total
    quotas = exact.floor().long()
    shortfall = limit - int(quotas.sum())
    # Largest remainder; a stable sort on the negated remainder breaks ties by label.
    order = torch.sort(-(exact - quotas), stable=True).indices
    quotas[order[:shortfall]] += 1
    # Rank of each item within its class, in file order: a stable sort by label keeps file order.
    by_class = torch.sort(labels, stable=True).indices
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(labels)
    rank[by_class] = torch.arange(total) - starts[labels[by_class]]
    return torch.nonzero(rank < quotas[labels]).flatten()
