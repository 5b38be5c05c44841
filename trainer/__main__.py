"""`python -m trainer [overrides]`, `torchrun ... -m trainer`, or the `distill` console script."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from trainer.config import ConfigError, register_configs
from trainer.data import DataError
from trainer.models import ModelError

USER_ERRORS = (ConfigError, DataError, ModelError)

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def distill(cfg) -> float:
    from trainer import job
    from trainer.distributed import finish_together, init_distributed

    rank = init_distributed()
    _quiet_other_ranks(rank.is_main)
    run_dir = job.agree_run_dir(Path(HydraConfig.get().runtime.output_dir))
    try:
        metric = job.run(cfg, rank, run_dir)
    except USER_ERRORS as error:
        # A wrong setting or input is the user's to fix: one line, no traceback. Every rank
        # validates the same inputs, so every rank stops here.
        print(f"distill: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finish_together()
    return metric


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


def main() -> None:
    sys.argv = _strip_launcher_local_rank(sys.argv)
    sys.argv = _shared_run_dir_args(sys.argv)
    distill()


if __name__ == "__main__":
    main()
