"""Measure the crossovers behind asap_attention's backend="auto" rule and the shared path's chunk size.

For each shape (b, h, n, d), unpadded and padded (a quarter of the tokens on average), one interleaved
run (asap.bench.measure.benchmark) times, in softmax-call units (softmax on the same unpadded inputs):

* the closure alone from a given f_hat: backend "flash" (two fused attention passes), "shared"
  (one exponential; unpadded fp32 with its elementwise passes native) at several chunk sizes and with the
  PyTorch ops (``closure_shared_torch``), and "native" (the C kernel);
* the fused dual map (L = 16, qk_mean + q_norm) alone: as dispatched (``dual_map``: the C kernel) and
  the PyTorch path (``dual_map_torch``);
* the whole AsapOperator with backend "auto", its one-call native path (``asap_fused``) and, unpadded, the map then the shared closure (``asap_split``), and Sinkhorn K = 3 and K = 11 for scale.

The native rules (asap.attention.native.closure_worth_it, fused_worth_it) come from these rows.

Writes a JSON (machine, threads, load average, command) and prints one line per shape:

    python scripts/bench_asap_paths.py --threads 2 --out results/bench/asap_paths_t2.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from asap.attention import asap_attention, build_operator, native, sinkhorn_attention, softmax_attention
from asap.attention.closure import shared_exp_closure
from asap.bench.measure import benchmark, write_script_result
from asap.bench.operators import padding_for
from asap.env import load_average
from asap.io import method_key

SHAPES = [(8, 8, 16, 64), (8, 8, 32, 64), (8, 8, 64, 64), (8, 8, 96, 64), (8, 8, 128, 64), (8, 8, 256, 64),
          (8, 8, 512, 64), (8, 8, 1024, 64), (32, 4, 17, 16), (128, 4, 17, 16), (32, 4, 50, 16), (32, 4, 128, 16),
          (32, 4, 512, 16), (16, 12, 64, 32), (16, 12, 128, 32), (16, 12, 256, 32)]
CHUNKS = (2**20, 4 * 2**20, 16 * 2**20)
NATIVE_ROWS_MAX_N = 1024  # the native closure and the one-call operator at every shape: where they stop paying


def _torch_map(dual_map, q, k, *, scale, valid):
    """The dual map on its PyTorch path (the native kernel switched off for this call)."""
    dual_map.use_native = False
    try:
        return dual_map(q, k, scale=scale, padding_mask=valid, center=False)
    finally:
        dual_map.use_native = True


def run_shape(b: int, h: int, n: int, d: int, *, padded: bool, budget: float) -> dict:
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    valid = padding_for(b, n, 0.25) if padded else None
    op = build_operator("asap", num_heads=h, head_dim=d, num_slices=16, extra_features=("qk_mean", "q_norm"))
    op.dual_map.set_coefficients(torch.randn(h, op.dual_map.num_features, generator=gen) / 18**0.5)
    scale = d**-0.5
    f = op.dual_map(q, k, scale=scale, padding_mask=valid, center=False)
    fns = {
        "softmax": lambda: softmax_attention(q, k, v),
        "closure_flash": lambda: asap_attention(q, k, v, f, padding_mask=valid, backend="flash"),
        "dual_map": lambda: op.dual_map(q, k, scale=scale, padding_mask=valid, center=False),
        "dual_map_torch": lambda: _torch_map(op.dual_map, q, k, scale=scale, valid=valid),
        "asap_auto": lambda: op(q, k, v, padding_mask=valid),
        method_key("sinkhorn", n_iters=3): lambda: sinkhorn_attention(q, k, v, n_iters=3, padding_mask=valid),
        method_key("sinkhorn", n_iters=11): lambda: sinkhorn_attention(q, k, v, n_iters=11, padding_mask=valid),
    }
    if n <= NATIVE_ROWS_MAX_N and native.unavailable() is None:
        fns["closure_native"] = lambda: asap_attention(q, k, v, f, padding_mask=valid, backend="native")
        # map and closure in one native call
        fused = build_operator("asap", num_heads=h, head_dim=d, backend="native", dual_map=op.dual_map)
        fns["asap_fused"] = lambda: fused(q, k, v, padding_mask=valid)
        if not padded:  # the map, then the one-exponential closure: the unpadded alternative to the fused call
            split = build_operator("asap", num_heads=h, head_dim=d, backend="shared", dual_map=op.dual_map)
            fns["asap_split"] = lambda: split(q, k, v)
    for chunk in CHUNKS:
        fns[f"closure_shared_{chunk >> 10}k"] = (
            lambda chunk=chunk: shared_exp_closure(q, k, v, f, scale=scale, eps=1.0, valid=valid, chunk_bytes=chunk))
    fns["closure_shared_torch"] = lambda: shared_exp_closure(q, k, v, f, scale=scale, eps=1.0, valid=valid,
                                                             native_passes=False)  # fmt: skip
    with torch.no_grad():
        run = benchmark(fns, device="cpu", warmup=2, repeats=40, min_repeats=5, budget_s=budget, measure_memory=False)
    med = {name: r.timing.median_s for name, r in run.results.items()}
    unit = med["softmax"]
    return {"b": b, "h": h, "n": n, "d": d, "padded": padded, "softmax_ms": 1e3 * unit,
            "softmax_calls": {name: t / unit for name, t in med.items()}, "rounds": run.rounds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--budget", type=float, default=1.5, help="seconds of timed calls per method and shape")
    parser.add_argument("--max-n", type=int, default=None, help="only the shapes with n up to this (a quick rerun)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    load_before = load_average()
    for b, h, n, d in [s for s in SHAPES if args.max_n is None or s[2] <= args.max_n]:
        for padded in (False, True):
            row = run_shape(b, h, n, d, padded=padded, budget=args.budget)
            rows.append(row)
            calls = row["softmax_calls"]
            print(f"b{b} h{h} n{n} d{d} {'padded' if padded else 'full  '} "
                  + " ".join(f"{k}={v:.2f}" for k, v in calls.items() if k != "softmax"), flush=True)
    write_script_result(args.out, schema="asap.scripts.asap_paths/1", script="scripts/bench_asap_paths.py",
                        argv=argv if argv is not None else sys.argv[1:], load_before=load_before, rows=rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
