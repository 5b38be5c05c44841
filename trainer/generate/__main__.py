"""`python -m trainer.generate generate.prompts=<rows> generate.out=<folder> [overrides]` (or under
torchrun): the teacher writes `generate.samples_per_prompt` responses per prompt into
`<folder>/train.jsonl`, which a student then learns with `data.train=<folder>/train.jsonl`
(`loss.kind=sft`, or KD on top). Prints `DATASET <path>` last; run it again to resume. With no
overrides, the demo's teacher answers the demo's training prompts into `outputs/generated`."""

from __future__ import annotations

import sys

import hydra

from trainer.config import register_configs
from trainer.launch.cli import prepare_argv, run_and_announce
from trainer.launch.help import register_help_resolver

register_configs()
register_help_resolver()  # `--help` renders the key table from the schema's field docs


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def generate(cfg) -> None:
    from trainer.generate.responses import generate_dataset

    run_and_announce(generate_dataset, cfg, "DATASET")


def main() -> None:
    sys.argv = prepare_argv(sys.argv)
    generate()


if __name__ == "__main__":
    main()
