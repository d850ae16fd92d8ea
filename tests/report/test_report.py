"""Report generation from small synthetic result JSON: README tables, plots, and visible notes for absent data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asap.bench.operators import SCHEMA
from asap.report import generate_report, main
from asap.report.paper import PAPER_CLAIMS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _method(median, peak, teacher_median, softmax_median, repeats=3):
    return {"oom": False, "peak_bytes": peak, "median_s": median, "q1_s": median * 0.9, "q3_s": median * 1.1,
            "iqr_s": median * 0.2, "repeats": repeats, "samples_s": [median] * repeats,
            "speedup_vs_teacher": teacher_median / median, "speedup_vs_softmax": softmax_median / median}


def synthetic_operators(asap_speedup_at_512: float) -> dict:
    """An operators JSON of the real schema with made-up figures (the test checks they are carried through)."""
    methods = {
        "softmax": {"family": "softmax", "label": "softmax", "trainable": True, "description": "sdpa",
                    "reference": "r"},
        "sinkhorn_k21": {"family": "sinkhorn", "label": "Sinkhorn K=21", "trainable": True, "description": "t",
                         "reference": "r"},
        "asap_l16": {"family": "asap", "label": "ASAP L=16", "trainable": False, "description": "a", "reference": "r"},
    }
    groups = []
    for n in (512, 1024):
        teacher, soft = 0.021 * n, 0.001 * n
        asap = teacher / asap_speedup_at_512 if n == 512 else teacher / 3
        dense = 2 * 2 * n * n * 4
        groups.append({
            "mode": "forward", "b": 2, "h": 2, "n": n, "m": n, "d": 8, "dtype": "float32", "rounds": 3,
            "dense_fp32_bytes": dense, "load_average_before": [1.0, 1.0, 1.0], "load_average_after": [1.0, 1.0, 1.0],
            "methods": {"softmax": _method(soft, dense // 4, teacher, soft),
                        "sinkhorn_k21": _method(teacher, 3 * dense, teacher, soft),
                        "asap_l16": _method(asap, dense // 8, teacher, soft)},
            "skipped": {},
        })
        fb_methods = {"softmax": _method(2 * soft, dense, 2 * teacher, 2 * soft)}
        if n == 512:
            fb_methods["sinkhorn_k21"] = _method(2 * teacher, 40 * dense, 2 * teacher, 2 * soft)
        else:
            fb_methods["sinkhorn_k21"] = {"oom": True, "peak_bytes": None, "error": "OutOfMemoryError: CUDA OOM",
                                          "speedup_vs_teacher": None, "speedup_vs_softmax": None}
        groups.append({**groups[-1], "mode": "forward_backward", "methods": fb_methods, "skipped": {}})
    return {
        "schema": SCHEMA, "command": "python -m asap.bench.operators --device cpu --lengths 512,1024",
        "config": {"device": "cpu", "dtype": "float32", "batch": 2, "heads": 2, "head_dim": 8, "lengths": [512, 1024],
                   "eps": 1.0, "repeats": 3, "budget_s": 5.0},
        "teacher": "sinkhorn_k21",
        "machine": {"cpu_model": "Synthetic CPU 9000", "cpu_count": 2, "torch_threads": 2, "gpu": None,
                    "torch": "2.13.0", "git_revision": "abcdef1234567", "git_dirty": False,
                    "date_utc": "2026-01-01T00:00:00+00:00", "load_average": [0.5, 0.5, 0.5]},
        "machine_after": {"load_average": [0.7, 0.6, 0.5]},
        "methods": methods,
        "unavailable": {"esp": "ESP is not available in this checkout (synthetic)"},
        "verification": [{"method": name, "reference": "r", "errors": {"output": 1e-7}, "tolerance": {"output": 1e-4},
                          "passed": True} for name in methods],
        "groups": groups,
    }


def synthetic_training_cost() -> dict:
    entry = {"kind": "esp", "options": {}, "seconds": [0.3], "memory_bytes": [300 * 2**20], "median_seconds": 0.3,
             "median_memory_bytes": 300 * 2**20, "time_ratio_to": {"sinkhorn_k3": 7.5},
             "memory_ratio_to": {"sinkhorn_k3": 12.25}}
    return {"benchmark": "training_cost", "config": {"step": "forward + backward + AdamW", "depth": 1, "repeats": 2},
            "memory_measure": "saved tensors", "machine": {"cpu_model": "Synthetic CPU 9000"},
            "results": {"vit": {"esp": entry}}}


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture
def results_dir(tmp_path):
    root = tmp_path / "results"
    write(root / "bench" / "operators_cpu.json", synthetic_operators(asap_speedup_at_512=9.5))
    return root


def test_report_writes_readme_and_png_plots(results_dir):
    readme = generate_report(results_dir)
    assert readme == results_dir / "README.md"
    for name in ("operators_cpu_time.png", "operators_cpu_memory.png"):
        png = results_dir / "bench" / name
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"(bench/{name})" in readme.read_text()


def test_operator_figures_come_from_the_json(results_dir):
    text = generate_report(results_dir).read_text()
    assert "Synthetic CPU 9000" in text and "abcdef1234" in text
    assert "python -m asap.bench.operators --device cpu --lengths 512,1024" in text
    assert "at least 8x faster than Sinkhorn K=21 at n=512: measured **9.50x** (met)" in text
    assert "softmax calls at n=512: measured **" in text and "softmax calls at n=1024: measured **" in text
    assert "OOM" in text  # the out-of-memory cell is shown, not dropped
    assert "esp: not available" in text
    assert "peak extra memory at n=4096" not in text  # not measured in this file: no line, no made-up figure

    write(results_dir / "bench" / "operators_cpu.json", synthetic_operators(asap_speedup_at_512=4.0))
    text = generate_report(results_dir).read_text()
    assert "Sinkhorn K=21 at n=512: measured **4.00x** (NOT met)" in text


def test_absent_sections_are_announced_and_the_paper_is_quoted(results_dir):
    text = generate_report(results_dir).read_text()
    # training cost, compile, accuracy, frozen layer, fidelity, compiled models, ASAP paths, Triton GPU,
    # teachers, reliability
    assert text.count("**Not available yet**") == 10
    assert f"ASAP {PAPER_CLAIMS['speedup_over_teacher']}x faster" in text
    assert "9.5x at n=512" in text  # our operator speed-up beside the paper's claim
    assert "not measured yet (no training-cost JSON)" in text
    assert "| CIFAR-100 | 64.95 | 58.46 | not measured yet | not measured yet | not measured yet |" in text


def test_training_cost_and_unknown_schemas_are_rendered(results_dir):
    write(results_dir / "bench" / "training_cost.json", synthetic_training_cost())
    write(results_dir / "compile" / "run1" / "fidelity.json", {"layers": {"0": {"kl_asap": 0.0123}}, "n_iters": 21})
    (results_dir / "bench" / "command.txt").write_text("training_cost.json: asap bench training-cost --device cpu\n")
    text = generate_report(results_dir).read_text()
    # accuracy, frozen layer, fidelity, compiled models, ASAP paths, Triton GPU, teachers, reliability
    assert text.count("**Not available yet**") == 8
    assert "asap bench training-cost --device cpu" in text
    assert "| esp | 300.0 ms | 300.0 MiB | 7.50x | 12.25x |" in text
    assert "esp takes 7.50x the time and 12.25x the memory of sinkhorn_k3" in text
    assert "| layers.0.kl_asap | 0.0123 |" in text


def synthetic_compile_record(teacher_acc, asap_acc, ms_teacher, ms_asap):
    layer = {"layer": 0, "K": 11, "r2_held_out": 0.97, "ms_teacher": ms_teacher, "ms_truncated": ms_teacher / 3,
             "ms_asap": ms_asap}
    return {"accuracy": {"teacher": teacher_acc, "sinkhorn_K3": teacher_acc - 0.1, "asap": asap_acc},
            "asap_fraction_of_teacher": asap_acc / teacher_acc, "mean_r2_held_out": 0.97,
            "mean_row_tv_asap": 0.01, "mean_row_tv_truncated": 0.2, "layers": [layer]}


def test_compile_experiments_are_tabulated_and_plotted(results_dir):
    context = {"dataset": "imdb", "teacher_attention": {"method": "sinkhorn", "options": {"n_iters": 11, "eps": 1.0}},
               "num_sinkhorn_layers": 2, "eval_split": "test", "eval_examples": 500}
    downstream = {**context, "experiment": "downstream_replacement", **synthetic_compile_record(0.8, 0.78, 12.0, 3.0)}
    frozen = {**context, "experiment": "frozen_layer",
              "results": [synthetic_compile_record(0.8, 0.79, 10.0, 2.5), synthetic_compile_record(0.8, 0.8, 9.0, 3.0)]}
    write(results_dir / "compile" / "imdb" / "downstream" / "result.json", downstream)
    command_file = results_dir / "compile" / "imdb" / "downstream" / "command.txt"
    command_file.write_text("python -m asap.compile.experiments x\n")
    write(results_dir / "compile" / "imdb" / "frozen_layer" / "result.json", frozen)
    text = generate_report(results_dir).read_text()
    assert "| `compile/imdb/downstream/result.json` | 80.00 | 78.00 | 70.00 | 97.50 |" in text
    assert "| 4.00x |" in text  # 12 ms / 3 ms, from the layer summary
    assert "| `compile/imdb/frozen_layer/result.json` | 1 | 80.00 | 80.00 |" in text
    assert "imdb: teacher sinkhorn K=11, eps=1.0" in text
    assert "Command: `python -m asap.compile.experiments x`" in text
    assert (results_dir / "compile" / "accuracy_vs_cost.png").read_bytes()[:8] == PNG_MAGIC
    assert "97.5 % of the teacher's accuracy" in text  # quoted beside the paper's > 95 %


def test_trained_models_are_tabulated_and_compared_with_the_paper(results_dir):
    run = results_dir / "teachers" / "imdb_sinkhorn_k11"
    write(run / "eval_test.json", {"dataset": "imdb", "split": "test", "accuracy": 0.8125, "num_samples": 25000,
                                   "attention": {"method": "sinkhorn", "options": {"n_iters": 11}}, "device": "cpu"})
    write(run / "config.json", {"model": {"dim": 64, "depth": 2, "num_heads": 4, "max_length": 128}})
    write(run / "tokenizer.json", {"model": {"vocab": {"[PAD]": 0}}})  # not an evaluation: never rendered
    text = generate_report(results_dir).read_text()
    assert "| `teachers/imdb_sinkhorn_k11` | imdb | sinkhorn (n_iters=11) | dim 64, depth 2, num_heads 4, " \
           "max_length 128 | 81.25 (test, n=25000) | cpu |" in text
    assert "| IMDb | 87.34 | - | 81.25 | not measured yet | not measured yet |" in text
    assert "[PAD]" not in text


def test_fine_tuned_pretrained_teachers_get_their_own_paper_rows(results_dir):
    gpu = {"device": "cuda:0", "gpu": {"name": "NVIDIA H200"}}
    for method, acc, suffix, train, env in (
        ("sinkhorn", 0.8390, "", {"limit": 5000, "epochs": 1}, {"device": "cpu"}),
        ("softmax", 0.8646, "", {"limit": 5000, "epochs": 1}, {"device": "cpu"}),
        ("sinkhorn", 0.9044, "_gpu", {"limit": 20000, "epochs": 2}, gpu),
    ):
        run = results_dir / "teachers" / f"minilm_{method}{suffix}"
        write(run / "eval_test.json", {"dataset": "imdb", "split": "test", "accuracy": acc, "num_samples": 5000,
                                       "attention": {"method": method}, "device": "cpu"})
        write(run / "config.json", {"model": {}, "environment": env,
                                    "train": {"pretrained": "hf:/somewhere/all-MiniLM-L6-v2/model", **train}})
    write(results_dir / "teachers" / "minilm_sinkhorn" / "compiled_asap" / "fidelity.json",
          {"accuracy": {"teacher": 0.855, "sinkhorn_k3": 0.856, "asap": 0.848, "num_samples": 1000}})
    text = generate_report(results_dir).read_text()
    # beside the paper's IMDb row, not mixed into the from-scratch figures of the data set
    assert "| IMDb | 87.34 | - | not measured yet | not measured yet | not measured yet |" in text
    # one row per training budget: the CPU pair, and the GPU run on its own
    assert ("| IMDb: ours fine-tuned from all-MiniLM-L6-v2 (5,000 examples x 1 epoch, cpu) | 87.34 | - | "
            "83.90 (n=5000) | - | 86.46 (n=5000) |") in text
    assert ("| IMDb: ours fine-tuned from all-MiniLM-L6-v2 (20,000 examples x 2 epochs, NVIDIA H200) | 87.34 | - | "
            "90.44 (n=5000) | - | - |") in text
    assert ("`teachers/minilm_sinkhorn/compiled_asap/fidelity.json`, 1000 test examples): ASAP keeps 99.2 % of the "
            "teacher's accuracy (84.80 vs 85.50, Sinkhorn K=3 85.60)") in text


def test_unreadable_json_is_noted_not_fatal(results_dir):
    (results_dir / "bench" / "operators_broken.json").write_text("{not json")
    text = generate_report(results_dir).read_text()
    assert "`bench/operators_broken.json` could not be read" in text
    assert "measured **9.50x**" in text


def test_cli_entry_point(results_dir, tmp_path):
    out = tmp_path / "elsewhere.md"
    assert main(["--results", str(results_dir), "--out", str(out)]) == 0
    assert out.read_text().startswith("# Results")
    with pytest.raises(FileNotFoundError, match="results directory not found"):
        generate_report(tmp_path / "missing")


def test_asap_report_command_writes_the_readme(results_dir):
    from asap.cli.main import main as asap_main

    assert asap_main(["report", "--results", str(results_dir)]) == 0
    assert "measured **9.50x**" in (results_dir / "README.md").read_text()


def test_fidelity_plane_is_rendered_with_its_verdict(results_dir):
    point = lambda method, family, tv, ms, **kw: {"method": method, "family": family, "row_tv": tv, "col_err": 0.1,  # noqa: E731
                                                  "ms": ms, **kw}
    layer = {"layer": 0, "name": "enc.0", "teacher_iters": 11, "shape": [16, 12, 128, 32],
             "maps": {"16": {"r2_held_out": [0.8, 0.9]}},
             "points": [point("sinkhorn_K3", "truncated", 0.06, 30.0, K=3), point("asap_L16_j0", "asap", 0.05, 28.0, L=16, extra_steps=0)],
             "verdict": {"asap_points_on_front": [{"asap": "asap_L16_j0", "beats": "sinkhorn_K3"}], "asap_wins": True}}
    write(results_dir / "fidelity" / "minilm.json", {"schema": "asap.bench.fidelity/1", "command": "asap bench fidelity --hf minilm",
          "source": {"kind": "hf", "path": "m", "dataset": "imdb", "split": "train", "max_length": 128},
          "calibration_examples": 64, "held_out_examples": 32, "layers": [layer]})  # fmt: skip
    text = generate_report(results_dir).read_text()
    assert "asap_L16_j0 is more faithful than sinkhorn_K3 at no more time" in text
    assert "| asap_L16_j0 | 0.0500 | 0.1000 | 28.00 |" in text and "L=16: 0.850" in text


def _gpu_setting(n: int, padded: bool, *, asap_ms: float, k3_ms: float, timed: bool = True) -> dict:
    def res(ms):
        return {"oom": False, "median_s": ms / 1e3, "peak_bytes": 1}

    methods = {"sdpa": res(0.1), "sinkhorn_k3": res(k3_ms), "sinkhorn_k21": res(10 * k3_ms)}
    if timed:
        methods["asap_l16_triton"] = res(asap_ms)
    return {"dtype": "float16", "n": n, "padded": padded, "shape": [2, 2, n, 8], "methods": methods,
            "parity": {"passed": timed}}


def test_gpu_kernels_are_tabulated_with_their_losses(results_dir):
    """The Triton GPU section carries the JSON's times and names every setting where ASAP is not ahead of K = 3."""
    doc = {"schema": "asap.scripts.bench_triton_gpu/1", "config": {"verify_max_length": 1024},
           "teacher": "sinkhorn_k21", "machine": {"gpu": {"name": "Synthetic GPU"}},
           "settings": [_gpu_setting(512, False, asap_ms=1.5, k3_ms=1.0),
                        _gpu_setting(4096, False, asap_ms=2.0, k3_ms=40.0),
                        _gpu_setting(4096, True, asap_ms=0, k3_ms=40.0, timed=False)]}
    (results_dir / "bench" / "triton_gpu.json").write_text(json.dumps(doc))
    (results_dir / "bench" / "command.txt").write_text("triton_gpu.json: bash scripts/bench_gpu.sh\n")
    readme = generate_report(results_dir).read_text()
    section = readme[readme.index("## ASAP on a GPU"):]
    assert "| float16 | 4096 | no | 0.10 | - | 2.00 | - | 40.00 | - | - | 400.00 | 200.00x | 20.00x | 20.00 | passed |" in section
    assert "float16 n=512 (0.67x)" in section and "float16 n=4096 padded (not timed)" in section
    assert "float16 n=4096 (" not in section.split("NOT faster")[1].split("\n")[0]
    assert "Command: `bash scripts/bench_gpu.sh`" in section
    assert (results_dir / "bench" / "triton_gpu.png").read_bytes().startswith(PNG_MAGIC)


