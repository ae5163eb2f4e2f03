#!/usr/bin/env bash
# SmolLM2-135M's training rows at 10x the CPU benchmark's tokens on a lent GPU (the `device` tool; CI never
# runs this): eval/bench_smollm2.py's prune rows (issue [13] item 3: 200 steps of 8 x 256 tokens against the
# CPU table's 20) and its MoE rows (400 steps against 40), each export checked in transformers (that
# machine has no vLLM).
#
# The GGUF (98 MB) is more than one call may carry (64 MiB), so it travels in two calls to one warm machine:
#   split -b 50000000 -d models/SmolLM2-135M-Instruct.Q4_1.gguf .gpu/part   (here, once)
#   call 1, carry [.gpu/part00, .whl]:            eval/gpu_smollm2.sh park
#   call 2, carry [.gpu/part01, .shared], at once: eval/gpu_smollm2.sh
# Measured on an H200 (2026-12-04): each prune row 45-115 s (200 steps in 23-36 s; the first row converts the
# GGUF); the dense FFN 384 row 64 s for 200 steps. A MoE row spends 72-87 s in moefy alone (it clusters
# channels on the CPU), so MOE_S defaults to 300 s per row; one 15-minute lease holds the prune rows and
# about one MoE row (that day's lease ran out before the MoE rows trained).
# .whl holds the wheels the image lacks (eval/gpu_run.sh's list and gguf), .shared the two WikiText-2 files
# and the GGUF's SHA-256 (.shared/gguf.sha256). Logs and result JSONs land in $OUT.
set -u
OUT=${OUT:-/tmp/gpu-smollm2}; mkdir -p "$OUT"
. eval/gpu_env.sh
if [ "${1:-}" = park ]; then
  cp .gpu/part00 /tmp/part00 || exit 1
  install_wheels || exit 1
  echo "parked: /tmp/part00 and /tmp/site"; exit 0
fi
[ -f /tmp/part00 ] || { echo "no /tmp/part00: this is not the machine call 1 parked it on"; exit 3; }
mkdir -p models && cat /tmp/part00 .gpu/part01 >models/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
sha256sum -c .shared/gguf.sha256 || exit 4
use_wheels
mkdir -p .venv/bin  # the benchmark starts runs through .venv/bin/llmslim
[ -x .venv/bin/llmslim ] || { printf '#!/bin/sh\nexec %s -m llmslim "$@"\n' "$PY" >.venv/bin/llmslim; chmod +x .venv/bin/llmslim; }
[ -x /usr/bin/time ] || {  # the benchmark reads each run's peak RSS from GNU time; the image may lack it
  cat >/usr/bin/time <<'TIME'
#!/usr/bin/env python3
"""time -f '%M %U %S' -o FILE CMD...: the one use eval/bench_gptq.run_child makes of GNU time."""
import resource, subprocess, sys
a = sys.argv[1:]
o = a.index("-o")
rc = subprocess.call(a[o + 2:])
r = resource.getrusage(resource.RUSAGE_CHILDREN)
open(a[o + 1], "w").write(f"{r.ru_maxrss} {r.ru_utime:.2f} {r.ru_stime:.2f}\n")
sys.exit(rc)
TIME
  chmod +x /usr/bin/time
}
nvidia-smi -L 2>/dev/null
$PY -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available())"
W=${WORK:-/tmp/w}
bench() {  # label, seconds, args...: every row its own results JSON, one log for all (8 files come back)
  local label=$1 limit=$2 s; shift 2; s=$(date +%s)
  echo "== $label" >>"$OUT/bench.log"
  timeout "$limit" $PY eval/bench_smollm2.py --work "$W" --check transformers ${EXTRA:-} "$@" >>"$OUT/bench.log" 2>&1
  echo "== $label: exit $? in $(( $(date +%s) - s )) s" | tee -a "$OUT/bench.log"
  cp eval/results/bench_smollm2.*.json "$OUT/" 2>/dev/null
}
P=(--sections prune --steps "${PRUNE_STEPS:-200}" --lr 3e-4)
M=(--sections moe --steps "${MOE_STEPS:-400}")
bench prune-layers "${PRUNE_S:-130}" "${P[@]}" --prune-rows "layers 30 -> 24"
bench prune-width "${PRUNE_S:-130}" "${P[@]}" --prune-rows width
bench prune-both "${PRUNE_S:-130}" "${P[@]}" --prune-rows both
bench moe-8x192 "${MOE_S:-300}" "${M[@]}" --moe-rows "moefy 8 x 192, top-2"
bench moe-dense "${MOE_S:-300}" "${M[@]}" --moe-rows "dense FFN 384"
bench moe-shared "${MOE_S:-300}" "${M[@]}" --moe-rows "moefy shared 192 + 7 x 192, top-1"
tar czf "$OUT/logs.tgz" -C "$W" logs 2>/dev/null
ls "$OUT"
