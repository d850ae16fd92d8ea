#!/usr/bin/env bash
# Every GPU figure of the speed issue in one go, on a machine with a CUDA GPU and triton (about 3 min on
# one H200): the Triton ASAP kernels against SDPA, the PyTorch ASAP path and the Sinkhorn teacher (fp16 and
# bf16, n = 512 ... 8192, unpadded and padded, parity-gated), then the operator benchmark on CUDA (fp16; ESP
# is left out: its fp16 gradients fail the benchmark's own fp64 check, grad_k error 0.68 > 0.05 on CPU).
# Then, at the attention shape of the MiniLM teacher (16 x 12 heads x d 32, n = 128 and 256, a quarter padded),
# the operator benchmark once more. PARTS (default "triton operators padded minilm breakdown") picks parts to run; "breakdown" times the dual
# map (Triton vs PyTorch), the closure and K = 3 at n = 16 ... 256.
# Usage: bash scripts/bench_gpu.sh [OUT_DIR]   (default results/bench; PYTHON picks the interpreter)
# Then `asap report` regenerates results/README.md from the JSON written here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-results/bench}
PY=${PYTHON:-python3}
export PYTHONPATH="$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
PARTS=" ${PARTS:-triton operators padded minilm breakdown} "
status=0
[[ $PARTS == *" triton "* ]] && { timeout 360 $PY scripts/bench_triton_gpu.py --out "$OUT_DIR/triton_gpu.json" --dtypes float16,bfloat16 \
    --lengths 512,1024,2048,4096,8192 --batch 4 --heads 8 --head-dim 64 --sinkhorn-iters 3,5,11,21 \
    --budget-s 1.0 --repeats 10 --seed 0 || status=1; }
[[ $PARTS == *" operators "* ]] && { timeout 200 $PY -m asap.bench.operators --device cuda --dtype float16 --batch 8 --heads 8 --head-dim 64 \
    --lengths 16,32,64,128,256,512,1024,2048,4096 --iters 3,5,11,21 --teacher-iters 21 --slices 16 --eps 1.0 \
    --methods softmax,sinkhorn,asap --backward-max-length 1024 --warmup 2 \
    --repeats 10 --min-repeats 3 --budget-s 0.5 --seed 0 --out "$OUT_DIR/operators_cuda.json" || status=1; }
# the same grid with a quarter of the tokens padded (the (b, n) padding mask text models pass), forward only
[[ $PARTS == *" padded "* ]] && { timeout 120 $PY -m asap.bench.operators --device cuda --dtype float16 --batch 8 --heads 8 --head-dim 64 \
    --lengths 16,64,256,1024,4096,8192 --iters 3,11,21 --teacher-iters 21 --slices 16 --eps 1.0 --padding 0.25 \
    --methods softmax,sinkhorn,asap --no-backward --warmup 2 \
    --repeats 10 --min-repeats 3 --budget-s 0.5 --seed 0 --out "$OUT_DIR/operators_cuda_padded.json" || status=1; }
[[ $PARTS == *" minilm "* ]] && { timeout 90 $PY -m asap.bench.operators --device cuda --dtype float16 --batch 16 --heads 12 \
    --head-dim 32 --lengths 128,256 --iters 3,5,11 --teacher-iters 11 --slices 16 --eps 1.0 --padding 0.25 \
    --methods softmax,sinkhorn,asap --no-backward --warmup 2 \
    --repeats 20 --min-repeats 3 --budget-s 0.5 --seed 0 --out "$OUT_DIR/operators_cuda_minilm_shape.json" || status=1; }
[[ $PARTS == *" breakdown "* ]] && { timeout 60 $PY scripts/bench_asap_breakdown_gpu.py "$OUT_DIR/asap_breakdown_cuda.json" || status=1; }
exit $status
