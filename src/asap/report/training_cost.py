"""Time and memory per training step, ESP vs Sinkhorn vs softmax (:mod:`asap.bench.training_cost`).
"""

from __future__ import annotations

from pathlib import Path

from asap.report.core import Doc, Rendered, fmt_bytes, fmt_ratio, fmt_time, machine_line, recorded_command, table


TRAINING_COST_SCHEMA = "training_cost"  # the "benchmark" field of asap.bench.training_cost's JSON


def render_training_cost(docs: list[Doc], results_dir: Path) -> Rendered:
    """Tables of :func:`asap.bench.training_cost.run_training_cost` output: per shape, time/step and memory."""
    out = Rendered()
    for doc in docs:
        data = doc.data
        out.lines += [f"### `{doc.rel}`", "", machine_line(data.get("machine")), ""]
        out.lines += [f"Command: `{recorded_command(doc) or 'not recorded'}`", ""]
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
