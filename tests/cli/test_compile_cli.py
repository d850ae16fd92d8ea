"""``asap compile`` end to end on a tiny Sinkhorn model trained on the bundled digits data."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from asap.cli.main import main
from asap.errors import ConfigError, UnsafePathError
from asap.compile import load_compiled
from asap.runs import load_run_model
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
    assert "r2_held_out" in printed and "sinkhorn_k3" in printed
    for name in ("model.safetensors", "manifest.json", "fidelity.json", "fidelity.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "fidelity.json").read_text())
    assert report["calibration"]["examples"] == 96 and report["calibration"]["held_out_batches"] == 1
    assert set(report["accuracy"]) >= {"teacher", "asap", "sinkhorn_k3"} and report["accuracy"]["num_samples"] == 60
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
            "--experiments", "frozen,downstream,slices", "--slice-grid", "2,3", "--frozen-layers", "1", "--threads", "1",
            "--model-rounds", "2", "--timing-batch", "4"]  # fmt: skip
    assert experiments(argv) == 0
    frozen = json.loads((out / "frozen_layer" / "result.json").read_text())
    assert [r["options"]["layers"] for r in frozen["results"]] == [[1]]
    downstream = json.loads((out / "downstream" / "result.json").read_text())
    assert downstream["options"]["layers"] is None and len(downstream["layers"]) == 2
    assert set(downstream["accuracy"]) == {"teacher", "sinkhorn_k3", "asap"}
    # the whole model, every layer compiled or truncated, timed against the teacher in interleaved rounds
    whole = downstream["whole_model"]
    assert set(whole["models"]) == {"teacher", "asap", "sinkhorn_k3", "sinkhorn_k5"} and whole["rounds"] == 2
    assert whole["models"]["teacher"]["model_speedup"] == 1.0 and all(m["model_ms"] > 0 for m in whole["models"].values())
    import shutil

    from asap.report import generate_report

    shutil.copytree(out, tmp_path / "report" / "compile" / "tiny")  # the layout asap report reads
    assert "whole model, every Sinkhorn layer replaced" in generate_report(tmp_path / "report").read_text()
    slices = json.loads((out / "ablation_slices" / "result.json").read_text())
    assert [r["value"] for r in slices["results"]] == [2, 3]
    assert [r["options"]["num_slices"] for r in slices["results"]] == [2, 3]
    command = (out / "downstream" / "command.txt").read_text()
    assert command.startswith("result.json: python -m asap.compile.experiments ") and "--slice-grid 2,3" in command
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


# --------------------------------------------------------------------------- issue 11: dual-map kinds, --target-tv


def _compile(run, out, *extra):
    return main(["compile", str(run), "--calibration", "64", "--batch-size", "16", "--out", str(out), "--slices", "3",
                 "--no-eval", "--quiet", "--map-steps", "15", *extra])  # fmt: skip


def test_compile_cli_map_kinds(tiny_run, tmp_path, capsys):
    out = tmp_path / "mlp"
    assert _compile(tiny_run, out, "--map", "mlp", "--mlp-hidden", "4") == 0
    model, manifest = load_compiled(out)
    assert [layer["map"] for layer in manifest["compiled_layers"]] == [{"kind": "mlp", "options": {"hidden": 4}}] * 2
    assert manifest["options"]["map_kind"] == "mlp" and manifest["options"]["map_options"] == {"mlp": {"hidden": 4}}
    assert type(model.blocks[0].attn.operator.dual_map).__name__ == "MlpDualMap"
    capsys.readouterr()


@pytest.mark.parametrize("flags, words", [
    (["--mlp-hidden", "4"], "--mlp-hidden is an option of the mlp map, but the map is linear"),
    (["--map", "relu", "--mlp-hidden", "4"], "--mlp-hidden is an option of the mlp map, but the map is relu"),
    (["--map", "mlp", "--relu-depth", "2"], "--relu-depth is an option of the relu map"),
    (["--map", "relu", "--target-tv", "0.1"], "--map and --target-tv exclude each other"),
    (["--target-tv", "0"], "target_tv must be a number in (0, 1]"),
    (["--target-tv", "2"], "target_tv must be a number in (0, 1]"),
    (["--map", "spline"], "--map"),
    (["--relu-depth", "0", "--map", "relu"], "--relu-depth"),
])  # fmt: skip
def test_compile_cli_refuses_map_flags_that_do_not_go_together(tiny_run, tmp_path, capsys, flags, words):
    out = tmp_path / "refused"
    assert _compile(tiny_run, out, *flags) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err, err
    assert not out.exists()


def test_compile_cli_target_tv_chooses_per_layer_and_records_it(tiny_run, tmp_path, capsys):
    # The tiny teacher's attention is nearly flat: with 2 slices and no extra feature the maps miss it (held-out
    # R2 ~ 0.1) and a warm-start step is what helps, so a tight target has something to choose.
    def run(target: str):
        out = tmp_path / f"tv_{target}"
        assert _compile(tiny_run, out, "--target-tv", target, "--slices", "2", "--extra-features", "none") == 0
        printed = capsys.readouterr().out
        model, manifest = load_compiled(out)
        report = json.loads((out / "fidelity.json").read_text())
        assert report["selection"] == [layer["selection"]["line"] for layer in manifest["fidelity"]]
        for line in report["selection"]:
            assert line in printed
        for layer, entry, block in zip(manifest["fidelity"], manifest["compiled_layers"], model.blocks):
            chosen = layer["selection"]["chosen"]
            assert entry["map"]["kind"] == chosen["map"] and entry["extra_steps"] == chosen["extra_steps"]
            assert (block.attn.operator.dual_map.kind, block.attn.operator.extra_steps) == (chosen["map"], chosen["extra_steps"])
            assert all(isinstance(c["row_tv"], float) and c["cost"] > 0 for c in layer["selection"]["candidates"])
        return manifest["fidelity"]

    loose = run("0.9")  # any candidate reaches it: the cheapest, the linear map, is taken and alone measured
    for layer in loose:
        assert layer["selection"]["reached"] and [(c["map"], c["extra_steps"]) for c in layer["selection"]["candidates"]] == [("linear", 0)]
    unreachable = run("1e-12")  # none does: every candidate measured, the lowest TV taken, and the report says so
    for layer in unreachable:
        selection = layer["selection"]
        assert not selection["reached"] and len(selection["candidates"]) == 9 and "no candidate reaches" in selection["line"]
        assert selection["chosen"]["row_tv"] == min(c["row_tv"] for c in selection["candidates"])
    # a target between layer 0's linear TV and its best: a richer map or extra steps are chosen
    tried = unreachable[0]["selection"]["candidates"]
    best = min(c["row_tv"] for c in tried)
    assert best < tried[0]["row_tv"], "no candidate beats the linear map: the test would prove nothing"
    tight = run(repr((tried[0]["row_tv"] + best) / 2))
    selection = tight[0]["selection"]
    assert selection["reached"] and (selection["chosen"]["map"], selection["chosen"]["extra_steps"]) != ("linear", 0)
    assert selection["candidates"][0]["row_tv"] == tried[0]["row_tv"]


# --------------------------------------------------------------------------- issue 12 items 3 and 4


def _tree(root):
    """Every path under ``root`` with its bytes (files), link target (symlinks) or None (folders)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                out[rel] = None
            else:
                with open(path, "rb") as f:
                    out[rel] = f.read()
    return out


