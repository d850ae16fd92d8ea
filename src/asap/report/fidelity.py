"""The fidelity plane (``asap bench fidelity``): per layer, row TV to the teacher and time per call of ASAP
with warm-start steps against truncated Sinkhorn.

Schema ``/2`` adds, per layer, one fitted map per kind and ``L`` (``maps`` a list with ``"map"``), the row KL
of every point, its cost in softmax calls timed in the same run, and ``against_truncation`` (the best ASAP
point of each kind no slower than truncation at K = 3, against K = 3 and K = 5). A ``/1`` document (``maps``
keyed by ``L``, no KL, no cost) renders as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asap.report.core import Doc, Rendered, machine_line, table

FIDELITY_SCHEMA = "asap.bench.fidelity/2"
#: Every schema the renderer reads (the report driver keeps fidelity files of these).
FIDELITY_SCHEMAS = ("asap.bench.fidelity/1", FIDELITY_SCHEMA)


def _mean(values: list[float] | None) -> float | None:
    return None if not values else sum(values) / len(values)


def _map_r2(layer: dict[str, Any]) -> str:
    maps = layer["maps"]
    if isinstance(maps, dict):  # schema /1: {L: {...}}, the linear map only
        return ", ".join(f"L={L}: {_mean(m['r2_held_out']):.3f}" for L, m in maps.items())
    return ", ".join(f"{m['map']} L={m['L']}: {_mean(m['r2_held_out']):.3f}" for m in maps)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _point_cell(p: dict[str, Any] | None, vs: dict[str, Any]) -> str:
    if p is None:
        return "none that fast"
    mark = "**< K=5**" if p["beats_K5"] else ("< K=3" if p["beats_K3"] else "loses to K=3")
    cost = "" if p.get("cost") is None else f", cost {p['cost']:.2f}"
    return f"{p['row_tv']:.4f} (`{p['method']}`{cost}) {mark}"


def _against_truncation_table(layers: list[dict[str, Any]]) -> list[str]:
    """Per layer and map: truncation at K=3 and K=5, ASAP's cheapest point and its best at <= K=3 / K=5 time."""
    rows = []
    for layer in layers:
        vs = layer.get("against_truncation")
        if not vs:
            continue
        k3, k5 = vs["K3"], vs["K5"]
        trunc = [f"{k3['row_tv']:.4f} / {_fmt(k3.get('cost'), '.2f')}", f"{k5['row_tv']:.4f} / {_fmt(k5.get('cost'), '.2f')}"]
        for kind, m in vs["maps"].items():
            rows.append([f"{layer['layer']}", kind, *trunc, _point_cell(m["cheapest"], vs), _point_cell(m["within_K3"], vs),
                         _point_cell(m["within_K5"], vs)])  # fmt: skip
    if not rows:
        return []
    header = ["layer", "map", "K=3: TV / cost", "K=5: TV / cost", "cheapest ASAP point", "best ASAP at <= K=3 time",
              "best ASAP at <= K=5 time"]  # fmt: skip
    return table(header, rows) + [""]


def _summary(layers: list[dict[str, Any]]) -> list[str]:
    """Per map kind: on how many layers it beats K=3 / K=5 at no more than K=3's / K=5's time (issue 11's test)."""
    counts: dict[str, list[int]] = {}
    total = 0
    for layer in layers:
        vs = layer.get("against_truncation")
        if not vs:
            continue
        total += 1
        for kind, m in vs["maps"].items():
            c = counts.setdefault(kind, [0, 0, 0])
            c[0] += bool(m["within_K3"] and m["within_K3"]["beats_K3"])
            c[1] += bool(m["within_K3"] and m["within_K3"]["beats_K5"])
            c[2] += bool(m["within_K5"] and m["within_K5"]["beats_K5"])
    if not counts:
        return []
    parts = [f"{kind}: at no more than K=3's time more faithful than K=3 on {c[0]} of {total} layers and than K=5 on "
             f"{c[1]} (issue 11's test); at no more than K=5's time more faithful than K=5 on {c[2]}"
             for kind, c in counts.items()]  # fmt: skip
    return ["Costs in softmax calls (the time of one softmax attention call on the same batch, in the same run). "
            "Per map, the most faithful ASAP point within truncation's measured time: " + "; ".join(parts) + ".", ""]


