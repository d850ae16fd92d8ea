"""Training cost of doubly-stochastic attention: time per step and memory, ESP vs Sinkhorn vs softmax.

The claim checked (docs/method.md sec. 7, "Training cost"): ESP attention needs
substantially more training memory and time than Sinkhorn attention at the
same model size. One small pre-norm transformer encoder stack
(:class:`asap.models.blocks.Block`, whose attention is
:class:`asap.attention.MultiheadAttention`) is trained for a few steps with each
attention operator swapped in (same weights, same data); a step is forward +
backward + AdamW step.

Measurement protocol:

* methods are **interleaved** (one step of each, then again) after one
  warm-up step each, ``repeats`` times, and medians are reported, so slow
  drifts of a shared machine hit every method alike;
* ratios are taken to the Sinkhorn runs measured side by side in the same run;
* memory on CUDA: ``torch.cuda.max_memory_allocated`` over one step, minus the
  memory allocated before it (parameters, optimizer state, inputs);
* memory on CPU (no portable allocator peak): the bytes of the tensors that
  autograd saves for backward during the forward pass, counted once per
  storage with :func:`torch.autograd.graph.saved_tensors_hooks`. This is the
  activation memory a training step holds at its peak (end of forward); it
  does not count transient buffers freed during the forward, nor the
  recomputation of checkpointed ESP tiles during backward, which
  ``memory_budget_bytes`` bounds per tile (reported alongside).

Run ``python -m asap.bench.training_cost --out results/training_cost.json``
(``--help`` for the shapes); :func:`run_training_cost` is the same as a function.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from asap.attention.esp import DEFAULT_MEMORY_BUDGET
from asap.attention.operators import AttentionOperator, EspOperator, SinkhornOperator, SoftmaxOperator
from asap.env import machine_info
from asap.io import atomic_write_json, method_key
from asap.models.blocks import Block


@dataclass(frozen=True)
class Shape:
    """One input shape: ``batch`` sequences of ``seq_len`` tokens, ``num_heads`` heads of ``head_dim``."""

    name: str
    seq_len: int
    num_heads: int = 8
    head_dim: int = 64
    batch: int = 1


# ViT-B/16-like token count (14 x 14 patches + class token) and a text length, both with 8 heads of 64.
DEFAULT_SHAPES = (Shape("vit", seq_len=197), Shape("text", seq_len=512))


@dataclass(frozen=True)
class MethodSpec:
    """A labelled attention operator: ``kind`` in {"softmax", "sinkhorn", "esp"} and its options."""

    label: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, *, num_heads: int, head_dim: int) -> AttentionOperator:
        if self.kind == "softmax":
            return SoftmaxOperator(**self.options)
        if self.kind == "sinkhorn":
            return SinkhornOperator(**self.options)
        if self.kind == "esp":
            return EspOperator(num_heads=num_heads, head_dim=head_dim, **self.options)
        raise ValueError(f"unknown method kind {self.kind!r}; choose softmax, sinkhorn or esp")


def default_methods(
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET, *, esp_untiled: bool = False
) -> tuple[MethodSpec, ...]:
    """Softmax, Sinkhorn with K = 3 and K = 11, and ESP (soft sort, tiled to the memory budget).

    ``esp_untiled`` adds ESP with every slice in one tile, i.e. the published
    code's memory behaviour (``(b, h, L, n, n)`` soft permutations kept for
    backward): several GiB at ``n = 512``, hence off by default.
    """
    esp = {"soft": True, "tau_sort": 1e-3}
    methods = (
        MethodSpec("softmax", "softmax"),
        MethodSpec(method_key("sinkhorn", n_iters=3), "sinkhorn", {"n_iters": 3}),
        MethodSpec(method_key("sinkhorn", n_iters=11), "sinkhorn", {"n_iters": 11}),
        MethodSpec("esp", "esp", {**esp, "memory_budget_bytes": memory_budget_bytes}),
    )
    return methods + ((MethodSpec("esp_untiled", "esp", {**esp, "memory_budget_bytes": None}),) if esp_untiled else ())


def build_encoder(shape: Shape, *, depth: int, mlp_ratio: float = 4.0) -> nn.Sequential:
    """``depth`` pre-norm blocks of width ``num_heads * head_dim`` (softmax attention until swapped)."""
    dim = shape.num_heads * shape.head_dim
    return nn.Sequential(*(Block(dim, num_heads=shape.num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)))


def set_attention(encoder: nn.Sequential, method: MethodSpec, shape: Shape) -> None:
    """Swap the attention operator of every block in place (the weights are shared by all methods)."""
    for block in encoder:
        block.attn.operator = method.build(num_heads=shape.num_heads, head_dim=shape.head_dim).to(
            next(encoder.parameters()).device
        )


def _saved_tensor_bytes(step) -> tuple[Any, int]:
    """Run ``step()`` and count the bytes autograd saves for backward during it (once per storage)."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = step()
    return result, sum(storages.values())


def _train_step(encoder: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, target: Tensor) -> tuple[float, int]:
    """One forward + backward + AdamW step: (seconds, memory bytes; see the module docstring)."""
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    out, saved = _saved_tensor_bytes(lambda: encoder(x))
    loss = nn.functional.mse_loss(out, target)
    loss.backward()
    optimizer.step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated() - base if cuda else saved
    return seconds, memory


