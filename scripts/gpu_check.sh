#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one command, on one H200 machine in under 8 minutes:
#
#   bash scripts/gpu_check.sh            # logs and summary.json under $OUT (default runs/gpu_check)
#   bash scripts/gpu_check.sh --smoke    # the same code paths with tiny shapes on a CPU (the test suite)
#
# Offline: where megatron-core (or another pure-Python dependency) is missing, the wheels in .whl/
# (cp312, see docs/benchmarks.md "GPU check") are installed into a private folder first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if ! "$PYTHON" -c "import megatron.core, yaml, psutil" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "error: megatron-core is not installed and there are no wheels in .whl/ to install it from" >&2
        exit 2
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" -m benchmarks.gpu_check "$@"
