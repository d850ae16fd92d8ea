"""Regenerate ``results/README.md`` and its plots from the committed result JSON.

Nothing in the report is typed by hand: every measured number is read from a
JSON file under ``results/``, and the README states the machine and the
command that produced each file. Run ``python -m asap.bench.report`` (or
``asap report``) after adding or updating any result.

The generator is a list of :class:`Section` s. Each one names the JSON files
it reads (glob patterns under ``results/``) and a renderer from the loaded
files to Markdown lines (plus any plots it draws). A section whose files are
absent prints a visible note saying which command produces them. A file whose
schema has no dedicated renderer is still shown, flattened into a key/value
table by :func:`render_generic`; adding a dedicated renderer for a new
schema (compiled layers, teachers) is one function and one :class:`Section`.

The "against the paper" section quotes the paper's claims (:data:`PAPER_CLAIMS`,
with their source) next to the matching figures measured here, where we have
them, and says "not measured yet" where we do not.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asap.io import atomic_write_text, method_key, method_of, parse_method_key

OPERATORS_SCHEMA = "asap.bench.operators/1"
TRAINING_COST_SCHEMA = "training_cost"  # the "benchmark" field of asap.bench.training_cost's JSON

#: The paper's published figures, quoted (not measured here). Sources: the abstract of Tran, Milkert & Hyde,
#: "ASAP: Amortized Doubly-Stochastic Attention via Sliced Dual Projection" (arXiv 2605.12879), and the baseline
#: accuracies of docs/method.md sec. 7 (a secondary source, likely the paper's table; unconfirmed).
PAPER_CLAIMS: dict[str, Any] = {
    "speedup_over_teacher": 5.3,
    "accuracy_kept_in_replacement": 0.95,
    "baseline_accuracy": {  # data set -> (Sinkformer, ESPFormer) top-1 accuracy in %, None = not reported
        "CIFAR-100": (64.95, 58.46),
        "DBpedia-14": (98.27, 96.58),
        "Yelp Review Full": (54.54, 49.49),
        "Cats & Dogs": (81.09, 81.23),
        "AG News": (90.12, 86.5),
        "IMDb": (87.34, None),
    },
}

#: Targets the operator benchmark is reported against (the speed issue); reported, never asserted.
SPEED_TARGET = {"calls_at": (512, 1024), "max_softmax_calls": 1.7, "n": 512, "speedup_over": {21: 8.0, 11: 5.0}}
MEMORY_TARGET_N = 4096
# Issue 14: on the attention shape a trained teacher really has, ASAP at least this much faster than the teacher.
TEACHER_SHAPE_SPEEDUP = 1.5


@dataclass(frozen=True)
class Doc:
    """One loaded result file: its path relative to the results directory and its parsed JSON."""

    rel: str
    path: Path
    data: dict[str, Any]

    @property
    def schema(self) -> str | None:
        return self.data.get("schema") or self.data.get("benchmark")


@dataclass
class Rendered:
    """A section's Markdown lines and the plot files it wrote."""

    lines: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)


Renderer = Callable[[list[Doc], Path], Rendered]


@dataclass(frozen=True)
class Section:
    """A part of the README: which JSON it reads, how it renders, and what to say when the JSON is absent."""

    key: str
    title: str
    patterns: tuple[str, ...]
    render: Renderer
    absent: str
    schemas: tuple[str, ...] | None = None  # keep only files of these schemas (None: any)
    #: its writers name methods by :func:`asap.io.method_key`: older files' ``sinkhorn_K3`` is read as ``sinkhorn_k3``
    method_keys: bool = False


# ------------------------------------------------------------------------------------------------ formatting


def fmt_time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def fmt_bytes(nbytes: float | None) -> str:
    if nbytes is None:
        return "-"
    mib = nbytes / 2**20
    if mib >= 1024:
        return f"{mib / 1024:.2f} GiB"
    return f"{mib:.1f} MiB" if mib >= 0.1 else f"{nbytes / 1024:.1f} KiB"


def fmt_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _sinkhorn(n_iters: int | None) -> str | None:
    """The result key of Sinkhorn with ``n_iters`` half-steps (:func:`asap.io.method_key`)."""
    return None if n_iters is None else method_key("sinkhorn", n_iters=n_iters)


