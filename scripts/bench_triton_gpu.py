#!/usr/bin/env python
"""GPU benchmark of the Triton ASAP kernels against SDPA, the PyTorch ASAP path and the Sinkhorn teacher.

Usage (on a machine with a CUDA GPU; refuses to run anywhere else)::

    python scripts/bench_triton_gpu.py --out results/bench/triton_gpu.json

For every sequence length ``n = m`` (default 512 ... 8192), dtype (default fp16) and
padding setting (none / about a quarter of the tokens padded, lengths varying over the
batch), one interleaved run (:func:`asap.bench.measure.benchmark`: round-robin calls,
CUDA events, medians and IQRs, out-of-memory recorded instead of crashing) times the
forward pass, under ``torch.inference_mode()``, of

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (one softmax pass; the
  padded setting passes a ``(b, 1, 1, n)`` key-padding mask);
* ``asap_triton``: :func:`asap.attention.triton_kernels.asap_attention_triton` from a
  given ``f_hat`` (padding as ``(b, n)`` vectors: no host sync);
* ``asap_torch``: :func:`asap.attention.functional.asap_attention` with ``backend="flash"``
  (the PyTorch path; ``"auto"`` would choose Triton on CUDA), from the same ``f_hat``
  (padding as the ``(b, 1, n, n)`` mask models build);
* ``asap_l16_triton`` / ``asap_l16_torch``: the whole operator, the L = 16 slice dual map
  (random coefficients: the cost does not depend on them) then either path;
* ``sinkhorn_k{K}``: :func:`asap.sinkhorn_attention`, K in (3, 11, 21) by default.

Before timing a setting, ``asap_triton`` is checked against the PyTorch path on the
same inputs, and (for ``n <= --verify-max-length``) against the fp64 reference by the
low-precision rule (error at most twice that of the plain reference in the same dtype;
fp32: at most 1e-4). A setting that fails is recorded and ``asap_triton`` is not timed.

The JSON holds the configuration, the machine (GPU, versions, git revision, load
average before and after), and per setting: each method's median / IQR / samples,
its peak memory beyond the inputs (``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``), the speed-ups over the K = 21 teacher and over SDPA
("softmax calls" = time / SDPA time), the default Triton tiles and the parity figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

DTYPES = ("float16", "bfloat16", "float32")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
        return values

    def dtypes(text: str) -> list[str]:
        values = [x for x in text.split(",") if x]
        bad = [x for x in values if x not in DTYPES]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"dtypes must be among {DTYPES}, got {text!r}")
        return values

    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", required=True, type=Path, help="JSON file to write (its folder is created)")
    p.add_argument("--lengths", type=ints, default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--batch", type=int, default=4, help="b (default 4: the K = 21 teacher at n = 8192 holds "
                   "several (b, h, n, n) fp32 tensors, 8.6 GB each at b = 4, h = 8)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtypes", type=dtypes, default=["float16"])
    p.add_argument("--sinkhorn-iters", type=ints, default=[3, 11, 21])
    p.add_argument("--eps", type=float, default=1.0)
    p.add_argument("--padding", choices=("both", "none", "padded"), default="both")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10, help="most timed calls per method (interleaved rounds)")
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=3.0, help="timing budget per method and setting")
    p.add_argument("--verify-max-length", type=int, default=1024)
    p.add_argument("--no-full-operator", action="store_true", help="skip the dual map + kernel methods")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.out.exists() and args.out.is_dir():
        p.error(f"--out {args.out} is a directory")
    for name in ("batch", "heads", "head_dim", "repeats", "min_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def refusal() -> str | None:
    """Why this machine cannot run the benchmark (one line), or ``None``."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set: interpreted kernels would be timed; unset it"
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run"
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"needs triton ({err}); install asap-attention[triton]"
    return None


