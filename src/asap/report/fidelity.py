"""The fidelity plane (``asap bench fidelity``): per layer, row TV to the teacher and time per call of ASAP
with warm-start steps against truncated Sinkhorn.
"""

from __future__ import annotations

from pathlib import Path

from asap.report.core import Doc, Rendered, machine_line, table


FIDELITY_SCHEMA = "asap.bench.fidelity/1"


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
                      "`asap_l{L}_j{j}` is ASAP with L slices and j extra Sinkhorn half-steps; `sinkhorn_k{K}` is the "
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
