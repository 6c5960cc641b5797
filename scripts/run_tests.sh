#!/usr/bin/env bash
# The test command: set up .venv, lint, check the format and the types, then run the whole suite
# (slow multi-process tests included).
# pytest's exit code 5 (no tests collected) is a failure here, never a silent pass.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh || exit 1
# Lint, format and types first (seconds): configured in pyproject.toml, also as a pre-commit hook.
.venv/bin/ruff check --quiet . || { echo "error: ruff check found the problems above" >&2; exit 1; }
.venv/bin/ruff format --check --quiet . || { echo "error: ruff format would reformat the files above" >&2; exit 1; }
.venv/bin/mypy || { echo "error: mypy found the type errors above" >&2; exit 1; }
# --durations: the slowest tests, so the time budget (whole suite < 20 min on 2 cores) stays visible.
.venv/bin/python -m pytest -q --durations=30 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
