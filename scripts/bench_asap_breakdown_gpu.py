"""Where ASAP's time goes at short rows on a CUDA GPU.

Times the dual map (the Triton kernel and the PyTorch ops), the closure from a given dual, the whole
operator and Sinkhorn K = 3 at b = 8, h = 8, d = 64, n = 16 ... 256 and at the MiniLM teacher's b = 16, h = 12, d = 32, n = 128, 256 (fp16) (medians of 30 calls, CUDA
events), and checks the Triton dual map against the PyTorch one (max abs difference after centring each
(b, h): the uncentred maps may differ by a constant). Usage: python scripts/bench_asap_breakdown_gpu.py OUT.json
"""

import json
import sys

import torch

from asap.attention import asap_attention, build_operator, sinkhorn_attention, triton_dual_map

SHAPES = [(8, 8, 16, 64), (8, 8, 64, 64), (8, 8, 128, 64), (8, 8, 256, 64), (16, 12, 128, 32), (16, 12, 256, 32)]
res = {}
for b, h, n, d in SHAPES:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
    op = build_operator("asap", num_heads=h, head_dim=d, num_slices=16, extra_features=("qk_mean", "q_norm")).cuda()
    op.dual_map.set_coefficients(torch.randn(h, 18, device="cuda") / 18**0.5)
    s = d**-0.5
    with torch.no_grad():
        f = op.dual_map(q, k, scale=s, center=False)
        def dual_kernel():  # the Triton kernel whatever the dispatch rule says
            return triton_dual_map.slice_dual_map_triton(q, k, op.dual_map.directions, op.dual_map.coef, scale=s,
                                                         c_mean=op.dual_map.extra_coef[:, 0], c_norm=op.dual_map.extra_coef[:, 1])

        def dual_torch():
            op.dual_map.use_native = False
            try:
                return op.dual_map(q, k, scale=s, center=False)
            finally:
                op.dual_map.use_native = True
        fns = {"dual_map_triton": dual_kernel, "dual_map_dispatched": lambda: op.dual_map(q, k, scale=s, center=False),
               "dual_map_torch": dual_torch,
               "closure": lambda: asap_attention(q, k, v, f), "asap": lambda: op(q, k, v),
               "sinkhorn_k3": lambda: sinkhorn_attention(q, k, v, n_iters=3)}
        a, c = dual_torch(), fns["dual_map_triton"]()
        err = ((a - a.mean(-1, keepdim=True)) - (c - c.mean(-1, keepdim=True))).abs().max().item()
        times = {}
        for name, fn in fns.items():
            for _ in range(5): fn()
            torch.cuda.synchronize()
            st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ts = []
            for _ in range(30):
                st.record(); fn(); en.record(); torch.cuda.synchronize(); ts.append(st.elapsed_time(en))
            times[name] = sorted(ts)[15]
    res[f"b{b} h{h} n{n} d{d}"] = {"ms": times, "dual_map_max_abs_diff_triton_vs_torch": err}
    print((b, h, n, d), {a: round(x, 3) for a, x in times.items()}, "diff %.2e" % err, flush=True)
json.dump({"dtype": "float16", "medians_of_30": res, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "command": " ".join(["python"] + sys.argv)}, open(sys.argv[1], "w"), indent=1)
