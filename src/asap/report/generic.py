"""Any result JSON without a dedicated section: its fields flattened into a key/value table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asap.report.core import Doc, Rendered, machine_line, scalar, table


def _flatten(value: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    if isinstance(value, dict) and depth < 4:
        items = []
        for key, sub in value.items():
            items += _flatten(sub, f"{prefix}.{key}" if prefix else str(key), depth + 1)
        return items
    if isinstance(value, list) and value and all(not isinstance(x, (dict, list)) for x in value):
        return [(prefix, ", ".join(scalar(x) for x in value[:8]) + (" ..." if len(value) > 8 else ""))]
    if isinstance(value, (dict, list)):
        return [(prefix, f"({type(value).__name__} of {len(value)})")]
    return [(prefix, scalar(value))]


def render_generic(docs: list[Doc], results_dir: Path, *, max_rows: int = 60) -> Rendered:
    """Any JSON without a dedicated renderer: its fields flattened into a key/value table."""
    out = Rendered()
    for doc in docs:
        items = [(k, v) for k, v in _flatten(doc.data) if not k.startswith("machine.")]
        out.lines += [f"### `{doc.rel}` (schema `{doc.schema or 'none'}`: generic view)", ""]
        out.lines += [machine_line(doc.data.get("machine")), ""]
        out.lines += table(["field", "value"], items[:max_rows])
        if len(items) > max_rows:
            out.lines += ["", f"({len(items) - max_rows} more fields in the JSON.)"]
        out.lines += [""]
    return out
