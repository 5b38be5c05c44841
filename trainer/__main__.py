"""`python -m trainer [overrides]`, `torchrun ... -m trainer`, or the `distill` console script."""

from __future__ import annotations

import sys

import hydra

from trainer.config import register_configs
from trainer.launch.cli import prepare_argv, run_entry
from trainer.launch.help import register_help_resolver

register_configs()
register_help_resolver()  # `--help` renders the key table from the schema's field docs


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def distill(cfg) -> float:
    return run_entry(_train, cfg)


def _train(cfg, rank, run_dir) -> float:
    from trainer.train import job

    return job.run(cfg, rank, run_dir.path, inputs_checked=run_dir.keep_record)


def main() -> None:
    sys.argv = prepare_argv(sys.argv)
    distill()


if __name__ == "__main__":
    main()
