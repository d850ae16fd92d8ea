"""Experiment driver: the frozen-layer and downstream-replacement experiments and the ablations.

    python -m asap.bench.compile_experiments RUN_DIR --out results/compile/imdb \\
        --calibration 512 --eval-limit 2000 --experiments frozen,downstream,slices,refine
    python -m asap.bench.compile_experiments --summarize results/compile/imdb    # only rewrite summary.md

(``python -m asap.compile.experiments``, its name before it moved out of the
compile stage, still runs it: the commands recorded under ``results/compile``
use that name.)

Every experiment compiles the teacher of ``RUN_DIR`` (without retraining) and
measures test accuracy against the teacher and against Sinkhorn truncated to
the same cost in the same layers; it writes ``OUT/<experiment>/result.json``,
a ``fidelity.png`` for the main ones, and ``command.txt`` with the exact
command that produced it; ``OUT/summary.md`` tabulates every result there. The teacher, its accuracy, the calibration batches
and the evaluation set are loaded once and shared by all experiments.

Experiments (each varies one option of the base configuration given on the
command line, all else equal):

* ``frozen``: one layer compiled, the others left Sinkhorn (every layer in turn);
* ``downstream``: every layer compiled;
* ``slices``: number of slices L in ``--slice-grid``;
* ``slice_type``: random vs axis-aligned directions;
* ``refine``: ridge only vs ridge + KL refinement vs the label-free semi-dual fit vs learned directions;
* ``calibration``: calibration set sizes in ``--calibration-grid`` (subsets of the largest);
* ``mode``: teacher-activation vs sequential calibration;
* ``features``: the linear slice map alone vs with cheap extra per-token features.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from asap.argtypes import int_list, name_list, nonnegative_int, positive_int
from asap.bench.compile_report import layer_summary, plot_report
from asap.bench.measure import time_operators_ms
from asap.bench.model_timing import time_models
from asap.compile.options import add_compile_options, compile_options
from asap.compile.swap import compile_model, sinkhorn_layers, truncate_sinkhorn
from asap.io import atomic_write_bytes, command_line, method_key, method_of, write_result
from asap.runs import TeacherRun, calibration_batches, load_data, load_teacher, predict

#: How the driver is run (what its recorded commands and summaries name).
PROG = "python -m asap.bench.compile_experiments"
#: The fit options recorded as every experiment's starting point (``base_options`` in the JSON).
BASE_OPTIONS = ("num_slices", "slice_type", "extra_features", "seed", "ridge", "refine", "refine_iters", "mode",
                "holdout_fraction", "reservoir_size", "truncated_iters")  # fmt: skip
EXPERIMENTS = ("frozen", "downstream", "slices", "slice_type", "refine", "calibration", "mode", "features")


class Bench:
    """The shared state of one driver run: teacher, data, cached teacher and baseline predictions."""

    def __init__(self, teacher: TeacherRun, *, batches: list, eval_data: tuple, eval_batch_size: int, base: dict):
        self.teacher, self.batches, self.eval_data, self.base = teacher, batches, eval_data, base
        self.eval_batch_size = eval_batch_size
        self._truncated: dict[tuple, Tensor] = {}
        self._runs: dict[str, dict[str, Any]] = {}
        self._last_model: tuple[str, torch.nn.Module] | None = None  # the newest compiled model (not in the JSON)
        self.teacher_pred, self.labels = self.predict(teacher.model)
        self.teacher_accuracy = self.accuracy(self.teacher_pred)

    def predict(self, model: torch.nn.Module) -> tuple[Tensor, Tensor]:
        return predict(model, self.eval_data, batch_size=self.eval_batch_size)

    def accuracy(self, pred: Tensor) -> float:
        return float((pred == self.labels).double().mean())

    def agreement(self, pred: Tensor) -> float:
        """Fraction of examples where ``pred`` is the teacher's prediction."""
        return float((pred == self.teacher_pred).double().mean())

    def truncated_predictions(self, layers: list[int] | None, n_iters: int) -> Tensor:
        key = (None if layers is None else tuple(layers), n_iters)
        if key not in self._truncated:
            self._truncated[key] = self.predict(truncate_sinkhorn(self.teacher.model, n_iters=n_iters, layers=layers))[0]
        return self._truncated[key]

    def run(self, *, num_examples: int | None = None, **overrides: Any) -> dict[str, Any]:
        """Compile with the base options updated by ``overrides``; evaluate; return a JSON-ready record."""
        options = {**self.base, **overrides}
        key = self._key(num_examples, options)
        if key not in self._runs:  # ablations share their base configuration: compile and evaluate it once
            model, self._runs[key] = self._run(num_examples, options)
            self._last_model = (key, model)  # only the newest is kept: a grid of compiled models would fill memory
        return copy.deepcopy(self._runs[key])

    def compiled(self, *, num_examples: int | None = None, **overrides: Any) -> torch.nn.Module:
        """The compiled model of the newest :meth:`run`, which must have had the same arguments."""
        key = self._key(num_examples, {**self.base, **overrides})
        if self._last_model is None or self._last_model[0] != key:
            raise RuntimeError("Bench.compiled: call run() with the same arguments first")
        return self._last_model[1]

    @staticmethod
    def _key(num_examples: int | None, options: dict[str, Any]) -> str:
        return json.dumps([num_examples, options], sort_keys=True, default=list)

    def whole_model_times(self, compiled: torch.nn.Module, *, truncated_iters: list[int], batch_size: int,
                          rounds: int) -> dict[str, Any]:  # fmt: skip
        """Interleaved forward times of the teacher, ``compiled`` and the teacher truncated to each K in every
        Sinkhorn layer, on the first ``batch_size`` evaluation examples (:func:`time_models`)."""
        dataset, collate = self.eval_data
        batch = collate([dataset[i] for i in range(min(batch_size, len(dataset)))])
        truncated = {method_key("sinkhorn", n_iters=k): truncate_sinkhorn(self.teacher.model, n_iters=k)
                     for k in truncated_iters}  # fmt: skip
        return time_models({"teacher": self.teacher.model, "asap": compiled, **truncated}, [batch], rounds=rounds,
                           reference="teacher")  # fmt: skip

    def _run(self, num_examples: int | None, options: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
        batches = self.batches
        if num_examples is not None:  # a subset of the calibration batches, for the calibration-size ablation
            batches, total = [], 0
            for batch in self.batches:
                if total >= num_examples:
                    break
                batches.append(batch)
                total += len(batch["labels"])
        start = time.perf_counter()
        compiled, report = compile_model(self.teacher.model, batches, timer=time_operators_ms, **options)
        seconds = time.perf_counter() - start
        truncated = self.truncated_predictions(options.get("layers"), options["truncated_iters"])
        asap = self.predict(compiled)[0]
        key = method_key("sinkhorn", n_iters=options["truncated_iters"])
        accuracy = {"teacher": self.teacher_accuracy, key: self.accuracy(truncated), "asap": self.accuracy(asap)}
        agreement = {"asap": self.agreement(asap), key: self.agreement(truncated)}
        report["accuracy"] = {**accuracy, "agreement": agreement}
        report["calibration"]["examples"] = sum(len(b["labels"]) for b in batches)
        summary = layer_summary(report)
        mean = lambda key: sum(r[key] for r in summary if r[key] is not None) / len(summary)  # noqa: E731
        return compiled, {
            "options": report["options"],
            "calibration_examples": report["calibration"]["examples"],
            "accuracy": accuracy,
            "agreement_with_teacher": agreement,
            "asap_minus_teacher_points": 100 * (accuracy["asap"] - accuracy["teacher"]),
            "asap_fraction_of_teacher": accuracy["asap"] / accuracy["teacher"],
            "mean_r2_held_out": mean("r2_held_out"),
            "mean_row_tv_asap": mean("row_tv_asap"),
            "mean_row_tv_truncated": mean("row_tv_truncated"),
            "mean_kl_asap": mean("kl_asap"),
            "mean_kl_truncated": mean("kl_truncated"),
            "compile_seconds": seconds,
            "refine": [layer.get("refine") for layer in report["layers"]] if options["refine"] != "none" else None,
            "layers": summary,
            "report": report,
        }


def _write(out: Path, name: str, result: dict[str, Any], command: str, *, plot: dict | None = None) -> None:
    directory = out / name
    directory.mkdir(parents=True, exist_ok=True)
    write_result(directory / "result.json", result, command=command)
    if plot is not None:
        plot_report(plot, directory / "fidelity.png")


def _frozen_plot(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One report for the frozen-layer figure: each layer's figures from the run that compiled it alone.

    The accuracies differ per run (they are in the table), so the figure shows the operator times instead.
    """
    report = copy.deepcopy(records[0]["report"])
    report["layers"] = [layer for record in records for layer in record["report"]["layers"]]
    report["accuracy"] = None
    return report


def _brief(record: dict[str, Any]) -> str:
    acc = record["accuracy"]
    trunc = next(v for k, v in acc.items() if method_of(k) == "sinkhorn")
    return (f"teacher {100 * acc['teacher']:.2f}  asap {100 * acc['asap']:.2f}  truncated {100 * trunc:.2f}  "
            f"R2 {record['mean_r2_held_out']:.4f}  "
            f"TV {record['mean_row_tv_asap']:.4g} vs {record['mean_row_tv_truncated']:.4g}")  # fmt: skip


def run_experiments(args: argparse.Namespace, command: str) -> None:
    torch.set_num_threads(args.threads)
    teacher = load_teacher(args.run_dir)
    num_layers = len(sinkhorn_layers(teacher.model))
    largest = max([args.calibration, *(args.calibration_grid if "calibration" in args.experiments else [])])
    batches = calibration_batches(teacher, num_samples=largest, batch_size=args.batch_size, seed=args.seed,
                                  data_dir=args.data_dir)  # fmt: skip
    eval_data = load_data(teacher, split=args.eval_split, limit=args.eval_limit, data_dir=args.data_dir)
    # the fit options every experiment starts from (the grids vary one of them; layers are set per experiment)
    base = {name: value for name, value in compile_options(args).items() if name in BASE_OPTIONS}
    bench = Bench(teacher, batches=batches, eval_data=eval_data, eval_batch_size=args.eval_batch_size, base=base)
    context = {
        "teacher_run": str(teacher.run_dir),
        "teacher_sha256": teacher.source_sha256,
        "teacher_attention": teacher.run_config.model.attention.to_dict(),
        "dataset": teacher.data_info["dataset"],
        "eval_split": args.eval_split,
        "eval_examples": len(eval_data[0]),
        "num_sinkhorn_layers": num_layers,
        "base_options": base,
        "base_calibration_examples": args.calibration,
        "torch_threads": args.threads,
    }
    examples = len(eval_data[0])
    print(f"teacher accuracy {100 * bench.teacher_accuracy:.2f} on {examples} {args.eval_split} examples", flush=True)
    out = Path(args.out)
    base_n = args.calibration

    def grid(name: str, key: str, values: list) -> None:
        records = []
        for value in values:
            if key == "num_examples":
                record = bench.run(num_examples=value)
            else:
                record = bench.run(num_examples=base_n, **{key: value})
            record["value"] = value
            records.append(record)
            print(f"[{name}] {key}={value}: {_brief(record)}", flush=True)
        slim = [{k: v for k, v in r.items() if k != "report"} for r in records]
        _write(out, f"ablation_{name}", {**context, "ablation": name, "varied": key, "results": slim}, command)

    for name in args.experiments:
        if name == "frozen":
            records = []
            for layer in range(num_layers) if args.frozen_layers is None else args.frozen_layers:
                record = bench.run(num_examples=base_n, layers=[layer])
                print(f"[frozen] layer {layer}: {_brief(record)}", flush=True)
                records.append(record)
            # Keep each frozen layer's full report (its one layer's figures): the plot is redrawn from it.
            _write(out, "frozen_layer", {**context, "experiment": "frozen_layer", "results": records}, command,
                   plot=_frozen_plot(records))  # fmt: skip
        elif name == "downstream":
            record = bench.run(num_examples=base_n, layers=None)
            print(f"[downstream] all layers: {_brief(record)}", flush=True)
            if args.model_rounds:  # what every layer compiled saves end to end, beside truncation in every layer
                record["whole_model"] = bench.whole_model_times(
                    bench.compiled(num_examples=base_n, layers=None), truncated_iters=args.truncated_model_iters,
                    batch_size=args.timing_batch, rounds=args.model_rounds)
                speed = {name: row["model_speedup"] for name, row in record["whole_model"]["models"].items()}
                print("[downstream] whole model, speed-up over the teacher: "
                      + ", ".join(f"{name} {value:.2f}x" for name, value in speed.items()), flush=True)
            result = {**context, "experiment": "downstream_replacement", **record}
            _write(out, "downstream", result, command, plot=record["report"])
        elif name == "slices":
            grid("slices", "num_slices", args.slice_grid)
        elif name == "slice_type":
            grid("slice_type", "slice_type", ["random", "axis"])
        elif name == "refine":
            grid("refine", "refine", ["none", "kl", "dual", "directions"])
        elif name == "calibration":
            grid("calibration", "num_examples", args.calibration_grid)
        elif name == "mode":
            grid("mode", "mode", ["teacher", "sequential"])
        elif name == "features":
            grid("features", "extra_features", [(), ("qk_mean",), ("q_norm",), ("qk_mean", "q_norm")])


def _row(label: str, value: Any, record: dict[str, Any], examples: int) -> str:
    acc = record["accuracy"]
    trunc_key = next(k for k in acc if method_of(k) == "sinkhorn")  # sinkhorn_k3, or sinkhorn_K3 in older results
    cells = [label, str(value), str(examples), f"{100 * acc['teacher']:.2f}", f"{100 * acc['asap']:.2f}",
             f"{100 * acc[trunc_key]:.2f}",
             f"{record['asap_minus_teacher_points']:+.2f}",
             f"{100 * record['agreement_with_teacher']['asap']:.2f}",
             f"{100 * record['agreement_with_teacher'][trunc_key]:.2f}", f"{record['mean_r2_held_out']:.4f}",
             f"{record['mean_row_tv_asap']:.3g}", f"{record['mean_row_tv_truncated']:.3g}"]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def summarize(out: str | Path, *, prog: str = PROG) -> str:
    """A Markdown table of every ``result.json`` under ``out`` (written to ``out/summary.md``); returns it."""
    out = Path(out)
    header = ("| experiment | value | test examples | teacher % | ASAP % | truncated % | ASAP - teacher (points) "
              "| ASAP agrees with teacher % | truncated agrees % | R2 held out | row TV ASAP | row TV truncated |\n"
              + "| :-- | :-- |" + " --: |" * 10)  # fmt: skip
    lines, context = [header], None
    paths = sorted(out.glob("*/result.json"), key=lambda p: (p.parent.name.startswith("ablation"), p.parent.name))
    for path in paths:
        result = json.loads(path.read_text())
        context = context or result
        name = path.parent.name
        if "results" in result:
            for record in result["results"]:
                value = record.get("value", record["options"]["layers"])
                lines.append(_row(name, value, record, result["eval_examples"]))
        else:
            lines.append(_row(name, "all layers", result, result["eval_examples"]))
    if context is None:
        raise FileNotFoundError(f"no */result.json under {out}")
    intro = (
        f"# Compile experiments: {context['dataset']}\n\n"
        f"Generated by `{prog} --summarize {out}` from the `result.json` files "
        f"beside it (each with its `command.txt`); do not edit by hand.\n\n"
        f"Teacher: `{context['teacher_run']}` ({context['teacher_attention']}), sha256 "
        f"`{context['teacher_sha256'][:16]}...`; accuracy on the `{context['eval_split']}` split (the first "
        "examples of each class when not all of it; the number is in the table). "
        f"Base options: `{json.dumps(context['base_options'])}`, "
        f"{context['base_calibration_examples']} calibration examples. \"truncated\" = the teacher's Sinkhorn "
        f"layers (the same ones ASAP replaces) run with K = {context['base_options']['truncated_iters']} half-steps, "
        "the same-cost baseline; row TV = mean total variation between teacher and ASAP (or truncated) attention "
        "rows on held-out calibration sequences, averaged over layers and heads; \"agrees\" = fraction of test "
        "examples where the model predicts the teacher's class.\n\n"
    )
    text = intro + "\n".join(lines) + "\n"
    atomic_write_bytes(out / "summary.md", text.encode())
    downstream = out / "downstream" / "result.json"
    if downstream.is_file():  # redraw the figures with the current plotting code
        plot_report(json.loads(downstream.read_text())["report"], downstream.parent / "fidelity.png")
    return text


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a trained Sinkhorn run (asap train)")
    parser.add_argument("--out", required=True, help="folder of the results (one subfolder per experiment)")
    parser.add_argument("--experiments", type=name_list(EXPERIMENTS), default=list(EXPERIMENTS),
                        help=f"comma-separated subset of {','.join(EXPERIMENTS)} (default: all)")  # fmt: skip
    parser.add_argument("--calibration", type=positive_int, default=512, help="base calibration examples (default: 512)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="calibration batch size (default: 32)")
    parser.add_argument("--calibration-grid", type=int_list(), default=[64, 128, 256, 512, 1024],
                        help="calibration sizes of the calibration experiment (default: 64,128,256,512,1024)")
    parser.add_argument("--slice-grid", type=int_list(), default=[4, 8, 16, 32, 64],
                        help="L of the slices experiment (default: 4,8,16,32,64)")
    parser.add_argument("--frozen-layers", type=int_list(nonnegative_int), default=None, help="layers for the frozen experiment (default all)")
    parser.add_argument("--eval-split", default="test", help="split for accuracy (default: test)")
    parser.add_argument("--data-dir", default=None, help="data directory (default: the run's, then $ASAP_DATA_DIR)")
    parser.add_argument("--eval-limit", type=positive_int, default=None,
                        help="evaluate on at most this many examples (class-stratified; default: all)")
    parser.add_argument("--eval-batch-size", type=positive_int, default=128, help="default: 128")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--model-rounds", type=nonnegative_int, default=0,
                        help="downstream: interleaved rounds of whole-model timing (teacher, ASAP, truncated), "
                             "0 = none (default: 0)")
    parser.add_argument("--timing-batch", type=positive_int, default=16,
                        help="downstream: evaluation examples in the timed batch (default: 16)")
    parser.add_argument("--truncated-model-iters", type=int_list(), default=[3, 5],
                        help="downstream: K of the truncated whole models timed (default: 3,5)")
    add_compile_options(parser)
    return parser


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    """Run the experiments (or ``--summarize DIR...``); ``prog`` is the command recorded as having run them."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--summarize"]:
        for directory in argv[1:]:
            print(summarize(directory, prog=prog))
        return 0
    args = build_parser(prog).parse_args(argv)
    unknown = sorted(set(args.experiments) - set(EXPERIMENTS))
    if unknown:
        raise SystemExit(f"unknown experiment(s) {unknown}; choose from {EXPERIMENTS}")
    if args.layers is not None:
        raise SystemExit("--layers is set per experiment here (frozen: --frozen-layers; downstream: all)")
    command = command_line(prog, argv)
    run_experiments(args, command)
    summarize(args.out, prog=prog)
    return 0


if __name__ == "__main__":
    sys.exit(main())
