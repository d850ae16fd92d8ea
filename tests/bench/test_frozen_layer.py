"""The frozen-layer benchmark on a seconds-long digits teacher: accuracies, verified timing, the report."""

from __future__ import annotations

import json

import pytest
import torch

from asap.bench import frozen_layer
from asap.bench.frozen_layer import SCHEMA, capture_layer_inputs
from asap.report import generate_report
from asap.compile.swap import sinkhorn_layers
from asap.runs import load_data, load_teacher, predict
from asap.train import train
from tests.train.conftest import tiny_train_config


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen")
    config = tiny_train_config(root / "teacher", depth=2, epochs=1, method="sinkhorn", n_iters=5, eps=1.0)
    train(config)
    return root


@pytest.fixture(scope="module")
def result(teacher_run):
    out = teacher_run / "results" / "frozen_layer" / "teacher.json"
    argv = [str(teacher_run / "teacher"), "--calibration", "64", "--budget", "0.05", "--timing-batch", "8",
            "--teacher-iters", "9", "--out", str(out)]  # fmt: skip
    assert frozen_layer.main(argv) == 0
    return out, json.loads(out.read_text())


def test_each_layer_is_compiled_alone_scored_and_timed(teacher_run, result):
    _, doc = result
    assert doc["schema"] == SCHEMA and [r["layer"] for r in doc["layers"]] == [0, 1]
    teacher = load_teacher(teacher_run / "teacher")
    pred, labels = predict(teacher.model, load_data(teacher, split="test", limit=None))
    for record in doc["layers"]:
        assert record["accuracy"]["teacher"] == pytest.approx(float((pred == labels).double().mean()))
        assert set(record["accuracy"]) == {"teacher", "asap", "sinkhorn_k3"}
        assert record["asap_max_abs_error_vs_fp64"] < 1e-4
        assert set(record["median_ms"]) == {"asap", "sinkhorn_k5", "sinkhorn_k9", "sinkhorn_k3", "softmax"}
        ratio = record["speedup_of_asap_over"]["sinkhorn_k9"]
        assert ratio == pytest.approx(record["median_ms"]["sinkhorn_k9"] / record["median_ms"]["asap"])
        assert record["shape"]["q"][0] == 8  # the timing batch
        # the whole model, interleaved: teacher, this layer compiled, this layer truncated (K = 5 is the teacher)
        whole = record["whole_model"]
        assert set(whole["models"]) == {"teacher", "asap", "sinkhorn_k3"} and whole["reference"] == "teacher"
        assert whole["models"]["teacher"]["model_speedup"] == pytest.approx(1.0)
        assert all(m["model_ms"] > 0 for m in whole["models"].values()) and whole["batches"] == 1
    assert doc["truncated_iters"] == [3, 5] and doc["device"] == "cpu"


def test_captured_inputs_are_what_the_layer_sees(teacher_run):
    teacher = load_teacher(teacher_run / "teacher")
    dataset, collate = load_data(teacher, split="test", limit=300)
    batch = collate([dataset[i] for i in range(4)])
    layer = sinkhorn_layers(teacher.model)[1]
    q, k, v, mask = capture_layer_inputs(teacher.model, layer.operator, {"images": batch["images"]})
    assert q.shape[0] == 4 and q.shape == k.shape == v.shape and mask is None
    with torch.no_grad():  # the layer's output on the captured inputs is reproducible from them alone
        torch.testing.assert_close(layer.operator(q, k, v), layer.operator(q.clone(), k.clone(), v.clone()))


def test_bad_layer_is_a_clear_error(teacher_run, capsys):
    assert frozen_layer.main([str(teacher_run / "teacher"), "--layers", "5", "--out", str(teacher_run / "x.json")]) == 2
    assert "out of range" in capsys.readouterr().err


def test_bad_device_is_a_clear_error(teacher_run, capsys):
    out = teacher_run / "y.json"
    assert frozen_layer.main([str(teacher_run / "teacher"), "--device", "tpu", "--out", str(out)]) == 2
    assert "--device" in capsys.readouterr().err and not out.exists()


def test_the_report_shows_the_ratios_and_the_goal(result):
    out, doc = result
    readme = generate_report(out.parent.parent).read_text()
    assert "### digits: `frozen_layer/teacher.json`" in readme
    ratios = doc["layers"][0]["speedup_of_asap_over"]
    verdict = "met" if ratios["sinkhorn_k5"] >= 1.5 else "NOT met"  # the goal is stated against the trained teacher
    assert (f"Layer 0: {ratios['sinkhorn_k5']:.2f}x over the trained teacher (sinkhorn_k5): 1.5x goal at its shape "
            f"{verdict}; {ratios['sinkhorn_k3']:.2f}x over sinkhorn_k3") in readme
    assert f"{ratios['sinkhorn_k9']:.2f}x" in readme  # the reference teacher's ratio stays in the table