def render_fidelity(docs: list[Doc], results_dir: Path) -> Rendered:
    """``asap bench fidelity``: per layer, row TV to the teacher and ms per call of ASAP (+j steps) and truncation."""
    out = Rendered()
    for doc in docs:
        data = doc.data
        src = data["source"]
        v2 = data.get("schema") == FIDELITY_SCHEMA
        what = (f"`{src.get('path')}` converted to Sinkhorn, {src.get('dataset')} {src.get('split')} texts of at most "
                f"{src.get('max_length')} tokens" if src.get("kind") == "hf" else f"run `{src.get('run_dir')}`")
        if v2:
            config = data["config"]
            learned = ("; the linear map's directions and coefficients learned on the row KL from the ridge fit "
                       f"({config['map_steps']} Adam steps, early-stopped likewise)"
                       if config.get("refine") == "directions" else "")
            extras = ", ".join(config.get("extra_features") or []) or "none"
            out.lines += [f"### `{doc.rel}`", "",
                          f"Teacher: {what}. Extra features: {extras}. Maps ({', '.join(config['maps'])}; L = "
                          f"{', '.join(str(L) for L in config['slices'])}; relu/mlp: {config['map_steps']} Adam steps "
                          f"at {config['map_lr']:g}, early-stopped on the last quarter of the calibration batches"
                          f"{learned}) "
                          f"fitted on {data['calibration_examples']} examples, figures on {data['held_out_examples']} "
                          "held-out ones: mean row total variation and row KL(teacher || candidate) over valid "
                          "queries, L1 column-marginal error; time: one call on one held-out batch (b x h x n), "
                          "interleaved medians; cost: that time in softmax calls on the same batch, timed in the "
                          "same run. `asap_l{L}_j{j}` is ASAP with the linear map, `asap_relu_l{L}_j{j}` / "
                          "`asap_mlp_l{L}_j{j}` with the relu / mlp map, L slices and j extra Sinkhorn half-steps; "
                          "`sinkhorn_k{K}` is the teacher stopped after K half-steps.", ""]  # fmt: skip
            out.lines += _against_truncation_table(data["layers"]) + _summary(data["layers"])
        else:
            out.lines += [f"### `{doc.rel}`", "",
                          f"Teacher: {what}. Maps fitted on {data['calibration_examples']} examples, figures on "
                          f"{data['held_out_examples']} held-out ones: mean row total variation to the teacher's attention "
                          "over valid queries; time: one call on one held-out batch (b x h x n), interleaved medians. "
                          "`asap_l{L}_j{j}` is ASAP with L slices and j extra Sinkhorn half-steps; `sinkhorn_k{K}` is the "
                          "teacher stopped after K half-steps.", ""]  # fmt: skip
        for layer in data["layers"]:
            pts = sorted(layer["points"], key=lambda p: (p["ms"] or 0))
            wins = layer["verdict"]["asap_points_on_front"]
            verdict = (("ASAP points more faithful than every truncation of at most their time: " + ", ".join(
                f"`{w['asap']}`" + (f" (vs `{w['beats']}`)" if w["beats"] else " (faster than every truncation)")
                for w in wins) if wins else "ASAP does NOT beat truncation on this layer: every ASAP point is slower "
                "or less faithful than some truncated Sinkhorn of at most its time") if v2 else ("ASAP beats truncation here: " + "; ".join(
                f"{w['asap']} " + (f"is more faithful than {w['beats']} at no more time" if w["beats"]
                                   else "is faster than every truncation") for w in wins)
                if wins else "ASAP does NOT beat truncation on this layer: every ASAP point is slower or less "
                "faithful than some truncated Sinkhorn of at most its time"))  # fmt: skip
            shape = "x".join(str(x) for x in layer["shape"][:3])
            softmax = f", softmax {layer['softmax_ms']:.2f} ms per call" if layer.get("softmax_ms") else ""
            out.lines += [f"**Layer {layer['layer']}** (`{layer['name']}`, teacher K={layer['teacher_iters']}, "
                          f"{shape}{softmax}; held-out R2 of the fit: " + _map_r2(layer) + f"). {verdict}.", ""]
            if v2:
                load = layer.get("load_average_before")
                if load:
                    out.lines[-2] += f" Load average before timing: {load[0]:.2f}."
                out.lines += table(["method", "row TV", "row KL", "column error", "ms per call", "cost (softmax calls)"],
                                   [[p["method"], f"{p['row_tv']:.4f}", f"{p['kl']:.4f}", f"{p['col_err']:.4f}",
                                     _fmt(p["ms"], ".2f"), _fmt(p.get("cost"), ".2f")] for p in pts]) + [""]  # fmt: skip
            else:
                out.lines += table(["method", "row TV", "column error", "ms per call"],
                                   [[p["method"], f"{p['row_tv']:.4f}", f"{p['col_err']:.4f}",
                                     "-" if p["ms"] is None else f"{p['ms']:.2f}"] for p in pts]) + [""]
        png = doc.path.with_suffix(".png")
        if png.is_file():
            out.lines += [f"![fidelity plane]({png.relative_to(results_dir).as_posix()})", ""]
        out.lines += [machine_line(data.get("machine")), "", f"Command: `{data.get('command') or 'not recorded'}`", ""]
    return out
