"""ASAP's CPU paths (``scripts/bench_asap_paths.py``): closure backends, dual map and whole operator, in
softmax calls.
"""

from __future__ import annotations

from pathlib import Path

from asap.report.core import Doc, Rendered, machine_line, table


ASAP_PATHS_SCHEMA = "asap.scripts.asap_paths/1"


def render_asap_paths(docs: list[Doc], results_dir: Path) -> Rendered:
    """``scripts/bench_asap_paths.py``: the closure backends, the dual map and the whole operator, in softmax calls."""
    out = Rendered()
    for doc in docs:
        rows = doc.data["rows"]
        names = list(dict.fromkeys(n for r in rows for n in r["softmax_calls"] if n != "softmax"))
        out.lines += [f"### `{doc.rel}`", "", "Cost in softmax calls (softmax on the same unpadded inputs = 1); "
                      "padded rows give every method the (b, n) token mask; - where a row does not time that path "
                      "(the native kernels and the PyTorch dual map only up to n = 128). These measurements set "
                      "`asap_attention(backend='auto')` (the native closure on short rows, else the "
                      "shared-exponential closure unpadded and the two-pass closure padded) and the dual map's "
                      "native rule.", ""]  # fmt: skip
        out.lines += table(["b x h x n x d", "padded", "softmax ms", *names],
                           [[f"{r['b']}x{r['h']}x{r['n']}x{r['d']}", "yes" if r["padded"] else "no",
                             f"{r['softmax_ms']:.3f}", *(_calls(r, n) for n in names)]
                            for r in rows])  # fmt: skip
        out.lines += ["", machine_line(doc.data.get("machine")), "", f"Command: `{doc.data.get('command')}`", ""]
    return out


def _calls(row: dict, name: str) -> str:
    value = row["softmax_calls"].get(name)
    return "-" if value is None else f"{value:.2f}"
