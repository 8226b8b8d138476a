#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) from a plain checkout: no install, nothing downloaded; the
# interpreter needs torch and transformers (and triton on CUDA).
#
#   bash scripts/gpu-check.sh            # a CUDA machine: about 5 minutes
#   bash scripts/gpu-check.sh --smoke    # CPU, tiny shapes, seconds
#
# Results (gpu-check.json, .md and .log; gpu-check-smoke.* with --smoke) go to $OUT when it is
# set, else to runs/. Other arguments go to the check (python -m bench.gpu_check --help).
# PYTHON: the interpreter (default python3); GPU_CHECK_TIMEOUT: the hard limit in seconds
# (default 480; the check itself starts no timing after --budget-s, default 420).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${OUT:-$root/runs}
stem=gpu-check
for arg in "$@"; do
    if [[ $arg == --smoke ]]; then stem=gpu-check-smoke; fi
done
mkdir -p "$out"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
timeout --kill-after=20 "${GPU_CHECK_TIMEOUT:-480}" "${PYTHON:-python3}" -m bench.gpu_check --out "$out" "$@" \
    2>&1 | tee "$out/$stem.log"
