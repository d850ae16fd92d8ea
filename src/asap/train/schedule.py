"""Learning-rate schedule: linear warm-up, then cosine decay."""

from __future__ import annotations

import math


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    ``(step + 1) / warmup_steps`` during warm-up (never 0, so the first step
    moves), then ``min_ratio + (1 - min_ratio) * (1 + cos(pi * t)) / 2`` with
    ``t`` going from 0 to 1 over the remaining steps. Warm-up matters for
    transformers trained with Adam: early updates with uncalibrated second
    moments are large.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
