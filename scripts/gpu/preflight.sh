#!/usr/bin/env bash
# Before a scarce GPU run: the GPU check at tiny shapes, on this CPU, in a copy of the GPU image's
# environment (its Python and its torch, transformers and peft versions, as scripts/gpu/wheels.sh
# describes it), with .whl/ installed into a scratch folder exactly as check.sh does there. It catches
# what breaks on the image's older versions and not on CI's (an argument transformers 5.17 does not
# know, say) before it costs device minutes. Needs PyPI: PyPI's torch is a CUDA build, so the first
# run downloads about 3 GB into VENV; later runs reuse it.
#
#   scripts/gpu/preflight.sh OUT_DIR [check.py options]    # e.g. --sections end_to_end
#
# Environment: IMAGE_PYTHON (default python3.12), VENV (default /tmp/distill-gpu-image), WORK (check.py's
# scratch, default /tmp/distill-preflight).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: scripts/gpu/preflight.sh OUT_DIR [check.py options]}
shift
IMAGE_PYTHON=${IMAGE_PYTHON:-python3.12}
VENV=${VENV:-/tmp/distill-gpu-image}
WORK=${WORK:-/tmp/distill-preflight}
# The image's own packages (scripts/gpu/wheels.sh's list), at the versions it was seen with.
IMAGE_PACKAGES=(torch==2.11.0 transformers==5.17.0 peft accelerate numpy pyyaml psutil ninja msgpack py-cpuinfo
                nvidia-ml-py einops pyarrow pandas xxhash fsspec)

if [[ "$(cat "$VENV/packages" 2>/dev/null)" != "${IMAGE_PACKAGES[*]}" ]]; then
  if ! "$IMAGE_PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
    echo "preflight.sh: error: $IMAGE_PYTHON is not a Python 3.12 here; set IMAGE_PYTHON to one (pyenv: \$(pyenv root)/versions/3.12.*/bin/python)." >&2
    exit 2
  fi
  rm -rf "$VENV"
  "$IMAGE_PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet "${IMAGE_PACKAGES[@]}"
  echo "${IMAGE_PACKAGES[*]}" > "$VENV/packages"  # written last: a half-built copy is rebuilt next time
fi
ls .whl/*.whl >/dev/null 2>&1 || bash scripts/gpu/wheels.sh

OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHON="$VENV/bin/python" SCRATCH_INSTALL=true \
  bash scripts/gpu/check.sh "$OUT" --cpu --work "$WORK" "$@"
# check.py writes a failed section's error into the report and goes on; here a failure is the answer.
"$VENV/bin/python" - "$OUT/gpu_check.json" <<'PY'
import json, sys
sections = json.load(open(sys.argv[1]))["sections"]
failed = [name for name, section in sections.items() if section["status"] != "ok"]
print(f"preflight: {'failed: ' + ', '.join(failed) if failed else 'every section ok'} (see gpu_check.md)")
sys.exit(1 if failed else 0)
PY
