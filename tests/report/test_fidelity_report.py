"""asap report renders a fidelity plane of schema /2: every map kind's R2, KL, cost and the K=3 / K=5 comparison."""

from __future__ import annotations

import json

import torch

from asap.attention.operators import SinkhornOperator
from asap.bench import fidelity
from asap.bench.fidelity import FidelityConfig, LayerCall, layer_plane
from asap.report import generate_report


def test_fidelity_v2_is_rendered_with_every_map(tmp_path):
    gen = torch.Generator().manual_seed(0)
    valid = torch.arange(10)[None] < torch.tensor([10, 7, 10])[:, None]
    calls = [LayerCall(*(3 * torch.randn(3, 2, 10, 8, generator=gen) for _ in range(3)), valid) for _ in range(5)]
    config = FidelityConfig(slices=(4,), extra_steps=(0, 2), truncated=(1, 3, 5), budget_s=0.01, repeats=2,
                            maps=("linear", "relu", "mlp"), map_steps=10)  # fmt: skip
    plane = layer_plane(calls[:3], calls[3:], SinkhornOperator(n_iters=5, eps=1.0), config)
    layer = {"layer": 0, "name": "blocks.0.attn.operator", **plane, "verdict": fidelity.pareto_verdict(plane["points"]),
             "against_truncation": fidelity.against_truncation(plane["points"])}  # fmt: skip
    doc = {"schema": fidelity.SCHEMA, "command": "asap bench fidelity RUN --maps linear,relu,mlp",
           "source": {"kind": "run", "run_dir": "runs/x"}, "config": {**config.__dict__},
           "calibration_examples": 9, "held_out_examples": 6, "layers": [layer], "machine": None}  # fmt: skip
    results = tmp_path / "results"
    (results / "fidelity").mkdir(parents=True)
    (results / "fidelity" / "x.json").write_text(json.dumps(doc))
    text = generate_report(results).read_text()
    assert "### `fidelity/x.json`" in text and "asap bench fidelity RUN --maps linear,relu,mlp" in text
    for kind in ("linear", "relu", "mlp"):
        assert f"{kind} L=4: " in text  # its held-out R2
        assert f"| 0 | {kind} | " in text  # its row of the K=3 / K=5 table
    assert "| asap_relu_l4_j0 | " in text and "| asap_mlp_l4_j2 | " in text
    assert "| method | row TV | row KL | column error | ms per call | cost (softmax calls) |" in text
    assert "issue 11's test" in text
