#!/usr/bin/env bash
# Creates .venv (Python 3.10+) with torch, megatron-core and the test tools; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# pip's notices about the machine (a newer pip exists, running as root, its own index settings) are
# not about this project and would bury the set-up's own output: off for these installs (-qq keeps
# errors).
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# (torchao by its metadata: importing it takes seconds)
if ! .venv/bin/python -c "import torch, megatron.core, pytest, yaml, wandb, mypy, ruff, importlib.metadata as m; m.version('torchao')" >/dev/null 2>&1; then
    echo "setting up .venv (torch, megatron-core and the test tools; a few minutes the first time)"
    .venv/bin/python -m pip install -qq --upgrade pip
    # torch first, pinned: on a fresh machine this takes the local CPU wheel; an unpinned torch
    # pulls gigabytes of CUDA packages.
    .venv/bin/python -m pip install -qq "torch==2.13.0"
    # Installs the dependencies and test tools only; the code runs from this folder.
    .venv/bin/python -m pip install -qq ".[test]"
fi
