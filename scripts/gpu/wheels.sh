#!/usr/bin/env bash
# Run on a CPU machine that reaches PyPI, before scripts/gpu/check.sh goes to a GPU machine that
# reaches nothing: puts into .whl/ (or $WHEELS) the wheels the GPU machine's image lacks, for its
# CPython 3.12 on manylinux x86-64, at the versions CI tests (constraints.txt).
#
# The image (see scripts/gpu/check.sh) has torch 2.11+cu130, transformers, peft, accelerate, numpy,
# pyyaml, psutil, ninja, msgpack, py-cpuinfo, nvidia-ml-py, einops, pyarrow, pandas, xxhash, fsspec
# and triton. It lacks, and the check needs:
#   - the trainer: deepspeed (and its hjson, pydantic), hydra-core, omegaconf, antlr4-python3-runtime;
#   - the TRL baseline: trl, datasets (and its dill, multiprocess);
#   - the Liger comparison: liger-kernel (pure Python over triton).
# Left out, since the check runs without them (logger=none, no sweeps, no SLURM): wandb (20+ MiB),
# hydra-submitit-launcher, hydra-optuna-sweeper, matplotlib's extras. What travels to the GPU
# machine must stay under 64 MiB in all; this script fails if it does not.
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=${WHEELS:-.whl}
PYTHON=${PYTHON:-python3}
LIMIT_MIB=${LIMIT_MIB:-64}
LIGER_VERSION=${LIGER_VERSION:-0.8.5}  # not a dependency of the project, so not in constraints.txt

# name==version as constraints.txt pins it (names compared as pip does: case and -_. alike).
pinned() {
  local wanted line
  wanted=$(echo "$1" | tr 'A-Z_.' 'a-z--')
  while read -r line; do
    [[ "$(echo "${line%%==*}" | tr 'A-Z_.' 'a-z--')" == "$wanted" ]] && { echo "$line"; return; }
  done < <(grep '==' constraints.txt)
  echo "wheels.sh: $1 is not pinned in constraints.txt; add it there (pip freeze) and run again." >&2
  exit 1
}

# typing-extensions too: pydantic needs >= 4.16, newer than an image may hold.
BINARY=(pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson hydra-core omegaconf
        trl datasets dill multiprocess)
SOURCE_ONLY=(deepspeed antlr4-python3-runtime)  # published as source only: built here (pure Python)

rm -rf "$WHEELS" && mkdir -p "$WHEELS"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
requirements=()
for name in "${BINARY[@]}"; do requirements+=("$(pinned "$name")"); done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$WHEELS" "${requirements[@]}" "liger-kernel==$LIGER_VERSION"
requirements=()
for name in "${SOURCE_ONLY[@]}"; do requirements+=("$(pinned "$name")"); done
# No compiled ops (DS_BUILD_OPS=0): DeepSpeed builds any it needs just in time there; the trainer needs none.
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps -w "$WHEELS" "${requirements[@]}"

total=$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)
ls -l "$WHEELS"
echo "wheels.sh: $(ls "$WHEELS"/*.whl | wc -l) wheels, $((total / 1024 / 1024)) MiB in $WHEELS"
if (( total > LIMIT_MIB * 1024 * 1024 )); then
  echo "wheels.sh: error: $WHEELS holds more than $LIMIT_MIB MiB; leave out a wheel the check can do without." >&2
  exit 1
fi
