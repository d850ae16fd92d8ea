"""Frozen-layer benchmark: one layer of a trained Sinkhorn model compiled to ASAP, the rest left as trained.

    asap bench frozen-layer results/teachers/imdb256_sinkhorn_k11 --data-dir ../shared/data
    asap bench frozen-layer runs/my_teacher --layers 0 --teacher-iters 21 --eval-limit 2000

This is the paper's main benchmark. For each chosen Sinkhorn layer, in turn:

* **accuracy**: the test accuracy of the model with that layer compiled
  (calibrated on ``--calibration`` training examples, the defaults of
  ``asap compile``), of the teacher, and of the teacher with that layer
  truncated to each of ``--truncated-iters`` half-steps (K = 3, the same-cost
  baseline by number of passes, and K = 5); plus each one's agreement with
  the teacher's predictions;
* **speed**: the layer's attention on *the same inputs*: the ``q, k, v`` (and
  padding mask) that layer receives on ``--timing-batch`` test examples. Timed
  round-robin in one run (median): ASAP, the teacher at its trained K, the
  teacher at ``--teacher-iters`` (K = 21 in the paper), truncated Sinkhorn and
  softmax ``scaled_dot_product_attention``. Reported as ratios measured side
  by side; absolute times only mean something for the machine recorded;
* **whole model**: the forward time of the whole model on the same
  ``--timing-batch`` examples, teacher, layer compiled and layer truncated to
  each K, interleaved per round (:func:`asap.bench.model_timing.time_models`,
  ``--model-rounds`` rounds): what the one compiled layer saves end to end.

Before timing, the captured ASAP output is checked against the fp64 reference
of the same operator (a wrong fast path is not timed). ``--device cuda`` runs
everything on the GPU (timings synchronise the device around each call). Writes
``results/frozen_layer/<run name>.json`` unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from asap.argtypes import int_list, module_main, nonnegative_int, positive_float, positive_int
from asap.attention.operators import call_mask
from asap.bench.measure import benchmark, speedups
from asap.env import machine_info
from asap.io import command_line, method_key, write_result

SCHEMA = "asap.bench.frozen_layer/2"  # /2: truncated_iters is a list, each layer has whole_model timings


def capture_layer_inputs(model: nn.Module, operator: nn.Module, inputs: dict[str, Tensor]) -> tuple:
    """``(q, k, v, attn_mask)`` that ``operator`` receives when ``model`` runs on ``inputs`` (eval mode).

    ``attn_mask`` is the 4-D boolean form (for the references) whatever form the
    call used; :func:`capture_layer_call` also returns the call's own keyword arguments.
    """
    q, k, v, kwargs = capture_layer_call(model, operator, inputs)
    return q, k, v, call_mask(kwargs)


def capture_layer_call(model: nn.Module, operator: nn.Module, inputs: dict[str, Tensor]) -> tuple:
    """``(q, k, v, mask_kwargs)``: what ``operator`` receives, with its mask keyword (``attn_mask`` or ``padding_mask``)."""
    captured: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        q, k, v = args[:3]
        masks = {key: kwargs[key].detach().clone() for key in ("attn_mask", "padding_mask") if kwargs.get(key) is not None}
        captured.update(q=q.detach().clone(), k=k.detach().clone(), v=v.detach().clone(), kwargs=masks)

    handle = operator.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            model.eval()(**inputs)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the layer was not called by the model's forward pass")
    return captured["q"], captured["k"], captured["v"], captured["kwargs"]


def verify_asap(operator: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> float:
    """Largest absolute error of the compiled operator against the fp64 reference c-transform on the captured inputs.

    The predicted dual is the operator's own (a small linear map); what is checked is the fast two-sided
    c-transform (SDPA row step, fused/tiled column log-sum-exp) that the timing measures.
    """
    from asap.attention.reference import asap_attention_reference

    with torch.inference_mode():
        fast = operator(q, k, v, attn_mask=mask)
        scale = operator.resolved_scale(q)
        f_hat = operator.dual_map(q, k, scale=scale, attn_mask=mask).double()
        ref = asap_attention_reference(q.double(), k.double(), v.double(), f_hat, eps=operator.eps, scale=scale,
                                       attn_mask=mask)  # fmt: skip
    return float((fast.double() - ref).abs().max())


def time_layer(
    operators: dict[str, nn.Module], q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, budget_s: float,
    padding: Tensor | None = None,
) -> dict[str, Any]:
    """Median time and peak memory of every operator on the same inputs, round-robin in one run.

    With ``padding`` (the ``(b, n)`` token mask the model passed) operators that
    take it get it, as in the model; the others get ``mask``.
    """
    fns = {}
    for name, op in operators.items():
        kwargs = {"padding_mask": padding} if padding is not None and op.takes_padding_mask else {"attn_mask": mask}

        def call(op=op, kwargs=kwargs):
            with torch.inference_mode():
                return op(q, k, v, **kwargs)

        fns[name] = call
    run = benchmark(fns, device=q.device, warmup=2, repeats=50, min_repeats=5, budget_s=budget_s)
    return {
        "median_ms": {n: r.timing.median_s * 1e3 for n, r in run.results.items() if r.timing is not None},
        "peak_bytes": {n: r.peak_bytes for n, r in run.results.items()},
        "speedup_of_asap_over": {n: None if s is None else 1 / s
                                 for n, s in speedups(run, reference="asap").items() if n != "asap"},
        "timing": {n: r.to_dict() for n, r in run.results.items()},
        "rounds": run.rounds,
    }  # fmt: skip


def _log(line: str) -> None:
    print(line, flush=True)  # a long run's log file shows each layer as it finishes


def run_frozen_layer(args: argparse.Namespace, command: str, *, log=_log) -> dict[str, Any]:
    from asap.attention import SinkhornOperator, SoftmaxOperator
    from asap.compile import compile_model
    from asap.bench.model_timing import time_models
    from asap.compile.swap import sinkhorn_layers, truncate_sinkhorn
    from asap.runs import calibration_batches, load_data, load_teacher, predict
    from asap.train.data import batch_inputs
    from asap.train.distributed import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    teacher = load_teacher(args.run_dir, device=device)
    layers = sinkhorn_layers(teacher.model)
    chosen = list(range(len(layers))) if args.layers is None else args.layers
    bad = [i for i in chosen if not 0 <= i < len(layers)]
    if not layers or bad:
        raise ValueError(f"layers {bad} out of range: {args.run_dir} has {len(layers)} Sinkhorn layers")
    batches = calibration_batches(teacher, num_samples=args.calibration, batch_size=32, seed=args.seed,
                                  data_dir=args.data_dir)  # fmt: skip
    data = load_data(teacher, split=args.eval_split, limit=args.eval_limit, data_dir=args.data_dir)
    teacher_pred, labels = predict(teacher.model, data)
    accuracy = lambda pred: float((pred == labels).double().mean())  # noqa: E731
    agreement = lambda pred: float((pred == teacher_pred).double().mean())  # noqa: E731
    dataset, collate = data
    timing_examples = collate([dataset[i] for i in range(min(args.timing_batch, len(dataset)))])
    inputs = batch_inputs(timing_examples, teacher.model.input_names, device)
    log(f"teacher accuracy {100 * accuracy(teacher_pred):.2f} % on {len(labels)} {args.eval_split} examples")

    results = []
    for index in chosen:
        layer = layers[index]
        start = time.perf_counter()
        compiled, report = compile_model(teacher.model, batches, layers=[index], seed=args.seed,
                                         truncated_iters=args.truncated_iters[0])  # fmt: skip
        compile_seconds = time.perf_counter() - start
        asap_pred = predict(compiled, data)[0]
        # the truncations cheaper than this layer's teacher (K = 5 of a K = 5 teacher would be the teacher)
        kept_iters = [k for k in args.truncated_iters if k < layer.operator.n_iters]
        truncated = {method_key("sinkhorn", n_iters=k): truncate_sinkhorn(teacher.model, n_iters=k, layers=[index])
                     for k in kept_iters}  # fmt: skip
        truncated_pred = {key: predict(model, data)[0] for key, model in truncated.items()}

        q, k, v, call_kwargs = capture_layer_call(teacher.model, layer.operator, inputs)
        mask, padding = call_mask(call_kwargs), call_kwargs.get("padding_mask")
        asap_op = compiled.get_submodule(layer.name)
        error = verify_asap(asap_op, q, k, v, mask)
        if not error < args.tolerance:
            raise RuntimeError(f"layer {index}: ASAP differs from its fp64 reference by {error:.3g}; not timing it")
        teacher_op = layer.operator
        reference_key = method_key("sinkhorn", n_iters=args.teacher_iters)
        operators = {
            "asap": asap_op,
            method_key("sinkhorn", n_iters=teacher_op.n_iters): teacher_op,
            reference_key: SinkhornOperator(n_iters=args.teacher_iters, eps=teacher_op.eps, scale=teacher_op.scale),
            **{method_key("sinkhorn", n_iters=k): SinkhornOperator(n_iters=k, eps=teacher_op.eps, scale=teacher_op.scale)
               for k in kept_iters},
            "softmax": SoftmaxOperator(scale=teacher_op.scale),
        }  # fmt: skip
        timing = time_layer(operators, q, k, v, mask, budget_s=args.budget, padding=padding)
        whole = time_models({"teacher": teacher.model, "asap": compiled, **truncated}, [timing_examples],
                            rounds=args.model_rounds, reference="teacher")  # fmt: skip
        fit = report["layers"][0]
        record = {
            "layer": index, "name": layer.name, "teacher_iters": teacher_op.n_iters, "eps": teacher_op.eps,
            "shape": {"q": list(q.shape), "k": list(k.shape)}, "padded": mask is not None,
            "accuracy": {"teacher": accuracy(teacher_pred), "asap": accuracy(asap_pred),
                         **{key: accuracy(pred) for key, pred in truncated_pred.items()}},
            "agreement_with_teacher": {"asap": agreement(asap_pred),
                                       **{key: agreement(pred) for key, pred in truncated_pred.items()}},
            "r2_held_out": _mean(fit.get("r2_held_out")), "row_tv_asap": _mean(fit.get("row_tv_asap")),
            "row_tv_truncated": _mean(fit.get("row_tv_truncated")),
            "asap_max_abs_error_vs_fp64": error, "compile_seconds": compile_seconds, **timing,
            "whole_model": whole,
        }  # fmt: skip
        results.append(record)
        ratio = timing["speedup_of_asap_over"]
        log(f"layer {index}: teacher {100 * record['accuracy']['teacher']:.2f} asap {100 * record['accuracy']['asap']:.2f} "
            + " ".join(f"{key} {100 * record['accuracy'][key]:.2f}" for key in truncated_pred) + " | "
            + ", ".join(f"{name} {ms:.2f} ms" for name, ms in timing["median_ms"].items())
            + f" | ASAP {ratio[reference_key]:.2f}x over K={args.teacher_iters}"
            + f" | whole model: ASAP {whole['models']['asap']['model_speedup']:.2f}x the teacher's speed")  # fmt: skip
    return {
        "schema": SCHEMA, "run_dir": str(args.run_dir), "teacher_sha256": teacher.source_sha256,
        "dataset": teacher.data_info["dataset"], "eval_split": args.eval_split, "eval_examples": len(labels),
        "calibration_examples": args.calibration, "timing_batch": len(timing_examples["labels"]),
        "reference_iters": args.teacher_iters, "truncated_iters": list(args.truncated_iters),
        "model_rounds": args.model_rounds,
        "layers": results, "device": str(device), "machine": machine_info(device), "command": command,
    }  # fmt: skip


def _mean(values: list[float] | None) -> float | None:
    return None if not values else sum(values) / len(values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a trained Sinkhorn run (asap train)")
    parser.add_argument("--layers", type=int_list(nonnegative_int), default=None, help="Sinkhorn layers to compile, one at a time (default all)")
    parser.add_argument("--teacher-iters", type=positive_int, default=21, help="K of the timed reference teacher (default 21)")
    parser.add_argument("--truncated-iters", type=int_list(), default=[3, 5],
                        help="K of the truncated baselines, odd, the first one also in the fit report (default 3,5)")
    parser.add_argument("--calibration", type=positive_int, default=512, help="calibration examples (default 512)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="calibration sample and slice directions (default 0)")
    parser.add_argument("--eval-split", default="test", help="default: test")
    parser.add_argument("--eval-limit", type=positive_int, default=None,
                        help="at most this many evaluation examples (class-stratified; default: all)")
    parser.add_argument("--timing-batch", type=positive_int, default=32,
                        help="test examples whose layer inputs (and whole-model forward) are timed (default 32)")
    parser.add_argument("--budget", type=positive_float, default=20.0, help="seconds of timed calls per operator (default 20)")
    parser.add_argument("--model-rounds", type=positive_int, default=10,
                        help="interleaved rounds of the whole-model timing (default 10)")
    parser.add_argument("--tolerance", type=positive_float, default=1e-4, help="largest ASAP error vs fp64 accepted (default 1e-4)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda or cuda:<index>: where the model runs, is compiled and is timed (default cpu)")
    parser.add_argument("--data-dir", default=None, help="data directory (default: the run's, then $ASAP_DATA_DIR)")
    parser.add_argument("--out", type=Path, default=None, help="JSON to write (default results/frozen_layer/RUN.json)")


def run_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = command_line("asap bench frozen-layer", argv)
    out = args.out or Path("results") / "frozen_layer" / f"{Path(args.run_dir).resolve().name}.json"
    bad = [k for k in args.truncated_iters if k % 2 == 0]
    if bad:
        print(f"asap bench frozen-layer: --truncated-iters must be odd (rows exact), got {bad}", file=sys.stderr)
        return 2
    try:
        doc = run_frozen_layer(args, command)
    except (ValueError, FileNotFoundError) as err:
        print(f"asap bench frozen-layer: {err}", file=sys.stderr)
        return 2
    write_result(out, doc, command=command)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return module_main(argv, prog="python -m asap.bench.frozen_layer", description=__doc__, add_arguments=add_arguments,
                       run_from_args=run_from_args)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
