#!/usr/bin/env bash
# Submit capjob to an existing Ray cluster, stream its logs and wait for its result.
#
#   RAY_ADDRESS=http://ray-head:8265 jobs/submit.sh model=qwen25vl_3b resources=l4x10 \
#       data.limit=1000000 sink.path=s3://my-bucket/captions/blip3o
#
# Arguments are capjob's overrides, exactly as for `capjob` (a sweep: --multirun a=1,2 ...).
# Exit status: 0 when the job SUCCEEDED; 1 when it FAILED, was STOPPED or timed out; 2 on usage.
#
# Environment:
#   RAY_ADDRESS            the cluster's job server (dashboard) address, e.g. http://ray-head:8265
#   RAY_JOB_HEADERS        optional JSON headers for an authenticating proxy (read by the ray CLI)
#   CAPJOB_RUNTIME_ENV     runtime env file (default: jobs/runtime_env.yaml)
#   CAPJOB_SUBMISSION_ID   the job's id (default: capjob-<UTC time>-<random>)
#   CAPJOB_ENTRYPOINT      how the cluster runs capjob (default: python -m capjob)
#   CAPJOB_TIMEOUT_S       give up (and stop the job) after this many seconds (default: no limit)
#   RAY                    the ray CLI to use (default: ray on PATH)
#
# Use a sink.path every node can write and you can read afterwards (s3://..., a shared volume):
# a relative path would land in the job's temporary working directory on the head node.
set -euo pipefail
cd "$(dirname "$0")/.."  # runtime_env.yaml's paths are relative to the repository root

if [ -z "${RAY_ADDRESS:-}" ]; then
  echo "submit.sh: error: set RAY_ADDRESS to the cluster's job server, e.g. http://ray-head:8265" >&2
  exit 2
fi
if [ "$#" -eq 0 ]; then
  echo "submit.sh: error: give capjob's overrides, e.g. jobs/submit.sh model=qwen25vl_3b sink.path=s3://bucket/out" >&2
  exit 2
fi
[ -n "${RAY_JOB_HEADERS:-}" ] || unset RAY_JOB_HEADERS  # an empty CI secret means none
ray=${RAY:-ray}
runtime_env=${CAPJOB_RUNTIME_ENV:-jobs/runtime_env.yaml}
submission_id=${CAPJOB_SUBMISSION_ID:-capjob-$(date -u +%Y%m%dT%H%M%SZ)-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')}
timeout_s=${CAPJOB_TIMEOUT_S:-0}
read -r -a entrypoint <<< "${CAPJOB_ENTRYPOINT:-python -m capjob}"

ray_job() { "$ray" job "$1" --address "$RAY_ADDRESS" --log-style record --log-color false "${@:2}"; }

# SUCCEEDED | FAILED | STOPPED | RUNNING | PENDING | UNKNOWN, from `ray job status`.
job_status() {
  local out
  out=$(ray_job status "$submission_id" 2>&1) || { echo UNKNOWN; return; }
  case "$out" in
    *"Job '$submission_id' succeeded"*) echo SUCCEEDED ;;
    *"Job '$submission_id' failed"*) echo FAILED ;;
    *"Job '$submission_id' was stopped"*) echo STOPPED ;;
    *": RUNNING"*) echo RUNNING ;;
    *": PENDING"*) echo PENDING ;;
    *) echo UNKNOWN ;;
  esac
}

stop_job() {
  echo "submit.sh: stopping $submission_id" >&2
  ray_job stop --no-wait "$submission_id" >&2 || true
}

echo "submit.sh: submitting $submission_id to $RAY_ADDRESS: ${entrypoint[*]} $*" >&2
ray_job submit --no-wait --submission-id "$submission_id" --runtime-env "$runtime_env" -- "${entrypoint[@]}" "$@"
started=$SECONDS
# Cancelling this script (CI cancel, Ctrl-C) stops the job instead of leaving it running.
trap 'stop_job; exit 1' INT TERM

# Stream the logs until the job ends; the stream may drop (network), so poll the status after.
if [ "$timeout_s" -gt 0 ]; then
  timeout "$timeout_s" "$ray" job logs --address "$RAY_ADDRESS" --follow "$submission_id" || true
else
  "$ray" job logs --address "$RAY_ADDRESS" --follow "$submission_id" || true
fi
while :; do
  status=$(job_status)
  case "$status" in
    SUCCEEDED|FAILED|STOPPED) break ;;
  esac
  if [ "$timeout_s" -gt 0 ] && [ $((SECONDS - started)) -ge "$timeout_s" ]; then
    echo "submit.sh: $submission_id still $status after ${timeout_s}s" >&2
    stop_job
    status=TIMEOUT
    break
  fi
  sleep 5
done
trap - INT TERM
echo "submit.sh: job $submission_id: $status" >&2
[ "$status" = SUCCEEDED ]
