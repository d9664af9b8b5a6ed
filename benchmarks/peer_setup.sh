#!/usr/bin/env bash
# Creates the venv of the PyTorch peer benchmark (benchmarks/peer.py): torch 2.13.0 CPU from a
# local wheel plus the exact pins of benchmarks/peer_requirements.txt (from PyPI).
#
#   bash benchmarks/peer_setup.sh [VENV]      # default $PEER_VENV or /work/peer_venv
#   TORCH_WHEEL=/path/torch-2.13.0+cpu-....whl PYTHON=python3.11 bash benchmarks/peer_setup.sh
#
# Re-running it on an existing venv reinstalls the same pins. Then, from the repository root:
#   /work/peer_venv/bin/python -m benchmarks.peer --config=small --mode=train
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-${PEER_VENV:-/work/peer_venv}}"
wheel="${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}"
python="${PYTHON:-python3.11}"  # the wheel is for CPython 3.11

if [[ ! -f "$wheel" ]]; then
  echo "error: torch wheel not found: $wheel (set TORCH_WHEEL=/path/to/torch-2.13.0+cpu-...whl)" >&2
  exit 2
fi
if ! command -v "$python" > /dev/null; then
  echo "error: $python not found (set PYTHON to a CPython 3.11 interpreter)" >&2
  exit 2
fi
"$python" -m venv "$venv"
"$venv/bin/pip" install -q "$wheel" -r "$here/peer_requirements.txt"
"$venv/bin/python" -c 'import torch, transformers
print(f"peer venv ready: torch {torch.__version__}, transformers {transformers.__version__}")'
