"""asap.env: the one machine description (moved here from tests/bench/test_measure.py with machine_info)."""

from __future__ import annotations

import json

import torch

from asap.env import machine_info


def test_machine_info_describes_the_machine_and_serialises():
    info = machine_info("cpu")
    for key in ("cpu_model", "cpu_count", "torch_threads", "torch", "git_revision", "date_utc", "load_average", "gpu"):
        assert key in info
    assert info["torch"] == torch.__version__
    assert info["cpu_count"] >= 1
    json.dumps(info)