def _current_method_keys(value: Any) -> Any:
    """``value`` (parsed JSON) with every method key, as a key or a string value, in :func:`asap.io.method_key`'s
    spelling: results written before it say ``sinkhorn_K3`` where new ones say ``sinkhorn_k3``."""
    if isinstance(value, dict):
        return {_current_method_keys(k): _current_method_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_current_method_keys(v) for v in value]
    parsed = parse_method_key(value)
    return method_key(parsed[0], **parsed[1]) if parsed else value


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table (first column left-aligned, the others right-aligned)."""
    align = [":--"] + ["--:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def machine_line(machine: dict[str, Any] | None) -> str:
    if not machine:
        return "Machine: not recorded."
    gpu = machine.get("gpu")
    gpu_text = f", GPU {gpu['name']}" if isinstance(gpu, dict) else (f", GPU {gpu}" if gpu else ", no GPU")
    rev = machine.get("git_revision") or "unknown"
    dirty = " (uncommitted changes)" if machine.get("git_dirty") else ""
    load = machine.get("load_average")
    load_text = f"; load average at start {load[0]:.2f}" if load else ""
    return (
        f"Machine: {machine.get('cpu_model', 'unknown CPU')}, {machine.get('cpu_count', '?')} cores "
        f"({machine.get('torch_threads', '?')} torch threads){gpu_text}; torch {machine.get('torch', '?')}; "
        f"git {str(rev)[:10]}{dirty}; {machine.get('date_utc', machine.get('date', 'date unknown'))}{load_text}."
    )


# ------------------------------------------------------------------------------------------ operator benchmark


def _groups(doc: Doc, mode: str) -> list[dict[str, Any]]:
    return sorted((g for g in doc.data["groups"] if g["mode"] == mode), key=lambda g: g["n"])


def _cell(group: dict[str, Any], name: str, render: Callable[[dict[str, Any]], str]) -> str:
    if name in group["skipped"]:
        return "skipped"
    res = group["methods"].get(name)
    if res is None:
        return ""
    return "OOM" if res["oom"] else render(res)


def _method_names(doc: Doc, mode: str) -> list[str]:
    return [name for name, m in doc.data["methods"].items() if mode == "forward" or m["trainable"]]


def _time_table(doc: Doc, mode: str) -> list[str]:
    names = _method_names(doc, mode)
    labels = [doc.data["methods"][n]["label"] for n in names]

    def time_iqr(res: dict[str, Any]) -> str:
        if res.get("median_s") is None:
            return "-"
        return f"{fmt_time(res['median_s'])} ±{fmt_time(res['iqr_s'] / 2)} ({res['repeats']})"

    rows = [[g["n"], *(_cell(g, n, time_iqr) for n in names)] for g in _groups(doc, mode)]
    return table(["n", *labels], rows)


def _speedup_table(doc: Doc, mode: str) -> list[str]:
    names = _method_names(doc, mode)
    labels = [doc.data["methods"][n]["label"] for n in names]
    rows = [[g["n"], *(_cell(g, n, lambda r: fmt_ratio(r.get("speedup_vs_teacher"))) for n in names)]
            for g in _groups(doc, mode)]
    return table(["n", *labels], rows)


def _memory_table(doc: Doc, mode: str) -> list[str]:
    names = _method_names(doc, mode)
    labels = [doc.data["methods"][n]["label"] for n in names]
    rows = [[g["n"], fmt_bytes(g["dense_fp32_bytes"]), *(_cell(g, n, lambda r: fmt_bytes(r.get("peak_bytes")))
                                                         for n in names)] for g in _groups(doc, mode)]
    return table(["n", "one (b,h,n,m) fp32 tensor", *labels], rows)


def _asap_name(doc: Doc) -> str | None:
    return next((n for n, m in doc.data["methods"].items() if m["family"] == "asap"), None)


def _forward_ratio(group: dict[str, Any], num: str, den: str) -> float | None:
    """``time(num) / time(den)`` from the medians of one interleaved group (None if either is missing)."""
    a, b = group["methods"].get(num), group["methods"].get(den)
    if not a or not b or not a.get("median_s") or not b.get("median_s"):
        return None
    return a["median_s"] / b["median_s"]


def operator_targets(doc: Doc) -> list[str]:
    """The speed issue's targets, with the measured figures (reported, never asserted)."""
    asap = _asap_name(doc)
    lines: list[str] = []
    forward = {g["n"]: g for g in _groups(doc, "forward")}
    if asap is None or not forward:
        return ["- No ASAP forward timings in this file."]
    for n in SPEED_TARGET["calls_at"]:
        group = forward.get(n)
        calls = _forward_ratio(group, asap, "softmax") if group else None
        if calls is not None:
            verdict = "met" if calls <= SPEED_TARGET["max_softmax_calls"] else "NOT met"
            lines.append(f"- ASAP at most {SPEED_TARGET['max_softmax_calls']:g} softmax calls at n={n}: measured "
                         f"**{calls:.2f}** ({verdict}).")
    group = forward.get(SPEED_TARGET["n"])
    for k, target in SPEED_TARGET["speedup_over"].items():
        ratio = _forward_ratio(group, _sinkhorn(k), asap) if group else None
        if ratio is not None:
            verdict = "met" if ratio >= target else "NOT met"
            lines.append(f"- ASAP at least {target:g}x faster than Sinkhorn K={k} at n={SPEED_TARGET['n']}: measured "
                         f"**{ratio:.2f}x** ({verdict}).")
    k3 = [(n, _forward_ratio(g, _sinkhorn(3), asap)) for n, g in sorted(forward.items())]
    k3 = [(n, r) for n, r in k3 if r is not None]
    if k3:
        losses = [f"n={n} ({r:.2f}x)" for n, r in k3 if r <= 1]
        lines.append("- ASAP faster than Sinkhorn truncated to K=3 at every n: "
                     + ("**met** (" if not losses else "**NOT met**, slower or equal at " + ", ".join(losses) + "; ")
                     + "speed-ups " + ", ".join(f"n={n}: {r:.2f}x" for n, r in k3) + (")" if not losses else "") + ".")
    padded = doc.data["config"].get("padding", 0)
    group = forward.get(MEMORY_TARGET_N)
    res = group["methods"].get(asap) if group else None
    if res and res.get("peak_bytes") is not None:
        dense = group["dense_fp32_bytes"]
        share = res["peak_bytes"] / dense
        limit = "" if not padded else f" (target for padded inputs: under 1/8: {'met' if share < 1 / 8 else 'NOT met'})"
        lines.append(
            f"- Memory: ASAP's peak extra memory at n={MEMORY_TARGET_N}{' with padding' if padded else ''} is "
            f"**{fmt_bytes(res['peak_bytes'])}**, {100 * share:.1f} % of one (b,h,n,m) fp32 tensor "
            f"({fmt_bytes(dense)}){limit}; teacher: "
            f"{fmt_bytes(group['methods'].get(doc.data['teacher'], {}).get('peak_bytes'))}."
        )
    return lines


def _series(groups: list[dict[str, Any]], name: str, key: str) -> list[tuple[int, dict[str, Any]]]:
    """``(n, result)`` of one method over the groups where it ran and ``key`` was measured."""
    return [(g["n"], g["methods"][name]) for g in groups
            if name in g["methods"] and not g["methods"][name]["oom"] and g["methods"][name].get(key) is not None]


