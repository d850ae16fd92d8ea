"""``asap compile`` end to end on a tiny Sinkhorn model trained on the bundled digits data."""

from __future__ import annotations

import json

import pytest
import torch

from asap.cli.main import main
from asap.compile import load_compiled
from asap.compile.runs import load_run_model
from asap.train import TrainConfig, load_model, train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("runs") / "digits_sk5"
    config = TrainConfig(
        dataset="digits", out_dir=str(run_dir), method="sinkhorn", n_iters=5, epochs=1, limit=200, batch_size=32,
        dim=16, depth=2, num_heads=2, patch_size=4, progress=False, device="cpu",
    )  # fmt: skip
    train(config)
    yield run_dir
    torch.set_num_threads(threads)


def test_compile_cli_end_to_end(tiny_run, tmp_path, capsys):
    out = tmp_path / "compiled"
    code = main(["compile", str(tiny_run), "--calibration", "96", "--batch-size", "24", "--out", str(out),
                 "--slices", "4", "--eval-limit", "60", "--quiet"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "r2_held_out" in printed and "sinkhorn_K3" in printed
    for name in ("model.safetensors", "manifest.json", "fidelity.json", "fidelity.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "fidelity.json").read_text())
    assert report["calibration"]["examples"] == 96 and report["calibration"]["held_out_batches"] == 1
    assert set(report["accuracy"]) >= {"teacher", "asap", "sinkhorn_K3"} and report["accuracy"]["num_samples"] == 60
    model, manifest = load_compiled(out)
    assert len(manifest["compiled_layers"]) == 2 and manifest["run_config"]["data"]["dataset"] == "digits"
    teacher, _ = load_model(tiny_run)
    assert manifest["model_config"] == teacher.config.to_dict()
    images = torch.randn(3, 1, 8, 8)
    assert torch.isfinite(model(images)).all()
    # What `asap eval` calls: a compiled directory loads as the compiled model with the teacher's run config.
    again, run_config = load_run_model(out)
    assert run_config.data["dataset"] == "digits"
    torch.testing.assert_close(again(images), model(images), rtol=0, atol=0)
    assert type(load_run_model(tiny_run)[0].blocks[0].attn.operator).__name__ == "SinkhornOperator"


def test_compile_cli_refuses_bad_input(tiny_run, tmp_path, capsys):
    assert main(["compile", str(tmp_path), "--calibration", "8", "--out", str(tmp_path / "x")]) == 2
    assert "config.json: file not found" in capsys.readouterr().err
    args = ["--calibration", "8", "--out", str(tmp_path / "y"), "--layers", "5", "--no-eval", "--quiet"]
    code = main(["compile", str(tiny_run), *args])
    assert code == 2 and "out of range" in capsys.readouterr().err
    # argparse refusals are one line and exit status 2, returned by main like every user error
    assert main(["compile", str(tiny_run), "--calibration", "8", "--out", str(tmp_path / "z"), "--layers", "a,b"]) == 2
    assert "--layers" in capsys.readouterr().err and not (tmp_path / "z").exists()


def test_experiment_driver_writes_results_and_commands(tiny_run, tmp_path):
    from asap.compile.experiments import main as experiments

    out = tmp_path / "results"
    argv = [str(tiny_run), "--out", str(out), "--calibration", "48", "--batch-size", "16", "--eval-limit", "40",
            "--experiments", "frozen,downstream,slices", "--slice-grid", "2,3", "--frozen-layers", "1", "--threads", "1"]
    assert experiments(argv) == 0
    frozen = json.loads((out / "frozen_layer" / "result.json").read_text())
    assert [r["options"]["layers"] for r in frozen["results"]] == [[1]]
    downstream = json.loads((out / "downstream" / "result.json").read_text())
    assert downstream["options"]["layers"] is None and len(downstream["layers"]) == 2
    assert set(downstream["accuracy"]) == {"teacher", "sinkhorn_K3", "asap"}
    slices = json.loads((out / "ablation_slices" / "result.json").read_text())
    assert [r["value"] for r in slices["results"]] == [2, 3]
    assert [r["options"]["num_slices"] for r in slices["results"]] == [2, 3]
    command = (out / "downstream" / "command.txt").read_text()
    assert command.startswith("python -m asap.compile.experiments ") and "--slice-grid 2,3" in command
    assert (out / "downstream" / "fidelity.png").is_file()


def test_eval_cli_accepts_a_compiled_model(tiny_run, tmp_path, capsys):
    out = tmp_path / "compiled"
    assert main(["compile", str(tiny_run), "--calibration", "64", "--batch-size", "32", "--out", str(out),
                 "--slices", "4", "--no-eval", "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["eval", str(out), "--limit", "50", "--output", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["attention"]["method"] == "asap" and result["attention"]["compiled_layers"] == [0, 1]
    model, _ = load_compiled(out)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["num_samples"] == 50
