#!/usr/bin/env bash
# Issue 22 on one lent H200, in three device calls made back to back once bench/gpu_wheels.py has
# installed the stack into /tmp/site (docs/gpu-host.md). Each call stays under the 10-minute limit;
# results accumulate in $WORK/results.jsonl on the warm machine and each call copies them, its log,
# the py-spy profiles and the capjob logs into $OUT (<= 8 files).
#
#   bench/gpu_issue22.sh data  # 12,000 images written (and the first 4,000 apart)
#   bench/gpu_issue22.sh A   # raw vLLM
#                            # (LLM.generate, the fastest offline API) over 12,000, cold compile cache,
#                            # profiled; capjob experiment=h200_throughput as it was ("base") over
#                            # 4,000, profiled
#   bench/gpu_issue22.sh B   # points P2, P3 over 4,000 (each compiles its own graphs: cold start-up)
#   bench/gpu_issue22.sh C   # the best point over 12,000 (warm), profiled; raw vLLM again (warm)
#   bench/gpu_issue22.sh D   # (cut short on 2026-12-03: run it first next time) raw vLLM over 4,000 with the vision
#                            # encoder's pixel batches unpinned; capjob as it was over 12,000, with the
#                            # engine core's native frames profiled
# Session 8 (2026-12-03 afternoon; bench/pin_micro.py runs first, in the first wheel call):
#   bench/gpu_issue22.sh E   # capjob with 2 and then 3 engine replicas sharing the H200 over 12,000
#                            # (each its own engine core + front-end: both per-process ceilings x N)
#   bench/gpu_issue22.sh F   # raw vLLM over 12,000 (warm compile cache; engine core profiled with native
#                            # frames: py-spy refuses --native with --nonblocking, so none), then E's best
#                            # with the encoder batches unpinned in every process (GPU_BENCH_NO_PIN=1 +
#                            # bench/nopin_site/sitecustomize.py) over 12,000
# Since session 8 experiment=h200_throughput itself runs two replicas (E's rpg2): A-D's "base" now
# means that; raw() keeps raw vLLM at one engine.
#
# Points (each on top of experiment=h200_throughput; issue 22's candidates). One knob at a time
# would take more device minutes than a session has (~200 s a point, start-up included):
#   P2  CUDA graphs captured up to max_num_seqs (vLLM stops at 512 by default) + the prompt before
#       the image (prefix cache) + stream_interval=128 (the front-end builds a RequestOutput per
#       request at its first and last token instead of at every token)
#   P3  P2 + 2048 sequences, 32768 batched tokens, 2048 requests in flight, graphs up to 2048
set -o pipefail
. /tmp/site/env.sh || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
  RAY_USAGE_STATS_ENABLED=0 DO_NOT_TRACK=1 VLLM_USE_FLASHINFER_SAMPLER=0
OUT=${OUT:-/tmp/capjob-gpu-out}
WORK=/tmp/capjob-gpu-bench     # 12,000 images
WORK4=/tmp/capjob-gpu-bench-4k # the first 4,000 of them (the same images: one RNG seed per index)
RESULTS=$WORK/results.jsonl
mkdir -p "$OUT" "$WORK" "$WORK4"
LOG=$OUT/session-$1.log
cg() { echo "+engine.extra_engine_kwargs.compilation_config={max_cudagraph_capture_size:$1}"; }
P2="$(cg 1024) caption.text_before_image=true +engine.extra_engine_kwargs.stream_interval=128"
R2="resources.replicas_per_gpu=2 resources.concurrency=2 engine.kv_cache_gib=16"
R3="resources.replicas_per_gpu=3 resources.concurrency=3 engine.kv_cache_gib=12"
DEADLINE=$(( $(date +%s) + ${CALL_S:-585} ))  # this device call's end (10-minute limit, less a margin)
left() { echo $(( DEADLINE - $(date +%s) )); }
best_of() {  # best_of LABEL...: the label with the highest engine-operator rate among ok capjob runs
  python3 - "$RESULTS" "$@" <<'EOF2'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ok = [r for r in rows if r.get("contender") == "capjob" and r.get("label") in sys.argv[2:] and r.get("engine_op_rows_per_s")]
print(max(ok, key=lambda r: r["engine_op_rows_per_s"])["label"] if ok else sys.argv[2])
EOF2
}
P3="$(cg 2048) caption.text_before_image=true +engine.extra_engine_kwargs.stream_interval=128 engine.max_num_seqs=2048 engine.max_num_batched_tokens=32768 engine.batch_size=256"

