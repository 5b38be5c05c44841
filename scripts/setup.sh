#!/usr/bin/env bash
# Create .venv with everything the trainer and its tests need, once; later calls return at once
# unless pyproject.toml changed. torch is pinned to the CPU build this project's CI carries; on a
# GPU machine install your CUDA build of torch first (VENV_PYTHON may name another interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.distill-installed"
if [[ -f "$STAMP" && "$STAMP" -nt pyproject.toml ]]; then
  exit 0
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  "${VENV_PYTHON:-python3}" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
touch "$STAMP"
