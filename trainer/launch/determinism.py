"""`train.deterministic`: kernels that give the same bits on every run, so that a run killed and
resumed matches one never interrupted on a GPU too.

On a CPU the job is deterministic already. On a GPU it is not by default: attention's backward
(FlashAttention and the memory-efficient kernel) adds the query gradient's pieces with atomics, in
whatever order the blocks finish, and cuBLAS documents bit-wise reproducible results only under a
fixed workspace configuration (`CUBLAS_WORKSPACE_CONFIG`, since CUDA 10.2). Two runs
from the same seed then part in the last bits after the first backward, and a resumed run cannot
be told from a broken resume. Turned on, torch uses its deterministic kernels (FlashAttention's
deterministic backward among them, which only the strict mode selects: `warn_only=True` keeps the
atomics), cuBLAS a fixed workspace, and cuDNN neither autotunes nor picks nondeterministic
algorithms. It costs speed (attention's backward most), so it is off by default.

A process-wide setting: cuBLAS reads its workspace setting at its first matrix product in the
process, so it is set when a job starts, before any model is built.
"""

from __future__ import annotations

import os

import torch

from trainer.config import REPRODUCIBLE_CUBLAS_WORKSPACES


def use_deterministic_kernels(enabled: bool) -> None:
    """Set torch's, cuBLAS's and cuDNN's determinism for this process as `train.deterministic` says
    (both ways: the jobs of a sequential sweep share the process)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", REPRODUCIBLE_CUBLAS_WORKSPACES[0])
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    if enabled:
        torch.backends.cudnn.benchmark = False  # autotuning times kernels, and may pick another one next run
