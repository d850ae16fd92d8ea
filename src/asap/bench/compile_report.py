"""Tables and the figure of a compile report (:func:`asap.compile.compile_model`'s ``report``).

The figures themselves are computed by the compile stage
(:mod:`asap.compile.report`); this module only presents them: one
head-averaged row per layer (:func:`layer_summary`), a plain-text table
(:func:`fidelity_table`, printed by ``asap compile`` and ``asap demo``) and a
four-panel PNG (:func:`plot_report`, their ``fidelity.png``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from asap.io import atomic_write_bytes


def _mean(values: list[float] | None) -> float | None:
    return None if values is None else sum(values) / len(values)


def layer_summary(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per compiled layer: head-averaged figures."""
    rows = []
    for layer in report["layers"]:
        row = {"layer": layer["index"], "K": layer["n_iters"]}
        for key in ("r2_held_out", "r2_fit", "row_tv_asap", "row_tv_truncated", "kl_asap", "kl_truncated",
                    "col_err_teacher", "col_err_asap", "col_err_truncated"):  # fmt: skip
            row[key] = _mean(layer.get(key))
        row.update({f"ms_{name}": value for name, value in layer.get("time_ms", {}).items()})
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table of ``rows`` (dicts) over ``columns``; floats with 4 significant digits."""
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    cells = [columns] + [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fidelity_table(report: dict[str, Any]) -> str:
    columns = ["layer", "K", "r2_held_out", "row_tv_asap", "row_tv_truncated", "col_err_teacher", "col_err_asap",
               "col_err_truncated", "ms_teacher", "ms_truncated", "ms_asap"]  # fmt: skip
    text = format_table(layer_summary(report), columns)
    accuracy = report.get("accuracy")
    if accuracy:
        acc_rows = [{"model": name, "accuracy": value} for name, value in accuracy.items() if isinstance(value, float)]
        text += "\n\n" + format_table(acc_rows, ["model", "accuracy"])
    return text


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """A PNG with four panels: dual-fit R^2, row TV to the teacher, column errors, accuracy (or operator time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = layer_summary(report)
    layers = [r["layer"] for r in rows]
    x = list(range(len(layers)))
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    ax = axes[0]
    for i, layer in enumerate(report["layers"]):
        r2 = layer["r2_held_out"] or layer["r2_fit"]
        ax.scatter([i] * len(r2), r2, color="tab:blue", s=14)
    ax.plot(x, [r["r2_held_out"] if r["r2_held_out"] is not None else r["r2_fit"] for r in rows], "k_", ms=18)
    ax.set(title="dual fit R$^2$ (held out; dots = heads)", xlabel="layer", xticks=x, xticklabels=layers)
    width = 0.38
    ax = axes[1]
    ax.bar([i - width / 2 for i in x], [r["row_tv_asap"] for r in rows], width, label="ASAP", color="tab:blue")
    ax.bar([i + width / 2 for i in x], [r["row_tv_truncated"] for r in rows], width,
           label=f"Sinkhorn K={report['options']['truncated_iters']}", color="tab:orange")  # fmt: skip
    ax.set(title="row total variation to teacher", xlabel="layer", xticks=x, xticklabels=layers)
    ax.legend(fontsize=8)
    ax = axes[2]
    w3 = 0.27
    series = (("col_err_teacher", "teacher", "tab:gray"), ("col_err_asap", "ASAP", "tab:blue"),
              ("col_err_truncated", f"Sinkhorn K={report['options']['truncated_iters']}", "tab:orange"))  # fmt: skip
    for j, (key, label, colour) in enumerate(series):
        ax.bar([i + (j - 1) * w3 for i in x], [r[key] for r in rows], w3, label=label, color=colour)
    ax.set(title="column marginal error (L1)", xlabel="layer", xticks=x, xticklabels=layers)
    ax.legend(fontsize=8)
    ax = axes[3]
    accuracy = {k: v for k, v in (report.get("accuracy") or {}).items() if isinstance(v, float)}
    if accuracy:
        names = list(accuracy)
        palette = {"teacher": "tab:gray", "asap": "tab:blue"}
        colours = [palette.get(n, "tab:orange") for n in names]
        ax.bar(names, [100 * accuracy[n] for n in names], color=colours)
        low = min(100 * v for v in accuracy.values())
        ax.set(title="test accuracy (%)", ylim=(max(0, low - 5), 100))
        for i, n in enumerate(names):
            ax.text(i, 100 * accuracy[n], f"{100 * accuracy[n]:.2f}", ha="center", va="bottom", fontsize=8)
    else:
        names = ["teacher", "truncated", "asap"]
        ax.bar(names, [sum(r[f"ms_{n}"] for r in rows) for n in names], color=["tab:gray", "tab:orange", "tab:blue"])
        ax.set(title="operator ms per call, summed over layers")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
