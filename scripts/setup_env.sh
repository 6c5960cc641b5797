#!/usr/bin/env bash
# Creates .venv (Python 3.10+) with torch, megatron-core and the test tools; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# (torchao by its metadata: importing it takes seconds)
if ! .venv/bin/python -c "import torch, megatron.core, pytest, yaml, wandb, mypy, ruff, importlib.metadata as m; m.version('torchao')" >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch first, pinned: on a fresh machine this takes the local CPU wheel; an unpinned torch
    # pulls gigabytes of CUDA packages.
    .venv/bin/python -m pip install -q "torch==2.13.0"
    # Installs the dependencies and test tools only; the code runs from this folder.
    .venv/bin/python -m pip install -q ".[test]"
fi