def run_training_cost(
    *,
    shapes: tuple[Shape, ...] = DEFAULT_SHAPES,
    methods: tuple[MethodSpec, ...] | None = None,
    depth: int = 1,
    repeats: int = 2,
    device: str | torch.device = "cpu",
    seed: int = 0,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Measure every method on every shape; return (and optionally write as JSON) the report.

    Returns a dict with ``config``, ``machine``, ``git_revision``,
    ``memory_measure`` and ``results[shape][method]`` holding the per-repeat
    ``seconds`` and ``memory_bytes``, their medians, and ratios to each Sinkhorn
    method of the run (``time_ratio_to`` / ``memory_ratio_to``).
    """
    if repeats < 1 or depth < 1:
        raise ValueError(f"repeats and depth must be >= 1, got repeats={repeats}, depth={depth}")
    methods = default_methods() if methods is None else methods
    device = torch.device(device)
    machine = machine_info(device)  # before the runs: the load average at the start
    references = [m.label for m in methods if m.kind == "sinkhorn"]
    results: dict[str, Any] = {}
    for shape in shapes:
        torch.manual_seed(seed)
        encoder = build_encoder(shape, depth=depth).to(device)
        initial = {name: p.detach().clone() for name, p in encoder.state_dict().items()}
        dim = shape.num_heads * shape.head_dim
        x = torch.randn(shape.batch, shape.seq_len, dim, device=device)
        target = torch.randn_like(x)
        samples: dict[str, dict[str, list]] = {m.label: {"seconds": [], "memory_bytes": []} for m in methods}
        for rep in range(repeats + 1):  # the first round is the warm-up
            for method in methods:
                encoder.load_state_dict(initial)  # every method trains the same weights
                set_attention(encoder, method, shape)
                optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-4)
                seconds, memory = _train_step(encoder, optimizer, x, target)
                if rep > 0:
                    samples[method.label]["seconds"].append(seconds)
                    samples[method.label]["memory_bytes"].append(memory)
        shape_results = {}
        for method in methods:
            s = samples[method.label]
            shape_results[method.label] = {
                "kind": method.kind,
                "options": method.options,
                **s,
                "median_seconds": statistics.median(s["seconds"]),
                "median_memory_bytes": statistics.median(s["memory_bytes"]),
            }
            if method.kind == "esp" and device.type != "cuda":
                # Checkpointed tiles are recomputed in backward: their transient memory is not in the
                # saved-tensor count, but is bounded (approximately) by the tile budget.
                shape_results[method.label]["transient_bound_bytes"] = method.options.get("memory_budget_bytes")
        for entry in shape_results.values():
            entry["time_ratio_to"] = {
                r: entry["median_seconds"] / shape_results[r]["median_seconds"] for r in references
            }
            entry["memory_ratio_to"] = {
                r: entry["median_memory_bytes"] / max(1, shape_results[r]["median_memory_bytes"]) for r in references
            }
        results[shape.name] = shape_results
    report = {
        "benchmark": "training_cost",
        "config": {"shapes": [asdict(s) for s in shapes], "depth": depth, "repeats": repeats, "seed": seed,
                   "step": "forward + backward + AdamW", "loss": "mse to a random target"},
        "memory_measure": "cuda.max_memory_allocated over the step minus memory before it" if device.type == "cuda"
        else "bytes of autograd saved tensors in the forward pass (once per storage); excludes checkpoint recompute",
        "machine": machine,
        "git_revision": machine["git_revision"] or "unknown",
        "results": results,
    }
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, report)
    return report


def _parse_shape(text: str) -> Shape:
    """``name:seq_len[:num_heads:head_dim[:batch]]``, e.g. ``vit:197`` or ``tiny:16:2:8:2``."""
    parts = text.split(":")
    if len(parts) not in (2, 4, 5):
        raise argparse.ArgumentTypeError(f"shape {text!r} must be name:seq_len[:num_heads:head_dim[:batch]]")
    return Shape(parts[0], *(int(p) for p in parts[1:]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m asap.bench.training_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON report")
    parser.add_argument("--shape", type=_parse_shape, action="append", dest="shapes",
                        help="name:seq_len[:num_heads:head_dim[:batch]] (repeatable; default vit:197 and text:512)")
    parser.add_argument("--depth", type=int, default=1, help="number of encoder blocks")
    parser.add_argument("--repeats", type=int, default=2, help="measured rounds (after one warm-up round)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--esp-memory-budget", type=int, default=DEFAULT_MEMORY_BUDGET,
                        help="ESP tile budget in bytes")
    parser.add_argument("--esp-untiled", action="store_true",
                        help="also run ESP with all slices in one tile (published memory behaviour; GiBs at n=512)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = run_training_cost(
        shapes=tuple(args.shapes) if args.shapes else DEFAULT_SHAPES,
        methods=default_methods(args.esp_memory_budget, esp_untiled=args.esp_untiled),
        depth=args.depth,
        repeats=args.repeats,
        device=args.device,
        seed=args.seed,
        out=args.out,
    )
    for shape_name, shape_results in report["results"].items():
        for label, entry in shape_results.items():
            ratios = ", ".join(f"{r}: time x{t:.2f}" for r, t in entry["time_ratio_to"].items())
            print(f"{shape_name:>6} {label:>13}: {entry['median_seconds'] * 1e3:9.1f} ms/step, "
                  f"{entry['median_memory_bytes'] / 2**20:8.1f} MiB  ({ratios})")
    return report


if __name__ == "__main__":
    main()
