#!/usr/bin/env bash
# One step of the GPU benchmark on the lent host, after bench/gpu_wheels.py has installed the
# wheels into /tmp/site (docs/gpu-host.md). Logs, results.jsonl and the report land in $OUT.
#   bench/gpu_session.sh data 3000 | run CONTENDER... [--sweep k=v1,v2 ...] | report
set -o pipefail
. /tmp/site/env.sh || exit 1
# No network on the host: every hub, usage-stats and telemetry call must stay off.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
  RAY_USAGE_STATS_ENABLED=0 DO_NOT_TRACK=1 VLLM_USE_FLASHINFER_SAMPLER=0
WORK=/tmp/capjob-gpu-bench
OUT=${OUT:-/tmp/capjob-gpu-out}
mkdir -p "$OUT"
step=$1; shift
case $step in
  data) python3 bench/gpu_bench.py data --images "${1:-3000}" ;;
  run) timeout "${STEP_TIMEOUT:-540}" python3 bench/gpu_bench.py run "$@" ;;
  report) python3 bench/gpu_bench.py report --out "$OUT" ;;
  *) echo "unknown step $step"; exit 2 ;;
esac 2>&1 | tee -a "$OUT/$step.log"
rc=$?
cp "$WORK/results.jsonl" "$OUT/" 2>/dev/null
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
exit $rc
