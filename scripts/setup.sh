#!/usr/bin/env bash
# Create .venv with everything the trainer and its tests need, once; later calls return at once
# unless pyproject.toml or constraints.txt changed. Versions come from constraints.txt: the CPU build
# of torch this project's CI carries, and the exact versions CI tests. On a GPU machine, install into
# the environment that holds your CUDA torch instead (README: "Running your own models").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.distill-installed"
if [[ -f "$STAMP" && "$STAMP" -nt pyproject.toml && "$STAMP" -nt constraints.txt ]]; then
  exit 0
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  "${VENV_PYTHON:-python3}" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[dev]"
touch "$STAMP"
