"""Side by side: the attention matrices a teacher and its compiled/truncated variants apply (``asap demo``).

Display, not compilation: the matrices are rebuilt with :mod:`asap.compile.plans`;
timing lives in :mod:`asap.bench.model_timing`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from asap.attention.operators import AsapOperator, AttentionOperator, SinkhornOperator, SoftmaxOperator, call_mask
from asap.attention.submodules import find_modules
from asap.compile.calibrate import model_inputs
from asap.compile.plans import as_4d_mask, asap_log_attention, scores_and_support, sinkhorn_log_attention


def attention_operators(model: nn.Module) -> list[AttentionOperator]:
    """Every attention operator of ``model``, each object once, in registration order."""
    return [found.module for found in find_modules(model, AttentionOperator)]


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
            captured.update(q=args[0], k=args[1], mask=as_4d_mask(call_mask(kwargs)))

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
