#!/usr/bin/env bash
# One distillation job on this machine's GPUs (one rank each), or on several machines.
#
#   scripts/torchrun.sh deepspeed=zero3 teacher.path=... student.path=... data.train=...
#   NNODES=2 RDZV_ENDPOINT=node01:29500 scripts/torchrun.sh ...   # the same line on every node
#
# Edit the defaults below or set them in the environment; the arguments are Hydra overrides.
set -euo pipefail

NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
NPROC_PER_NODE=${NPROC_PER_NODE/#0/1}   # no GPU: one CPU rank (set NPROC_PER_NODE for more)
NNODES=${NNODES:-1}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-}         # host:port on the first node; needed when NNODES > 1
RDZV_ID=${RDZV_ID:-distill}              # the same on every node of one job, different per job
DISTILL_PYTHON=${DISTILL_PYTHON:-python}

if [[ "$NNODES" == 1 ]]; then
  rendezvous=(--standalone)
elif [[ -z "$RDZV_ENDPOINT" ]]; then
  echo "torchrun.sh: NNODES=$NNODES needs RDZV_ENDPOINT=<first node>:<free port>, the same on every node." >&2
  exit 2
else
  rendezvous=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID")
fi
exec "$DISTILL_PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
  "${rendezvous[@]}" -m trainer "$@"
