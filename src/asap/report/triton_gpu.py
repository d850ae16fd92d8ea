"""ASAP on a GPU (``scripts/bench_triton_gpu.py``): the Triton kernels against SDPA, the PyTorch path and
truncated Sinkhorn, per dtype and n, and its plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asap.report.core import Doc, Rendered, fmt_ratio, machine_line, pyplot, save_figure, recorded_command, sinkhorn_key, style_axes, table


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
    plt = pyplot()

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
        style_axes(ax, xlabel="sequence length n = m", ylabel="median time (ms)", x_base=2, log_y=True,
                   title=f"{dtype}, {'padded' if padded else 'unpadded'}")  # fmt: skip
    gpu = (doc.data.get("machine") or {}).get("gpu") or {}
    b, h, _, d = doc.data["settings"][0]["shape"]
    fig.suptitle(f"ASAP on GPU: b={b}, h={h}, d={d}, {gpu.get('name', 'GPU')}")
    return save_figure(fig, path)


def render_triton_gpu(docs: list[Doc], results_dir: Path) -> Rendered:
    """``scripts/bench_triton_gpu.py``: Triton ASAP against SDPA, the PyTorch path and the teacher, per dtype and n."""
    out = Rendered()
    for doc in docs:
        data = doc.data
        teacher = data.get("teacher", sinkhorn_key(21))
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
            over_k3 = _triton_ratio(s, sinkhorn_key(3), "asap_l16_triton")
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
            ratio = _triton_ratio(s, sinkhorn_key(3), "asap_l16_triton")
            if ratio is None or ratio <= 1.0:
                where = f"{s['dtype']} n={s['n']}{' padded' if s['padded'] else ''}"
                slower.append(f"{where} (not timed)" if ratio is None else f"{where} ({ratio:.2f}x)")
        out.lines += ["", "Where the whole Triton operator is NOT faster than Sinkhorn truncated to K = 3: "
                      + (", ".join(slower) if slower else "nowhere in this run") + ".", ""]
        plot = plot_triton_gpu(doc, doc.path.with_suffix(".png"))
        out.plots.append(plot)
        out.lines += [f"![ASAP on GPU]({plot.relative_to(results_dir).as_posix()})", "",
                      machine_line(data.get("machine")), "", f"Command: `{recorded_command(doc) or 'not recorded'}`",
                      ""]  # fmt: skip
    return out