@pytest.fixture
def sandbox(tiny_run, tmp_path):
    """A copy of the run (``R``), another saved run (``other``), an artifact (``art``) and a plain folder."""
    run = tmp_path / "R"
    shutil.copytree(tiny_run, run)
    shutil.copytree(tiny_run, tmp_path / "other")
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "manifest.json").write_text("{}")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "link_to_run").symlink_to(run, target_is_directory=True)
    return run


REFUSED_OUT = [
    ("R", "run folder"),                 # the teacher itself: its weights would be overwritten
    ("R/compiled", "run folder"),         # inside the run
    (".", "contains the run folder"),     # contains the run
    ("link_to_run", "run folder"),        # the run again, through a symlink
    ("link_to_run/sub", "run folder"),
    ("other", "saved run"),               # another run
    ("other/compiled", "saved run"),      # inside another run
    ("art/compiled", "compiled artifact"),  # inside an artifact
    ("plain", "not empty"),               # someone's folder
    ("a_file", "not a folder"),
]


@pytest.mark.parametrize("out, reason", REFUSED_OUT, ids=[o for o, _ in REFUSED_OUT])
def test_compile_refuses_an_out_that_would_damage_a_run_and_writes_nothing(sandbox, capsys, out, reason):
    root = sandbox.parent
    before = _tree(root)
    code = main(["compile", str(sandbox), "--calibration", "16", "--out", str(root / out), "--no-eval", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and reason in err and "--out" in err, err
    assert _tree(root) == before


def test_compile_may_replace_an_earlier_artifact(tiny_run, tmp_path, capsys):
    from asap.runs import check_output_dir

    out = tmp_path / "compiled"
    args = ["compile", str(tiny_run), "--calibration", "32", "--out", str(out), "--slices", "2", "--no-eval", "--quiet"]
    assert main(args) == 0 and main(args) == 0  # the second run overwrites the first artifact
    load_compiled(out)
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", run_dir=tiny_run) == tmp_path / "empty"
    assert check_output_dir(tmp_path / "new" / "deeper", run_dir=tiny_run) == tmp_path / "new" / "deeper"
    (out / "sub").mkdir()
    with pytest.raises(ConfigError, match="also holds"):
        check_output_dir(out, run_dir=tiny_run)


@pytest.mark.parametrize("name", ["/etc/hostname", "../../x", "sub/tokenizer.json"])
def test_compile_refuses_a_tokenizer_name_outside_the_run(sandbox, capsys, name):
    """An image run's config.json naming a tokenizer used to get that file copied into the artifact."""
    config = json.loads((sandbox / "config.json").read_text())
    config["data"]["tokenizer"] = name
    (sandbox / "config.json").write_text(json.dumps(config))
    root = sandbox.parent
    before = _tree(root)
    out = root / "compiled"
    code = main(["compile", str(sandbox), "--calibration", "16", "--out", str(out), "--no-eval", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "data.tokenizer" in err, err
    assert _tree(root) == before and not out.exists()


def test_teacher_extra_files_checks_the_name(tiny_run):
    from asap.runs import load_teacher

    teacher = load_teacher(tiny_run)
    teacher.run_config.data["tokenizer"] = "/etc/hostname"
    with pytest.raises(UnsafePathError, match="data.tokenizer"):
        teacher.extra_files()
    (tiny_run / "tokenizer.json").write_text("{}")
    try:
        teacher.run_config.data["tokenizer"] = "tokenizer.json"
        assert teacher.extra_files() == [tiny_run / "tokenizer.json"]
    finally:
        (tiny_run / "tokenizer.json").unlink()
        del teacher.run_config.data["tokenizer"]
