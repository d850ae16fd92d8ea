"""The frozen-layer benchmark (``asap bench frozen-layer``): per layer, accuracy and speed ratios against the
goal at the teacher's shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asap.report.core import Doc, Rendered, fmt_ratio, machine_line, pct, recorded_command, sinkhorn_key, table


FROZEN_LAYER_SCHEMA = "asap.bench.frozen_layer/2"
#: Older results keep rendering: /1 had one truncated K and no whole-model timing.
FROZEN_LAYER_SCHEMAS = ("asap.bench.frozen_layer/1", FROZEN_LAYER_SCHEMA)


# Issue 14: on the attention shape a trained teacher really has, ASAP at least this much faster than the teacher.
TEACHER_SHAPE_SPEEDUP = 1.5


def frozen_layer_target(record: dict[str, Any], *, teacher: str, truncated: str) -> str:
    """One line: ASAP's speed-up over the trained ``teacher`` on this layer's real inputs against the goal, and
    over the same-cost baseline ``truncated`` (below 1: ASAP is the slower of the two)."""
    ratios = record.get("speedup_of_asap_over", {})
    ratio = ratios.get(teacher)
    if ratio is None:
        return f"{teacher}: not timed"
    verdict = "met" if ratio >= TEACHER_SHAPE_SPEEDUP else "NOT met"
    line = f"{ratio:.2f}x over the trained teacher ({teacher}): {TEACHER_SHAPE_SPEEDUP:g}x goal at its shape {verdict}"
    against = ratios.get(truncated)
    if against is not None:
        line += f"; {against:.2f}x over {truncated}" + (" (ASAP slower)" if against < 1 else "")
    return line


def _truncated_iters(data: dict[str, Any]) -> list[int]:
    """The truncated Ks of a result: a list (schema /2), or the one K of schema /1."""
    iters = data["truncated_iters"]
    return list(iters) if isinstance(iters, list) else [iters]


def render_frozen_layer(docs: list[Doc], results_dir: Path) -> Rendered:
    """``asap bench frozen-layer``: per layer, accuracy of teacher / ASAP / truncated, the layer's speed ratios,
    and (schema /2) the whole model's forward time."""
    out = Rendered()
    for doc in docs:
        data = doc.data
        ks = _truncated_iters(data)
        ref, truncs = sinkhorn_key(data["reference_iters"]), [sinkhorn_key(k) for k in ks]
        rows, whole_rows = [], []
        for r in data["layers"]:
            acc, agree, ms = r["accuracy"], r["agreement_with_teacher"], r["median_ms"]
            teacher = sinkhorn_key(r["teacher_iters"])
            shape = r["shape"]["q"]
            rows.append([r["layer"], f"{shape[0]}x{shape[1]}x{shape[2]}" + (" (padded)" if r.get("padded") else ""),
                         pct(acc["teacher"]), pct(acc["asap"]), *(pct(acc.get(t)) for t in truncs), pct(agree["asap"]),
                         *(pct(agree.get(t)) for t in truncs),
                         *(f"{ms[k]:.2f}" if k in ms else "-" for k in ("asap", teacher, ref, *truncs, "softmax")),
                         fmt_ratio(r["speedup_of_asap_over"].get(ref)), fmt_ratio(r["speedup_of_asap_over"].get(teacher)),
                         fmt_ratio(ms["asap"] / ms["softmax"]) if ms.get("softmax") else "-"])  # fmt: skip
            whole = r.get("whole_model")
            if whole:
                models = whole["models"]
                cells = [f"{models[m]['model_ms']:.2f}" if m in models else "-" for m in ("teacher", "asap", *truncs)]
                speed = [fmt_ratio(models[m]["model_speedup"]) if m in models else "-" for m in ("asap", *truncs)]
                whole_rows.append([r["layer"], *cells, *speed])
        teacher_k = data["layers"][0]["teacher_iters"] if data["layers"] else "?"
        out.lines += [f"### {data['dataset']}: `{doc.rel}`", "",
                      f"Teacher `{data['run_dir']}` (Sinkhorn K={teacher_k}); accuracy on {data['eval_examples']} "
                      f"{data['eval_split']} examples; ASAP calibrated on {data['calibration_examples']} training "
                      f"examples; times are one call of the layer's attention on the q, k, v it receives for "
                      f"{data['timing_batch']} test examples (b x h x n), median of a round-robin run.", ""]
        out.lines += table(["layer", "b x h x n", "teacher %", "ASAP %", *(f"K={k} %" for k in ks),
                            "ASAP agrees %", *(f"K={k} agrees %" for k in ks), "ms ASAP",
                            f"ms K={teacher_k} (teacher)", f"ms K={data['reference_iters']}",
                            *(f"ms K={k}" for k in ks), "ms softmax", f"ASAP speed-up over K={data['reference_iters']}",
                            f"over K={teacher_k}", "ASAP time / softmax"], rows)  # fmt: skip
        if whole_rows:
            rounds = data["layers"][0]["whole_model"]["rounds"]
            out.lines += ["", f"Whole model, one forward of the same {data['timing_batch']} test examples with only "
                          f"this layer changed (median ms of {rounds} interleaved rounds; speed = the median of the "
                          "per-round ratios teacher / model, above 1: faster than the teacher):", ""]
            out.lines += table(["layer", "ms teacher", "ms ASAP", *(f"ms K={k}" for k in ks), "ASAP speed",
                                *(f"K={k} speed" for k in ks)], whole_rows)
        out.lines += [""] + [f"- Layer {r['layer']}: "
                             f"{frozen_layer_target(r, teacher=sinkhorn_key(r['teacher_iters']), truncated=truncs[0])}."
                             for r in data["layers"]]  # fmt: skip
        out.lines += ["", machine_line(data.get("machine")), "", f"Command: `{recorded_command(doc) or 'not recorded'}`", ""]
    return out
