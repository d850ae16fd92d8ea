"""``asap demo``: train a Sinkhorn teacher, compile it to ASAP, compare accuracy and speed.

    asap demo                      # about a minute on 2 idle CPU cores (more on a busy machine); writes runs/demo
    asap demo --out /tmp/demo --epochs 5

On the bundled ``digits`` data set (scikit-learn; nothing to download), the
demo

1. trains a small Vision Transformer whose attention is Sinkhorn with
   ``K = --n-iters`` half-steps (the teacher), or reuses the one in
   ``OUT/teacher`` if a previous demo finished training it. Its patches are
   single pixels by default (65 tokens): its attention is then sharp, and
   Sinkhorn truncated to ``K = 3`` loses tens of accuracy points where ASAP
   keeps the teacher's (``--patch-size 2``: 17 tokens, flat attention, where
   truncation is as good as the teacher and ASAP has nothing to win);
2. compiles it to ASAP on ``--calibration`` training images (``OUT/asap``);
3. measures, side by side in this process and on the same test batches, the
   test accuracy and the median time per batch (whole model, and attention
   operators alone) of the teacher, of Sinkhorn truncated to ``K = 3``
   (the same-cost baseline: one n x m pass more than ASAP) and of ASAP, and
   the time of one attention layer of each on longer random sequences
   (``--lengths``): at 17 tokens the L sorts of ASAP cost about as much as the
   n x n passes it saves, the gain grows with n;
4. prints the table and saves it (``OUT/demo.json``, ``OUT/demo.txt``) with a
   picture of one head's attention matrix (first layer) for one test image
   under each operator (``OUT/attention_maps.png``) and the fidelity report
   (``OUT/asap/fidelity.png``).
"""

from __future__ import annotations

import argparse

from asap.cli.options import int_list, nonnegative_int, positive_int
from asap.errors import ConfigError

