"""`python -m trainer.cache [overrides]` (or under torchrun): run the teacher once over the data
and keep its top-k log-probabilities, so that any number of student runs can train with
`teacher=cache` (or `teacher.cache=auto`) and no teacher in memory.

Takes the job's own config: the same teacher, data, train.seq_len and deepspeed settings the
training runs use, plus teacher.top_k, teacher.tail_samples, teacher.cache_dtype and teacher.cache_shard_rows.
With loss.cross_tokenizer set, the cache serves students of any tokenizer (trainer/cache/cross.py). Prints
`CACHE <folder>` last. Run it again after an interruption: it resumes at the first missing shard.
"""

from __future__ import annotations

import sys

import hydra

from trainer.config import register_configs
from trainer.launch.cli import prepare_argv, run_and_announce
from trainer.launch.help import register_help_resolver

register_configs()
register_help_resolver()  # `--help` renders the key table from the schema's field docs


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def build(cfg) -> None:
    from trainer.cache.build import build_cache

    run_and_announce(build_cache, cfg, "CACHE")


def main() -> None:
    sys.argv = prepare_argv(sys.argv)
    build()


if __name__ == "__main__":
    main()
