"""Accuracy table: softmax, the Sinkhorn teacher, truncated Sinkhorn, ESP and ASAP at the same budget.

    asap bench accuracy --suite digits                                  # 3 seeds -> results/accuracy/digits.json
    asap bench accuracy --suite fashion_mnist --data-dir ../shared/data
    asap bench accuracy --suite imdb --data-dir ../shared/data --seeds 0 --epochs 1   # any training field

For every seed, one model per *trained* method (``softmax``, ``sinkhorn``
with K = ``--teacher-iters`` half-steps, ``esp``) is trained with the same
model size, data, optimiser, epochs and seed (a :class:`Suite` fixes them per
data set; options override them). ``--esp-seeds N`` trains the costly ESP
baseline for the first N seeds only, when the budget does not allow all. Then, *without retraining*, the Sinkhorn
teacher is

* run with its iterations truncated to each of ``--truncated-iters`` (``sinkhorn_k3``: the
  same-cost baseline by number of passes), and
* compiled to ASAP (every layer, the defaults of ``asap compile``) from
  ``--calibration`` training examples,

and every model is scored on the same test split. Reported per method: the
accuracy of each seed, their mean and sample standard deviation, the
agreement of the derived models with their teacher, and the *inference cost*:
the forward time of each model on one test batch, timed round-robin in one
run on this machine (so ratios, not absolute times, are what carries over).

Nothing is lost to an interruption: training runs live under ``--runs-dir``
(``<runs-dir>/<suite>/<method>_seed<k>``); a finished run is reused, an
interrupted one resumed from its checkpoint, and the JSON is rewritten after
every seed. Rerunning the same command completes what is missing. A reused
run whose saved configuration differs from what the command asks for is an
error, not a silent mix.

ESP is trained with a soft-sort temperature of ``--esp-tau-sort`` (default
0.01), not ESPFormer's 1e-3: at 1e-3 the soft sort is nearly a hard sort whose
rare, very large gradients (scale 1/tau) dominate the clipped update, and the
models barely train at these sizes; 0.01 had the best validation accuracy in
short digits runs (``asap train --dataset digits --method esp --attention-option
tau_sort=...``). The temperature is recorded in the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asap.argtypes import int_list, module_main, name_list, nonnegative_int
from asap.bench.measure import benchmark
from asap.env import machine_info
from asap.io import command_line, method_key, write_result

SCHEMA = "asap.bench.accuracy/1"
TRAINED_METHODS = ("softmax", "sinkhorn", "esp")


@dataclass(frozen=True)
class Suite:
    """One data set's shared training budget: :class:`~asap.train.TrainConfig` fields common to every method.

    The budgets are sized for a 2-core CPU (the ESP runs dominate: ESP costs
    10-30x a Sinkhorn step); ``note`` says what was cut relative to a full run.
    """

    dataset: str
    train: dict[str, Any]
    note: str = ""
    calibration: int = 512


SUITES: dict[str, Suite] = {
    "digits": Suite(
        "digits",
        dict(preset="tiny", epochs=20, batch_size=32, lr=2e-3),
        "scikit-learn's 8x8 digits (installed with the package), the full training split.",
    ),
    "fashion_mnist": Suite(
        "fashion_mnist",
        dict(dim=64, depth=2, num_heads=4, mlp_ratio=2.0, patch_size=4, epochs=3, batch_size=64, lr=1e-3, limit=10000),
        "first 10,000 training images (9,000 train / 1,000 validation), all 10,000 test images; 50 tokens.",
    ),
    "ag_news": Suite(
        "ag_news",
        dict(dim=64, depth=2, num_heads=4, mlp_ratio=2.0, dropout=0.1, max_length=64, vocab_size=8000, epochs=2,
             batch_size=32, lr=1e-3, limit=12000),  # fmt: skip
        "first 12,000 training articles (stratified), 64 subword tokens, all 7,600 test articles (needs the "
        "official training split).",
    ),
    "imdb": Suite(
        "imdb",
        dict(dim=64, depth=2, num_heads=4, mlp_ratio=2.0, dropout=0.1, max_length=128, vocab_size=8000, epochs=2,
             batch_size=32, lr=1e-3, limit=4000),  # fmt: skip
        "first 4,000 reviews of each split (stratified), 128 subword tokens.",
    ),
}


@dataclass
class AccuracyConfig:
    """What one ``asap bench accuracy`` invocation measures."""

    suite: str
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = TRAINED_METHODS
    teacher_iters: int = 11
    truncated_iters: tuple[int, ...] = (3,)
    eps: float = 1.0
    calibration: int | None = None
    data_dir: str | None = None
    runs_dir: str = "runs/accuracy"
    overrides: dict[str, Any] = field(default_factory=dict)
    timing_batch: int = 64
    timing_budget_s: float = 20.0
    device: str = "cpu"
    esp_tau_sort: float = 0.01
    esp_seeds: int | None = None  # train ESP (the costly baseline) for the first this-many seeds only

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ValueError(f"unknown suite {self.suite!r}; choose from {sorted(SUITES)}")
        unknown = sorted(set(self.methods) - set(TRAINED_METHODS))
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; trained methods are {TRAINED_METHODS}")
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if self.esp_seeds is not None and self.esp_seeds < 1:
            raise ValueError(f"--esp-seeds must be >= 1, got {self.esp_seeds}")
        for k in (self.teacher_iters, *self.truncated_iters):
            if k < 1 or k % 2 == 0:
                raise ValueError(f"Sinkhorn half-step counts must be odd and >= 1, got {k}")
        if any(k >= self.teacher_iters for k in self.truncated_iters):
            raise ValueError(f"--truncated-iters must be below the teacher's {self.teacher_iters}")

    @property
    def derived_methods(self) -> tuple[str, ...]:
        """Models derived from the Sinkhorn teacher without retraining (none when it is not trained)."""
        if "sinkhorn" not in self.methods:
            return ()
        return (*(method_key("sinkhorn", n_iters=k) for k in self.truncated_iters), "asap")

    def train_config(self, method: str, seed: int):
        from asap.train import TrainConfig

        fields = {**SUITES[self.suite].train, **self.overrides}
        run_dir = Path(self.runs_dir) / self.suite / f"{method}_seed{seed}"
        attention: dict[str, Any] = {}
        if method == "sinkhorn":
            attention = dict(n_iters=self.teacher_iters, eps=self.eps)
        elif method == "esp":
            attention = dict(attention_options={"tau_sort": self.esp_tau_sort})
        return TrainConfig(dataset=SUITES[self.suite].dataset, data_dir=self.data_dir, out_dir=str(run_dir),
                           method=method, seed=seed, device=self.device, progress=False,
                           checkpoint_every=100, **attention, **fields)  # fmt: skip


def method_label(method: str, teacher_iters: int) -> str:
    return method_key("sinkhorn", n_iters=teacher_iters) if method == "sinkhorn" else method


def ensure_trained(config) -> tuple[Path, float]:
    """Train the run ``config`` describes, or reuse/resume it; ``(run_dir, training seconds)``.

    A finished run (``eval_test.json`` present) is reused when its saved
    configuration equals ``config`` in every field that changes the result.
    """
    from asap.train import TrainConfig, read_metrics, train
    from asap.train.checkpoint import CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE

    run_dir = Path(config.out_dir)
    saved_path = run_dir / CONFIG_FILE
    if saved_path.is_file():
        saved = TrainConfig.from_dict(json.loads(saved_path.read_text())["train"])
        diff = config.differences(saved)
        if diff:
            raise ValueError(f"{run_dir} was trained with other settings {diff}: remove it or choose another --runs-dir")
    if not (run_dir / "eval_test.json").is_file():
        train(config, resume=(run_dir / CHECKPOINT_FILE).is_file())
    history = read_metrics(run_dir / METRICS_FILE)
    return run_dir, float(history[-1]["elapsed_seconds"]) if history else math.nan


def summarize(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for one value), min, max and n of ``values``."""
    return {
        "n": len(values), "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None, "min": min(values), "max": max(values),
    }  # fmt: skip