def plot_operators(doc: Doc, out_dir: Path) -> list[Path]:
    """Median time and peak memory against sequence length (log-log), forward and forward + backward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = Path(doc.rel).stem
    paths = []
    for quantity, ylabel in (("time", "median time (s)"), ("memory", "peak memory (MiB)")):
        modes = [m for m in ("forward", "forward_backward") if _groups(doc, m)]
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            groups = _groups(doc, mode)
            for name in _method_names(doc, mode):
                label = doc.data["methods"][name]["label"]
                pts = _series(groups, name, "median_s" if quantity == "time" else "peak_bytes")
                if not pts:
                    continue
                xs = [n for n, _ in pts]
                if quantity == "time":
                    ys = [r["median_s"] for _, r in pts]
                    iqr = [[r["median_s"] - r["q1_s"] for _, r in pts], [r["q3_s"] - r["median_s"] for _, r in pts]]
                    ax.errorbar(xs, ys, yerr=iqr, marker="o", capsize=3, label=label)
                else:
                    ax.plot(xs, [r["peak_bytes"] / 2**20 for _, r in pts], marker="o", label=label)
            if quantity == "memory":
                ax.plot([g["n"] for g in groups], [g["dense_fp32_bytes"] / 2**20 for g in groups], "k--",
                        label="one (b,h,n,m) fp32 tensor")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length n = m")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{mode.replace('_', ' + ')}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        machine = doc.data.get("machine", {})
        cfg = doc.data["config"]
        hardware = machine.get("cpu_model") if cfg["device"] == "cpu" else (machine.get("gpu") or {}).get("name")
        fig.suptitle(f"{stem}: b={cfg['batch']}, h={cfg['heads']}, d={cfg['head_dim']}, {cfg['dtype']}, {hardware}")
        fig.tight_layout()
        path = out_dir / f"{stem}_{quantity}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _verification_table(records: list[dict[str, Any]]) -> list[str]:
    rows = []
    for record in records:
        errors = record["errors"]
        grads = [err for key, err in errors.items() if key.startswith("grad")]
        rows.append([record["method"], f"{errors['output']:.1e}", f"{max(grads):.1e}" if grads else "-",
                     "yes" if record["passed"] else "NO"])
    return table(["method", "output", "worst gradient", "passed"], rows)


def _operator_header(doc: Doc) -> list[str]:
    """Where, how and what was measured: machine, load, command, shapes, methods, verification."""
    data, cfg = doc.data, doc.data["config"]
    lines = [f"### `{doc.rel}` ({cfg['device']}, {cfg['dtype']})", "", machine_line(data.get("machine")), ""]
    after = data.get("machine_after", {}).get("load_average")
    if after:
        duration = f"; the run took {data['duration_s']:.0f} s" if data.get("duration_s") is not None else ""
        lines += [f"Load average at the end: {after[0]:.2f} (1-minute){duration}. On a shared machine absolute "
                  "times are noisy; ratios come from interleaved runs.", ""]
    lines += [f"Command: `{data.get('command') or 'not recorded'}`", ""]
    padding = cfg.get("padding", 0)
    threads = (data.get("machine") or {}).get("torch_threads")
    lines += [f"Shapes: b={cfg['batch']}, h={cfg['heads']}, d={cfg['head_dim']}, n=m in "
              f"{', '.join(str(n) for n in cfg['lengths'])}; eps={cfg['eps']}; "
              + (f"padding: {100 * padding:.0f} % of the tokens on average, passed as (b, n) token masks "
                 "(the softmax row is masked softmax); " if padding else "unpadded; ")
              + (f"{threads} torch threads; " if threads else "")
              + f"ASAP map extras: {', '.join(cfg.get('extra_features') or []) or 'none'}; "
              f"teacher: {data['methods'][data['teacher']]['label']}; methods interleaved round-robin, each timed "
              f"up to {cfg['repeats']} times per shape (fewer when its calls would exceed {cfg['budget_s']} s; the "
              "count is in brackets); memory measured on the first (warm-up) call.", ""]
    lines += ["Methods:", ""]
    lines += [f"- **{m['label']}** (`{name}`): {m['description']}." for name, m in data["methods"].items()]
    lines += [f"- **{family}: not available**: {reason}" for family, reason in data.get("unavailable", {}).items()]
    lines += ["", "Verification against the fp64 references before timing (max error / max(1, max |ref|)):", ""]
    return lines + _verification_table(data.get("verification", [])) + [""]


def render_operators(docs: list[Doc], results_dir: Path) -> Rendered:
    """Per operator-benchmark JSON: header, targets, time / speed-up / memory tables per mode, and two plots."""
    out = Rendered()
    for doc in docs:
        out.lines += _operator_header(doc)
        out.lines += ["**Targets** (reported, not asserted):", ""] + operator_targets(doc) + [""]
        for mode, title in (("forward", "Forward (inference, `torch.no_grad`)"),
                            ("forward_backward", "Forward + backward (trainable methods)")):
            if not _groups(doc, mode):
                continue
            out.lines += [f"#### {title}: median time ± half the IQR (timed calls)", ""] + _time_table(doc, mode)
            out.lines += ["", f"#### {title}: speed-up over the teacher (same run)", ""] + _speedup_table(doc, mode)
            out.lines += ["", f"#### {title}: peak memory", ""] + _memory_table(doc, mode) + [""]
        skipped = {reason for g in doc.data["groups"] for reason in g["skipped"].values()}
        if skipped:
            out.lines += ["Skipped cells: " + "; ".join(sorted(skipped)) + ".", ""]
        plots = plot_operators(doc, doc.path.parent)
        out.plots += plots
        out.lines += [f"![{p.stem}]({p.relative_to(results_dir).as_posix()})" for p in plots] + [""]
    return out


# ------------------------------------------------------------------------------------------------ training cost


def render_training_cost(docs: list[Doc], results_dir: Path) -> Rendered:
    """Tables of :func:`asap.bench.training_cost.run_training_cost` output: per shape, time/step and memory."""
    out = Rendered()
    for doc in docs:
        data = doc.data
        out.lines += [f"### `{doc.rel}`", "", machine_line(data.get("machine")), ""]
        out.lines += [f"Command: `{_recorded_command(doc) or 'not recorded'}`", ""]
        cfg = data.get("config", {})
        out.lines += [f"Step: {cfg.get('step', '?')}; depth {cfg.get('depth', '?')}; {cfg.get('repeats', '?')} "
                      f"measured rounds. Memory: {data.get('memory_measure', 'not described')}.", ""]
        for shape, methods in data.get("results", {}).items():
            refs = sorted({r for entry in methods.values() for r in entry.get("time_ratio_to", {})})
            header = ["method", "time / step", "memory", *(f"time vs {r}" for r in refs),
                      *(f"memory vs {r}" for r in refs)]
            rows = [[label, fmt_time(e.get("median_seconds")), fmt_bytes(e.get("median_memory_bytes")),
                     *(fmt_ratio(e.get("time_ratio_to", {}).get(r)) for r in refs),
                     *(fmt_ratio(e.get("memory_ratio_to", {}).get(r)) for r in refs)] for label, e in methods.items()]
            out.lines += [f"Shape `{shape}`:", ""] + table(header, rows) + [""]
    return out


# ---------------------------------------------------------------------------------------------- compiled layers


def _truncated_key(accuracy: dict[str, Any]) -> str | None:
    return next((k for k in accuracy if method_of(k) == "sinkhorn"), None)


def _mean_ms(record: dict[str, Any], name: str) -> float | None:
    """Mean over compiled layers of one operator call's median milliseconds (``ms_<name>`` of the layer summary)."""
    values = [row[f"ms_{name}"] for row in record.get("layers", []) if row.get(f"ms_{name}") is not None]
    return sum(values) / len(values) if values else None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _compile_row(record: dict[str, Any]) -> list[str]:
    acc = record.get("accuracy", {})
    trunc = _truncated_key(acc)
    ms_teacher, ms_asap = _mean_ms(record, "teacher"), _mean_ms(record, "asap")
    speedup = ms_teacher / ms_asap if ms_teacher and ms_asap else None
    return [_pct(acc.get("teacher")), _pct(acc.get("asap")), _pct(acc.get(trunc)) if trunc else "-",
            _pct(record.get("asap_fraction_of_teacher")), _scalar(record.get("mean_r2_held_out")),
            _scalar(record.get("mean_row_tv_asap")), _scalar(record.get("mean_row_tv_truncated")),
            fmt_ratio(speedup)]


COMPILE_HEADER = ["teacher acc %", "ASAP acc %", "truncated acc %", "ASAP / teacher %", "dual fit R2 (held out)",
                  "row TV ASAP", "row TV truncated", "operator speed-up (teacher ms / ASAP ms)"]


def _teacher_text(doc: Doc) -> str:
    att = doc.data.get("teacher_attention") or {}
    opts = att.get("options", {})
    return (f"{doc.data.get('dataset', '?')}: teacher {att.get('method', '?')} "
            f"K={opts.get('n_iters', '?')}, eps={opts.get('eps', '?')}; {doc.data.get('num_sinkhorn_layers', '?')} "
            f"Sinkhorn layers; accuracy on {doc.data.get('eval_examples', '?')} {doc.data.get('eval_split', '?')} "
            "examples")


