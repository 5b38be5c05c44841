"""A cache's identity for one job: its key, its data fingerprints, its folder, and the check that
a cache on disk is the one the job needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.cache.key import auto_cache_folder, differences, model_folder, weights_fingerprint
from trainer.cache.store import CacheError, Manifest
from trainer.config import cache_root
from trainer.data.examples import examples_fingerprint, tokenizer_fingerprint
from trainer.preflight.inputs import data_sources
from trainer.ranks import broadcast_object

_KEY_NAMES = {"teacher": "teacher weights", "tokenizer": "tokenizer", "top_k": "teacher.top_k",
              "tail_samples": "teacher.tail_samples"}


@dataclass
class CacheIdentity:
    key: dict
    """teacher, tokenizer, top_k, tail_samples (only when drawn); without `teacher` when the job has
    no teacher to compare."""
    data: dict
    """Split name -> fingerprint of its tokenized rows."""
    folder: Path


def job_identity(cfg, tokenizer, is_main: bool) -> CacheIdentity:
    """Computed on rank 0 (hashing weights and data can take a while) and shared with every rank."""
    identity = _compute_identity(cfg, tokenizer) if is_main else None
    return broadcast_object(identity)


def _compute_identity(cfg, tokenizer) -> CacheIdentity:
    key = {"tokenizer": tokenizer_fingerprint(tokenizer), "top_k": cfg.teacher.top_k}
    if cfg.teacher.tail_samples:  # absent at 0, so exact top-k caches keep the keys they were built with
        key["tail_samples"] = cfg.teacher.tail_samples
    if cfg.teacher.path is not None:
        folder = model_folder(cfg.teacher.path, cfg.teacher.revision)
        key["teacher"] = weights_fingerprint(folder, cache_root(cfg) / "weight_hashes.json")
    data = {name: examples_fingerprint(source, tokenizer, cfg.train.seq_len, key=f"data.{name}")
            for name, source in data_sources(cfg).items()}
    if cfg.teacher.cache in (None, "auto"):
        folder = auto_cache_folder(cache_root(cfg), key, data)
    else:
        folder = Path(cfg.teacher.cache).expanduser()
    return CacheIdentity(key, data, folder)


def check_matches(manifest: Manifest, identity: CacheIdentity, *, explicit_folder: bool, fix: str) -> None:
    """Raise :class:`CacheError` naming every part of the key or data that differs.

    With an explicitly named folder, `top_k` and `tail_samples` are the cache's own: the job reads
    whatever it holds."""
    expected = dict(identity.key)
    if explicit_folder:
        expected.pop("top_k")
        expected.pop("tail_samples", None)
    found = {name: manifest.key.get(name) for name in expected}
    differing = [_KEY_NAMES[name] for name in differences(expected, found)]
    for split, fingerprint in identity.data.items():
        info = manifest.splits.get(split)
        if info is None:
            differing.append(f"data.{split} (the cache has no {split} split)")
        elif info.data != fingerprint:
            differing.append(f"data.{split} (or train.seq_len)")
    if differing:
        raise CacheError(f"the teacher cache in {identity.folder} was built for a different {', '.join(differing)}; {fix}")