def _predict_accuracy(model, data, *, batch_size: int = 256) -> tuple[float, torch.Tensor]:
    from asap.runs import predict

    pred, labels = predict(model, data, batch_size=batch_size)
    return float((pred == labels).double().mean()), pred


def evaluate_seed(cfg: AccuracyConfig, seed: int, *, log=print) -> tuple[dict[str, Any], dict[str, torch.nn.Module], Any]:
    """Train (or reuse) the seed's models and score them and the derived ones; also returns the models and test data."""
    from asap.compile import compile_model
    from asap.compile.swap import truncate_sinkhorn
    from asap.runs import calibration_batches, load_data, load_teacher
    from asap.train import load_model

    record: dict[str, Any] = {}
    models: dict[str, torch.nn.Module] = {}
    data = None
    for method in cfg.methods:
        if method == "esp" and cfg.esp_seeds is not None and cfg.seeds.index(seed) >= cfg.esp_seeds:
            continue  # over the ESP budget: this seed has no ESP model (the summary counts the seeds it has)
        start = time.perf_counter()
        run_dir, train_seconds = ensure_trained(cfg.train_config(method, seed))
        label = method_label(method, cfg.teacher_iters)
        test = json.loads((run_dir / "eval_test.json").read_text())
        record[label] = {"accuracy": test["accuracy"], "run_dir": str(run_dir), "train_seconds": train_seconds,
                         "test_examples": test["num_samples"]}  # fmt: skip
        model, _ = load_model(run_dir)
        models[label] = model.eval()
        log(f"[seed {seed}] {label}: {100 * test['accuracy']:.2f} % ({time.perf_counter() - start:.0f} s)")

    if "sinkhorn" in cfg.methods:
        teacher_label = method_label("sinkhorn", cfg.teacher_iters)
        teacher = load_teacher(record[teacher_label]["run_dir"])
        limit = teacher.run_config.train.limit
        data = load_data(teacher, split="test", limit=limit, data_dir=cfg.data_dir)
        teacher_acc, teacher_pred = _predict_accuracy(teacher.model, data)
        # The trainer scored the same split: a mismatch would mean the two evaluations differ.
        record[teacher_label]["accuracy_rescored"] = teacher_acc

        def derived(label: str, model: torch.nn.Module, extra: dict[str, Any]) -> None:
            acc, pred = _predict_accuracy(model, data)
            agree = float((pred == teacher_pred).double().mean())
            record[label] = {"accuracy": acc, "agreement_with_teacher": agree, **extra}
            models[label] = model.eval()
            log(f"[seed {seed}] {label}: {100 * acc:.2f} % (agrees with the teacher on {100 * agree:.2f} %)")

        for k in cfg.truncated_iters:
            derived(method_key("sinkhorn", n_iters=k), truncate_sinkhorn(teacher.model, n_iters=k), {"from": teacher_label})
        calibration = cfg.calibration or SUITES[cfg.suite].calibration
        batches = calibration_batches(teacher, num_samples=calibration, batch_size=32, seed=seed, data_dir=cfg.data_dir)
        start = time.perf_counter()
        compiled, report = compile_model(teacher.model, batches, seed=seed)
        derived("asap", compiled, {"from": teacher_label, "compile_seconds": time.perf_counter() - start,
                                   "calibration_examples": sum(len(b["labels"]) for b in batches),
                                   "compile_options": report["options"]})  # fmt: skip
    return record, models, data