def plot_accuracy_vs_cost(docs: list[Doc], path: Path) -> Path | None:
    """Accuracy against the mean time of one attention call: teacher, truncated Sinkhorn and ASAP, per result."""
    points = []
    for doc in docs:
        records = doc.data.get("results") if doc.data.get("experiment") == "frozen_layer" else [doc.data]
        if doc.data.get("experiment") not in ("frozen_layer", "downstream_replacement"):
            continue
        for index, record in enumerate(records or []):
            acc = record.get("accuracy", {})
            trunc = _truncated_key(acc)
            tag = f"{doc.data.get('dataset', '?')} {doc.data['experiment']}" + (
                f" layer {index}" if doc.data["experiment"] == "frozen_layer" else "")
            for name, key in (("teacher", "teacher"), ("truncated", trunc), ("asap", "asap")):
                ms = _mean_ms(record, name)
                if key and acc.get(key) is not None and ms is not None:
                    points.append((tag, name, ms, 100 * acc[key]))
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"teacher": "s", "truncated": "^", "asap": "o"}
    for tag in dict.fromkeys(p[0] for p in points):
        pts = [p for p in points if p[0] == tag]
        line = ax.plot([p[2] for p in pts], [p[3] for p in pts], ":", alpha=0.5)[0]
        for _, name, ms, acc in pts:
            ax.scatter([ms], [acc], marker=markers[name], color=line.get_color(), label=f"{tag}: {name}")
    ax.set_xscale("log")
    ax.set_xlabel("time of one attention call, mean over compiled layers (ms)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_compile(docs: list[Doc], results_dir: Path) -> Rendered:
    """Frozen-layer, downstream-replacement and ablation results of :mod:`asap.bench.compile_experiments`."""
    out = Rendered()
    known = [d for d in docs if d.data.get("experiment") or d.data.get("ablation")]
    downstream = [d for d in known if d.data.get("experiment") == "downstream_replacement"]
    frozen = [d for d in known if d.data.get("experiment") == "frozen_layer"]
    ablations = [d for d in known if d.data.get("ablation")]
    if downstream:
        out.lines += ["### Downstream replacement: every Sinkhorn layer compiled, no retraining", ""]
        out.lines += table(["result", *COMPILE_HEADER], [[f"`{d.rel}`", *_compile_row(d.data)] for d in downstream])
        out.lines += [""] + [f"- `{d.rel}`: {_teacher_text(d)}. Command: `{_recorded_command(d) or 'not recorded'}`"
                             for d in downstream] + [""]
    if frozen:
        out.lines += ["### Frozen-layer benchmark: one layer compiled at a time", ""]
        rows = [[f"`{d.rel}`", i, *_compile_row(r)] for d in frozen for i, r in enumerate(d.data.get("results", []))]
        out.lines += table(["result", "layer", *COMPILE_HEADER], rows)
        out.lines += [""] + [f"- `{d.rel}`: {_teacher_text(d)}. Command: `{_recorded_command(d) or 'not recorded'}`"
                             for d in frozen] + [""]
    for d in ablations:
        varied = d.data.get("varied", "?")
        out.lines += [f"### Ablation `{d.data['ablation']}` (varies `{varied}`): `{d.rel}`", ""]
        rows = [[_scalar(r.get("value")), *_compile_row(r)] for r in d.data.get("results", [])]
        out.lines += table([varied, *COMPILE_HEADER], rows)
        out.lines += ["", f"{_teacher_text(d)}. Command: `{_recorded_command(d) or 'not recorded'}`", ""]
    plot = plot_accuracy_vs_cost(known, results_dir / "compile" / "accuracy_vs_cost.png")
    if plot is not None:
        out.plots.append(plot)
        out.lines += [f"![accuracy vs inference cost]({plot.relative_to(results_dir).as_posix()})", ""]
    rest = [d for d in docs if d not in known]
    if rest:
        out.lines += render_generic(rest, results_dir).lines
    return out


# ------------------------------------------------------------------------------------------------ accuracy table

ACCURACY_SCHEMA = "asap.bench.accuracy/1"
FROZEN_LAYER_SCHEMA = "asap.bench.frozen_layer/1"


def _method_kind(doc: Doc, method: str) -> str:
    teacher = _sinkhorn(doc.data.get("teacher_iters"))
    if method == "asap":
        return f"compiled from {teacher}"
    if method_of(method) == "sinkhorn" and method != teacher:
        return f"{teacher} truncated at inference"
    return "trained" + (" (teacher)" if method == teacher else "")


def _mean_std(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "-"
    std = summary.get("std")
    return f"{100 * summary['mean']:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _accuracy_rows(doc: Doc) -> list[list[Any]]:
    data = doc.data
    inference = data.get("inference") or {}
    ms = inference.get("median_ms", {})
    soft, teacher = ms.get("softmax"), ms.get(_sinkhorn(data.get("teacher_iters")))
    rows = []
    for method in data.get("methods", []):
        seeds = [data["per_seed"][str(s)].get(method, {}) for s in data.get("seeds", [])]
        values = " / ".join(_pct(r.get("accuracy")) for r in seeds)
        agree = [r["agreement_with_teacher"] for r in seeds if r.get("agreement_with_teacher") is not None]
        m = ms.get(method)
        rows.append([f"`{method}`", _method_kind(doc, method), _mean_std(data.get("summary", {}).get(method)), values,
                     _pct(sum(agree) / len(agree)) if agree else "-", "-" if m is None else f"{m:.1f}",
                     fmt_ratio(m / soft) if m and soft else "-", fmt_ratio(m / teacher) if m and teacher else "-"])
    return rows


def plot_accuracy_table(docs: list[Doc], path: Path) -> Path | None:
    """One panel per data set: mean test accuracy (± std over seeds) against inference time relative to softmax."""
    docs = [d for d in docs if (d.data.get("inference") or {}).get("median_ms", {}).get("softmax")]
    if not docs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(docs), figsize=(4.2 * len(docs), 3.8), squeeze=False)
    for ax, doc in zip(axes[0], docs):
        ms = doc.data["inference"]["median_ms"]
        for method in doc.data["methods"]:
            summary = doc.data["summary"].get(method)
            if method not in ms or not summary:
                continue
            ax.errorbar([ms[method] / ms["softmax"]], [100 * summary["mean"]], yerr=[100 * (summary["std"] or 0)],
                        marker="o", capsize=3, linestyle="none", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("inference time / softmax (same batch)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{doc.data['dataset']} ({len(doc.data['seeds'])} seeds)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_accuracy(docs: list[Doc], results_dir: Path) -> Rendered:
    """The accuracy table of :mod:`asap.bench.accuracy`: one table per data set, and the accuracy-vs-cost plot."""
    out = Rendered()
    for doc in docs:
        data = doc.data
        train = data.get("train", {})
        inference = data.get("inference") or {}
        text = len(inference.get("input_shape") or []) == 2  # (batch, tokens); images are (batch, c, h, w)
        keys = ("preset", "dim", "depth", "num_heads", "patch_size", "max_length", "vocab_size", "limit", "epochs",
                "batch_size", "lr")
        budget = ", ".join(f"{k} {train[k]}" for k in keys if train.get(k) is not None
                           and (text or k not in ("max_length", "vocab_size")))  # fmt: skip
        out.lines += [f"### {data['dataset']}: `{doc.rel}`", "",
                      f"{data.get('note', '')} Same budget for every trained method: {budget}; Sinkhorn eps "
                      f"{data.get('eps')}. Seeds: {', '.join(str(s) for s in data.get('seeds', []))}.", ""]
        out.lines += table(["method", "how obtained", "test accuracy % (mean ± std)", "per seed",
                            "agrees with teacher %", "inference ms", "time / softmax", "time / teacher"],
                           _accuracy_rows(doc))  # fmt: skip
        out.lines += ["", f"Inference time: the median forward time of each whole model (seed "
                          f"{inference.get('seed', '?')}) on the same {inference.get('batch', '?')} test examples "
                          f"(input {inference.get('input_shape', '?')}), timed round-robin in one run.",
                      "", machine_line(data.get("machine")), "", f"Command: `{_recorded_command(doc) or 'not recorded'}`",
                      ""]  # fmt: skip
    plot = plot_accuracy_table(docs, results_dir / "accuracy" / "accuracy_vs_cost.png")
    if plot is not None:
        out.plots.append(plot)
        out.lines += [f"![accuracy vs inference cost]({plot.relative_to(results_dir).as_posix()})", ""]
    return out


def frozen_layer_target(record: dict[str, Any], reference: str) -> str:
    """One line: ASAP's measured speed-up over ``reference`` on this layer's real inputs, against the goal."""
    ratio = record.get("speedup_of_asap_over", {}).get(reference)
    if ratio is None:
        return f"{reference}: not timed"
    verdict = "met" if ratio >= TEACHER_SHAPE_SPEEDUP else "NOT met"
    return f"{ratio:.2f}x over {reference}: {TEACHER_SHAPE_SPEEDUP:g}x goal at the teacher's shape {verdict}"


def render_frozen_layer(docs: list[Doc], results_dir: Path) -> Rendered:
    """``asap bench frozen-layer``: per layer, accuracy of teacher / ASAP / truncated and the speed ratios."""
    out = Rendered()
    for doc in docs:
        data = doc.data
        ref, trunc = _sinkhorn(data["reference_iters"]), _sinkhorn(data["truncated_iters"])
        rows = []
        for r in data["layers"]:
            acc, agree, ms = r["accuracy"], r["agreement_with_teacher"], r["median_ms"]
            teacher = _sinkhorn(r["teacher_iters"])
            shape = r["shape"]["q"]
            rows.append([r["layer"], f"{shape[0]}x{shape[1]}x{shape[2]}" + (" (padded)" if r.get("padded") else ""),
                         _pct(acc["teacher"]), _pct(acc["asap"]), _pct(acc.get(trunc)), _pct(agree["asap"]),
                         _pct(agree.get(trunc)),
                         *(f"{ms[k]:.2f}" if k in ms else "-" for k in ("asap", teacher, ref, trunc, "softmax")),
                         fmt_ratio(r["speedup_of_asap_over"].get(ref)), fmt_ratio(r["speedup_of_asap_over"].get(teacher)),
                         fmt_ratio(ms["asap"] / ms["softmax"]) if ms.get("softmax") else "-"])  # fmt: skip
        teacher_k = data["layers"][0]["teacher_iters"] if data["layers"] else "?"
        out.lines += [f"### {data['dataset']}: `{doc.rel}`", "",
                      f"Teacher `{data['run_dir']}` (Sinkhorn K={teacher_k}); accuracy on {data['eval_examples']} "
                      f"{data['eval_split']} examples; ASAP calibrated on {data['calibration_examples']} training "
                      f"examples; times are one call of the layer's attention on the q, k, v it receives for "
                      f"{data['timing_batch']} test examples (b x h x n), median of a round-robin run.", ""]
        out.lines += table(["layer", "b x h x n", "teacher %", "ASAP %", f"K={data['truncated_iters']} %",
                            "ASAP agrees %", f"K={data['truncated_iters']} agrees %", "ms ASAP",
                            f"ms K={teacher_k} (teacher)", f"ms K={data['reference_iters']}",
                            f"ms K={data['truncated_iters']}", "ms softmax", f"ASAP speed-up over K={data['reference_iters']}",
                            f"over K={teacher_k}", "ASAP time / softmax"], rows)  # fmt: skip
        out.lines += [""] + [f"- Layer {r['layer']}: {frozen_layer_target(r, ref)}." for r in data["layers"]]
        out.lines += ["", machine_line(data.get("machine")), "", f"Command: `{_recorded_command(doc) or 'not recorded'}`", ""]
    return out


# ---------------------------------------------------------------------------------- fidelity plane, ASAP paths

FIDELITY_SCHEMA = "asap.bench.fidelity/1"
ASAP_PATHS_SCHEMA = "asap.scripts.asap_paths/1"


def render_fidelity(docs: list[Doc], results_dir: Path) -> Rendered:
    """``asap bench fidelity``: per layer, row TV to the teacher and ms per call of ASAP (+j steps) and truncation."""
    out = Rendered()
    for doc in docs:
        data = doc.data
        src = data["source"]
        what = (f"`{src.get('path')}` converted to Sinkhorn, {src.get('dataset')} {src.get('split')} texts of at most "
                f"{src.get('max_length')} tokens" if src.get("kind") == "hf" else f"run `{src.get('run_dir')}`")
        out.lines += [f"### `{doc.rel}`", "",
                      f"Teacher: {what}. Maps fitted on {data['calibration_examples']} examples, figures on "
                      f"{data['held_out_examples']} held-out ones: mean row total variation to the teacher's attention "
                      "over valid queries; time: one call on one held-out batch (b x h x n), interleaved medians. "
                      "`asap_L{L}_j{j}` is ASAP with L slices and j extra Sinkhorn half-steps; `sinkhorn_K{K}` is the "
                      "teacher stopped after K half-steps.", ""]  # fmt: skip
        for layer in data["layers"]:
            pts = sorted(layer["points"], key=lambda p: (p["ms"] or 0))
            r2 = {L: sum(m["r2_held_out"]) / len(m["r2_held_out"]) for L, m in layer["maps"].items()}
            wins = layer["verdict"]["asap_points_on_front"]
            verdict = ("ASAP beats truncation here: " + "; ".join(
                f"{w['asap']} " + (f"is more faithful than {w['beats']} at no more time" if w["beats"]
                                   else "is faster than every truncation") for w in wins)
                if wins else "ASAP does NOT beat truncation on this layer: every ASAP point is slower or less "
                "faithful than some truncated Sinkhorn of at most its time")  # fmt: skip
            shape = "x".join(str(x) for x in layer["shape"][:3])
            out.lines += [f"**Layer {layer['layer']}** (`{layer['name']}`, teacher K={layer['teacher_iters']}, "
                          f"{shape}; held-out R2 of the fit: "
                          + ", ".join(f"L={L}: {v:.3f}" for L, v in r2.items()) + f"). {verdict}.", ""]
            out.lines += table(["method", "row TV", "column error", "ms per call"],
                               [[p["method"], f"{p['row_tv']:.4f}", f"{p['col_err']:.4f}",
                                 "-" if p["ms"] is None else f"{p['ms']:.2f}"] for p in pts]) + [""]
        png = doc.path.with_suffix(".png")
        if png.is_file():
            out.lines += [f"![fidelity plane]({png.relative_to(results_dir).as_posix()})", ""]
        out.lines += [machine_line(data.get("machine")), "", f"Command: `{data.get('command') or 'not recorded'}`", ""]
    return out


def render_asap_paths(docs: list[Doc], results_dir: Path) -> Rendered:
    """``scripts/bench_asap_paths.py``: the closure backends, the dual map and the whole operator, in softmax calls."""
    out = Rendered()
    for doc in docs:
        rows = doc.data["rows"]
        names = [n for n in rows[0]["softmax_calls"] if n != "softmax"]
        out.lines += [f"### `{doc.rel}`", "", "Cost in softmax calls (softmax on the same unpadded inputs = 1); "
                      "padded rows give every method the (b, n) token mask. These measurements set "
                      "`asap_attention(backend='auto')`: the shared-exponential closure unpadded, the two-pass "
                      "closure padded.", ""]  # fmt: skip
        out.lines += table(["b x h x n x d", "padded", "softmax ms", *names],
                           [[f"{r['b']}x{r['h']}x{r['n']}x{r['d']}", "yes" if r["padded"] else "no",
                             f"{r['softmax_ms']:.3f}", *(f"{r['softmax_calls'][n]:.2f}" for n in names)]
                            for r in rows])  # fmt: skip
        out.lines += ["", machine_line(doc.data.get("machine")), "", f"Command: `{doc.data.get('command')}`", ""]
    return out


# ---------------------------------------------------------------------------------------------- Triton on GPU

TRITON_GPU_SCHEMA = "asap.scripts.bench_triton_gpu/1"
# columns of the GPU table: the whole ASAP operator (dual map + closure) on each path, its closure alone, the baselines
TRITON_GPU_METHODS = ("sdpa", "asap_triton", "asap_l16_triton", "asap_l16_torch", "sinkhorn_k3", "sinkhorn_k5",
                      "sinkhorn_k11", "sinkhorn_k21")


def _triton_ms(setting: dict[str, Any], name: str) -> str:
    res = setting["methods"].get(name)
    if res is None:
        return "-"
    return "OOM" if res.get("oom") else f"{res['median_s'] * 1e3:.2f}"


def _triton_ratio(setting: dict[str, Any], num: str, den: str) -> float | None:
    a, b = setting["methods"].get(num), setting["methods"].get(den)
    if not a or not b or a.get("oom") or b.get("oom") or not a.get("median_s") or not b.get("median_s"):
        return None
    return a["median_s"] / b["median_s"]


def plot_triton_gpu(doc: Doc, path: Path) -> Path:
    """Median time against n (log-log), one panel per (dtype, padding): the ASAP paths against SDPA and Sinkhorn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(s["dtype"], s["padded"]) for s in doc.data["settings"]})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (dtype, padded) in zip(axes[0], panels):
        settings = sorted((s for s in doc.data["settings"] if (s["dtype"], s["padded"]) == (dtype, padded)),
                          key=lambda s: s["n"])
        for name in TRITON_GPU_METHODS:
            pts = [(s["n"], s["methods"][name]["median_s"] * 1e3) for s in settings
                   if name in s["methods"] and not s["methods"][name].get("oom")]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name, linestyle="--" if name.startswith("sinkhorn") else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n = m")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{dtype}, {'padded' if padded else 'unpadded'}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    gpu = (doc.data.get("machine") or {}).get("gpu") or {}
    b, h, _, d = doc.data["settings"][0]["shape"]
    fig.suptitle(f"ASAP on GPU: b={b}, h={h}, d={d}, {gpu.get('name', 'GPU')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_triton_gpu(docs: list[Doc], results_dir: Path) -> Rendered:
    """``scripts/bench_triton_gpu.py``: Triton ASAP against SDPA, the PyTorch path and the teacher, per dtype and n."""
    out = Rendered()
    for doc in docs:
        data = doc.data
        teacher = data.get("teacher", _sinkhorn(21))
        out.lines += [
            f"### `{doc.rel}`", "",
            "Forward pass under `torch.inference_mode()`, methods interleaved round-robin (CUDA events, medians). "
            "`asap_triton`: the two Triton kernels from a given dual `f_hat`; `asap_l16_triton` / `asap_l16_torch`: "
            "the whole operator (L = 16 slice dual map, then the Triton kernels / the PyTorch two-pass closure); "
            "`sinkhorn_kK`: Sinkhorn truncated to K half-steps. Padded settings: lengths from n down to about 0.6 n "
            "over the batch. A setting's Triton path is timed only after it passed the parity check (against the "
            "fp64 reference by the low-precision rule for n <= "
            f"{data['config'].get('verify_max_length', '?')}, against the PyTorch path above).", "",
        ]  # fmt: skip
        rows = []
        for s in data["settings"]:
            parity = s.get("parity") or {}
            over_teacher = _triton_ratio(s, teacher, "asap_l16_triton")
            over_k3 = _triton_ratio(s, _sinkhorn(3), "asap_l16_triton")
            calls = _triton_ratio(s, "asap_l16_triton", "sdpa")
            rows.append([s["dtype"], s["n"], "yes" if s["padded"] else "no",
                         *(_triton_ms(s, m) for m in TRITON_GPU_METHODS),
                         fmt_ratio(over_teacher), fmt_ratio(over_k3), "-" if calls is None else f"{calls:.2f}",
                         "passed" if parity.get("passed") else ("not run" if not parity else "FAILED")])
        out.lines += ["Median time in ms, then the whole Triton operator's speed-up over the teacher "
                      f"(`{teacher}`) and over K = 3, and its cost in SDPA calls:", ""]
        out.lines += table(["dtype", "n", "padded", *TRITON_GPU_METHODS, f"over {teacher}", "over K=3",
                            "SDPA calls", "parity"], rows)
        slower = []
        for s in data["settings"]:
            ratio = _triton_ratio(s, _sinkhorn(3), "asap_l16_triton")
            if ratio is None or ratio <= 1.0:
                where = f"{s['dtype']} n={s['n']}{' padded' if s['padded'] else ''}"
                slower.append(f"{where} (not timed)" if ratio is None else f"{where} ({ratio:.2f}x)")
        out.lines += ["", "Where the whole Triton operator is NOT faster than Sinkhorn truncated to K = 3: "
                      + (", ".join(slower) if slower else "nowhere in this run") + ".", ""]
        plot = plot_triton_gpu(doc, doc.path.with_suffix(".png"))
        out.plots.append(plot)
        out.lines += [f"![ASAP on GPU]({plot.relative_to(results_dir).as_posix()})", "",
                      machine_line(data.get("machine")), "", f"Command: `{_recorded_command(doc) or 'not recorded'}`",
                      ""]  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------- reliability

RELIABILITY_SCHEMA = "asap.scripts.reliability_probe/1"


def render_reliability(docs: list[Doc], results_dir: Path) -> Rendered:
    """``scripts/reliability_probe.py``: how many bad inputs each surface was given and how each was answered."""
    out = Rendered()
    for doc in docs:
        data = doc.data
        outcomes = data.get("outcomes") or ["exit_2", "refused", "correct", "WRONG"]
        counts = data["counts"]
        out.lines += [
            f"### `{doc.rel}`", "",
            "Bad or unusual inputs thrown at each surface, and how each was answered: `exit_2` = one line on "
            "stderr naming the problem, exit status 2, nothing written; `refused` = a named error with a one-line "
            "message; `correct` = a valid input in an odd form (layout, empty dimension, fp16/bf16) whose result "
            "matches the fp64 reference; `WRONG` = anything else (a wrong result, a bad input accepted, a raw "
            "Python error, a traceback, a file written).", "",
        ]  # fmt: skip
        rows = [[surface, sum(c.values()), *(c.get(o, 0) for o in outcomes)] for surface, c in counts.items()]
        rows.append(["**all**", data["total"], *(sum(c.get(o, 0) for c in counts.values()) for o in outcomes)])
        out.lines += table(["surface", "inputs", *outcomes], rows)
        unexpected = data.get("unexpected") or []
        out.lines += ["", f"{data['as_expected']} of {data['total']} inputs answered as expected"
                      + (" (every bad input refused, every valid one computed correctly)." if not unexpected
                         else f"; {len(unexpected)} NOT as expected:"), ""]  # fmt: skip
        out.lines += [f"- {u['surface']}: {u['input']} -> {u['outcome']} ({u['message']})" for u in unexpected[:20]]
        if len(unexpected) > 20:
            out.lines.append(f"- ... {len(unexpected) - 20} more in the JSON")
        out.lines += [*([""] if unexpected else []), machine_line(data.get("machine")), "",
                      f"Command: `{_recorded_command(doc) or 'not recorded'}`", ""]  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------------ teachers


def _sibling_json(doc: Doc, name: str) -> dict[str, Any]:
    path = doc.path.parent / name
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _attention_text(attention: dict[str, Any]) -> str:
    opts = attention.get("options", {})
    extra = ", ".join(f"{k}={v}" for k, v in opts.items())
    return f"{attention.get('method', '?')}" + (f" ({extra})" if extra else "")


def render_teachers(docs: list[Doc], results_dir: Path) -> Rendered:
    """Test accuracy of the trained models (``eval_<split>.json`` of each run, its ``config.json`` for the size)."""
    rows = []
    for doc in docs:
        data = doc.data
        model = _sibling_json(doc, "config.json").get("model", {})
        size = ", ".join(f"{key} {model[key]}" for key in ("dim", "depth", "num_heads", "max_length", "image_size")
                         if model.get(key) is not None)
        rows.append([f"`{Path(doc.rel).parent.as_posix()}`", data.get("dataset", "?"),
                     _attention_text(data.get("attention", {})), size or "-",
                     f"{_pct(data.get('accuracy'))} ({data.get('split', '?')}, n={data.get('num_samples', '?')})",
                     data.get("device", "?")])
    lines = table(["run", "data set", "attention", "model", "accuracy %", "device"], rows)
    lines += ["", "Each run's exact training command is in its `command.txt`; `teachers/README.md` (written by "
              "`python -m asap.train.summary`) has the training details.", ""]
    return Rendered(lines=lines)


# ---------------------------------------------------------------------------------------------- generic fallback


def _flatten(value: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    if isinstance(value, dict) and depth < 4:
        items = []
        for key, sub in value.items():
            items += _flatten(sub, f"{prefix}.{key}" if prefix else str(key), depth + 1)
        return items
    if isinstance(value, list) and value and all(not isinstance(x, (dict, list)) for x in value):
        return [(prefix, ", ".join(_scalar(x) for x in value[:8]) + (" ..." if len(value) > 8 else ""))]
    if isinstance(value, (dict, list)):
        return [(prefix, f"({type(value).__name__} of {len(value)})")]
    return [(prefix, _scalar(value))]


def _scalar(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def render_generic(docs: list[Doc], results_dir: Path, *, max_rows: int = 60) -> Rendered:
    """Any JSON without a dedicated renderer: its fields flattened into a key/value table."""
    out = Rendered()
    for doc in docs:
        items = [(k, v) for k, v in _flatten(doc.data) if not k.startswith("machine.")]
        out.lines += [f"### `{doc.rel}` (schema `{doc.schema or 'none'}`: generic view)", ""]
        out.lines += [machine_line(doc.data.get("machine")), ""]
        out.lines += table(["field", "value"], items[:max_rows])
        if len(items) > max_rows:
            out.lines += ["", f"({len(items) - max_rows} more fields in the JSON.)"]
        out.lines += [""]
    return out


def _recorded_command(doc: Doc) -> str | None:
    """The command that produced ``doc``: its line in ``command.txt`` beside it, else its ``command`` field.

    ``command.txt`` holds ``file.json: command`` lines (:func:`asap.io.record_command`) or, as
    the experiment driver wrote it before, for a directory holding one result, the bare command.
    Its line wins over the JSON's own field because it names the command to rerun
    (a wrapper script, the repository's paths) where the field records the process's argv.
    """
    commands = doc.path.parent / "command.txt"
    lines = [line for line in commands.read_text().splitlines() if line.strip()] if commands.exists() else []
    for line in lines:
        name, _, command = line.partition(": ")
        if name == doc.path.name:
            return command
    recorded = doc.data.get("command")
    if recorded:
        return " ".join(map(str, recorded)) if isinstance(recorded, list) else str(recorded)
    if len(lines) == 1 and not lines[0].split(" ", 1)[0].endswith(".json:"):
        return lines[0]
    return None


# --------------------------------------------------------------------------------------------- against the paper


def _best_asap_speedup(docs: list[Doc]) -> list[str]:
    lines = []
    for doc in docs:
        asap = _asap_name(doc)
        rows = [(g["n"], g["methods"][asap]["speedup_vs_teacher"]) for g in _groups(doc, "forward")
                if asap in g["methods"] and g["methods"][asap].get("speedup_vs_teacher") is not None]
        if rows:
            teacher = doc.data["methods"][doc.data["teacher"]]["label"]
            text = ", ".join(f"{x:.1f}x at n={n}" for n, x in rows)
            lines.append(f"  - ours (`{doc.rel}`, operator only, vs {teacher}): {text}.")
    return lines


def _dataset_key(name: str) -> str:
    """``"AG News"``, ``"ag_news"`` -> ``"agnews"``; ``"Cats & Dogs"`` -> ``"catsdogs"``."""
    return "".join(ch for ch in name.lower() if ch.isalnum()).replace("and", "")


def _our_accuracies(all_docs: dict[str, list[Doc]]) -> dict[str, dict[str, Any]]:
    """Data set key -> {"name": data set, method: test accuracy} from the trained models, else the compile results."""
    found: dict[str, dict[str, Any]] = {}
    for doc in all_docs.get("accuracy", []):  # first choice: the mean over seeds at one budget
        entry = found.setdefault(_dataset_key(doc.data["dataset"]), {"name": doc.data["dataset"]})
        teacher = _sinkhorn(doc.data.get("teacher_iters"))
        for method, summary in doc.data.get("summary", {}).items():
            key = "sinkhorn" if method == teacher else method
            if key in ("sinkhorn", "esp", "softmax"):
                entry.setdefault(key, summary["mean"])
    for doc in all_docs.get("teachers", []):
        name, acc = doc.data.get("dataset"), doc.data.get("accuracy")
        method = doc.data.get("attention", {}).get("method")
        if name and acc is not None and method and doc.data.get("split", "test") == "test":
            found.setdefault(_dataset_key(name), {"name": name}).setdefault(method, acc)
    for doc in all_docs.get("compile", []):
        records = doc.data.get("results") or [doc.data]
        acc = (records[0] if records else {}).get("accuracy", {}).get("teacher")
        name = doc.data.get("dataset")
        if name and acc is not None:
            found.setdefault(_dataset_key(name), {"name": name}).setdefault("sinkhorn", acc)
    return found


def render_paper(all_docs: dict[str, list[Doc]], results_dir: Path) -> Rendered:
    """The paper's claims beside our measured figures; 'not measured yet' where we have none."""
    claims = PAPER_CLAIMS
    ops = all_docs.get("operators", [])
    lines = [
        "Quoted claims: the abstract of arXiv 2605.12879 and the baseline table of a secondary source "
        "(METHOD.md sec. 7); our figures are read from the JSON above.",
        "",
        f"- **Speed**: paper: ASAP {claims['speedup_over_teacher']}x faster than its trained Sinkhorn teacher at "
        "matched accuracy (the teacher's K is not known to us).",
    ]
    speed = _best_asap_speedup(ops)
    # The compile experiments time their operators on calibration chunks (v = k) in passing; where the
    # frozen-layer benchmark exists it measures the same comparison properly, and only it is quoted.
    compiled = [] if all_docs.get("frozen_layer") else [
        d for d in all_docs.get("compile", []) if d.data.get("experiment") in ("downstream_replacement", "frozen_layer")]
    for doc in compiled:
        records = doc.data.get("results", []) if doc.data["experiment"] == "frozen_layer" else [doc.data]
        for index, record in enumerate(records):
            ms_teacher, ms_asap = _mean_ms(record, "teacher"), _mean_ms(record, "asap")
            acc = record.get("accuracy", {})
            if ms_teacher and ms_asap and acc.get("teacher") is not None and acc.get("asap") is not None:
                where = f", layer {index}" if doc.data["experiment"] == "frozen_layer" else ""
                iters = (doc.data.get("teacher_attention") or {}).get("options", {}).get("n_iters", "?")
                speed.append(f"  - ours (`{doc.rel}`{where}, {doc.data.get('dataset', '?')}, teacher K={iters}): "
                             f"operator speed-up over the teacher {ms_teacher / ms_asap:.2f}x (below 1: slower), "
                             f"accuracy {100 * (acc['asap'] - acc['teacher']):+.2f} points.")
    for doc in all_docs.get("frozen_layer", []):
        ref = _sinkhorn(doc.data["reference_iters"])
        for r in doc.data.get("layers", []):
            teacher = _sinkhorn(r["teacher_iters"])
            ratios = r.get("speedup_of_asap_over", {})
            if ratios.get(ref) is None:
                continue
            speed.append(f"  - ours (`{doc.rel}`, frozen layer {r['layer']}, {doc.data['dataset']}, "
                         f"n={r['shape']['k'][-2]}): ASAP {ratios[ref]:.2f}x faster than K={doc.data['reference_iters']}"
                         f" and {fmt_ratio(ratios.get(teacher))} than the trained K={r['teacher_iters']}, accuracy "
                         f"{100 * (r['accuracy']['asap'] - r['accuracy']['teacher']):+.2f} points.")
    lines += speed or ["  - ours: not measured yet (no operator benchmark or compile JSON)."]
    if ops:
        lines.append("  - caveat: the operator benchmark times the attention operator alone with random ASAP "
                     "coefficients against a K=21 teacher; the paper's figure is at matched accuracy against its own "
                     "teacher (compiled-layer rows, where present, are the like-for-like comparison).")
    kept = claims["accuracy_kept_in_replacement"]
    lines.append(f"- **Replacement without retraining**: paper: over {kept:.0%} of the teacher's accuracy kept.")
    kept_lines = [
        f"  - ours (`{d.rel}`, {d.data.get('dataset', '?')}): ASAP keeps "
        f"{100 * d.data['asap_fraction_of_teacher']:.1f} % of the teacher's accuracy "
        f"({_pct(d.data.get('accuracy', {}).get('asap'))} vs {_pct(d.data.get('accuracy', {}).get('teacher'))})."
        for d in all_docs.get("compile", [])
        if d.data.get("experiment") == "downstream_replacement" and d.data.get("asap_fraction_of_teacher") is not None
    ]
    lines += kept_lines or ["  - ours: not measured yet (no downstream-replacement JSON under results/compile/)."]
    lines.append("- **Training cost**: paper: ESP needs substantially more training memory and time than Sinkhorn.")
    cost_lines = []
    for doc in all_docs.get("training_cost", []):
        for shape, methods in doc.data.get("results", {}).items():
            for label, entry in methods.items():
                if entry.get("kind") != "esp":
                    continue
                for ref, t in entry.get("time_ratio_to", {}).items():
                    mem = entry.get("memory_ratio_to", {}).get(ref)
                    cost_lines.append(f"  - ours (`{doc.rel}`, shape `{shape}`): {label} takes {fmt_ratio(t)} the "
                                      f"time and {fmt_ratio(mem)} the memory of {ref} per training step.")
    lines += cost_lines or ["  - ours: not measured yet (no training-cost JSON)."]
    lines += ["- **Baseline accuracies** (Sinkformer / ESPFormer top-1 %, as listed) beside the test accuracy of "
              "our trained models (the mean over seeds of the accuracy table where it has the data set, else the "
              "trained models above; smaller models and shorter training than the paper's):", ""]
    ours = _our_accuracies(all_docs)
    methods = ("sinkhorn", "esp", "softmax")
    rows = []
    for name, (sink, esp) in claims["baseline_accuracy"].items():
        mine = ours.pop(_dataset_key(name), {})
        rows.append([name, f"{sink:.2f}", "-" if esp is None else f"{esp:.2f}",
                     *(_pct(mine.get(m)) if m in mine else "not measured yet" for m in methods)])
    rows += [[f"{mine['name']} (not in the paper)", "-", "-", *(_pct(mine.get(m)) for m in methods)]
             for mine in ours.values()]
    lines += table(["data set", "Sinkformer (paper)", "ESPFormer (paper)", "ours: Sinkhorn", "ours: ESP",
                    "ours: softmax"], rows)
    return Rendered(lines=lines + [""])


# ------------------------------------------------------------------------------------------------------ driver

SECTIONS: tuple[Section, ...] = (
    Section("operators", "Operator benchmark", ("bench/operators_*.json",), render_operators,
            "`python -m asap.bench.operators` (or `asap bench operators`)", schemas=(OPERATORS_SCHEMA,)),
    Section("training_cost", "Training cost (ESP vs Sinkhorn vs softmax)",
            ("bench/training_cost*.json", "training_cost*.json"), render_training_cost,
            "`asap bench training-cost` (or `python -m asap.bench.training_cost --out ...`)",
            schemas=(TRAINING_COST_SCHEMA,)),
    Section("compile", "Compiled layers (frozen-layer benchmark, downstream replacement, ablations)",
            ("compile/**/*.json",), render_compile,
            "`python -m asap.bench.compile_experiments RUN_DIR --out results/compile/<dataset>`", method_keys=True),
    Section("accuracy", "Accuracy table: every method at the same budget, over seeds", ("accuracy/*.json",),
            render_accuracy, "`asap bench accuracy --suite <data set>`", schemas=(ACCURACY_SCHEMA,), method_keys=True),
    Section("frozen_layer", "Frozen-layer benchmark: speed and accuracy in one layer of a trained teacher",
            ("frozen_layer/*.json",), render_frozen_layer, "`asap bench frozen-layer RUN_DIR`",
            schemas=(FROZEN_LAYER_SCHEMA,), method_keys=True),
    Section("fidelity", "Fidelity plane: ASAP with warm-start steps against truncated Sinkhorn, per layer",
            ("fidelity/*.json",), render_fidelity, "`asap bench fidelity`", schemas=(FIDELITY_SCHEMA,)),
    Section("asap_paths", "ASAP's CPU paths: closure backends, dual map, whole operator",
            ("bench/asap_paths_*.json",), render_asap_paths, "`python scripts/bench_asap_paths.py --out ...`",
            schemas=(ASAP_PATHS_SCHEMA,)),
    Section("triton_gpu", "ASAP on a GPU: Triton kernels against SDPA and Sinkhorn", ("bench/triton_gpu*.json",),
            render_triton_gpu, "`bash scripts/bench_gpu.sh` on a CUDA machine", schemas=(TRITON_GPU_SCHEMA,)),
    Section("teachers", "Trained models (teachers and baselines)", ("teachers/*/eval_*.json",), render_teachers,
            "`asap train` then `asap eval`, run folders copied under `results/teachers/`"),
    Section("reliability", "Reliability: bad inputs per surface and how each was answered",
            ("reliability/*.json",), render_reliability,
            "`python scripts/reliability_probe.py --out results/reliability/reliability.json`",
            schemas=(RELIABILITY_SCHEMA,)),
)


def load_docs(results_dir: Path, section: Section) -> tuple[list[Doc], list[str]]:
    """The section's JSON files (sorted, unique) and notes on files skipped as unreadable or of another schema."""
    docs, notes, seen = [], [], set()
    for pattern in section.patterns:
        for path in sorted(results_dir.glob(pattern)):
            if path in seen or not path.is_file():
                continue
            seen.add(path)
            rel = path.relative_to(results_dir).as_posix()
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                notes.append(f"`{rel}` could not be read ({err}); skipped.")
                continue
            doc = Doc(rel, path, (_current_method_keys(data) if section.method_keys else data)
                      if isinstance(data, dict) else {"value": data})
            if section.schemas is not None and doc.schema not in section.schemas:
                notes.append(f"`{rel}` has schema `{doc.schema}`, not {section.schemas}; skipped.")
                continue
            docs.append(doc)
    return docs, notes


def generate_report(results_dir: str | Path = "results", *, out: str | Path | None = None) -> Path:
    """Write ``<results_dir>/README.md`` (or ``out``) and the plots; returns the README path."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results directory not found: {results_dir}")
    out = Path(out) if out is not None else results_dir / "README.md"
    lines = [
        "# Results",
        "",
        "Generated by `python -m asap.bench.report` (`asap report`) from the JSON files under `results/`: "
        "do not edit by hand; rerun the generator after adding or updating a result. Each section names its "
        "JSON, the machine and the command that produced it.",
        "",
    ]
    loaded: dict[str, list[Doc]] = {}
    for section in SECTIONS:
        docs, notes = load_docs(results_dir, section)
        loaded[section.key] = docs
        lines += [f"## {section.title}", ""]
        lines += [f"> {note}" for note in notes] + ([""] if notes else [])
        if not docs:
            lines += [f"> **Not available yet**: no JSON matching {', '.join(f'`{p}`' for p in section.patterns)} "
                      f"under `results/`. Produced by {section.absent}.", ""]
            continue
        lines += section.render(docs, results_dir).lines
    lines += ["## Against the paper", ""] + render_paper(loaded, results_dir).lines
    atomic_write_text(out, "\n".join(lines).rstrip() + "\n")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=Path("results"), help="results directory (default %(default)s)")
    parser.add_argument("--out", type=Path, help="README to write (default RESULTS/README.md)")


def run_from_args(args: argparse.Namespace) -> int:
    print(f"wrote {generate_report(args.results, out=args.out)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asap.bench.report", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
