"""The operator benchmark's method table: each timed operator (:class:`BenchMethod`) with its fast path and its
fp64 oracle (:func:`build_methods`), the inputs they share (:func:`padding_for`, :func:`random_asap_operator`),
and the check of every fast path against its oracle before anything is timed (:func:`verify_methods`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from asap.attention.functional import sinkhorn_attention, softmax_attention
from asap.attention.operators import AsapOperator
from asap.attention.reference import (
    asap_attention_reference,
    sinkhorn_attention_reference,
    softmax_attention_reference,
)
from asap.bench.operator_config import DTYPES, OperatorBenchConfig
from asap.io import method_key
from asap.transport.masks import key_padding_to_attn_mask

#: Verification tolerances per benchmark dtype: max |fast - fp64 reference| <= tol * max(1, max |reference|),
#: for outputs and (looser: gradients of unrolled iterations and soft sorts accumulate rounding) gradients.
VERIFY_TOLERANCE = {
    torch.float32: {"output": 1e-4, "grad": 1e-3},
    torch.float16: {"output": 2e-2, "grad": 5e-2},
    torch.bfloat16: {"output": 8e-2, "grad": 2e-1},
}

#: ``fn(q, k, v, padding)``: ``padding`` is the ``(b, n)`` token mask (True = real token) or ``None``.
AttentionFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]


class VerificationError(RuntimeError):
    """A fast path disagrees with its fp64 reference: its timings would be meaningless."""


@dataclass(frozen=True)
class BenchMethod:
    """One timed operator: its fast path, its fp64 oracle, and how to describe it."""

    name: str
    family: str
    label: str
    trainable: bool
    description: str
    forward: AttentionFn
    reference: AttentionFn
    reference_name: str

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "label": self.label, "trainable": self.trainable,
                "description": self.description, "reference": self.reference_name}


def teacher_name(iters: int) -> str:
    return method_key("sinkhorn", n_iters=iters)


def random_asap_operator(
    *, heads: int, head_dim: int, num_slices: int, eps: float, seed: int, device: torch.device,
    extra_features: tuple[str, ...] = (), backend: str = "auto",
) -> AsapOperator:  # fmt: skip
    """The full ASAP operator with random (unfitted) coefficients ``alpha ~ N(0, 1/(L + E))``: for timing only."""
    op = AsapOperator(num_heads=heads, head_dim=head_dim, eps=eps, num_slices=num_slices, slice_type="random",
                      seed=seed, extra_features=extra_features, backend=backend)  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 1)
    features = op.dual_map.num_features
    # deliberately "fitted" with random values: see the module docstring
    op.dual_map.set_coefficients(torch.randn(heads, features, generator=gen) / math.sqrt(features))
    return op.to(device)


def _mask(padding: Tensor | None) -> Tensor | None:
    return None if padding is None else key_padding_to_attn_mask(padding)


def padding_for(batch: int, n: int, fraction: float, *, device: torch.device | str = "cpu") -> Tensor | None:
    """The ``(b, n)`` token mask of :attr:`OperatorBenchConfig.padding` (``None`` for 0): lengths from n down."""
    if fraction == 0:
        return None
    steps = torch.arange(batch, dtype=torch.float64) / max(1, batch - 1)
    lengths = (n * (1 - 2 * fraction * steps)).round().clamp(min=1).long()
    return (torch.arange(n)[None, :] < lengths[:, None]).to(device)


def _esp_methods(config: OperatorBenchConfig) -> tuple[list[BenchMethod], str | None]:
    try:
        from asap.attention.esp import esp_attention, esp_attention_reference
    except ImportError as err:
        return [], f"ESP is not available in this checkout ({err})"
    method = BenchMethod(
        name="esp", family="esp", label="ESP", trainable=True,
        description=f"esp_attention defaults: soft sorting, the d={config.head_dim} coordinate axes as slices",
        forward=lambda q, k, v, p: esp_attention(q, k, v, attn_mask=_mask(p)),
        reference=lambda q, k, v, p: esp_attention_reference(q, k, v, attn_mask=_mask(p)),
        reference_name="asap.attention.esp.esp_attention_reference",
    )
    return [method], None


def build_methods(config: OperatorBenchConfig, device: torch.device) -> tuple[dict[str, BenchMethod], dict[str, str]]:
    """The methods of ``config`` and, for families that cannot run here, the reason (never a silent skip)."""
    methods: list[BenchMethod] = []
    unavailable: dict[str, str] = {}
    if "softmax" in config.methods:
        methods.append(BenchMethod(
            name="softmax", family="softmax", label="softmax", trainable=True,
            description="softmax_attention (scaled_dot_product_attention)",
            forward=lambda q, k, v, p: softmax_attention(q, k, v, padding_mask=p),
            reference=lambda q, k, v, p: softmax_attention_reference(q, k, v, attn_mask=_mask(p)),
            reference_name="asap.attention.reference.softmax_attention_reference",
        ))
    if "sinkhorn" in config.methods:
        for iters in config.sinkhorn_iters:
            teacher = " (reference teacher)" if iters == config.teacher_iters else ""
            methods.append(BenchMethod(
                name=teacher_name(iters), family="sinkhorn", label=f"Sinkhorn K={iters}", trainable=True,
                description=f"sinkhorn_attention, {iters} half-steps, eps={config.eps}, grad_mode='unroll'{teacher}",
                forward=lambda q, k, v, p, iters=iters: sinkhorn_attention(
                    q, k, v, n_iters=iters, eps=config.eps, padding_mask=p),
                reference=lambda q, k, v, p, iters=iters: sinkhorn_attention_reference(
                    q, k, v, n_iters=iters, eps=config.eps, attn_mask=_mask(p)),
                reference_name="asap.attention.reference.sinkhorn_attention_reference",
            ))
    if "asap" in config.methods:
        op = random_asap_operator(heads=config.heads, head_dim=config.head_dim, num_slices=config.num_slices,
                                  eps=config.eps, seed=config.seed, device=device,
                                  extra_features=config.extra_features)  # fmt: skip
        scale = config.head_dim**-0.5
        reference_map = copy.deepcopy(op.dual_map).cpu()  # the references run on the CPU in fp64

        def asap_reference(q: Tensor, k: Tensor, v: Tensor, p: Tensor | None) -> Tensor:
            # the design matrix (features @ coefficients), evaluated in q's dtype (fp64)
            phi = reference_map.features(q, k, scale=scale, attn_mask=_mask(p))
            f_hat = torch.einsum("bhln,hl->bhn", phi, reference_map.coefficients().to(phi.dtype))
            return asap_attention_reference(q, k, v, f_hat, eps=config.eps, attn_mask=_mask(p))

        extras = "+".join(config.extra_features) or "no extras"
        methods.append(BenchMethod(
            name=method_key("asap", num_slices=config.num_slices), family="asap", label=f"ASAP L={config.num_slices}", trainable=False,
            description=(f"AsapOperator: {config.num_slices} random slices and {extras}, linear map with RANDOM "
                         f"coefficients (timing only; the cost does not depend on their values), backend 'auto', "
                         f"eps={config.eps}"),
            forward=lambda q, k, v, p: op(q, k, v, padding_mask=p), reference=asap_reference,
            reference_name="SliceDualMap.features in fp64 + asap.attention.reference.asap_attention_reference",
        ))
    if "esp" in config.methods:
        esp, reason = _esp_methods(config)
        methods.extend(esp)
        if reason is not None:
            unavailable["esp"] = reason
    return {m.name: m for m in methods}, unavailable


def _max_error(fast: Tensor, ref: Tensor) -> float:
    """``max |fast - ref| / max(1, max |ref|)``: absolute for small values, relative for large ones."""
    ref = ref.detach().to(torch.float64)
    err = (fast.detach().to(torch.float64) - ref).abs().max()
    return float(err / ref.abs().max().clamp(min=1.0))


def verify_methods(
    methods: Mapping[str, BenchMethod], config: OperatorBenchConfig, device: torch.device
) -> list[dict[str, Any]]:
    """Compare each fast path (benchmark dtype, device) with its fp64 reference (CPU) on a small input.

    Checks the output of every method and, for trainable ones, the gradients
    of ``<out, w>`` (random ``w``) with respect to ``q``, ``k`` and ``v``.
    Raises :class:`VerificationError` listing every failure.
    """
    dtype = DTYPES[config.dtype]
    tol = VERIFY_TOLERANCE[dtype]
    gen = torch.Generator().manual_seed(config.seed + 2)
    batch = 1 if config.padding == 0 else 3
    shape = (batch, config.heads, config.verify_length, config.head_dim)
    base = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    weight = torch.randn(shape, generator=gen, dtype=torch.float64)
    padding = padding_for(batch, config.verify_length, config.padding)
    records, failures = [], []
    for method in methods.values():
        ref_inputs = [t.clone().requires_grad_(method.trainable) for t in base]
        fast_inputs = [t.to(device=device, dtype=dtype).requires_grad_(method.trainable) for t in base]
        with torch.set_grad_enabled(method.trainable):
            ref_out = method.reference(*ref_inputs, padding)
            fast_out = method.forward(*fast_inputs, None if padding is None else padding.to(device))
        if not torch.isfinite(fast_out).all():
            failures.append(f"{method.name}: non-finite output")
        errors = {"output": _max_error(fast_out.cpu(), ref_out)}
        if method.trainable:
            ref_grads = torch.autograd.grad((ref_out * weight).sum(), ref_inputs)
            fast_grads = torch.autograd.grad((fast_out * weight.to(device, dtype)).sum(), fast_inputs)
            for name, fast_g, ref_g in zip("qkv", fast_grads, ref_grads):
                errors[f"grad_{name}"] = _max_error(fast_g.cpu(), ref_g)
        for key, err in errors.items():
            limit = tol["output" if key == "output" else "grad"]
            if not err <= limit:  # also catches NaN
                failures.append(f"{method.name}: {key} error {err:.3g} > {limit:g} against {method.reference_name}")
        records.append({
            "method": method.name, "reference": method.reference_name, "errors": errors,
            "tolerance": {"output": tol["output"], "grad": tol["grad"] if method.trainable else None},
            "passed": all(errors[key] <= tol["output" if key == "output" else "grad"] for key in errors),
        })
    if failures:
        raise VerificationError("fast paths disagree with their fp64 references:\n  " + "\n  ".join(failures))
    return records
