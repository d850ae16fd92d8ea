"""The training-cost benchmark runs end to end on a tiny configuration and writes well-formed JSON."""

from __future__ import annotations

import json

from asap.bench.training_cost import Shape, default_methods, main, run_training_cost


def test_tiny_run_writes_json_with_every_method(tmp_path):
    out = tmp_path / "training_cost.json"
    methods = default_methods(memory_budget_bytes=4096, esp_untiled=True)  # tiny budget: the tiled path runs
    report = run_training_cost(shapes=(Shape("tiny", seq_len=8, num_heads=2, head_dim=4, batch=2),),
                               methods=methods, depth=1, repeats=2, out=out)
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(report))
    assert {"config", "machine", "git_revision", "memory_measure", "results"} <= set(written)
    assert written["machine"]["torch"]
    results = written["results"]["tiny"]
    assert set(results) == {m.label for m in methods}
    for entry in results.values():
        assert len(entry["seconds"]) == len(entry["memory_bytes"]) == 2
        assert entry["median_seconds"] > 0 and entry["median_memory_bytes"] > 0
        assert set(entry["time_ratio_to"]) == set(entry["memory_ratio_to"]) == {"sinkhorn_k3", "sinkhorn_k11"}
    assert results["sinkhorn_k3"]["time_ratio_to"]["sinkhorn_k3"] == 1.0


def test_command_line_entry_point(tmp_path, capsys):
    out = tmp_path / "cli.json"
    main(["--out", str(out), "--shape", "tiny:6:2:4:1", "--depth", "1", "--repeats", "1", "--device", "cpu"])
    assert set(json.loads(out.read_text())["results"]["tiny"]) == {"softmax", "sinkhorn_k3", "sinkhorn_k11", "esp"}
    assert "esp" in capsys.readouterr().out
