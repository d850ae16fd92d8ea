"""The operator benchmark (``asap bench operators``, schema ``asap.bench.operators/1``): header, targets,
time / speed-up / memory tables per mode, and the time and memory plots.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from asap.report.core import Doc, Rendered, fmt_bytes, fmt_ratio, fmt_time, machine_line, pyplot, save_figure, sinkhorn_key, style_axes, table


OPERATORS_SCHEMA = "asap.bench.operators/1"


#: Targets the operator benchmark is reported against (the speed issue); reported, never asserted.
SPEED_TARGET = {"calls_at": (512, 1024), "max_softmax_calls": 1.7, "n": 512, "speedup_over": {21: 8.0, 11: 5.0}}
MEMORY_TARGET_N = 4096


def mode_groups(doc: Doc, mode: str) -> list[dict[str, Any]]:
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

    rows = [[g["n"], *(_cell(g, n, time_iqr) for n in names)] for g in mode_groups(doc, mode)]
    return table(["n", *labels], rows)


def _speedup_table(doc: Doc, mode: str) -> list[str]:
    names = _method_names(doc, mode)
    labels = [doc.data["methods"][n]["label"] for n in names]
    rows = [[g["n"], *(_cell(g, n, lambda r: fmt_ratio(r.get("speedup_vs_teacher"))) for n in names)]
            for g in mode_groups(doc, mode)]
    return table(["n", *labels], rows)


def _memory_table(doc: Doc, mode: str) -> list[str]:
    names = _method_names(doc, mode)
    labels = [doc.data["methods"][n]["label"] for n in names]
    rows = [[g["n"], fmt_bytes(g["dense_fp32_bytes"]), *(_cell(g, n, lambda r: fmt_bytes(r.get("peak_bytes")))
                                                         for n in names)] for g in mode_groups(doc, mode)]
    return table(["n", "one (b,h,n,m) fp32 tensor", *labels], rows)


def asap_name(doc: Doc) -> str | None:
    return next((n for n, m in doc.data["methods"].items() if m["family"] == "asap"), None)


def _forward_ratio(group: dict[str, Any], num: str, den: str) -> float | None:
    """``time(num) / time(den)`` from the medians of one interleaved group (None if either is missing)."""
    a, b = group["methods"].get(num), group["methods"].get(den)
    if not a or not b or not a.get("median_s") or not b.get("median_s"):
        return None
    return a["median_s"] / b["median_s"]


def operator_targets(doc: Doc) -> list[str]:
    """The speed issue's targets, with the measured figures (reported, never asserted)."""
    asap = asap_name(doc)
    lines: list[str] = []
    forward = {g["n"]: g for g in mode_groups(doc, "forward")}
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
        ratio = _forward_ratio(group, sinkhorn_key(k), asap) if group else None
        if ratio is not None:
            verdict = "met" if ratio >= target else "NOT met"
            lines.append(f"- ASAP at least {target:g}x faster than Sinkhorn K={k} at n={SPEED_TARGET['n']}: measured "
                         f"**{ratio:.2f}x** ({verdict}).")
    k3 = [(n, _forward_ratio(g, sinkhorn_key(3), asap)) for n, g in sorted(forward.items())]
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
    plt = pyplot()

    stem = Path(doc.rel).stem
    paths = []
    for quantity, ylabel in (("time", "median time (s)"), ("memory", "peak memory (MiB)")):
        modes = [m for m in ("forward", "forward_backward") if mode_groups(doc, m)]
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            groups = mode_groups(doc, mode)
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
            style_axes(ax, xlabel="sequence length n = m", ylabel=ylabel, title=f"{mode.replace('_', ' + ')}",
                       x_base=2, log_y=True, legend_size=8)  # fmt: skip
        machine = doc.data.get("machine", {})
        cfg = doc.data["config"]
        hardware = machine.get("cpu_model") if cfg["device"] == "cpu" else (machine.get("gpu") or {}).get("name")
        fig.suptitle(f"{stem}: b={cfg['batch']}, h={cfg['heads']}, d={cfg['head_dim']}, {cfg['dtype']}, {hardware}")
        paths.append(save_figure(fig, out_dir / f"{stem}_{quantity}.png"))
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
            if not mode_groups(doc, mode):
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