def test_compiled_models_are_tabulated_fastest_first(results_dir):
    """The compiled-model section carries each model's accuracy, agreement and times from the JSON."""
    def model(ms, speedup):
        return {"model_ms": ms, "model_speedup": speedup, "attention_ms": ms / 2, "attention_speedup": speedup + 1}

    doc = {"schema": "asap.scripts.compiled_model_time/1", "teacher": "runs/t", "compiled": "runs/c", "batch_size": 16,
           "eval_examples": 1000, "command": "python scripts/time_compiled_model.py runs/t runs/c --out x.json",
           "accuracy": {"teacher": {"accuracy": 0.9, "agreement": 1.0}, "asap": {"accuracy": 0.904, "agreement": 0.981},
                        "sinkhorn_k3": {"accuracy": 0.8, "agreement": 0.85}},
           "timing": {"rounds": 5, "threads": 1, "load_average_before": [0.5, 0.5, 0.5],
                      "models": {"teacher": model(300.0, 1.0), "sinkhorn_k3": model(200.0, 1.5), "asap": model(100.0, 3.0)}}}
    (results_dir / "bench" / "compiled_model_t.json").write_text(json.dumps(doc))
    readme = generate_report(results_dir).read_text()
    section = readme[readme.index("## Compiled models against truncation"):]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows[:3] == ["| `asap` | 90.40 | 98.10 | 100.0 (3.00x) | 50.0 (4.00x) |",
                        "| `sinkhorn_k3` | 80.00 | 85.00 | 200.0 (1.50x) | 100.0 (2.50x) |",
                        "| `teacher` | 90.00 | 100.00 | 300.0 (1.00x) | 150.0 (2.00x) |"]
    assert "first 1000 test examples" in section and "Command: `python scripts/time_compiled_model.py" in section