def time_inference(models: dict[str, torch.nn.Module], data, *, batch: int, budget_s: float) -> dict[str, Any]:
    """Median forward time of each model on the same test batch, timed round-robin in one run."""
    from asap.train.data import batch_inputs

    dataset, collate = data
    examples = collate([dataset[i] for i in range(min(batch, len(dataset)))])
    fns = {}
    for name, model in models.items():
        inputs = batch_inputs(examples, model.input_names, next(model.parameters()).device)

        def forward(model=model, inputs=inputs):
            with torch.inference_mode():
                return model(**inputs)

        fns[name] = forward
    device = next(next(iter(models.values())).parameters()).device
    run = benchmark(fns, device=device, warmup=2, repeats=50, min_repeats=5, budget_s=budget_s, measure_memory=False)
    ms = {name: res.timing.median_s * 1e3 for name, res in run.results.items() if res.timing is not None}
    first = next(iter(examples.values()))
    return {"batch": len(examples["labels"]), "input_shape": list(first.shape), "rounds": run.rounds,
            "median_ms": ms, "timing": {name: res.to_dict() for name, res in run.results.items()}}  # fmt: skip


def run_accuracy(cfg: AccuracyConfig, *, out: Path, command: str, log=print) -> dict[str, Any]:
    """Every seed of ``cfg``; the JSON at ``out`` is rewritten after each one (see the module docstring)."""
    torch_threads = torch.get_num_threads()
    out.parent.mkdir(parents=True, exist_ok=True)
    base = cfg.train_config(cfg.methods[0], cfg.seeds[0]).to_dict()
    for name in ("out_dir", "method", "seed", "n_iters", "eps", "attention_options", "data_dir", "progress",
                 "checkpoint_every"):
        base.pop(name, None)
    doc: dict[str, Any] = {
        "schema": SCHEMA, "suite": cfg.suite, "dataset": SUITES[cfg.suite].dataset, "note": SUITES[cfg.suite].note,
        "train": base, "teacher_iters": cfg.teacher_iters, "eps": cfg.eps, "truncated_iters": list(cfg.truncated_iters),
        "esp_options": {"tau_sort": cfg.esp_tau_sort}, "esp_seeds": cfg.esp_seeds,
        "methods": [method_label(m, cfg.teacher_iters) for m in cfg.methods] + list(cfg.derived_methods),
        "seeds": [], "per_seed": {}, "summary": {}, "inference": None, "command": command,
    }  # fmt: skip
    for index, seed in enumerate(cfg.seeds):
        record, models, data = evaluate_seed(cfg, seed, log=log)
        doc["seeds"].append(seed)
        doc["per_seed"][str(seed)] = record
        if index == 0 and data is not None:  # inference cost: the first seed's models, one run
            doc["inference"] = {"seed": seed, **time_inference(models, data, batch=cfg.timing_batch,
                                                               budget_s=cfg.timing_budget_s)}  # fmt: skip
            log("inference ms: " + ", ".join(f"{k} {v:.1f}" for k, v in doc["inference"]["median_ms"].items()))
        for method in doc["methods"]:
            values = [doc["per_seed"][str(s)][method]["accuracy"] for s in doc["seeds"] if method in doc["per_seed"][str(s)]]
            doc["summary"][method] = summarize(values)
        doc["machine"] = {**machine_info(cfg.device), "torch_threads": torch_threads}
        write_result(out, doc, command=command)
    return doc


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The budget options given on the command line (each a :class:`~asap.train.TrainConfig` field)."""
    names = ("epochs", "limit", "batch_size", "lr", "max_length", "dim", "depth")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", required=True, choices=sorted(SUITES), help="data set and its training budget")
    parser.add_argument("--seeds", type=int_list(nonnegative_int), default=(0, 1, 2), help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--methods", type=name_list(TRAINED_METHODS), default=TRAINED_METHODS,
                        help=f"trained methods (default {','.join(TRAINED_METHODS)})")  # fmt: skip
    parser.add_argument("--teacher-iters", type=int, default=11, help="Sinkhorn half-steps K of the teacher (default: 11)")
    parser.add_argument("--truncated-iters", type=int_list(), default=(3,), help="K of the truncated teachers (default 3)")
    parser.add_argument("--calibration", type=int, default=None, help="ASAP calibration examples (default: suite's)")
    parser.add_argument("--data-dir", default=None, help="data directory (default: $ASAP_DATA_DIR)")
    parser.add_argument("--runs-dir", default="runs/accuracy", help="where the training runs go (default %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="JSON to write (default results/accuracy/SUITE.json)")
    parser.add_argument("--timing-batch", type=int, default=64, help="test examples per timed forward (default: 64)")
    parser.add_argument("--esp-tau-sort", type=float, default=0.01, help="ESP soft-sort temperature (default 0.01)")
    parser.add_argument("--esp-seeds", type=int, default=None,
                        help="train ESP for the first N seeds only (its cost is 10-30x Sinkhorn's; default all)")
    group = parser.add_argument_group("budget overrides (default: the suite's)")
    for name, kind in (("epochs", int), ("limit", int), ("batch-size", int), ("lr", float), ("max-length", int),
                       ("dim", int), ("depth", int)):  # fmt: skip
        group.add_argument(f"--{name}", type=kind, default=None)


def run_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    try:
        cfg = AccuracyConfig(
            suite=args.suite, seeds=args.seeds, methods=args.methods, teacher_iters=args.teacher_iters,
            truncated_iters=args.truncated_iters, calibration=args.calibration, data_dir=args.data_dir,
            runs_dir=args.runs_dir, overrides=_overrides(args), timing_batch=args.timing_batch,
            esp_tau_sort=args.esp_tau_sort, esp_seeds=args.esp_seeds,
        )  # fmt: skip
    except ValueError as err:
        print(f"asap bench accuracy: {err}", file=sys.stderr)
        return 2
    out = args.out or Path("results") / "accuracy" / f"{args.suite}.json"
    argv = sys.argv[1:] if argv is None else argv
    command = command_line("asap bench accuracy", argv)
    try:
        run_accuracy(cfg, out=out, command=command)
    except (ValueError, FileNotFoundError) as err:  # a changed budget; a data set not in the data directory
        print(f"asap bench accuracy: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return module_main(argv, prog="python -m asap.bench.accuracy", description=__doc__, add_arguments=add_arguments,
                       run_from_args=run_from_args)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
