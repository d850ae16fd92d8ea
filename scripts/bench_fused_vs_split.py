"""ASAP's two unpadded CPU paths for short rows, timed between the layers of a model rather than back to back.

``AsapOperator`` runs either its one-call native path (the map and the closure in one C pass per (b, h),
``fused``) or the native map then the one-exponential closure with torch's GEMMs (``split``); the rule is
``asap.attention.native.fused_worth_it``. Back to back (``scripts/bench_asap_paths.py``) the operands stay
in cache, which favours the split path; in a model each attention call follows other layers. Here every
timed call (split, fused, Sinkhorn K = 3 for scale) follows one MLP block on the same tokens
((b n, h d) -> 4 h d -> h d), round-robin over 60 rounds; medians in ms. Writes a JSON (machine, threads,
load average, command):

    python scripts/bench_fused_vs_split.py --threads 1 --out results/bench/fused_vs_split_1_thread.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from asap.attention import build_operator, sinkhorn_attention
from asap.bench.measure import write_script_result
from asap.env import load_average


SHAPES = [(8, 8, 16, 64), (8, 8, 32, 64), (8, 8, 64, 64), (8, 8, 128, 64), (32, 4, 17, 16), (32, 4, 50, 16),
          (16, 12, 64, 32), (16, 12, 128, 32)]
ROUNDS = 60


def run_shape(b: int, h: int, n: int, d: int) -> dict:
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    split = build_operator("asap", num_heads=h, head_dim=d, num_slices=16, extra_features=("qk_mean", "q_norm"),
                           backend="shared")  # fmt: skip
    split.dual_map.set_coefficients(torch.randn(h, split.dual_map.num_features, generator=gen) / 18**0.5)
    fused = build_operator("asap", num_heads=h, head_dim=d, backend="native", dual_map=split.dual_map)
    x = torch.randn(b * n, h * d, generator=gen)
    w1, w2 = torch.randn(h * d, 4 * h * d, generator=gen), torch.randn(4 * h * d, h * d, generator=gen)
    fns = {"split": lambda: split(q, k, v), "fused": lambda: fused(q, k, v),
           "sinkhorn_k3": lambda: sinkhorn_attention(q, k, v, n_iters=3)}  # fmt: skip
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for _ in range(ROUNDS):
            for name, fn in fns.items():
                torch.relu(x @ w1) @ w2  # the model's other layers, between attention calls
                begin = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - begin)
    medians = {name: 1e3 * sorted(s)[len(s) // 2] for name, s in samples.items()}
    return {"b": b, "h": h, "n": n, "d": d, "median_ms": medians}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before, rows = load_average(), []
    for b, h, n, d in SHAPES:
        rows.append(run_shape(b, h, n, d))
        print(f"b{b} h{h} n{n} d{d} " + " ".join(f"{k}={v:.3f}ms" for k, v in rows[-1]["median_ms"].items()), flush=True)
    write_script_result(args.out, schema="asap.scripts.fused_vs_split/1", script="scripts/bench_fused_vs_split.py",
                        argv=argv if argv is not None else sys.argv[1:], load_before=load_before, rounds=ROUNDS,
                        rows=rows)  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
