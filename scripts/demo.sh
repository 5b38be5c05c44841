#!/usr/bin/env bash
# The embedded demo, end to end on a CPU with no network: builds (once) a small arithmetic teacher,
# distils it into a half-depth LoRA student, then trains the same student on hard labels only for
# the same number of steps, and prints both side by side. Extra arguments are Hydra overrides for
# both runs (e.g. train.max_steps=100 logger=none).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
stamp=$(date +%Y-%m-%d/%H-%M-%S)
kd_dir="outputs/demo/$stamp/kd" sft_dir="outputs/demo/$stamp/sft"
.venv/bin/python -m trainer hydra.run.dir="$kd_dir" "$@"
.venv/bin/python -m trainer experiment=demo_sft hydra.run.dir="$sft_dir" "$@"
.venv/bin/python scripts/compare_runs.py "$kd_dir" "$sft_dir"
