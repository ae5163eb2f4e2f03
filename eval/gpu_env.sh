# Sourced by the lent-GPU scripts (eval/gpu_run.sh, gpu_ptq.sh, gpu_smollm2.sh; the `device` tool, never CI):
# the environment they share and the wheels its image lacks (.whl/: datasets, dill, multiprocess, pydantic,
# compressed-tensors, loguru, bitsandbytes, gguf), installed apart from the image's own torch into /tmp/site.
export PYTHONUNBUFFERED=1 LLMSLIM_SHARED=$PWD/.shared TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}

install_wheels() {
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

use_wheels() {  # after install_wheels, here or in an earlier call to the same warm machine
  export PYTHONPATH=/tmp/site:$PWD
}
