#!/usr/bin/env bash
# Rerun the CPU speed figures of the speed issue, on this machine, one after the other, with the commands
# recorded beside the committed JSON (run it on an otherwise idle machine: each benchmark interleaves its
# methods, but a busy neighbour still adds noise; every JSON records the threads and the load average).
# Then `asap report` regenerates results/README.md. Usage: bash scripts/rerun_speed_results.sh [PART...]
# with PART among ops1 paths fused frozen demo padded ops2 imdb minilm (default: all but minilm, in that
# order; ~50 min on 2 idle cores). minilm needs the MiniLM Sinkhorn teacher in runs/sharp/minilm_imdb256_sinkhorn
# (trained by the command in results/teachers/minilm_imdb256_sinkhorn_k11/command.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${ASAP_DATA_DIR:-../shared/data}
parts=("${@:-ops1 paths fused frozen demo padded ops2 imdb}")
GRID=(--device cpu --dtype float32 --batch-size 8 --heads 8 --head-dim 64 --teacher-iters 21 --slices 16
      --extra-features qk_mean,q_norm --eps 1.0 --seed 0)
for part in ${parts[@]}; do
  case $part in
    ops1)  # the operator grid, forward, one thread: softmax calls, ratios to K = 3 / 11 / 21
      $PY -m asap.bench.operators "${GRID[@]}" --lengths 16,32,64,128,256,512,1024,2048,4096 --iters 3,5,11,21 \
        --padding 0.0 --methods softmax,sinkhorn,asap --backward-max-length 512 --max-length esp=128 --warmup 1 \
        --repeats 7 --min-repeats 1 --budget-s 2.0 --no-backward --threads 1 \
        --out results/bench/operators_cpu_1thread.json ;;
    paths)  # ASAP's paths at the shipped teachers' attention shapes, torch's default threads and one thread
      $PY scripts/bench_asap_paths.py --out results/bench/asap_paths_default_threads.json
      $PY scripts/bench_asap_paths.py --threads 1 --out results/bench/asap_paths_1_thread.json ;;
    frozen)  # the frozen-layer benchmark (K = 3 and 5 beside ASAP, whole-model times) on the small teachers
      $PY -m asap.cli.main bench frozen-layer results/teachers/digits_sinkhorn_k11 --threads 1 --data-dir "$DATA" \
        --out results/frozen_layer/digits_sinkhorn_k11.json
      $PY -m asap.cli.main bench frozen-layer results/teachers/digits_p1_sinkhorn_k11 --threads 1 \
        --out results/frozen_layer/digits_p1_sinkhorn_k11.json
      $PY -m asap.cli.main bench frozen-layer results/teachers/fmnist_sinkhorn_k11 --threads 1 --data-dir "$DATA" \
        --out results/frozen_layer/fmnist_sinkhorn_k11.json ;;
    demo)  # the README's first command (its own folder; its table is quoted in results/demo)
      $PY -m asap.cli.main demo --out runs/demo --quiet
      mkdir -p results/demo && cp runs/demo/demo.txt runs/demo/demo.json results/demo/ ;;
    padded)  # the padded grid (a quarter of the tokens padded on average), forward, one thread
      $PY -m asap.bench.operators "${GRID[@]}" --lengths 16,64,128,512,1024,4096 --iters 3,11,21 --padding 0.25 \
        --methods softmax,sinkhorn,asap --backward-max-length 512 --max-length sinkhorn=1024 --warmup 1 \
        --repeats 5 --min-repeats 1 --budget-s 2.0 --no-backward --threads 1 \
        --out results/bench/operators_cpu_padded_1thread.json ;;
    ops2)  # the full grid at torch's default threads, forward and backward, with ESP
      $PY -m asap.bench.operators "${GRID[@]}" --lengths 16,32,64,128,256,512,1024,2048,4096 --iters 3,5,11,21 \
        --padding 0.0 --methods softmax,sinkhorn,asap,esp --backward-max-length 512 --max-length esp=128 \
        --warmup 1 --repeats 7 --min-repeats 1 --budget-s 5.0 --out results/bench/operators_cpu.json ;;
    fused)  # the operator's two unpadded short-row paths between the layers of a model (fused_worth_it)
      $PY scripts/bench_fused_vs_split.py --threads 1 --out results/bench/fused_vs_split_1_thread.json
      $PY scripts/bench_fused_vs_split.py --out results/bench/fused_vs_split_default_threads.json ;;
    imdb)  # the IMDb teachers (n = 256 and 512, padded), torch's default threads
      for n in 256 512; do
        $PY -m asap.cli.main bench frozen-layer results/teachers/imdb${n}_sinkhorn_k11 --data-dir "$DATA" --eval-limit 5000 \
          --out results/frozen_layer/imdb${n}_sinkhorn_k11.json
      done ;;
    minilm)  # the pretrained MiniLM Sinkhorn teacher (n = 256, padded reviews), one thread
      $PY -m asap.cli.main bench frozen-layer runs/sharp/minilm_imdb256_sinkhorn --calibration 256 --eval-limit 500 \
        --timing-batch 16 --budget 10 --model-rounds 5 --threads 1 --data-dir "$DATA" \
        --out results/frozen_layer/minilm_imdb256_sinkhorn_k11.json ;;
    *) echo "rerun_speed_results.sh: unknown part '$part' (ops1 paths fused frozen demo padded ops2 imdb minilm)" >&2; exit 2 ;;
  esac
done
$PY -m asap.cli.main report
