"""ASAP's CPU paths (``scripts/bench_asap_paths.py``): closure backends, dual map and whole operator, in
softmax calls.
"""

from __future__ import annotations

from pathlib import Path

from asap.report.core import Doc, Rendered, machine_line, table


ASAP_PATHS_SCHEMA = "asap.scripts.asap_paths/1"
FUSED_VS_SPLIT_SCHEMA = "asap.scripts.fused_vs_split/1"


def render_asap_paths(docs: list[Doc], results_dir: Path) -> Rendered:
    """``scripts/bench_asap_paths.py``: the closure backends, the dual map and the whole operator, in softmax calls."""
    out = Rendered()
    for doc in docs:
        if doc.schema == FUSED_VS_SPLIT_SCHEMA:
            out.lines += _fused_vs_split(doc)
            continue
        rows = doc.data["rows"]
        names = list(dict.fromkeys(n for r in rows for n in r["softmax_calls"] if n != "softmax"))
        limit = max((r["n"] for r in rows if "asap_fused" in r["softmax_calls"]), default=0)
        out.lines += [f"### `{doc.rel}`", "", "Cost in softmax calls (softmax on the same unpadded inputs = 1); "
                      "padded rows give every method the (b, n) token mask; - where a row does not time that path "
                      f"(the native closure and the one-call operator `asap_fused` up to n = {limit}, the split "
                      "operator `asap_split` unpadded only). `closure_shared_*` is the one-exponential closure "
                      "with its elementwise passes native where the row is unpadded, `closure_shared_torch` the "
                      "same with PyTorch ops; `asap_auto` is the operator as dispatched when the file was "
                      "written. These measurements set `asap_attention(backend='auto')` (the native closure on "
                      "padded rows, else the shared-exponential closure unpadded) and the operator's one-call "
                      "rule (`asap.attention.native.fused_worth_it`).", ""]  # fmt: skip
        out.lines += table(["b x h x n x d", "padded", "softmax ms", *names],
                           [[f"{r['b']}x{r['h']}x{r['n']}x{r['d']}", "yes" if r["padded"] else "no",
                             f"{r['softmax_ms']:.3f}", *(_calls(r, n) for n in names)]
                            for r in rows])  # fmt: skip
        out.lines += ["", machine_line(doc.data.get("machine")), "", f"Command: `{doc.data.get('command')}`", ""]
    return out


def _calls(row: dict, name: str) -> str:
    value = row["softmax_calls"].get(name)
    return "-" if value is None else f"{value:.2f}"


def _fused_vs_split(doc: Doc) -> list[str]:
    """``scripts/bench_fused_vs_split.py``: the operator's one-call and split paths between a model's layers."""
    lines = [f"### `{doc.rel}`", "", "The operator's two unpadded paths on short rows, each call after an MLP block "
             "(as between the layers of a model): `fused` = map and closure in one native call, `split` = the native "
             "map then the one-exponential closure; medians in ms. These rows set "
             "`asap.attention.native.fused_worth_it`.", ""]  # fmt: skip
    lines += table(["b x h x n x d", "split ms", "fused ms", "Sinkhorn K=3 ms", "fused speed-up over split"],
                   [[f"{r['b']}x{r['h']}x{r['n']}x{r['d']}", f"{r['median_ms']['split']:.3f}",
                     f"{r['median_ms']['fused']:.3f}", f"{r['median_ms']['sinkhorn_k3']:.3f}",
                     f"{r['median_ms']['split'] / r['median_ms']['fused']:.2f}x"] for r in doc.data["rows"]])  # fmt: skip
    lines += ["", machine_line(doc.data.get("machine")), "", f"Command: `{doc.data.get('command')}`", ""]
    return lines

