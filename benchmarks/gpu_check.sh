#!/usr/bin/env bash
# The GPU check on a bare GPU machine (the device tool's `run`, with `carry: [".whl"]`): install the wheels
# carried with the tree (`make gpu-wheels` made them here), run benchmarks/gpu_check.py, copy its results
# to $OUT when the tool provides one. Everything else comes from the machine's own torch/transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
status=0
python3 benchmarks/gpu_check.py --disk "${GPU_CHECK_DISK:-/tmp}" "$@" || status=$?
if [ -n "${OUT:-}" ]; then cp benchmarks/results/gpu/gpu_check.* "$OUT"/ 2>/dev/null || true; fi
exit $status
