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
    return _shared_run_dir_args(_strip_launcher_local_rank(argv))


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
    """Under torchrun every rank would resolve `${now:...}` on its own and may land in a different
    directory; rank 0 decides and the others follow (non-zero ranks also skip writing `.hydra/`)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if world_size == 1 or multirun or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    from datetime import datetime

    from trainer.distributed import broadcast_object, init_distributed

    rank = init_distributed()
    chosen = broadcast_object(datetime.now().strftime("outputs/%Y-%m-%d/%H-%M-%S") if rank.is_main else None)
    extra = [f"hydra.run.dir={chosen}"]
    if not rank.is_main:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=none"]
    return argv + extra
