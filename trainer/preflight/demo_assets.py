"""The demo's assets: `demo://` values swapped for the demo's models and data (built once, cached),
and the pairings that keep the demo's data apart from the user's own models."""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist
from omegaconf import OmegaConf

from trainer.config import DEMO_SCHEME, ConfigError, cache_root
from trainer.ranks import RankInfo

log = logging.getLogger(__name__)

DEMO_TRAIN, DEMO_EVAL = f"{DEMO_SCHEME}train", f"{DEMO_SCHEME}eval"
CROSS_STUDENT = "student_cross_tokenizer"
DEMO_NAMES = ("teacher", "student", CROSS_STUDENT, "train", "eval")
"""What may follow `demo://`: the demo's models and data (trainer/demo/)."""

TRAINING_KEYS = ("teacher.path", "student.path", "data.train", "data.eval")
"""The keys that may name a demo asset, as training reads them; a cache build reads no student and
generation reads only the teacher and `generate.prompts`."""
CACHE_KEYS = ("teacher.path", "data.train", "data.eval")
GENERATE_KEYS = ("teacher.path", "generate.prompts")
KEYS_READ_BY = {"train": TRAINING_KEYS, "cache": CACHE_KEYS, "generate": GENERATE_KEYS}
"""Each entry point's keys that may name a demo asset."""


def materialise_demo(cfg, rank: RankInfo, keys: tuple[str, ...] = TRAINING_KEYS) -> None:
    """Swap `demo://` values of `keys` (what the entry point reads) for the demo's models and data,
    built once on rank 0 and cached. Nothing is built when none of them is a demo asset."""
    if "data.train" in keys:
        refuse_demo_data_for_own_models(cfg, keys)
        pair_demo_held_out(cfg)
    named = _named_demo_assets(cfg, keys)
    if not named:
        return
    paths = _built_demo_assets(cache_root(cfg) / "demo", rank, with_cross_student=CROSS_STUDENT in named.values())
    for key, name in named.items():
        OmegaConf.update(cfg, key, str(paths[name]))


def _named_demo_assets(cfg, keys: tuple[str, ...]) -> dict[str, str]:
    """{key: the asset it names}, for each of `keys` set to `demo://<asset>`; an unknown one is refused."""
    named = {}
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if not _is_demo(value):
            continue
        named[key] = value[len(DEMO_SCHEME):]
        if named[key] not in DEMO_NAMES:
            raise ConfigError(f"{key}={value} is not one of the demo's assets; use one of "
                              f"{', '.join(DEMO_SCHEME + name for name in DEMO_NAMES)}.")
    return named


def _built_demo_assets(demo_dir: Path, rank: RankInfo, *, with_cross_student: bool) -> dict[str, Path]:
    """{asset name: its path}, built on rank 0 while the other ranks wait. The cross-tokenizer student
    is derived from the others and built only when asked for, so the plain demo never waits for it."""
    from trainer.demo import build_cross_tokenizer_student, build_demo_assets

    if rank.is_main:
        build_demo_assets(demo_dir, log=log.info)
    dist.barrier()
    assets = build_demo_assets(demo_dir, log=log.debug)
    paths = {"teacher": assets.teacher_path, "student": assets.student_path,
             "train": assets.train_path, "eval": assets.eval_path}
    if with_cross_student:
        if rank.is_main:
            build_cross_tokenizer_student(assets, demo_dir, log=log.info)
        dist.barrier()
        paths[CROSS_STUDENT] = build_cross_tokenizer_student(assets, demo_dir, log=log.debug)
    return paths


def pair_demo_held_out(cfg) -> None:
    """The demo's training rows come with their own held-out problems (none in both), so the demo
    evaluates on those; any other `data.train` without `data.eval` holds out `data.eval_fraction`
    of itself. (`conf/data/demo.yaml` leaves `eval` null for this: a fixed `demo://eval` there
    would stay behind when only `data.train` is overridden.)"""
    if cfg.data.train == DEMO_TRAIN and cfg.data.eval is None:
        cfg.data.eval = DEMO_EVAL


def refuse_demo_data_for_own_models(cfg, keys: tuple[str, ...]) -> None:
    """The demo's arithmetic rows are data for the demo's models: next to the user's own model they
    are a data.train left at its default, and building them would train the demo's teacher first."""
    if not _is_demo(cfg.data.train):
        return
    own = [key for key in keys if key.endswith(".path") and not _is_demo(OmegaConf.select(cfg, key))]
    if own:
        value = OmegaConf.select(cfg, own[0])
        raise ConfigError(f"data.train is the demo's arithmetic ({cfg.data.train}), but {own[0]}="
                          f"{'null' if value is None else value} is not the demo's model; set data.train to your data "
                          "(a .jsonl/.parquet file, a list of them or a datasets name; without data.eval, "
                          "data.eval_fraction of it is held out).")


def _is_demo(value) -> bool:
    return isinstance(value, str) and value.startswith(DEMO_SCHEME)


def demo_prompts_for_the_demo_teacher(cfg) -> None:
    """`generate.prompts=null` with the demo's teacher is the demo: its teacher answers its training prompts."""
    if cfg.generate.prompts is None and _is_demo(cfg.teacher.path):
        cfg.generate.prompts = DEMO_TRAIN
