#!/usr/bin/env bash
# The CUDA paths, run on a lent GPU machine (the `device` tool; CI never runs this): the training loop
# (accelerate, bf16 mixed precision) for distill and QAT, GPTQ with layer work on the GPU, QLoRA's NF4
# base in bitsandbytes on CUDA. That machine has its own PyTorch and no vLLM, so exports are checked
# against transformers there (vLLM's CUDA build is not carried).
#
# Carried: .whl/ (wheels of the packages its image lacks: datasets, dill, multiprocess, pydantic,
# compressed-tensors, loguru, bitsandbytes) and .shared/ (a copy of ../shared). Files land in $OUT.
set -u
OUT=${OUT:-/tmp/gpu-run}; mkdir -p "$OUT" /tmp/runs
. eval/gpu_env.sh
install_wheels || exit 1
use_wheels
nvidia-smi -L
python3 - <<'PY' || exit 1
import bitsandbytes, compressed_tensors, datasets, peft, pyarrow, torch, transformers, accelerate
mods = (torch, transformers, accelerate, peft, datasets, bitsandbytes, pyarrow, compressed_tensors)
print(torch.cuda.get_device_name(0), {m.__name__: m.__version__ for m in mods})
PY
for r in reference-prune-distill reference-qat-w4; do
  s=$(date +%s)
  timeout 150 python3 -m llmslim run "recipes/$r.yaml" --quiet --set export.check=transformers \
    --set "output=/tmp/runs/$r" >"$OUT/$r.log" 2>&1
  echo "== $r: exit $? in $(( $(date +%s) - s )) s"; tail -n 12 "$OUT/$r.log"
  cp "/tmp/runs/$r/report.md" "$OUT/$r.report.md" 2>/dev/null
done
s=$(date +%s)
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_distill.py tests/test_qat.py -k "not vllm and not two_processes" \
  >"$OUT/pytest.log" 2>&1
echo "== pytest (distill, qat; vLLM and 2-process tests deselected): exit $? in $(( $(date +%s) - s )) s"
tail -n 25 "$OUT/pytest.log"
python3 - <<'PY'
import torch  # why a qat rtn start and an rtn stage must run on the same device
x, d = torch.rand(1 << 20) * 3, torch.full((1 << 20,), 7.0)
print("float32 x / 7 differing in the last bit, cuda vs cpu:", int(((x.cuda() / 7.0).cpu() != x / 7.0).sum()),
      "by scalar;", int(((x.cuda() / d.cuda()).cpu() != x / d).sum()), "by tensor, of", x.numel())
PY
s=$(date +%s)
timeout "${BENCH_S:-270}" python3 eval/bench_distill.py --steps 1000 >"$OUT/bench_distill_gpu.log" 2>&1
echo "== bench_distill on the GPU: exit $? in $(( $(date +%s) - s )) s"
grep -v "Loading weights" "$OUT/bench_distill_gpu.log" | tail -n 30
cp eval/results/bench_distill.json "$OUT/bench_distill_gpu.json" 2>/dev/null
