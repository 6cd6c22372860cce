#!/usr/bin/env bash
# Re-check capjob's GPU presets and layouts on a lent GPU host in one device call, once
# bench/gpu_wheels.py has installed the stack into /tmp/site (docs/gpu-host.md):
#
#   bench/gpu_check.sh [--images N] [--gpu H200|H100] [LAYOUT...]
#
# Every LAYOUT is one capjob run (bench/gpu_bench.py) over the same N images (default 300),
# Qwen2.5-VL-3B dims with dummy weights, on top of the preset users run for the card:
# experiment=h200_throughput or experiment=h100_throughput (--gpu), pinned to the card's Ray
# label. Default LAYOUTs: one preset fp8.
#   preset   the preset as it is (H200: two replicas sharing the GPU; H100: one)  resources=<gpu>x1
#   one      the preset with 1 replica on 1 GPU
#   fp8      the preset with engine.quantization=fp8
#   two      2 replicas, one per GPU                resources=<gpu>x2
#   tp2      1 replica, tensor parallel over 2 GPUs resources=<gpu>x2 concurrency=1 gpus_per_worker=2 TP=2
#   pp2      1 replica, pipeline parallel, 2 GPUs   ... PP=2
#   tp2ray   tp2 under vLLM's Ray executor (what failed in issue 21), for comparison
#   tp2eager tp2 without torch.compile and CUDA graphs (engine.enforce_eager=true)
#   sweep    `capjob --multirun ... engine.tensor_parallel_size=1,2 resources.gpus_per_worker=1,2`
#            (one replica; the two invalid combinations are refused up front), sweep.md in $OUT
# Prints a table (bench/gpu_bench.py check: images/s steady, GPU busy, start-up, the engine
# guard's ms per batch) and exits 1 if a layout failed, lost or doubled a row, or quarantined one
# for anything but the empty caption a dummy-weight model may generate (caption.ignore_eos and a
# fixed max_tokens make every request generate the same length, as raw vLLM's contender does).
# Its images and runs live in its own folder (CAPJOB_CHECK_DIR, default /tmp/capjob-gpu-check):
# another bench's image set (bench/gpu_bench.py's CAPJOB_BENCH_DIR) is never touched.
# Logs, check.jsonl and each run's capjob.log land in $OUT. A run is cut at STEP_TIMEOUT s (540).
set -o pipefail
images=300 gpu=H200 layouts=()
while [ $# -gt 0 ]; do
  case $1 in
    --images) images=$2; shift 2 ;;
    --gpu) gpu=$2; shift 2 ;;
    *) layouts+=("$1"); shift ;;
  esac