def lengths_for(b: int, n: int) -> list[int]:
    """Valid lengths of the padded setting: from n down to about 0.6 n over the batch (mean ~0.75 n)."""
    if b == 1:
        return [max(1, (3 * n) // 4)]
    return [max(1, n - round(0.4 * n * i / (b - 1))) for i in range(b)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = refusal()
    if reason is not None:
        print(f"bench_triton_gpu: {reason}", file=sys.stderr)
        return 2

    import torch

    return run(args, torch.device("cuda"))


def run(args: argparse.Namespace, device) -> int:
    """The benchmark on ``device`` (``main`` passes CUDA; a CPU run under the interpreter is only a smoke test)."""
    import torch
    import torch.nn.functional as F
    import triton

    from asap.attention import triton_kernels as tk
    from asap.attention.functional import asap_attention, sinkhorn_attention
    from asap.attention.reference import asap_attention_reference
    from asap.bench.measure import benchmark, speedups
    from asap.env import load_average, machine_info
    from asap.bench.operators import random_asap_operator
    from asap.io import atomic_write_json, command_line, method_key
    from asap.transport.masks import key_padding_to_attn_mask

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 settings compare IEEE fp32 against IEEE fp32
    b, h, d, eps = args.batch, args.heads, args.head_dim, args.eps
    scale = d**-0.5
    teacher = method_key("sinkhorn", n_iters=max(args.sinkhorn_iters))
    out: dict[str, Any] = {
        "schema": "asap.scripts.bench_triton_gpu/1",
        "command": command_line("python scripts/bench_triton_gpu.py", sys.argv[1:]),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine_info(device),
        "triton": triton.__version__,
        "load_average_before": load_average(),
        "teacher": teacher,
        "settings": [],
    }
    paddings = {"both": (False, True), "none": (False,), "padded": (True,)}[args.padding]
    started = time.perf_counter()

    def write() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, out, indent=1)  # a partial run still leaves valid JSON with the settings done so far

    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for n in args.lengths:
            for padded in paddings:
                gen = torch.Generator(device=device).manual_seed(args.seed + n)
                q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, generator=gen) for _ in range(3))
                f_hat = torch.randn(b, h, n, device=device, generator=gen)
                f_hat = f_hat - f_hat.mean(dim=-1, keepdim=True)
                valid = mask = sdpa_mask = None
                lengths = None
                if padded:
                    lengths = lengths_for(b, n)
                    valid = torch.arange(n, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
                    mask = key_padding_to_attn_mask(valid)  # (b, 1, n, n): what MultiheadAttention passes
                    sdpa_mask = valid[:, None, None, :]
                setting: dict[str, Any] = {"dtype": dtype_name, "n": n, "padded": padded, "lengths": lengths,
                                           "shape": [b, h, n, d]}
                reason = tk.supports(q, k, v, f_hat, query_valid=valid, key_valid=valid)
                setting["triton_supports"] = reason
                setting["tiles"] = {kind: tk._tiles(kind, dtype, d, None, None)[:2] for kind in ("row", "col")}

                with torch.inference_mode():
                    triton_ok = reason is None and verify(setting, q, k, v, f_hat, mask, valid, eps=eps,
                                                          verify_max_length=args.verify_max_length,
                                                          asap_attention=asap_attention,
                                                          reference=asap_attention_reference, tk=tk)
                    fns = {
                        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask),
                        # backend="flash" pins the PyTorch path: "auto" would pick Triton on CUDA when unmasked
                        "asap_torch": lambda: asap_attention(q, k, v, f_hat, eps=eps, attn_mask=mask, backend="flash"),
                    }
                    if triton_ok:
                        fns["asap_triton"] = lambda: tk.asap_attention_triton(
                            q, k, v, f_hat, eps=eps, query_valid=valid, key_valid=valid)
                    if not args.no_full_operator:
                        op = random_asap_operator(heads=h, head_dim=d, num_slices=16, eps=eps, seed=args.seed,
                                                  device=device)
                        flash_op = random_asap_operator(heads=h, head_dim=d, num_slices=16, eps=eps, seed=args.seed,
                                                        device=device, backend="flash")
                        fns["asap_l16_torch"] = lambda: flash_op(q, k, v, attn_mask=mask)
                        if triton_ok:
                            fns["asap_l16_triton"] = lambda: tk.asap_attention_triton(
                                q, k, v, op.dual_map(q, k, scale=scale, attn_mask=mask), eps=eps,
                                query_valid=valid, key_valid=valid)
                    for iters in args.sinkhorn_iters:
                        fns[method_key("sinkhorn", n_iters=iters)] = (
                            lambda iters=iters: sinkhorn_attention(q, k, v, n_iters=iters, eps=eps, attn_mask=mask))
                    run = benchmark(fns, device=device, warmup=args.warmup, repeats=args.repeats,
                                    min_repeats=args.min_repeats, budget_s=args.budget_s)
                setting["rounds"] = run.rounds
                setting["methods"] = {name: res.to_dict() for name, res in run.results.items()}
                setting["speedup_over_teacher"] = speedups(run, reference=teacher)
                over_sdpa = speedups(run, reference="sdpa")
                setting["softmax_calls"] = {m: (None if s is None else 1.0 / s) for m, s in over_sdpa.items()}
                out["settings"].append(setting)
                out["elapsed_s"] = time.perf_counter() - started
                write()
                summary = ", ".join(
                    f"{m} {r.timing.median_s * 1e3:.2f} ms" if r.timing else f"{m} {'OOM' if r.oom else '-'}"
                    for m, r in run.results.items())
                print(f"{dtype_name} n={n} padded={padded}: {summary}", flush=True)
                del q, k, v, f_hat, mask, valid, sdpa_mask, fns, run
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    out["load_average_after"] = load_average()
    out["elapsed_s"] = time.perf_counter() - started
    write()
    print(f"wrote {args.out}")
    return 0


def verify(setting, q, k, v, f_hat, mask, valid, *, eps, verify_max_length, asap_attention, reference, tk) -> bool:
    """Parity of the Triton path on this setting's inputs; records the figures, returns whether it passed."""
    import torch

    fast = tk.asap_attention_triton(q, k, v, f_hat, eps=eps, query_valid=valid, key_valid=valid)
    torch_path = asap_attention(q, k, v, f_hat, eps=eps, attn_mask=mask, backend="flash")
    parity: dict[str, Any] = {"max_abs_diff_vs_torch_path": float((fast.float() - torch_path.float()).abs().max())}
    ok = bool(torch.isfinite(fast).all())
    n = q.shape[-2]
    if n <= verify_max_length:
        truth = reference(q.double(), k.double(), v.double(), f_hat.double(), eps=eps, attn_mask=mask)
        fast_err = float((fast.double() - truth).abs().max())
        if q.dtype == torch.float32:
            bound = 1e-4
        else:  # the low-precision rule: at most twice the plain reference's error in the same dtype
            plain = reference(q, k, v, f_hat.to(q.dtype), eps=eps, attn_mask=mask)
            bound = 2 * float((plain.double() - truth).abs().max())
        parity.update(max_abs_err_vs_fp64=fast_err, bound=bound)
        ok = ok and fast_err <= bound
        del truth
    else:  # no fp64 reference at this size: the PyTorch path in the same dtype is the yardstick
        bound = 1e-4 if q.dtype == torch.float32 else 5e-2
        parity["bound_vs_torch_path"] = bound
        ok = ok and parity["max_abs_diff_vs_torch_path"] <= bound
    parity["passed"] = ok
    setting["parity"] = parity
    return ok


if __name__ == "__main__":
    sys.exit(main())
