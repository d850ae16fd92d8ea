"""The accuracy table on seconds-long digits runs: every method per seed, derived models, reuse, the report."""

from __future__ import annotations

import json
import statistics

import pytest

from asap.bench import accuracy
from asap.bench.accuracy import SCHEMA, AccuracyConfig, run_accuracy
from asap.report import generate_report

TINY = dict(limit=300, dim=16, depth=1, num_heads=2, epochs=1, batch_size=16, lr=3e-3)


def tiny(tmp_path, **kwargs) -> AccuracyConfig:
    options = dict(suite="digits", seeds=(0, 1), runs_dir=str(tmp_path / "runs"), overrides=dict(TINY),
                   timing_budget_s=0.2, timing_batch=8)  # fmt: skip
    options.update(kwargs)
    return AccuracyConfig(**options)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = tmp_path_factory.mktemp("accuracy")
    out = root / "results" / "accuracy" / "digits.json"
    doc = run_accuracy(tiny(root), out=out, command="asap bench accuracy --suite digits", log=lambda *_: None)
    return root, out, doc


def test_every_method_and_seed_is_scored_and_summarised(table):
    _, out, doc = table
    assert json.loads(out.read_text()) == doc and doc["schema"] == SCHEMA
    assert doc["methods"] == ["softmax", "sinkhorn_k11", "esp", "sinkhorn_k3", "asap"]
    assert doc["seeds"] == [0, 1] and doc["esp_options"] == {"tau_sort": 0.01}
    for method in doc["methods"]:
        values = [doc["per_seed"][str(s)][method]["accuracy"] for s in (0, 1)]
        assert all(0.0 <= v <= 1.0 for v in values)
        summary = doc["summary"][method]
        assert summary["n"] == 2 and summary["mean"] == pytest.approx(statistics.fmean(values))
        assert summary["std"] == pytest.approx(statistics.stdev(values))
    assert set(doc["inference"]["median_ms"]) == set(doc["methods"])
    assert (out.parent / "command.txt").read_text().startswith("digits.json: asap bench accuracy")


def test_derived_models_come_from_the_teacher_and_rescoring_agrees(table):
    _, _, doc = table
    for seed in ("0", "1"):
        record = doc["per_seed"][seed]
        teacher = record["sinkhorn_k11"]
        # The trainer's test score and the benchmark's own evaluation of the same model and split agree.
        assert teacher["accuracy_rescored"] == pytest.approx(teacher["accuracy"])
        for derived in ("sinkhorn_k3", "asap"):
            assert record[derived]["from"] == "sinkhorn_k11"
            assert 0.0 <= record[derived]["agreement_with_teacher"] <= 1.0
        assert record["asap"]["calibration_examples"] > 0


def test_rerun_reuses_finished_runs_and_refuses_a_changed_budget(table):
    root, out, doc = table
    model = root / "runs" / "digits" / "softmax_seed0" / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    again = run_accuracy(tiny(root, seeds=(0,), methods=("softmax",)), out=root / "again.json", command="x",
                         log=lambda *_: None)  # fmt: skip
    assert model.stat().st_mtime_ns == stamp
    assert again["per_seed"]["0"]["softmax"]["accuracy"] == doc["per_seed"]["0"]["softmax"]["accuracy"]
    assert again["methods"] == ["softmax"] and again["inference"] is None  # no teacher: nothing derived
    with pytest.raises(ValueError, match="trained with other settings"):
        run_accuracy(tiny(root, seeds=(0,), methods=("softmax",), overrides={**TINY, "epochs": 2}),
                     out=root / "changed.json", command="x", log=lambda *_: None)  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(suite="nope"), "unknown suite"), (dict(methods=("asap",)), "unknown method"), (dict(seeds=()), "seed"),
     (dict(teacher_iters=10), "odd"), (dict(truncated_iters=(11,)), "below the teacher")],
)  # fmt: skip
def test_bad_configurations_are_refused(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(tmp_path, **kwargs)


def test_the_report_tabulates_and_plots_the_table(table):
    root, out, doc = table
    readme = generate_report(out.parent.parent).read_text()
    assert "### digits: `accuracy/digits.json`" in readme
    mean = doc["summary"]["asap"]["mean"]
    assert f"| `asap` | compiled from sinkhorn_k11 | {100 * mean:.2f} ±" in readme
    assert (out.parent / "accuracy_vs_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_reports_bad_options(capsys):
    assert accuracy.main(["--suite", "digits", "--teacher-iters", "4"]) == 2
    assert "odd" in capsys.readouterr().err


def test_esp_can_be_limited_to_the_first_seeds(table):
    root, _, _ = table
    doc = run_accuracy(tiny(root, esp_seeds=1), out=root / "esp1.json", command="x", log=lambda *_: None)
    assert "esp" in doc["per_seed"]["0"] and "esp" not in doc["per_seed"]["1"]
    assert doc["summary"]["esp"]["n"] == 1 and doc["summary"]["esp"]["std"] is None
    assert doc["summary"]["asap"]["n"] == 2 and doc["esp_seeds"] == 1
