#!/usr/bin/env bash
# Rebuild the sharp teachers of issue 10 (teachers whose attention truncated Sinkhorn cannot copy cheaply) and copy
# each run's small files under results/teachers/. Usage: bash scripts/train_sharp_teachers.sh [digits] [minilm]
# (default: digits). Expected time on an idle 2-core CPU: digits ~2 min per model.
# One torch thread per run, as for the other shipped teachers (results/teachers/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
ASAP=${ASAP:-.venv/bin/asap}
RUNS=${RUNS:-runs/sharp}
which=("${@:-digits}")

keep() {  # copy a finished run's small files (weights included: a few hundred KB) beside the other teachers
  local run=$1 name=$2
  mkdir -p "results/teachers/$name"
  cp "$RUNS/$run"/{command.txt,config.json,eval_test.json,metrics.jsonl,model.safetensors} "results/teachers/$name/"
  cp "$RUNS/$run"/eval_test_*.json "results/teachers/$name/" 2>/dev/null || true
}

for target in "${which[@]}"; do
  case $target in
    digits)
      # the digits ViT with patch size 1: 65 tokens per image instead of 17, and sharp attention
      for method in sinkhorn softmax; do
        extra=(); [ "$method" = sinkhorn ] && extra=(--n-iters 11 --eps 1.0)
        OMP_NUM_THREADS=1 $ASAP train --dataset digits --out "$RUNS/digits_p1_$method" --preset tiny --patch-size 1 \
          --method "$method" "${extra[@]}" --epochs 20 --batch-size 32 --lr 0.002 --seed 0 --no-progress
      done
      # how sharp: the teacher with its attention truncated to K = 3 and 5 half-steps, and with softmax
      for k in 3 5; do $ASAP eval "$RUNS/digits_p1_sinkhorn" --method-override sinkhorn --n-iters "$k" --eps 1.0; done
      $ASAP eval "$RUNS/digits_p1_sinkhorn" --method-override softmax
      keep digits_p1_sinkhorn digits_p1_sinkhorn_k11
      keep digits_p1_softmax digits_p1_softmax
      ;;
    *) echo "train_sharp_teachers.sh: unknown teacher '$target' (digits)" >&2; exit 2 ;;
  esac
done
.venv/bin/python -m asap.train.summary readme results/teachers
