"""The reliability probe (``scripts/reliability_probe.py``): bad inputs per surface and how each was answered.
"""

from __future__ import annotations

from pathlib import Path

from asap.report.core import Doc, Rendered, machine_line, recorded_command, table


RELIABILITY_SCHEMA = "asap.scripts.reliability_probe/1"


def render_reliability(docs: list[Doc], results_dir: Path) -> Rendered:
    """``scripts/reliability_probe.py``: how many bad inputs each surface was given and how each was answered."""
    out = Rendered()
    for doc in docs:
        data = doc.data
        outcomes = data.get("outcomes") or ["exit_2", "refused", "correct", "WRONG"]
        counts = data["counts"]
        out.lines += [
            f"### `{doc.rel}`", "",
            "Bad or unusual inputs thrown at each surface, and how each was answered: `exit_2` = one line on "
            "stderr naming the problem, exit status 2, nothing written; `refused` = a named error with a one-line "
            "message; `correct` = a valid input in an odd form (layout, empty dimension, fp16/bf16) whose result "
            "matches the fp64 reference; `WRONG` = anything else (a wrong result, a bad input accepted, a raw "
            "Python error, a traceback, a file written).", "",
        ]  # fmt: skip
        rows = [[surface, sum(c.values()), *(c.get(o, 0) for o in outcomes)] for surface, c in counts.items()]
        rows.append(["**all**", data["total"], *(sum(c.get(o, 0) for c in counts.values()) for o in outcomes)])
        out.lines += table(["surface", "inputs", *outcomes], rows)
        unexpected = data.get("unexpected") or []
        out.lines += ["", f"{data['as_expected']} of {data['total']} inputs answered as expected"
                      + (" (every bad input refused, every valid one computed correctly)." if not unexpected
                         else f"; {len(unexpected)} NOT as expected:"), ""]  # fmt: skip
        out.lines += [f"- {u['surface']}: {u['input']} -> {u['outcome']} ({u['message']})" for u in unexpected[:20]]
        if len(unexpected) > 20:
            out.lines.append(f"- ... {len(unexpected) - 20} more in the JSON")
        out.lines += [*([""] if unexpected else []), machine_line(data.get("machine")), "",
                      f"Command: `{recorded_command(doc) or 'not recorded'}`", ""]  # fmt: skip
    return out