images() {  # images DIR N: write N images unless DIR holds them
  have=$(python3 -c "import pathlib, pyarrow.parquet as pq; print(sum(pq.read_metadata(p).num_rows for p in pathlib.Path('$1/data').glob('*.parquet')))" 2>/dev/null)
  [ "$have" = "$2" ] || python3 bench/gpu_bench.py --work "$1" data --images "$2"
}
capjob() {  # capjob WORK LABEL TIMEOUT OVERRIDES...
  local work=$1 label=$2 t=$3; shift 3
  echo "=== capjob $label ($(date -u +%T)): $*"
  timeout "$t" python3 bench/gpu_bench.py --work "$work" --resources h200x1 --experiment h200_throughput --results "$RESULTS" \
    run capjob --label "$label" --timeout $((t - 15)) --profile "${PROFILE:-0}" --profile-delay 5 --set "$@"
  ray stop --force >/dev/null 2>&1  # a run cut by its timeout leaves its local Ray (and GPU memory) behind
  log=$(ls -td "$work"/capjob-out/"$label"-* 2>/dev/null | head -1)/capjob.log
  if [ -f "$log" ]; then
    cp "$log" "$WORK/logs/$label.capjob.log"
    # The full log (Ray, vLLM: its stat lines, start-up steps), without the progress-bar redraws.
    grep -v "it/s]" "$(dirname "$log")/hydra/capjob.log" 2>/dev/null | tail -3000 >"$WORK/logs/$label.full.log"
    grep -hE "Asynchronous scheduling|torch.compile took|Compil.* took|Graph capturing finished|init engine|Loading weights took|Model loading took|cudagraph_capture_sizes|Available KV cache|Maximum concurrency" "$log" | cut -c1-220 | head -12
  fi
}
raw() {  # raw WORK LABEL TIMEOUT API OVERRIDES...
  local work=$1 label=$2 t=$3 api=$4; shift 4
  echo "=== raw vLLM $api $label ($(date -u +%T)): $*"
  # One engine with a profiled KV cache, as measured in sessions 7 and 8 (the preset has run two
  # replicas with a fixed KV cache since session 8; raw vLLM is one LLM).
  timeout "$t" python3 bench/gpu_bench.py --work "$work" --resources h200x1 --experiment h200_throughput --results "$RESULTS" \
    run raw_vllm --label "$label" --raw-api "$api" --profile "${PROFILE:-0}" --profile-delay 20 --set \
    resources.replicas_per_gpu=1 resources.concurrency=1 engine.kv_cache_gib=null "$@"
}
collect() {
  cp "$RESULTS" "$OUT/results.jsonl" 2>/dev/null
  mkdir -p "$WORK/profiles" && cp -r "$WORK4/profiles/." "$WORK/profiles/" 2>/dev/null
  tar czf "$OUT/profiles-logs.tgz" -C "$WORK" profiles logs 2>/dev/null
  python3 bench/gpu_bench.py --results "$RESULTS" report 2>/dev/null | tail -30
  nvidia-smi --query-gpu=name,memory.used,utilization.gpu,clocks.sm,power.draw --format=csv,noheader
}
mkdir -p "$WORK/logs"
{
  case $1 in
    data)  # in the call that unpacks the wheels, to keep A under 10 minutes
      nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader
      python3 -c "import ray, vllm, psutil; print('ray', ray.__version__, 'vllm', vllm.__version__)"; command -v py-spy
      images "$WORK" 12000 && images "$WORK4" 4000 || exit 1
      ;;
    A)
      images "$WORK" 12000 && images "$WORK4" 4000 || exit 1
      PROFILE=15 raw "$WORK" raw12k 330 generate
      PROFILE=15 capjob "$WORK4" base4k 210
      ;;
    B)
      capjob "$WORK4" P2 250 $P2
      capjob "$WORK4" P3 270 $P3
      ;;
    C)
      best=$(python3 - "$RESULTS" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ok = [r for r in rows if r.get("contender") == "capjob" and r.get("status") == "ok" and r.get("images_per_s") and r.get("label") in ("P2", "P3", "base4k")]
print(max(ok, key=lambda r: r["images_per_s"])["label"] if ok else "P2")
EOF
)
      echo "best of the sweep: $best"
      case $best in P2) set_=$P2 ;; P3) set_=$P3 ;; *) set_="" ;; esac
      # shellcheck disable=SC2086
      PROFILE=15 capjob "$WORK" "final-$best" 280 $set_
      # shellcheck disable=SC2086 # raw vLLM with the same engine kwargs and prompt order
      raw "$WORK" "raw12k-warm-$best" 290 generate $set_
      ;;
    D)  # after A and B (a fresh machine: the images again): the ceiling A's profile named
      images "$WORK" 12000 && images "$WORK4" 4000 || exit 1
      # raw vLLM with the encoder's pixel batches in ordinary memory (gpu_bench.unpinned_mm_batches)
      GPU_BENCH_NO_PIN=1 PROFILE=15 raw "$WORK4" raw4k-nopin 240 generate
      # capjob as the preset stands, 4,000 images (the device minutes left), native frames profiled too
      GPU_BENCH_NATIVE=1 PROFILE=15 capjob "$WORK4" base4k-native 300
      ;;
    E)
      images "$WORK" 12000 || exit 1
      # shellcheck disable=SC2086
      PROFILE=15 capjob "$WORK" rpg2 320 $R2
      # shellcheck disable=SC2086
      PROFILE=15 capjob "$WORK" rpg3 "$(left)" $R3
      ;;
    F)
      images "$WORK" 12000 || exit 1
      GPU_BENCH_NATIVE=1 PROFILE=15 raw "$WORK" raw12k-warm 290 generate
      best=$(best_of rpg2 rpg3); echo "best of E: $best"
      case $best in rpg3) set_=$R3 ;; *) set_=$R2 ;; esac
      # shellcheck disable=SC2086
      PYTHONPATH=$PWD/bench/nopin_site:$PYTHONPATH GPU_BENCH_NO_PIN=1 PROFILE=15 capjob "$WORK" "$best-nopin" "$(left)" $set_
      ;;
  esac
  collect
} 2>&1 | tee -a "$LOG"
