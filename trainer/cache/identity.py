"""A cache's identity for one job: its key, its data fingerprints, its folder, and the check that
a cache on disk is the one the job needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.cache.key import auto_cache_folder, differences
from trainer.cache.store import CacheError, Manifest

if TYPE_CHECKING:
    from trainer.preflight.sequence import Preflight

_KEY_NAMES = {"teacher": "teacher weights", "tokenizer": "tokenizer", "top_k": "teacher.top_k",
              "tail_samples": "teacher.tail_samples",
              "cross_tokenizer": "loss.cross_tokenizer (a cache for students of any tokenizer, or of the teacher's only)"}


@dataclass
class CacheIdentity:
    key: dict
    """teacher, tokenizer, top_k, tail_samples (only when drawn); without `teacher` when the job has
    no teacher to compare."""
    data: dict
    """Split name -> fingerprint of its tokenized rows."""
    folder: Path


def job_identity(teacher_cfg, preflight: Preflight, cache_root: Path, *, cross_tokenizer: bool = False) -> CacheIdentity:
    """The cache `preflight` describes. Nothing is hashed here: the preflight hashed the weights (on
    rank 0, shared), the tokenizer and each split once, so every rank holds the same identity.

    `cross_tokenizer` (a cache build with loss.cross_tokenizer set), or a training job across
    tokenizers: the cache of the teacher's own tokenisation of the rows (trainer/cache/cross.py),
    keyed by the teacher's tokenizer and that tokenisation's fingerprints, whatever the student."""
    training_across = preflight.cross_tokenizer
    key = {"tokenizer": preflight.teacher_tokenizer_hash if training_across else preflight.tokenizer_hash,
           "top_k": teacher_cfg.top_k}
    if cross_tokenizer or training_across:  # absent otherwise, so earlier caches keep their keys
        key["cross_tokenizer"] = True
    if teacher_cfg.tail_samples:  # absent at 0, so exact top-k caches keep the keys they were built with
        key["tail_samples"] = teacher_cfg.tail_samples
    if teacher_cfg.path is not None:
        key["teacher"] = preflight.teacher_weights
    data = preflight.teacher_data_fingerprints if training_across else preflight.data_fingerprints
    if teacher_cfg.cache in (None, "auto"):
        folder = auto_cache_folder(cache_root, key, data)
    else:
        folder = Path(teacher_cfg.cache).expanduser()
    return CacheIdentity(key, data, folder)


def check_matches(manifest: Manifest, identity: CacheIdentity, *, explicit_folder: bool, fix: str) -> None:
    """Raise :class:`CacheError` naming every part of the key or data that differs.

    With an explicitly named folder, `top_k` and `tail_samples` are the cache's own: the job reads
    whatever it holds."""
    expected = dict(identity.key)
    if explicit_folder:
        expected.pop("top_k")
        expected.pop("tail_samples", None)
    # Compared both ways: a cache built across tokenizers is not read as one of the teacher's
    # tokenizer only, nor the other way round.
    expected["cross_tokenizer"] = bool(expected.get("cross_tokenizer"))
    found = {name: manifest.key.get(name) for name in expected}
    found["cross_tokenizer"] = bool(found["cross_tokenizer"])
    differing = [_KEY_NAMES[name] for name in differences(expected, found)]
    for split, fingerprint in identity.data.items():
        info = manifest.splits.get(split)
        if info is None:
            differing.append(f"data.{split} (the cache has no {split} split)")
        elif info.data != fingerprint:
            differing.append(f"data.{split} (or train.seq_len)")
    if differing:
        raise CacheError(f"the teacher cache in {identity.folder} was built for a different {', '.join(differing)}; {fix}")
