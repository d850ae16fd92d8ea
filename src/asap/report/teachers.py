"""The trained models (teachers and baselines): each run's ``eval_<split>.json`` and its ``config.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asap.report.core import Doc, Rendered, pct, sibling_json, table


def _attention_text(attention: dict[str, Any]) -> str:
    opts = attention.get("options", {})
    extra = ", ".join(f"{k}={v}" for k, v in opts.items())
    return f"{attention.get('method', '?')}" + (f" ({extra})" if extra else "")


def render_teachers(docs: list[Doc], results_dir: Path) -> Rendered:
    """Test accuracy of the trained models (``eval_<split>.json`` of each run, its ``config.json`` for the size)."""
    rows = []
    for doc in docs:
        data = doc.data
        model = sibling_json(doc, "config.json").get("model", {})
        size = ", ".join(f"{key} {model[key]}" for key in ("dim", "depth", "num_heads", "max_length", "image_size")
                         if model.get(key) is not None)
        rows.append([f"`{Path(doc.rel).parent.as_posix()}`", data.get("dataset", "?"),
                     _attention_text(data.get("attention", {})), size or "-",
                     f"{pct(data.get('accuracy'))} ({data.get('split', '?')}, n={data.get('num_samples', '?')})",
                     data.get("device", "?")])
    lines = table(["run", "data set", "attention", "model", "accuracy %", "device"], rows)
    lines += ["", "Each run's exact training command is in its `command.txt`; `teachers/README.md` (written by "
              "`python -m asap.train.summary`) has the training details.", ""]
    return Rendered(lines=lines)
