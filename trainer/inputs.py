"""What every entry point (train, cache, generate) resolves before loading a model: the demo's
assets when asked for, the tokenizer, and the tokenized data of each split."""

from __future__ import annotations

import logging

import torch.distributed as dist
from omegaconf import OmegaConf

from trainer.config import DEMO_SCHEME, cache_root
from trainer.data import Examples, load_examples
from trainer.distributed import RankInfo

log = logging.getLogger(__name__)

DEMO_KEYS = ("teacher.path", "student.path", "data.train", "data.eval", "generate.prompts")


def materialise_demo(cfg, rank: RankInfo) -> None:
    """Swap `demo://` values for the demo's models and data, built once on rank 0 and cached."""
    if not any(str(OmegaConf.select(cfg, key)).startswith(DEMO_SCHEME) for key in DEMO_KEYS):
        return
    from trainer.demo import build_demo_assets

    demo_dir = cache_root(cfg) / "demo"
    if rank.is_main:
        build_demo_assets(demo_dir, log=log.info)
    dist.barrier()
    assets = build_demo_assets(demo_dir, log=log.debug)
    by_name = {"teacher": assets.teacher_path, "student": assets.student_path,
               "train": assets.train_path, "eval": assets.eval_path}
    for key in DEMO_KEYS:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and value.startswith(DEMO_SCHEME):
            OmegaConf.update(cfg, key, str(by_name[value[len(DEMO_SCHEME):]]))


def data_sources(cfg) -> dict:
    """The job's splits by name: `train`, and `eval` when held-out data is given separately."""
    return {"train": cfg.data.train, **({"eval": cfg.data.eval} if cfg.data.eval else {})}


def load_splits(cfg, tokenizer, rank: RankInfo) -> dict[str, Examples]:
    """Tokenized rows of each split: rank 0 tokenises and caches, then the other ranks read the cache."""
    cache = cache_root(cfg) / "tokenized"
    for turn in ("main", "others"):
        if (turn == "main") == rank.is_main:
            splits = {name: load_examples(source, tokenizer, cfg.train.seq_len, cache, key=f"data.{name}",
                                          truncate=cfg.data.truncate)
                      for name, source in data_sources(cfg).items()}
        dist.barrier()
    return splits
