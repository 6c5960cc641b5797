#!/usr/bin/env bash
# Quickstart: set up .venv, build a corpus from Python's own standard library (no download), and
# train recipes/tiny_gpt.yaml on CPU with 2 processes under torchrun. Extra args are overrides.
# It ends with the command that generates text from the checkpoint it trained.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m data.preprocess quickstart --output-prefix runs/quickstart/corpus/text_document
NPROC="${NPROC:-2}"
OVERRIDES=(logging.dir=runs/quickstart checkpoint.load=auto "$@")
# Validate first in one process: a bad override is then one clean line (exit 2), not a torchrun
# failure report. A rerun resumes from the newest checkpoint (checkpoint.load=auto).
.venv/bin/python pretrain_gpt.py --recipe tiny_gpt "${OVERRIDES[@]}" --dry-run --world-size "$NPROC" >/dev/null
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" .venv/bin/torchrun --standalone --nproc_per_node="$NPROC" \
    pretrain_gpt.py --recipe tiny_gpt "${OVERRIDES[@]}"
CHECKPOINTS=$(.venv/bin/python -c 'import sys; from pretrain.recipe import load_recipe
print(load_recipe("tiny_gpt", sys.argv[1:]).checkpoint_dir())' "${OVERRIDES[@]}")
echo "generate text from it: .venv/bin/python -m tools.generate --checkpoint $CHECKPOINTS --prompt 'def main('"
