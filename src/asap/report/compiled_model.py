"""A compiled model against its teacher and truncation (``scripts/time_compiled_model.py``): accuracy, agreement
with the teacher, whole-model and attention time.
"""

from __future__ import annotations

from pathlib import Path

from asap.report.core import Doc, Rendered, machine_line, table


COMPILED_MODEL_SCHEMA = "asap.scripts.compiled_model_time/1"


def render_compiled_model(docs: list[Doc], results_dir: Path) -> Rendered:
    """One table per JSON: each model's accuracy and agreement on the same test examples, and its interleaved times."""
    out = Rendered()
    for doc in docs:
        data = doc.data
        timing = data["timing"]
        out.lines += [f"### `{doc.rel}`", "",
                      f"Compiled artifact `{data['compiled']}` (every Sinkhorn layer replaced by ASAP, no retraining) "
                      f"against its teacher `{data['teacher']}` and the teacher with every Sinkhorn layer truncated to K "
                      f"half-steps: accuracy and agreement with the teacher's predictions on the first "
                      f"{data['eval_examples']} test examples; time per batch of {data['batch_size']} (median of "
                      f"{timing['rounds']} interleaved rounds, {timing['threads']} torch thread(s); speed-up = median "
                      "of the per-round ratios teacher / model; attention = the time inside the attention "
                      "operators).", ""]  # fmt: skip
        rows = []
        for name, t in sorted(timing["models"].items(), key=lambda item: item[1]["model_ms"]):
            acc = data["accuracy"][name]
            rows.append([f"`{name}`", f"{100 * acc['accuracy']:.2f}", f"{100 * acc['agreement']:.2f}",
                         f"{t['model_ms']:.1f} ({t['model_speedup']:.2f}x)",
                         f"{t['attention_ms']:.1f} ({t['attention_speedup']:.2f}x)"])  # fmt: skip
        out.lines += table(["model", "accuracy %", "agrees with teacher %", "whole model ms (speed-up)",
                            "attention ms (speed-up)"], rows)  # fmt: skip
        out.lines += ["", f"Load average before timing: {timing.get('load_average_before')}. "
                      + machine_line(data.get("machine")), "", f"Command: `{data.get('command')}`", ""]  # fmt: skip
    return out
