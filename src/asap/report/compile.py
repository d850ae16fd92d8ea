"""The compile experiments (:mod:`asap.bench.compile_experiments`): frozen-layer, downstream-replacement and
ablation tables, and the accuracy-against-cost plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asap.io import method_of
from asap.report.core import Doc, Rendered, fmt_ratio, pct, pyplot, save_figure, recorded_command, scalar, style_axes, table
from asap.report.generic import render_generic


def _truncated_key(accuracy: dict[str, Any]) -> str | None:
    return next((k for k in accuracy if method_of(k) == "sinkhorn"), None)


def mean_ms(record: dict[str, Any], name: str) -> float | None:
    """Mean over compiled layers of one operator call's median milliseconds (``ms_<name>`` of the layer summary)."""
    values = [row[f"ms_{name}"] for row in record.get("layers", []) if row.get(f"ms_{name}") is not None]
    return sum(values) / len(values) if values else None


def _compile_row(record: dict[str, Any]) -> list[str]:
    acc = record.get("accuracy", {})
    trunc = _truncated_key(acc)
    ms_teacher, ms_asap = mean_ms(record, "teacher"), mean_ms(record, "asap")
    speedup = ms_teacher / ms_asap if ms_teacher and ms_asap else None
    return [pct(acc.get("teacher")), pct(acc.get("asap")), pct(acc.get(trunc)) if trunc else "-",
            pct(record.get("asap_fraction_of_teacher")), scalar(record.get("mean_r2_held_out")),
            scalar(record.get("mean_row_tv_asap")), scalar(record.get("mean_row_tv_truncated")),
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
                ms = mean_ms(record, name)
                if key and acc.get(key) is not None and ms is not None:
                    points.append((tag, name, ms, 100 * acc[key]))
    if not points:
        return None
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"teacher": "s", "truncated": "^", "asap": "o"}
    for tag in dict.fromkeys(p[0] for p in points):
        pts = [p for p in points if p[0] == tag]
        line = ax.plot([p[2] for p in pts], [p[3] for p in pts], ":", alpha=0.5)[0]
        for _, name, ms, acc in pts:
            ax.scatter([ms], [acc], marker=markers[name], color=line.get_color(), label=f"{tag}: {name}")
    style_axes(ax, xlabel="time of one attention call, mean over compiled layers (ms)", ylabel="test accuracy (%)")
    return save_figure(fig, path)


def _whole_model_line(doc: Doc) -> str | None:
    """The whole model's forward, every layer compiled (and truncated), against the teacher's: one bullet."""
    timing = doc.data.get("whole_model")
    if not timing:
        return None
    rows = timing["models"]
    label = lambda name: "ASAP" if name == "asap" else f"Sinkhorn K={name.rsplit('_k', 1)[-1]}"  # noqa: E731
    cells = ", ".join(f"{label(name)} {row['model_ms']:.1f} ms ({row['model_speedup']:.2f}x)"
                      for name, row in rows.items() if name != "teacher")
    return (f"- `{doc.rel}`: whole model, every Sinkhorn layer replaced (median of {timing['rounds']} interleaved "
            f"rounds, {timing['threads']} torch thread(s), speed-up over the teacher's "
            f"{rows['teacher']['model_ms']:.1f} ms in brackets): {cells}.")


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
        out.lines += [""] + [f"- `{d.rel}`: {_teacher_text(d)}. Command: `{recorded_command(d) or 'not recorded'}`"
                             for d in downstream] + [""]
        out.lines += [line for d in downstream if (line := _whole_model_line(d))]
        out.lines += [""] if any(d.data.get("whole_model") for d in downstream) else []
    if frozen:
        out.lines += ["### Frozen-layer benchmark: one layer compiled at a time", ""]
        rows = [[f"`{d.rel}`", i, *_compile_row(r)] for d in frozen for i, r in enumerate(d.data.get("results", []))]
        out.lines += table(["result", "layer", *COMPILE_HEADER], rows)
        out.lines += [""] + [f"- `{d.rel}`: {_teacher_text(d)}. Command: `{recorded_command(d) or 'not recorded'}`"
                             for d in frozen] + [""]
    for d in ablations:
        varied = d.data.get("varied", "?")
        out.lines += [f"### Ablation `{d.data['ablation']}` (varies `{varied}`): `{d.rel}`", ""]
        rows = [[scalar(r.get("value")), *_compile_row(r)] for r in d.data.get("results", [])]
        out.lines += table([varied, *COMPILE_HEADER], rows)
        out.lines += ["", f"{_teacher_text(d)}. Command: `{recorded_command(d) or 'not recorded'}`", ""]
    plot = plot_accuracy_vs_cost(known, results_dir / "compile" / "accuracy_vs_cost.png")
    if plot is not None:
        out.plots.append(plot)
        out.lines += [f"![accuracy vs inference cost]({plot.relative_to(results_dir).as_posix()})", ""]
    rest = [d for d in docs if d not in known]
    if rest:
        out.lines += render_generic(rest, results_dir).lines
    return out
