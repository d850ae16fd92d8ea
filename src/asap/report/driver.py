"""The report's driver: the :data:`SECTIONS` in README order, :func:`generate_report` and the command line.

Each :class:`~asap.report.core.Section` names its JSON (glob patterns under ``results/``, and the schemas it
accepts) and its renderer, one module per result schema; the "against the paper" section, which reads every
section's files, comes last.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from asap.io import atomic_write_text
from asap.report.accuracy import ACCURACY_SCHEMA, render_accuracy
from asap.report.asap_paths import ASAP_PATHS_SCHEMA, FUSED_VS_SPLIT_SCHEMA, render_asap_paths
from asap.report.compile import render_compile
from asap.report.core import Doc, Section, load_docs
from asap.report.fidelity import FIDELITY_SCHEMAS, render_fidelity
from asap.report.frozen_layer import FROZEN_LAYER_SCHEMAS, render_frozen_layer
from asap.report.operators import OPERATORS_SCHEMA, render_operators
from asap.report.paper import render_paper
from asap.report.compiled_model import COMPILED_MODEL_SCHEMA, render_compiled_model
from asap.report.reliability import RELIABILITY_SCHEMA, render_reliability
from asap.report.teachers import render_teachers
from asap.report.training_cost import TRAINING_COST_SCHEMA, render_training_cost
from asap.report.triton_gpu import TRITON_GPU_SCHEMA, render_triton_gpu

#: The name the report is run by: the README it writes says so, and ``scripts/`` call it.
PROG = "python -m asap.bench.report"
DESCRIPTION = "Regenerate ``results/README.md`` and its plots from the committed result JSON."

SECTIONS: tuple[Section, ...] = (
    Section("operators", "Operator benchmark", ("bench/operators_*.json",), render_operators,
            "`python -m asap.bench.operators` (or `asap bench operators`)", schemas=(OPERATORS_SCHEMA,)),
    Section("training_cost", "Training cost (ESP vs Sinkhorn vs softmax)",
            ("bench/training_cost*.json", "training_cost*.json"), render_training_cost,
            "`asap bench training-cost` (or `python -m asap.bench.training_cost --out ...`)",
            schemas=(TRAINING_COST_SCHEMA,)),
    Section("compile", "Compiled layers (frozen-layer benchmark, downstream replacement, ablations)",
            ("compile/**/*.json",), render_compile,
            "`python -m asap.bench.compile_experiments RUN_DIR --out results/compile/<dataset>`", method_keys=True),
    Section("accuracy", "Accuracy table: every method at the same budget, over seeds", ("accuracy/*.json",),
            render_accuracy, "`asap bench accuracy --suite <data set>`", schemas=(ACCURACY_SCHEMA,), method_keys=True),
    Section("frozen_layer", "Frozen-layer benchmark: speed and accuracy in one layer of a trained teacher",
            ("frozen_layer/*.json",), render_frozen_layer, "`asap bench frozen-layer RUN_DIR`",
            schemas=FROZEN_LAYER_SCHEMAS, method_keys=True),
    Section("fidelity", "Fidelity plane: ASAP with warm-start steps against truncated Sinkhorn, per layer",
            ("fidelity/*.json",), render_fidelity, "`asap bench fidelity`", schemas=FIDELITY_SCHEMAS),
    Section("compiled_model", "Compiled models against truncation: accuracy and whole-model time",
            ("bench/compiled_model_*.json",), render_compiled_model,
            "`python scripts/time_compiled_model.py TEACHER COMPILED --out results/bench/compiled_model_<name>.json`",
            schemas=(COMPILED_MODEL_SCHEMA,)),
    Section("asap_paths", "ASAP's CPU paths: closure backends, dual map, whole operator",
            ("bench/asap_paths_*.json", "bench/fused_vs_split_*.json"), render_asap_paths,
            "`python scripts/bench_asap_paths.py --out ...`, `python scripts/bench_fused_vs_split.py --out ...`",
            schemas=(ASAP_PATHS_SCHEMA, FUSED_VS_SPLIT_SCHEMA)),
    Section("triton_gpu", "ASAP on a GPU: Triton kernels against SDPA and Sinkhorn", ("bench/triton_gpu*.json",),
            render_triton_gpu, "`bash scripts/bench_gpu.sh` on a CUDA machine", schemas=(TRITON_GPU_SCHEMA,)),
    Section("teachers", "Trained models (teachers and baselines)", ("teachers/*/eval_*.json",), render_teachers,
            "`asap train` then `asap eval`, run folders copied under `results/teachers/`"),
    Section("reliability", "Reliability: bad inputs per surface and how each was answered",
            ("reliability/*.json",), render_reliability,
            "`python scripts/reliability_probe.py --out results/reliability/reliability.json`",
            schemas=(RELIABILITY_SCHEMA,)),
)


def generate_report(results_dir: str | Path = "results", *, out: str | Path | None = None) -> Path:
    """Write ``<results_dir>/README.md`` (or ``out``) and the plots; returns the README path."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results directory not found: {results_dir}")
    out = Path(out) if out is not None else results_dir / "README.md"
    lines = [
        "# Results",
        "",
        f"Generated by `{PROG}` (`asap report`) from the JSON files under `results/`: "
        "do not edit by hand; rerun the generator after adding or updating a result. Each section names its "
        "JSON, the machine and the command that produced it.",
        "",
    ]
    loaded: dict[str, list[Doc]] = {}
    for section in SECTIONS:
        docs, notes = load_docs(results_dir, section)
        loaded[section.key] = docs
        lines += [f"## {section.title}", ""]
        lines += [f"> {note}" for note in notes] + ([""] if notes else [])
        if not docs:
            lines += [f"> **Not available yet**: no JSON matching {', '.join(f'`{p}`' for p in section.patterns)} "
                      f"under `results/`. Produced by {section.absent}.", ""]
            continue
        lines += section.render(docs, results_dir).lines
    lines += ["## Against the paper", ""] + render_paper(loaded, results_dir).lines
    atomic_write_text(out, "\n".join(lines).rstrip() + "\n")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=Path("results"), help="results directory (default %(default)s)")
    parser.add_argument("--out", type=Path, help="README to write (default RESULTS/README.md)")


def run_from_args(args: argparse.Namespace) -> int:
    print(f"wrote {generate_report(args.results, out=args.out)}")
    return 0


def main(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
