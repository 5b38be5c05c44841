#!/usr/bin/env bash
# The GPU check, in one go: run on the GPU machine from the repository's root, after
# scripts/gpu/wheels.sh filled .whl/ on a machine with PyPI. Installs .whl/ into a scratch folder
# (never into the image's own environment, whose CUDA torch stays), then within 8 minutes writes
# gpu_check.json and gpu_check.md into OUT_DIR (each section as soon as it ends; see check.py).
#
#   scripts/gpu/check.sh OUT_DIR          # on the GPU
#   scripts/gpu/check.sh OUT_DIR --cpu    # tiny shapes on the CPU, in the current environment (CI)
#
# Environment: PYTHON (default python3), WHEELS (default .whl), LIMIT_S (seconds for check.py: 480, or
# 1500 with --cpu, whose job start-ups take minutes on a small shared CPU), SCRATCH_INSTALL (above).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: scripts/gpu/check.sh OUT_DIR [--cpu] [check.py options]}
shift
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
cpu=false
for arg in "$@"; do [[ "$arg" == --cpu ]] && cpu=true; done

# --cpu runs where the project is installed already (CI's .venv): the wheels are for the GPU image's
# Python 3.12 and would shadow that environment's own packages. SCRATCH_INSTALL=true installs them
# anyway, for a copy of the image's environment on a CPU (scripts/gpu/preflight.sh).
if [[ "$cpu" == false || "${SCRATCH_INSTALL:-false}" == true ]]; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "check.sh: error: no wheels in $WHEELS; run scripts/gpu/wheels.sh on a machine with PyPI first." >&2
    exit 2
  fi
  SITE=$(mktemp -d /tmp/distill-site.XXXXXX)
  trap 'rm -rf "$SITE"' EXIT  # the scratch install is this run's only: nothing is left on the image
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false MALLOC_MMAP_THRESHOLD_=65536
[[ "$cpu" == true ]] && limit=${LIMIT_S:-1500} || limit=${LIMIT_S:-480}
# check.py fits its sections into the limit; timeout is the backstop.
# Not exec: the shell stays to run the EXIT trap that removes the scratch install.
PYTHONUNBUFFERED=1 timeout --signal=TERM --kill-after=10 "$((limit + 30))" \
  "$PYTHON" scripts/gpu/check.py --out "$OUT" --limit-s "$limit" "$@"
