"""Side-by-side measurements of a teacher and its compiled/truncated variants: speed and attention maps.

Speed is measured in one process, on the same batches, round-robin over the
models (each repetition runs every model once, in turn), so that the load of
a shared machine affects all of them alike; the figure is the median over
repetitions. Two times per forward are reported: the whole model, and the
attention operators alone (the sum over layers of the time between a forward
pre-hook and a forward hook on each operator).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from asap.attention.operators import AsapOperator, AttentionOperator, SinkhornOperator, SoftmaxOperator
from asap.compile.calibrate import model_inputs
from asap.compile.plans import as_4d_mask, asap_log_attention, scores_and_support, sinkhorn_log_attention


def attention_operators(model: nn.Module) -> list[AttentionOperator]:
    return [m for m in model.modules() if isinstance(m, AttentionOperator)]


class _OperatorTimer:
    """Accumulates the wall time spent inside the attention operators of a model."""

    def __init__(self, model: nn.Module):
        self.total = 0.0
        self._start = 0.0
        self._handles = []
        for op in attention_operators(model):
            self._handles.append(op.register_forward_pre_hook(self._enter))
            self._handles.append(op.register_forward_hook(self._exit))

    def _enter(self, module, args):
        self._start = time.perf_counter()

    def _exit(self, module, args, output):
        self.total += time.perf_counter() - self._start

    def remove(self):
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def time_models(
    models: Mapping[str, nn.Module], batches: Sequence[Any], *, repeats: int = 5, progress: Any = None
) -> dict[str, dict[str, float]]:
    """Median milliseconds per batch of each model: ``{name: {"model_ms", "attention_ms"}}``.

    One warm-up pass per model, then ``repeats`` rounds; in each round every
    model runs over all ``batches`` in turn.
    """
    timers = {name: _OperatorTimer(model) for name, model in models.items()}
    samples: dict[str, dict[str, list[float]]] = {name: {"model_ms": [], "attention_ms": []} for name in models}
    try:
        rounds = range(repeats + 1)
        if progress is not None:
            rounds = progress(rounds, total=repeats + 1)
        for round_index in rounds:
            for name, model in models.items():
                model.eval()
                device = next(model.parameters()).device
                timer = timers[name]
                timer.total = 0.0
                start = time.perf_counter()
                for batch in batches:
                    args, kwargs = model_inputs(model, batch, device)
                    model(*args, **kwargs)
                elapsed = time.perf_counter() - start
                if round_index > 0:  # round 0 is the warm-up
                    samples[name]["model_ms"].append(1e3 * elapsed / len(batches))
                    samples[name]["attention_ms"].append(1e3 * timer.total / len(batches))
    finally:
        for timer in timers.values():
            timer.remove()
    return {name: {key: statistics.median(values) for key, values in s.items()} for name, s in samples.items()}


def operator_attention(operator: AttentionOperator, q: Tensor, k: Tensor, attn_mask: Tensor | None) -> Tensor:
    """The attention matrix ``(b, h, n, m)`` an operator applies to ``(q, k)``, rebuilt for display."""
    scale = operator.resolved_scale(q)
    scores, supp = scores_and_support(q, k, scale=scale, attn_mask=attn_mask)
    if isinstance(operator, SinkhornOperator):
        log_attn = sinkhorn_log_attention(scores, supp, n_iters=operator.n_iters, eps=operator.eps)
    elif isinstance(operator, AsapOperator):
        f_hat = operator.dual_map(q, k, scale=scale, attn_mask=attn_mask)
        log_attn = asap_log_attention(scores, f_hat, eps=operator.eps, supp=supp)
    elif isinstance(operator, SoftmaxOperator):
        log_attn = sinkhorn_log_attention(scores, supp, n_iters=1, eps=1.0)
    else:
        raise TypeError(f"cannot display the attention of a {type(operator).__name__}")
    return supp.zero_rows(log_attn.exp(), vectors=True)


@torch.no_grad()
def attention_maps(models: Mapping[str, nn.Module], batch: Any, *, layer: int) -> dict[str, Tensor]:
    """Each model's attention matrix ``(b, h, n, m)`` at attention layer ``layer``, on its own activations."""
    maps = {}
    for name, model in models.items():
        operators = attention_operators(model)
        if not -len(operators) <= layer < len(operators):
            raise ValueError(f"layer {layer} out of range: {name} has {len(operators)} attention layers")
        operator = operators[layer]
        captured = {}

        def hook(module, args, kwargs):
            captured.update(q=args[0], k=args[1], mask=as_4d_mask(kwargs.get("attn_mask")))

        handle = operator.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            args, kwargs = model_inputs(model.eval(), batch, next(model.parameters()).device)
            model(*args, **kwargs)
        finally:
            handle.remove()
        maps[name] = operator_attention(operator, captured["q"], captured["k"], captured["mask"])
    return maps


def plot_attention_maps(
    maps: Mapping[str, Tensor], path: str, *, example: int = 0, head: int = 0, titles: Mapping[str, str] | None = None
) -> None:
    """A PNG with one panel per model: the attention matrix of one example and one head, on a shared colour scale.

    Panels after the first are titled with their mean row total variation to the first (the teacher).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mats = {name: m[example, head].float().cpu() for name, m in maps.items()}
    reference = next(iter(mats.values()))
    vmax = max(float(m.max()) for m in mats.values())
    fig, axes = plt.subplots(1, len(mats), figsize=(4.2 * len(mats), 4))
    for i, (ax, (name, mat)) in enumerate(zip(axes, mats.items())):
        image = ax.imshow(mat.numpy(), cmap="viridis", vmin=0, vmax=vmax)
        title = (titles or {}).get(name, name)
        if i > 0:  # mean row total variation to the first panel (the teacher)
            title += f"\nrow TV to {next(iter(mats))}: {0.5 * (mat - reference).abs().sum(-1).mean():.3f}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key")
        if i == 0:
            ax.set_ylabel("query")
    fig.colorbar(image, ax=list(axes), shrink=0.8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def time_operator_scaling(
    operators: Mapping[str, AttentionOperator],
    *,
    num_heads: int,
    head_dim: int,
    lengths: Sequence[int],
    batch_size: int = 8,
    repeats: int = 5,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Median milliseconds of one call of each operator on random ``(batch, h, n, d)`` inputs, for each ``n``.

    The time of these operators does not depend on the values, so random
    inputs of the trained layer's shape measure how the costs grow with the
    sequence length (``K`` passes over ``n x n`` for Sinkhorn, 2 plus ``L``
    sorts of ``n`` for ASAP). Round-robin over operators, as in :func:`time_models`.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        q, k, v = (torch.randn(batch_size, num_heads, n, head_dim, generator=gen) for _ in range(3))
        samples: dict[str, list[float]] = {name: [] for name in operators}
        for round_index in range(repeats + 1):
            for name, op in operators.items():
                start = time.perf_counter()
                op(q, k, v)
                if round_index > 0:
                    samples[name].append(1e3 * (time.perf_counter() - start))
        rows.append({"n": n, **{name: statistics.median(s) for name, s in samples.items()}})
    return rows
