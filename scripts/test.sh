#!/usr/bin/env bash
# The whole test suite, on CPU and offline, in a fresh or existing .venv. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The launcher tests start a real one-node SLURM (tests/launch/test_launchers.py); its Debian packages
# install here when this runs as root, as in CI. Elsewhere install them once: sudo scripts/local_slurm.sh install
if [[ "$(id -u)" == 0 ]]; then bash scripts/local_slurm.sh install; fi
export HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
exec .venv/bin/python -m pytest -q "$@"