done
[ ${#layouts[@]} -eq 0 ] && layouts=(one preset fp8)
# GPU_CHECK_PLAN=1: print each layout's capjob overrides and the work folder, run nothing (the
# CPU tests compose them: tests/test_bench_scripts.py).
plan=${GPU_CHECK_PLAN:-}
[ -z "$plan" ] && { . /tmp/site/env.sh || exit 1; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
  RAY_USAGE_STATS_ENABLED=0 DO_NOT_TRACK=1 VLLM_USE_FLASHINFER_SAMPLER=0
OUT=${OUT:-/tmp/capjob-gpu-out}
WORK=${CAPJOB_CHECK_DIR:-/tmp/capjob-gpu-check}
mkdir -p "$OUT"
[ -z "$plan" ] && mkdir -p "$WORK"
results=$OUT/check.jsonl
# Ray's label for this node's GPUs (accelerator_type:<label>): the presets pin it, and a preset
# whose label no node has is refused before any engine starts.
label=${GPU_CHECK_LABEL:-}
[ -z "$plan" ] && label=$(python3 -c "from ray._private.accelerators import NvidiaGPUAcceleratorManager as M; print(M.get_current_node_accelerator_type() or '')" 2>/dev/null)
pin=""
if [ -n "$label" ] && [ "$label" != "$gpu" ]; then
  echo "gpu_check: WARNING: Ray labels these GPUs '$label', not '$gpu': running with resources.accelerator_type=$label" | tee -a "$OUT/check.log"
  pin="resources.accelerator_type=$label"
fi
x1=$(echo "$gpu" | tr 'A-Z' 'a-z')x1 x2=$(echo "$gpu" | tr 'A-Z' 'a-z')x2
preset=$(echo "$gpu" | tr 'A-Z' 'a-z')_throughput
single="resources.concurrency=1 resources.replicas_per_gpu=1 engine.kv_cache_gib=null"
one_gpu_replica="resources.concurrency=1 resources.replicas_per_gpu=1 engine.kv_cache_gib=null resources.gpus_per_worker=2"

if [ -n "$plan" ]; then
  echo "work $WORK"
else
have=$(python3 -c "import pathlib, pyarrow.parquet as pq; print(sum(pq.read_metadata(p).num_rows for p in pathlib.Path('$WORK/data').glob('*.parquet')))" 2>/dev/null)
if [ "$have" != "$images" ]; then
  python3 bench/gpu_bench.py --work "$WORK" data --images "$images" 2>&1 | tee -a "$OUT/check.log" || exit 1
fi
fi

for layout in "${layouts[@]}"; do
  case $layout in
    preset) res=$x1 point="" ;;
    one) res=$x1 point="$single" ;;
    two) res=$x2 point="resources.concurrency=2 resources.replicas_per_gpu=1 engine.kv_cache_gib=null" ;;
    tp2) res=$x2 point="$one_gpu_replica engine.tensor_parallel_size=2" ;;
    pp2) res=$x2 point="$one_gpu_replica engine.pipeline_parallel_size=2" ;;
    fp8) res=$x1 point="engine.quantization=fp8" ;;
    tp2ray) res=$x2 point="$one_gpu_replica engine.tensor_parallel_size=2 +engine.extra_engine_kwargs.distributed_executor_backend=ray" ;;
    tp2eager) res=$x2 point="$one_gpu_replica engine.tensor_parallel_size=2 engine.enforce_eager=true" ;;
    sweep) res=$x2 point="" ;;
    *) echo "gpu_check: unknown layout $layout" >&2; exit 2 ;;
  esac
  if [ -n "$plan" ]; then
    echo "layout $layout: resources=$res experiment=$preset $point $pin"
    continue
  fi
  echo "=== $layout: resources=$res $point ($(date -u +%H:%M:%S))" | tee -a "$OUT/check.log"
  if [ "$layout" = sweep ]; then
    # shellcheck disable=SC2086 # the overrides are words
    timeout "${STEP_TIMEOUT:-540}" python3 bench/gpu_bench.py --work "$WORK" --results "$results" --resources "$res" \
      --experiment "$preset" run capjob --label sweep --timeout "$(( ${STEP_TIMEOUT:-540} - 25 ))" --multirun $single $pin \
      engine.tensor_parallel_size=1,2 resources.gpus_per_worker=1,2 2>&1 | tee -a "$OUT/check.log"
    dir=$(ls -td "$WORK"/capjob-sweep/* 2>/dev/null | head -1)
    [ -n "$dir" ] && { cp "$dir/sweep.md" "$OUT/sweep.md"; cp "$dir/capjob.log" "$OUT/sweep.capjob.log"; }
  else
    # shellcheck disable=SC2086 # the overrides are words
    timeout "${STEP_TIMEOUT:-540}" python3 bench/gpu_bench.py --work "$WORK" --results "$results" --resources "$res" \
      --experiment "$preset" run capjob --label "$layout" --timeout "$(( ${STEP_TIMEOUT:-540} - 20 ))" --sweep $point $pin 2>&1 | tee -a "$OUT/check.log"
    log=$(ls -td "$WORK"/capjob-out/"$layout"-* 2>/dev/null | head -1)/capjob.log
    [ -f "$log" ] && cp "$log" "$OUT/$layout.capjob.log"
  fi
  ray stop --force >/dev/null 2>&1  # a run cut by its timeout leaves its local Ray (and GPU memory) behind
  grep -q "\"label\": \"$layout\"" "$results" 2>/dev/null ||
    echo "{\"contender\": \"capjob\", \"label\": \"$layout\", \"status\": \"no result (timed out or crashed)\", \"resources\": \"$res\"}" >>"$results"
done
[ -n "$plan" ] && exit 0
nvidia-smi --query-gpu=index,name,memory.used,utilization.gpu --format=csv,noheader
python3 bench/gpu_bench.py --results "$results" check --images "$images" | tee -a "$OUT/check.log"
