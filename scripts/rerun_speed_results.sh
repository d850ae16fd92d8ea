#!/usr/bin/env bash
# Rerun every speed figure the speed issue asks for, on this machine, one after the other (run it on an
# otherwise idle machine: each benchmark interleaves its methods, but a busy neighbour still adds noise).
# Then `asap report` regenerates results/README.md from the JSON written here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${ASAP_DATA_DIR:-../shared/data}
# The operator grid (the same command as before, plus n = 16 and 32), and the padded grid (forward only).
$PY -m asap.bench.operators --device cpu --dtype float32 --batch 8 --heads 8 --head-dim 64 \
    --lengths 16,32,64,128,256,512,1024,2048,4096 --iters 3,5,11,21 --teacher-iters 21 --slices 16 --eps 1.0 \
    --methods softmax,sinkhorn,asap,esp --backward-max-length 512 --max-length esp=128 --warmup 1 --repeats 7 \
    --min-repeats 1 --budget-s 5.0 --seed 0 --out results/bench/operators_cpu.json
$PY -m asap.bench.operators --device cpu --dtype float32 --batch 8 --heads 8 --head-dim 64 \
    --lengths 16,64,128,512,1024,4096 --iters 3,11,21 --teacher-iters 21 --slices 16 --eps 1.0 \
    --methods softmax,sinkhorn,asap --padding 0.25 --no-backward --warmup 1 --repeats 7 --min-repeats 1 \
    --budget-s 5.0 --seed 0 --out results/bench/operators_cpu_padded.json
# ASAP's paths at the shipped teachers' attention shapes, torch's default threads and one thread.
$PY scripts/bench_asap_paths.py --out results/bench/asap_paths_default_threads.json
$PY scripts/bench_asap_paths.py --threads 1 --out results/bench/asap_paths_1_thread.json
# The fidelity plane on sharp pretrained attention (MiniLM converted to Sinkhorn K = 11, IMDb reviews).
$PY -m asap.bench.fidelity --hf minilm --data-dir "$DATA" --slices 16,64 --out results/fidelity/minilm_imdb128.json
# The frozen-layer benchmark on the shipped teachers.
$PY -m asap.bench.frozen_layer results/teachers/digits_sinkhorn_k11 --out results/frozen_layer/digits_sinkhorn_k11.json
$PY -m asap.bench.frozen_layer results/teachers/fmnist_sinkhorn_k11 --data-dir "$DATA" \
    --out results/frozen_layer/fmnist_sinkhorn_k11.json
# ... and on the sharp digits teacher (patch size 1, scripts/train_sharp_teachers.sh).
$PY -m asap.bench.frozen_layer results/teachers/digits_p1_sinkhorn_k11 \
    --out results/frozen_layer/digits_p1_sinkhorn_k11.json
# The demo (its own folder; its table is quoted in results/demo.txt).
$PY -m asap.cli.main demo --out runs/demo --quiet
mkdir -p results/demo && cp runs/demo/demo.txt runs/demo/demo.json results/demo/
$PY -m asap.bench.report
