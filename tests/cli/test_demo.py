"""``asap demo`` end to end, shrunk (1 epoch, a few hundred images) to stay fast."""

from __future__ import annotations

import json

import torch

from asap.cli.main import main
from asap.compile import load_compiled


def test_demo_writes_table_pictures_and_a_loadable_model(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["demo", "--out", str(tmp_path), "--epochs", "1", "--limit", "200", "--calibration", "64",
                     "--slices", "4", "--repeats", "1", "--lengths", "8,16", "--quiet"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    printed = capsys.readouterr().out
    assert "Sinkhorn K=3 (same cost)" in printed and "attention_speedup" in printed
    demo = json.loads((tmp_path / "demo.json").read_text())
    assert [row["model"] for row in demo["rows"]] == ["teacher (Sinkhorn K=11)", "Sinkhorn K=3 (same cost)", "ASAP"]
    teacher_row = demo["rows"][0]
    assert teacher_row["attention_speedup"] == 1.0 and teacher_row["attention_ms"] > 0
    assert [row["n"] for row in demo["scaling"]] == [8, 16] and all(row["asap_speedup"] > 0 for row in demo["scaling"])
    assert all(0 <= row["accuracy"] <= 100 for row in demo["rows"])
    for name in ("attention_maps.png", "demo.txt", "asap/fidelity.png", "asap/manifest.json"):
        assert (tmp_path / name).is_file(), name
    model, manifest = load_compiled(tmp_path / "asap")
    assert [layer["teacher"]["n_iters"] for layer in manifest["compiled_layers"]] == [11, 11]
    # A second run reuses the trained teacher instead of training again.
    assert main(["demo", "--out", str(tmp_path), "--limit", "200", "--calibration", "64", "--slices", "4",
                 "--repeats", "1", "--lengths", "8", "--quiet"]) == 0  # fmt: skip
    assert "reusing the teacher" in capsys.readouterr().out
