#!/usr/bin/env bash
# Quickstart: set up .venv, build a corpus from Python's own standard library (no download), and
# train recipes/tiny_gpt.yaml on CPU with 2 processes under torchrun. Extra args are overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m data.preprocess quickstart --output-prefix runs/quickstart/corpus/text_document
.venv/bin/torchrun --standalone --nproc_per_node="${NPROC:-2}" pretrain_gpt.py --recipe tiny_gpt \
    logging.dir=runs/quickstart "$@"
