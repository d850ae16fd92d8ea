"""The accuracy table (:mod:`asap.bench.accuracy`): every method at one budget over seeds, and its plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asap.io import method_of
from asap.report.core import Doc, Rendered, fmt_ratio, machine_line, pct, pyplot, save_figure, recorded_command, sinkhorn_key, style_axes, table


ACCURACY_SCHEMA = "asap.bench.accuracy/1"


def _method_kind(doc: Doc, method: str) -> str:
    teacher = sinkhorn_key(doc.data.get("teacher_iters"))
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
    soft, teacher = ms.get("softmax"), ms.get(sinkhorn_key(data.get("teacher_iters")))
    rows = []
    for method in data.get("methods", []):
        seeds = [data["per_seed"][str(s)].get(method, {}) for s in data.get("seeds", [])]
        values = " / ".join(pct(r.get("accuracy")) for r in seeds)
        agree = [r["agreement_with_teacher"] for r in seeds if r.get("agreement_with_teacher") is not None]
        m = ms.get(method)
        rows.append([f"`{method}`", _method_kind(doc, method), _mean_std(data.get("summary", {}).get(method)), values,
                     pct(sum(agree) / len(agree)) if agree else "-", "-" if m is None else f"{m:.1f}",
                     fmt_ratio(m / soft) if m and soft else "-", fmt_ratio(m / teacher) if m and teacher else "-"])
    return rows


def plot_accuracy_table(docs: list[Doc], path: Path) -> Path | None:
    """One panel per data set: mean test accuracy (± std over seeds) against inference time relative to softmax."""
    docs = [d for d in docs if (d.data.get("inference") or {}).get("median_ms", {}).get("softmax")]
    if not docs:
        return None
    plt = pyplot()

    fig, axes = plt.subplots(1, len(docs), figsize=(4.2 * len(docs), 3.8), squeeze=False)
    for ax, doc in zip(axes[0], docs):
        ms = doc.data["inference"]["median_ms"]
        for method in doc.data["methods"]:
            summary = doc.data["summary"].get(method)
            if method not in ms or not summary:
                continue
            ax.errorbar([ms[method] / ms["softmax"]], [100 * summary["mean"]], yerr=[100 * (summary["std"] or 0)],
                        marker="o", capsize=3, linestyle="none", label=method)
        style_axes(ax, xlabel="inference time / softmax (same batch)", ylabel="test accuracy (%)",
                   title=f"{doc.data['dataset']} ({len(doc.data['seeds'])} seeds)")  # fmt: skip
    return save_figure(fig, path)


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
                      "", machine_line(data.get("machine")), "", f"Command: `{recorded_command(doc) or 'not recorded'}`",
                      ""]  # fmt: skip
    plot = plot_accuracy_table(docs, results_dir / "accuracy" / "accuracy_vs_cost.png")
    if plot is not None:
        out.plots.append(plot)
        out.lines += [f"![accuracy vs inference cost]({plot.relative_to(results_dir).as_posix()})", ""]
    return out
