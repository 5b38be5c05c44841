"""What the three entry points share: launcher arguments, one run directory for all ranks, and
user errors reported as one line.

`python -m trainer` (train), `python -m trainer.cache` (build a teacher cache) and
`python -m trainer.generate` (teacher-written responses) all take the same Hydra config.
"""

from __future__ import annotations

import logging
import os
import sys

from trainer.cache.store import CacheError
from trainer.config import ConfigError
from trainer.data import DataError
from trainer.models import ModelError

USER_ERRORS = (ConfigError, DataError, ModelError, CacheError)


def prepare_argv(argv: list[str]) -> list[str]:
    argv = _strip_launcher_local_rank(argv)
    if any(a in ("-m", "--multirun") for a in argv):
        return argv  # the sweeper and its launcher give each job its own directory
    from trainer.distributed import fill_launcher_env

    fill_launcher_env()
    return _shared_run_dir_args(argv)


def run_entry(task, cfg):
    """Join the process group, run `task(cfg, rank)` and return its result on every rank.

    A wrong setting or input is the user's to fix: one line, no traceback, exit status 2. Every
    rank validates the same inputs, so every rank stops there."""
    from trainer.distributed import finish_together, init_distributed

    rank = init_distributed()
    _quiet_other_ranks(rank.is_main)
    try:
        result = task(cfg, rank)
    except USER_ERRORS as error:
        print(f"distill: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finish_together()
    return result


def run_and_announce(task, cfg, label: str) -> None:
    """:func:`run_entry` for a task that returns a path; rank 0 prints `<label> <path>` last, for scripts."""
    path = run_entry(task, cfg)
    if os.environ.get("RANK", "0") == "0":  # run_entry has set it, under torchrun or not
        print(f"{label} {path.resolve()}", flush=True)


def _quiet_other_ranks(is_main: bool) -> None:
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    if not is_main:
        logging.getLogger("trainer").setLevel(logging.WARNING)


def _strip_launcher_local_rank(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher appends `--local_rank=N`, which Hydra's parser rejects; torchrun
    passes LOCAL_RANK in the environment, so move it there."""
    kept = []
    for arg in argv:
        if arg.startswith("--local_rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        else:
            kept.append(arg)
    return kept


def _shared_run_dir_args(argv: list[str]) -> list[str]:
    """One run directory for every rank: each rank resolving `${now:...}` on its own may land in
    a different one. Under SLURM it is named after the job and step, so a requeued job comes back
    to it and resumes; elsewhere rank 0 decides and the others follow. Non-zero ranks skip `.hydra/`."""
    if any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    chosen = _slurm_run_dir()
    if chosen is None and int(os.environ["WORLD_SIZE"]) == 1:
        return argv
    if chosen is None:
        from datetime import datetime

        from trainer.distributed import broadcast_object, init_distributed

        rank = init_distributed()
        chosen = broadcast_object(datetime.now().strftime("outputs/%Y-%m-%d/%H-%M-%S") if rank.is_main else None)
    extra = [f"hydra.run.dir={chosen}"]
    if os.environ["RANK"] != "0":
        extra += ["hydra.output_subdir=null", "hydra/job_logging=none"]
    return argv + extra


def _slurm_run_dir() -> str | None:
    """`outputs/slurm-<job id>.<step id>` inside a SLURM job: the same on every task and after a
    requeue (which keeps the job id and numbers the steps afresh), different for each srun of an
    interactive allocation."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        return None
    return f"outputs/slurm-{job}.{os.environ.get('SLURM_STEP_ID', 'batch')}"
