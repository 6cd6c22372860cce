#!/usr/bin/env bash
# capjob-watch as a Ray job beside a training run: every checkpoint the trainer writes under
# watch.path is captioned on the golden set and scored as soon as it is complete, and
# <sink.path>/leaderboard.md/.csv/.png follow the training (README, "Validate checkpoints as
# they arrive").
#
#   RAY_ADDRESS=http://ray-head:8265 jobs/watch/submit.sh \
#       watch.path=s3://my-bucket/run7/checkpoints/ model=qwen25vl_3b \
#       dataset=parquet data.path=s3://my-bucket/golden/ data.name=golden \
#       eval=stats eval.reference_column=reference sink.path=s3://my-bucket/run7/validation \
#       watch.poll_interval_s=60 job.metrics_export_port=8090
#
# The training job writes its checkpoints (step-N/ or checkpoint-N/) under watch.path and, when
# it ends, the stop file (watch.stop_file, default <watch.path>/WATCH_STOP): the watcher
# evaluates what is left and the job SUCCEEDS. Submitted again (a restart, a preempted head),
# it skips every checkpoint <sink.path>/watch/state.json already holds.
#
# This is jobs/submit.sh (same environment variables, same runtime env: jobs/runtime_env.yaml)
# with the watcher as the entrypoint; it streams the watcher's log until the watcher stops.
# Run it in the background (or under nohup) next to the training submission, or set
# CAPJOB_TIMEOUT_S to bound it. The model group's settings (engine, dtype, chat template) apply
# to every checkpoint; model.source is each checkpoint's folder.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export CAPJOB_ENTRYPOINT="${CAPJOB_ENTRYPOINT:-python -m capjob.watch}"
export CAPJOB_SUBMISSION_ID="${CAPJOB_SUBMISSION_ID:-capjob-watch-$(date -u +%Y%m%dT%H%M%SZ)-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')}"
exec "$here/../submit.sh" "$@"