#: The digits images are 8 x 8 pixels; the patch size must divide 8.
DIGITS_IMAGE_SIZE = 8


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="train, compile and compare on the bundled digits data (minutes on a CPU)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--epochs", type=positive_int, default=20, help="teacher training epochs (default 20)")
    parser.add_argument("--n-iters", type=positive_int, default=11, help="Sinkhorn half-steps K of the teacher (odd, default 11)")
    parser.add_argument("--patch-size", type=positive_int, default=1,
                        help="patch size on the 8x8 digits: 1 gives 65 tokens and sharp attention, which Sinkhorn "
                             "truncated to K = 3 cannot copy; 2 gives 17 tokens and nearly flat attention (default 1)")
    parser.add_argument("--limit", type=positive_int, default=None, help="use at most this many images per split (quick runs)")
    parser.add_argument("--calibration", type=positive_int, default=512, help="calibration images (default 512)")
    parser.add_argument("--slices", type=positive_int, default=16, help="slice directions per head (default 16)")
    parser.add_argument("--refine", choices=("none", "kl"), default="none", help="KL refinement of the map (default none)")
    parser.add_argument("--repeats", type=positive_int, default=30,
                        help="timing rounds, each running every test batch through every model in turn (default 30)")
    parser.add_argument("--lengths", type=int_list(), default=[17, 65, 128, 512],
                        help="sequence lengths of the operator timing (default 17,65,128,512)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="default 0")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_demo)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from asap.compile import compile_model, save_compiled, truncate_sinkhorn
    from asap.bench.model_timing import time_models, time_operator_scaling
    from asap.bench.compare import attention_maps, attention_operators, plot_attention_maps
    from asap.bench.compile_report import fidelity_table, format_table, plot_report
    from asap.bench.measure import time_operators_ms
    from asap.runs import calibration_batches, load_data, load_teacher
    from asap.train import TrainConfig, train
    from asap.io import atomic_write_bytes, atomic_write_json, method_key
    from asap.train.evaluate import evaluate

    if args.patch_size > DIGITS_IMAGE_SIZE or DIGITS_IMAGE_SIZE % args.patch_size:
        raise ConfigError(f"--patch-size {args.patch_size} does not divide the {DIGITS_IMAGE_SIZE} x {DIGITS_IMAGE_SIZE} digits images")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    bar = None if args.quiet else (lambda desc: lambda it, total: tqdm(it, total=total, desc=desc, leave=False))

    # 1. The teacher.
    teacher_dir = out / "teacher"
    if (teacher_dir / "eval_test.json").is_file():
        print(f"[1/4] reusing the teacher trained in {teacher_dir}")
    else:
        print(f"[1/4] training a Sinkhorn (K={args.n_iters}) Vision Transformer on digits, {args.epochs} epochs")
        config = TrainConfig(
            dataset="digits", out_dir=str(teacher_dir), method="sinkhorn", n_iters=args.n_iters, eps=1.0,
            preset="tiny", patch_size=args.patch_size, epochs=args.epochs, batch_size=32, lr=3e-3, limit=args.limit,
            seed=args.seed, device="cpu", progress=not args.quiet,
        )  # fmt: skip
        # Creates OUT/teacher (and OUT) once its checks have passed; an interrupted demo continues its teacher.
        train(config, resume=(teacher_dir / "config.json").is_file())
    teacher = load_teacher(teacher_dir)

    # 2. Compile.
    print(f"[2/4] compiling to ASAP on {args.calibration} training images")
    batches = calibration_batches(teacher, num_samples=args.calibration, batch_size=64, seed=args.seed)
    compiled, report = compile_model(
        teacher.model, batches, num_slices=args.slices, refine=args.refine, seed=args.seed,
        progress=bar and bar("calibrating"), timer=time_operators_ms,
    )  # fmt: skip
    truncated = truncate_sinkhorn(teacher.model, n_iters=3)
    models = {f"teacher (Sinkhorn K={args.n_iters})": teacher.model, "Sinkhorn K=3 (same cost)": truncated, "ASAP": compiled}

    # 3. Accuracy and speed on the same test batches.
    print("[3/4] measuring accuracy and speed side by side")
    dataset, collate = load_data(teacher, split="test", limit=args.limit)
    accuracy = {name: evaluate(model, dataset, collate=collate, batch_size=128)["accuracy"]
                for name, model in models.items()}
    test_batches = [collate([dataset[i] for i in range(s, min(s + 128, len(dataset)))]) for s in range(0, len(dataset), 128)]
    timing = time_models(models, test_batches, rounds=args.repeats, progress=bar and bar("timing"))
    speed = timing["models"]
    teacher_name = next(iter(models))
    rows = []
    for name in models:
        rows.append({
            "model": name,
            "accuracy": 100 * accuracy[name],
            "model_ms": speed[name]["model_ms"],
            "attention_ms": speed[name]["attention_ms"],
            "model_speedup": speed[name]["model_speedup"],
            "model_speedup_iqr": speed[name]["model_speedup_iqr"],
            "attention_speedup": speed[name]["attention_speedup"],
            "attention_speedup_iqr": speed[name]["attention_speedup_iqr"],
        })  # fmt: skip
    columns = ["model", "accuracy", "model_ms", "attention_ms", "model_speedup", "model_speedup_iqr",
               "attention_speedup", "attention_speedup_iqr"]  # fmt: skip
    table = format_table(rows, columns)
    load = timing["load_average_before"]
    note = (
        f"accuracy in % on {len(dataset)} test images; times: median ms per batch of up to 128 images over "
        f"{args.repeats} rounds, every batch run through every model in turn (whole model / attention operators "
        f"only); speed-ups: median and IQR of the per-round ratios teacher / model; {timing['threads']} torch "
        f"threads, load average {load[0] if load else 'n/a'} before timing"
    )
    # How the operators scale with n, from the flat 17-token regime (sorts cost as much as the passes) upwards:
    layer_ops = {name: attention_operators(model)[-1] for name, model in models.items()}
    last = layer_ops["ASAP"].dual_map
    scaling = time_operator_scaling(layer_ops, num_heads=last.num_heads, head_dim=last.head_dim, lengths=args.lengths,
                                    rounds=max(5, args.repeats // 2))  # fmt: skip
    for row in scaling:
        row["asap_speedup"] = row["ASAP_speedup"]
    scaling_note = (
        "one attention layer (the last one, its fitted dual map) on random inputs of 8 sequences of n tokens: "
        "median ms per call, and ASAP's speed-up over the teacher (median per-round ratio)"
    )
    verdict = _verdict(speed["ASAP"], scaling, tokens=(DIGITS_IMAGE_SIZE // args.patch_size) ** 2 + 1)

    # 4. Save.
    print("[4/4] saving")
    report["accuracy"] = {"teacher": accuracy[teacher_name], method_key("sinkhorn", n_iters=3): accuracy["Sinkhorn K=3 (same cost)"],
                          "asap": accuracy["ASAP"], "num_samples": len(dataset)}  # fmt: skip
    asap_dir = save_compiled(out / "asap", compiled, report=report, run_config=teacher.run_config.to_dict(),
                             source_sha256=teacher.source_sha256)  # fmt: skip
    atomic_write_json(asap_dir / "fidelity.json", report)
    plot_report(report, asap_dir / "fidelity.png")
    # Layer 0: every model sees the same inputs there, so the maps differ only by the normaliser.
    maps = attention_maps(models, test_batches[0], layer=0)
    plot_attention_maps(maps, str(out / "attention_maps.png"))
    demo = {"rows": rows, "note": note, "verdict": verdict, "timing": timing, "scaling": scaling,
            "scaling_note": scaling_note, "teacher": str(teacher_dir), "asap": str(asap_dir)}  # fmt: skip
    atomic_write_json(out / "demo.json", demo)
    scaling_table = format_table(scaling, ["n", *models, "asap_speedup"])
    text = (
        f"{table}\n\n{note}\n\n{verdict}\n\n{scaling_table}\n\n{scaling_note}\n\n"
        f"fidelity of the compiled layers:\n{fidelity_table(report)}\n"
    )
    atomic_write_bytes(out / "demo.txt", text.encode())
    print(f"\n{text}")
    print(f"written: {out / 'demo.json'}, {out / 'attention_maps.png'}, {asap_dir}")
    return 0


def _verdict(asap: dict, scaling: list[dict], *, tokens: int) -> str:
    """One honest sentence: is ASAP faster than its teacher here, and if not, from which n it is."""
    model, attention = asap["model_speedup"], asap["attention_speedup"]
    if model > 1 and attention > 1:
        return f"ASAP is faster than its teacher on this model: {model:.2f}x whole model, {attention:.2f}x attention alone."
    wins = [row["n"] for row in scaling if row["asap_speedup"] > 1]
    where = (f"in the single-layer timing ASAP is faster from n = {wins[0]} tokens" if wins
             else "ASAP was not faster at any timed length")
    return (f"ASAP is NOT faster than its teacher on this model ({model:.2f}x whole model, {attention:.2f}x "
            f"attention alone): at its {tokens} tokens the fixed cost of the dual map's sorts is as "
            f"large as the Sinkhorn passes it saves; {where}.")
