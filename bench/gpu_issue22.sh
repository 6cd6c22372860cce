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
# Session 9 (2026-12-03 evening; the first wheel call writes the images in the background and
# looks for CUDA MPS; every call copies results.jsonl to $OUT after each run):
#   bench/gpu_issue22.sh G   # capjob rpg2 as the preset stood ("s8base", the baseline; cold compile cache: the
#                            # machine's first engine start), then rpg2 under CUDA MPS ("mps2", warm) if the MPS
#                            # control daemon starts and a CUDA client runs under it; else K on rpg2
#   bench/gpu_issue22.sh H   # rpg3 under MPS ("mps3", if mps2 beat s8base), then K on the best of
#                            # s8base/mps2/mps3 (cold for K's compile settings)
#   bench/gpu_issue22.sh I   # raw vLLM over 12,000 with a fresh compile cache ("raw-cold"; decoding in 16
#                            # processes), raw vLLM warm over 1,000 (start-up only), then the best capjob
#                            # point over 12,000 (warm) as "final"
#   bench/gpu_issue22.sh J   # (the device time left) s8base again (warm) and K again: the run-to-run spread
# Measured 2026-12-03 (docs/benchmarks.md "Session 9"): MPS slower, K the winner, now in the preset.
# K = the per-engine CPU knobs, each on a ceiling that session 8's profile named:
#   compile_mm_encoder (torch.compile of the vision blocks; vLLM 0.26's cudagraph_mm_encoder exists in
#   the V1 model runner only, and this engine runs the V2 runner) + CUDA graphs captured up to 4,096
#   tokens (steady steps of ~900 decodes + ~7 prefills of ~170 tokens run past the default 512 and so
#   launched the language model from Python) + engine.log_engine_metrics=false (no Ray metrics
#   recorded per step) + engine.detokenize_stage=true (token ids from vLLM, one decode per caption in
#   a Ray Data actor instead of vLLM's incremental detokenizer in the front-end thread).
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
WORK1=/tmp/capjob-gpu-bench-1k # the first 1,000 (raw vLLM's warm start-up, session 9)
RESULTS=$WORK/results.jsonl
mkdir -p "$OUT" "$WORK" "$WORK4"
LOG=$OUT/session-$1.log
cg() { echo "++engine.extra_engine_kwargs.compilation_config={max_cudagraph_capture_size:$1}"; }
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
# Session 9 (arrays: the capture-size list holds brackets, which the shell would glob).
SIZES=1,2,4,8,16,24,32,40,48,56,64,72,80,88,96,104,112,120,128,136,144,152,160,168,176,184,192,200,208,216,224,232,240,248,256,272,288,304,320,336,352,368,384,400,416,432,448,464,480,496,512,576,640,704,768,832,896,960,1024,1088,1152,1216,1280,1344,1408,1472,1536,1600,1664,1728,1792,1856,1920,1984,2048,2112,2176,2240,2304,2368,2432,2496,2560,2624,2688,2752,2816,2880,2944,3008,3072,3136,3200,3264,3328,3392,3456,3520,3584,3648,3712,3776,3840,3904,3968,4032,4096
# Since session 9 the preset itself holds K: S8 turns it back into the preset as session 8 left it
# (G-J's s8base and mps runs and raw vLLM's engine kwargs are measured with it).
S8=(engine.log_engine_metrics=true engine.detokenize_stage=false "~engine.extra_engine_kwargs.compilation_config")
K_FRONT=(engine.log_engine_metrics=false engine.detokenize_stage=true)
K=("++engine.extra_engine_kwargs.compilation_config={compile_mm_encoder:true,cudagraph_capture_sizes:[$SIZES]}" "${K_FRONT[@]}")
# K with vLLM's V1 model runner, whose CUDA graphs of the vision encoder (cudagraph_mm_encoder) the
# V2 runner lacks
KV1=("++engine.extra_engine_kwargs.compilation_config={compile_mm_encoder:true,cudagraph_mm_encoder:true,cudagraph_capture_sizes:[$SIZES]}" "+engine.env_vars.VLLM_USE_V2_MODEL_RUNNER=0" "${K_FRONT[@]}")
# K without the compiled encoder (the fallback if K's engines fail to start)
K_NOENC=("++engine.extra_engine_kwargs.compilation_config={cudagraph_capture_sizes:[$SIZES]}" "${K_FRONT[@]}")
R3S=(resources.replicas_per_gpu=3 resources.concurrency=3 engine.kv_cache_gib=12)
MPS_BIN=$(command -v nvidia-cuda-mps-control || ls /usr/local/nvidia/bin/nvidia-cuda-mps-control 2>/dev/null)
mps_start() {  # CUDA MPS: a user-space control daemon (no card setting); its pipe and log dirs are private
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if [ -z "$MPS_BIN" ]; then echo "MPS: nvidia-cuda-mps-control not found"; mps_env_off; return 1; fi
  "$MPS_BIN" -d || echo "MPS: -d failed (a daemon left running?); trying a client anyway"
  # A CUDA client under it (Ray workers and vLLM's engine cores inherit the two variables).
  # A client finding no daemon would run without MPS: the daemon must list the server it started.
  if timeout 60 python3 -c "import torch; x = torch.ones(4, device='cuda'); print('MPS client ok', float(x.sum()))"; then
    servers=$(echo get_server_list | timeout 10 "$MPS_BIN")
    echo "MPS servers: ${servers:-none}"
    [ -n "$servers" ] && return 0
  fi
  echo "MPS: a CUDA client failed under the daemon"; tail -20 /tmp/mps-log/control.log /tmp/mps-log/server.log 2>/dev/null
  mps_stop; return 1
}
mps_env_off() { unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; }
mps_stop() {
  [ -n "$MPS_BIN" ] && [ -n "$CUDA_MPS_PIPE_DIRECTORY" ] && echo quit | timeout 30 "$MPS_BIN"  # quit waits for its clients
  sleep 2; tail -5 /tmp/mps-log/control.log 2>/dev/null; mps_env_off
}
rate() {  # rate LABEL: the steady images/s of LABEL's last capjob result (0 if none)
  python3 - "$RESULTS" "$1" <<'EOF2'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ok = [r for r in rows if r.get("label") == sys.argv[2] and r.get("images_per_s")]
print(ok[-1]["images_per_s"] if ok else 0)
EOF2
}
better() { python3 -c "import sys; sys.exit(0 if float('$1') > 1.05 * float('$2') else 1)"; }  # $1 beats $2 by > 5 %
snap() { cp "$RESULTS" "$OUT/results.jsonl" 2>/dev/null; }  # a call cut by the lease still brings the runs done
run_point() {  # run_point LABEL TIMEOUT: the point a session-9 label names, MPS on when the label says so
  local label=$1 t=$2 args=("${S8[@]}") mps=0
  case $label in *mps3*) args+=("${R3S[@]}") ;; esac
  case $label in *mps*) mps=1 ;; esac
  case ${label#final-} in
    K-*) args+=("${K[@]}") ;;
    Knoenc-*) args+=("${K_NOENC[@]}") ;;
    Kfront-*) args+=("${K_FRONT[@]}") ;;
    Kv1-*) args+=("${KV1[@]}") ;;
  esac
  if [ $mps = 1 ]; then mps_start || { echo "MPS did not start: $label not run"; return 1; }; fi
  PROFILE=15 capjob "$WORK" "$label" "$t" "${args[@]}"; snap
  if [ $mps = 1 ]; then mps_stop; fi
}

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
    run raw_vllm --label "$label" --raw-api "$api" --profile "${PROFILE:-0}" --profile-delay 20 --decode-workers "${DECODE:-1}" --set \
    resources.replicas_per_gpu=1 resources.concurrency=1 engine.kv_cache_gib=null "$@"
}
collect() {
  cp "$RESULTS" "$OUT/results.jsonl" 2>/dev/null
  mkdir -p "$WORK/profiles" && cp -r "$WORK4/profiles/." "$WORK/profiles/" 2>/dev/null
  tar czf "$OUT/profiles-logs.tgz" -C "$WORK" profiles logs 2>/dev/null
  python3 bench/gpu_bench.py --results "$RESULTS" report 2>/dev/null | tail -50
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
    G)
      images "$WORK" 12000 || exit 1
      PROFILE=15 capjob "$WORK" s8base 330 "${S8[@]}"; snap
      if mps_start; then
        PROFILE=15 capjob "$WORK" mps2 "$(left)" "${S8[@]}"; snap
        mps_stop
      fi
      # no MPS, or its engines failed to start under it: K on rpg2 now
      [ "$(rate mps2)" = 0 ] && [ "$(left)" -gt 200 ] && run_point K-rpg2 "$(left)"
      ;;
    H)
      if [ "$(rate mps2)" != 0 ]; then
        # MPS ran: 3 engines under it if 2 beat the baseline, then K on the best layout so far
        if better "$(rate mps2)" "$(rate s8base)"; then
          run_point mps3 260
          if better "$(rate mps3)" "$(rate mps2)"; then lay=mps3; else lay=mps2; fi
        else
          lay=rpg2
        fi
        run_point "K-$lay" "$(left)"
        [ "$(rate "K-$lay")" = 0 ] && [ "$(left)" -gt 200 ] && run_point "Knoenc-$lay" "$(left)"
        [ "$lay" = rpg2 ] && [ "$(left)" -gt 230 ] && run_point Kfront-rpg2 "$(left)"
      else
        # no MPS (G ran K on rpg2): the front-end knobs alone (which half of K did it), then, if the
        # call has the time, K with vLLM's V1 model runner and the encoder's CUDA graphs
        [ "$(rate K-rpg2)" = 0 ] && run_point K-rpg2 300
        [ "$(left)" -gt 230 ] && run_point Kfront-rpg2 260
        [ "$(left)" -gt 230 ] && run_point Kv1-rpg2 "$(left)"
      fi
      ;;
    I)
      # raw vLLM, one engine, capjob's engine kwargs as the preset stood (K's compile settings are
      # capjob's knob, not raw's), fresh vLLM/inductor/Triton caches: cold
      mkdir -p /tmp/cold && VLLM_CACHE_ROOT=/tmp/cold/vllm TORCHINDUCTOR_CACHE_DIR=/tmp/cold/inductor TRITON_CACHE_DIR=/tmp/cold/triton \
        DECODE=16 raw "$WORK" raw-cold 330 generate "${S8[@]}"; snap
      # the best capjob point so far, again (warm compile cache)
      best=$(python3 - "$RESULTS" <<'EOF2'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ok = [r for r in rows if r.get("contender") == "capjob" and r.get("images_per_s") and r.get("status") == "ok"]
print(max(ok, key=lambda r: r["images_per_s"])["label"] if ok else "s8base")
EOF2
)
      echo "final = $best"
      run_point "final-$best" "$(left)"
      # raw vLLM warm (the cache raw-cold wrote), 1,000 images: its start-up only
      if [ "$(left)" -gt 100 ]; then
        images "$WORK1" 1000 && VLLM_CACHE_ROOT=/tmp/cold/vllm TORCHINDUCTOR_CACHE_DIR=/tmp/cold/inductor TRITON_CACHE_DIR=/tmp/cold/triton \
          DECODE=16 raw "$WORK1" raw-warm-1k "$(left)" generate "${S8[@]}"; snap
      fi
      ;;
    J)  # the device time left after I: the baseline again (warm) and K again, for the run-to-run spread
      PROFILE=15 capjob "$WORK" s8base-warm 200 "${S8[@]}"; snap
      [ "$(left)" -gt 150 ] && run_point K-rpg2-again "$(left)"
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
