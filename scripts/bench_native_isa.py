"""The native kernels' AVX2 and AVX-512 builds on one machine: ASAP against softmax and Sinkhorn K = 3.

The library is built for the widest vectors the CPU has (``asap.attention.native.instruction_set``); a CPU
with AVX-512 never runs the AVX2 build that most laptops and many cloud CPUs (AMD Zen 1-3, Intel client
parts) run. Each *variant* builds the library from a C source for one instruction set
(``$ASAP_NATIVE_ISA``) into its own cache file and runs in its own process; the processes alternate round
by round (``--rounds``), and each one times ASAP's operator (random coefficients, the dispatched native
path), softmax attention and Sinkhorn K = 3 interleaved on the same inputs, so every ASAP time is also a
ratio to softmax and to K = 3 measured side by side. Medians over the rounds.
``--variant LABEL=SOURCE[:ISA]`` adds one (SOURCE ``-`` = the installed ``asap_cpu.c``; ISA ``avx512``,
``avx2`` or ``generic``, default this CPU's); the default compares this CPU's build of the installed
source with its AVX2 build. The AVX2 build's times on an AVX-512 CPU say how its code compares, not what
an AVX2 CPU (with torch's AVX2 kernels for softmax and Sinkhorn) would measure. Writes a JSON (machine,
threads, load average, command)::

    python scripts/bench_native_isa.py --threads 1 --out results/bench/native_isa_1_thread.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = [(8, 8, 16, 64), (8, 8, 32, 64), (8, 8, 64, 64), (8, 8, 128, 64), (32, 4, 17, 16), (32, 4, 65, 16),
          (8, 8, 512, 64)]
CALLS = 25  # timed calls of each function per round, interleaved


def worker(source: str, threads: int) -> dict:
    """One round in this process: the library built from ``source`` (for ``$ASAP_NATIVE_ISA``), every shape
    timed."""
    import torch

    from asap.attention import native
    from asap.attention.functional import sinkhorn_attention, softmax_attention
    from asap.bench.operator_methods import random_asap_operator

    torch.set_num_threads(threads)
    if source != "-":
        native.SOURCE = Path(source)  # the cache file is keyed by the source's bytes and the flags
    if native.unavailable():
        raise SystemExit(native.unavailable())
    isa = native.instruction_set()
    out = {}
    for b, h, n, d in SHAPES:
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
        op = random_asap_operator(heads=h, head_dim=d, num_slices=16, eps=1.0, seed=0, device=torch.device("cpu"),
                                  extra_features=("qk_mean", "q_norm"))  # fmt: skip
        fns = {"asap": lambda: op(q, k, v), "softmax": lambda: softmax_attention(q, k, v),
               "sinkhorn_k3": lambda: sinkhorn_attention(q, k, v, n_iters=3)}  # fmt: skip
        samples: dict[str, list[float]] = {name: [] for name in fns}
        with torch.no_grad():
            for fn in fns.values():
                fn()
            for _ in range(CALLS):
                for name, fn in fns.items():
                    begin = time.perf_counter()
                    fn()
                    samples[name].append(time.perf_counter() - begin)
        out[f"{b}x{h}x{n}x{d}"] = {name: statistics.median(s) for name, s in samples.items()}
    return {"isa": isa, "shapes": out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; each variant runs once per round (default 7)")
    parser.add_argument("--variant", action="append", default=None, metavar="LABEL=SOURCE[:ISA]")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--worker", metavar="SOURCE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads)))
        return 0
    from asap.bench.measure import write_script_result
    from asap.env import load_average

    variants = {}
    for text in args.variant or ["default=-", "avx2=-:avx2"]:
        label, _, rest = text.partition("=")
        source, _, isa = rest.partition(":")
        if not label or not source:
            parser.error(f"--variant LABEL=SOURCE[:ISA], got {text!r}")
        variants[label] = (source, isa)
    load_before = load_average()
    rounds: dict[str, list[dict]] = {label: [] for label in variants}
    for r in range(args.rounds):
        for label, (source, isa) in variants.items():
            env = {key: value for key, value in os.environ.items() if key != "ASAP_NATIVE_ISA"}
            if isa:
                env["ASAP_NATIVE_ISA"] = isa
            proc = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--out", str(args.out),
                                   "--worker", source], capture_output=True, text=True, check=True, env=env)  # fmt: skip
            rounds[label].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    results = {}
    for label, runs in rounds.items():
        results[label] = {"isa": runs[0]["isa"], "shapes": {}}
        for shape, first in runs[0]["shapes"].items():
            ms = {name: 1e3 * statistics.median(run["shapes"][shape][name] for run in runs) for name in first}
            results[label]["shapes"][shape] = {"median_ms": ms, "asap_softmax_calls": ms["asap"] / ms["softmax"],
                                               "k3_over_asap": ms["sinkhorn_k3"] / ms["asap"]}  # fmt: skip
    write_script_result(args.out, schema="asap.scripts.native_isa/1", script="scripts/bench_native_isa.py",
                        argv=sys.argv[1:] if argv is None else argv, load_before=load_before, threads=args.threads,
                        rounds=args.rounds, calls_per_round=CALLS, results=results,
                        variants={label: {"source": s, "isa": isa or "this CPU's"} for label, (s, isa) in variants.items()})  # fmt: skip
    for label, result in results.items():
        for shape, row in result["shapes"].items():
            print(f"{label:>10} ({result['isa']}) {shape:>14}  asap {row['median_ms']['asap']:.3f} ms  "
                  f"{row['asap_softmax_calls']:.2f} softmax calls  {row['k3_over_asap']:.2f}x over K=3")
    return 0


if __name__ == "__main__":
    sys.exit(main())
