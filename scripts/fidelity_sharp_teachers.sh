#!/usr/bin/env bash
# The fidelity planes of issue 11 on the two sharp teachers: every dual map kind (linear, relu, mlp) per layer
# against truncated Sinkhorn K = 1, 3, 5, 7, 11, one thread, results under results/fidelity/ (JSON, PNG,
# command.txt), then `asap report`. Usage: bash scripts/fidelity_sharp_teachers.sh [digits] [minilm] [minilm-gpu]
# digits: the committed teacher results/teachers/digits_p1_sinkhorn_k11 (weights committed; digits data built in).
# minilm: the MiniLM Sinkhorn teacher fine-tuned on IMDb; its weights are not committed: train it first with
#   scripts/train_sharp_teachers.sh (run folder runs/sharp/minilm_imdb256_sinkhorn), IMDb under $ASAP_DATA_DIR.
# About 15 and 20 minutes on 2 shared cores. Timings are medians of interleaved calls; each JSON records the
# load average before timing every layer.
set -euo pipefail
cd "$(dirname "$0")/.."
ASAP=${ASAP:-.venv/bin/asap}
DATA=${ASAP_DATA_DIR:-../shared/data}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
parts=("${@:-digits minilm}")
for part in ${parts[@]}; do
  case $part in
    digits)
      $ASAP bench fidelity results/teachers/digits_p1_sinkhorn_k11 --maps linear,relu,mlp --slices 16,64 \
        --truncated 1,3,5,7,11 --calibration 128 --held-out 128 --budget 1.5 --threads 1 ;;
    minilm)
      $ASAP bench fidelity runs/sharp/minilm_imdb256_sinkhorn --data-dir "$DATA" --maps linear,relu,mlp --slices 16 \
        --map-steps 100 --truncated 1,3,5,7,11 --calibration 48 --held-out 32 --batch-size 16 --budget 1.0 \
        --threads 1 ;;
    minilm-gpu)  # the GPU-trained MiniLM teacher (scripts/train_minilm_gpu.sh, copied to runs/gpu): the linear map
      # with the default extras and with the landmark log-sum-exp added, L = 16 and 32 (~15 min each on one core)
      for extras in qk_mean,q_norm qk_mean,q_norm,lse_landmarks; do
        $ASAP bench fidelity runs/gpu/minilm_imdb256_sinkhorn --data-dir "$DATA" --maps linear --slices 16,32 \
          --extra-features "$extras" --truncated 1,3,5,7,11 --calibration 48 --held-out 32 --batch-size 16 \
          --budget 1.0 --threads 1 --out "results/fidelity/minilm_imdb256_sinkhorn_k11_gpu_${extras//,/_}.json"
      done ;;
    *) echo "unknown part $part (digits, minilm, minilm-gpu)" >&2; exit 2 ;;
  esac
done
$ASAP report
