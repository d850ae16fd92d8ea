"""A compiled artifact against its teacher and the teacher truncated to K: accuracy and whole-model time.

The saved model of ``asap compile`` (every Sinkhorn layer replaced by ASAP), the teacher and the teacher with
every Sinkhorn layer truncated to K half-steps are evaluated on the first ``--eval-limit`` test examples
(accuracy, and agreement with the teacher's predictions) and timed on one batch of them
(asap.bench.model_timing.time_models: rounds interleaved, paired ratios, the attention operators timed by
hooks), so that the compiled model can be set against the truncation of the same measured cost. Writes a
JSON (machine, threads, load average, command):

    python scripts/time_compiled_model.py runs/gpu/minilm_imdb256_sinkhorn runs/gpu/minilm_dir_keys_l32_s100 \\
        --data-dir ../shared/data --truncated 1,3,5 --eval-limit 1000 \\
        --out results/bench/compiled_model_minilm_imdb256_lse_keys_directions.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from asap.argtypes import int_list, positive_int
from asap.bench.measure import write_script_result
from asap.bench.model_timing import time_models
from asap.compile.swap import truncate_sinkhorn
from asap.env import load_average
from asap.io import method_key
from asap.runs import load_data, load_run_model, load_teacher, predict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher", type=Path, help="the teacher's run folder (asap train)")
    parser.add_argument("compiled", type=Path, help="the compiled artifact's folder (asap compile --out)")
    parser.add_argument("--data-dir", default=None, help="data folder (default: the teacher's)")
    parser.add_argument("--truncated", type=int_list(), default=(1, 3, 5), help="truncated Sinkhorn K (default 1,3,5)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="test inputs in the timed batch")
    parser.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds (median and IQR over them)")
    parser.add_argument("--eval-limit", type=positive_int, default=1000, help="test examples evaluated")
    parser.add_argument("--eval-batch-size", type=positive_int, default=32)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = load_teacher(args.teacher)
    compiled, _ = load_run_model(args.compiled)
    data = load_data(teacher, split="test", limit=max(args.eval_limit, args.batch_size), data_dir=args.data_dir)
    dataset, collate = data
    batch = collate([dataset[i] for i in range(min(args.batch_size, len(dataset)))])
    truncated = {method_key("sinkhorn", n_iters=k): truncate_sinkhorn(teacher.model, n_iters=k) for k in args.truncated}
    models = {"teacher": teacher.model, "asap": compiled, **truncated}
    # the data above is exactly the evaluation set unless the timed batch asked for more examples
    evaluated = data if args.eval_limit >= args.batch_size else \
        load_data(teacher, split="test", limit=args.eval_limit, data_dir=args.data_dir)  # fmt: skip
    predictions = {}
    for name, model in models.items():
        predictions[name], labels = predict(model, evaluated, batch_size=args.eval_batch_size)
        print(f"{name}: accuracy {(predictions[name] == labels).double().mean().item():.4f}", flush=True)
    accuracy = {name: {"accuracy": (pred == labels).double().mean().item(),
                       "agreement": (pred == predictions["teacher"]).double().mean().item()}
                for name, pred in predictions.items()}  # fmt: skip
    load_before = load_average()
    with torch.no_grad():
        timing = time_models(models, [batch], rounds=args.rounds, reference="teacher")
    write_script_result(args.out, schema="asap.scripts.compiled_model_time/1", script="scripts/time_compiled_model.py",
                        argv=argv if argv is not None else sys.argv[1:], load_before=load_before,
                        teacher=str(args.teacher), compiled=str(args.compiled), batch_size=len(batch["labels"]),
                        eval_examples=len(labels), accuracy=accuracy, timing=timing)  # fmt: skip
    for name, row in timing["models"].items():
        print(f"{name}: {row['model_ms']:.1f} ms per batch ({row['model_speedup']:.2f}x), attention "
              f"{row['attention_ms']:.1f} ms ({row['attention_speedup']:.2f}x)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
