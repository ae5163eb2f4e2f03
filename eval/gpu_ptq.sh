#!/usr/bin/env bash
# The PTQ methods of [10] on CUDA, run on a lent GPU machine (the `device` tool; CI never runs this):
# awq, autoround, gptaq and automatic mixed precision with their layer work on the GPU (`device: auto`),
# each exported and checked in transformers (that machine has no vLLM), on stories260K (W3 per channel,
# calibrated on dev.txt [0, 0.5], perplexity on [0.5, 1] as in eval/bench_ptq.py) and on the reference
# model (W4 g128); then tests/test_ptq.py without its vLLM test.
#
# Carried: .whl/ (wheels the image lacks, see eval/gpu_run.sh) and .shared/ (a copy of ../shared).
set -u
OUT=${OUT:-/tmp/gpu-ptq}; mkdir -p "$OUT" /tmp/runs /tmp/recipes
. eval/gpu_env.sh
install_wheels || exit 1
use_wheels
nvidia-smi -L
S=$LLMSLIM_SHARED; DEV=$S/data/tinystories/dev.txt
stories() {  # name, stages (YAML flow list)
  cat >"/tmp/recipes/$1.yaml" <<EOF
model: $S/models/stories260K-hf
output: /tmp/runs/$1
seed: 0
data:
  calib: {path: $DEV, fraction: [0.0, 0.5], samples: 128, seq_len: 512}
  heldout: {path: $DEV, fraction: [0.5, 1.0], seq_len: 512}
stages: $2
export: {check: transformers}
eval: {perplexity: [heldout]}
EOF
}
reference() {
  cat >"/tmp/recipes/$1.yaml" <<EOF
model: llmslim/assets/reference
output: /tmp/runs/$1
seed: 0
data:
  calib: {path: llmslim/assets/reference/calib.txt, samples: 64, seq_len: 256}
  heldout: {path: llmslim/assets/reference/eval.txt, seq_len: 256}
stages: $2
export: {check: transformers}
eval: {perplexity: [heldout]}
EOF
}
W3="bits: 3, group_size: -1, observer: mse"
stories s-gptq-mse "[{method: gptq, data: calib, $W3}]"
stories s-gptaq-minmax "[{method: gptq, data: calib, bits: 3, group_size: -1, gptaq: true}]"
stories s-awq-gptq "[{method: awq, data: calib, $W3}, {method: gptq, data: calib, $W3}]"
stories s-autoround200 "[{method: autoround, data: calib, bits: 3, group_size: -1, iters: 200}]"
stories s-mixed35 "[{method: gptq, data: calib, $W3, mixed: {target_bits: 3.5, high_bits: 4}}]"
reference r-awq-gptq "[{method: awq, data: calib, bits: 4, group_size: 128}, {method: gptq, data: calib, bits: 4, group_size: 128}]"
reference r-autoround "[{method: autoround, data: calib, bits: 4, group_size: 128}]"
for r in s-gptq-mse s-gptaq-minmax s-awq-gptq s-autoround200 s-mixed35 r-awq-gptq r-autoround; do
  s=$(date +%s)
  timeout 150 python3 -m llmslim run "/tmp/recipes/$r.yaml" --quiet >"$OUT/$r.log" 2>&1
  rc=$?
  python3 - "$r" "$rc" "$(( $(date +%s) - s ))" <<'PY'
import json, sys
name, rc, wall = sys.argv[1:]
try:
    rep = json.load(open(f"/tmp/runs/{name}/llmslim_report.json"))
except OSError:
    print(f"== {name}: exit {rc} in {wall} s, no report"); sys.exit()
ppl = lambda k: rep["eval"][k]["perplexity"]["heldout"]["ppl"]
stages = ", ".join(f"{s['method']} {s['seconds']:.1f} s" for s in rep["stages"])
print(f"== {name}: exit {rc} in {wall} s; perplexity {ppl('before'):.3f} -> {ppl('after'):.3f}; {stages}; "
      f"check {rep['check']['backend']} {'passed' if rep['check']['passed'] else 'FAILED'}")
PY
  [ "$rc" = 0 ] || tail -n 8 "$OUT/$r.log"
done
s=$(date +%s)
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_ptq.py -k "not vllm" >"$OUT/pytest.log" 2>&1
echo "== pytest tests/test_ptq.py (vLLM test deselected): exit $? in $(( $(date +%s) - s )) s"
tail -n 15 "$OUT/pytest.log"
