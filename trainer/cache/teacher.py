"""The teacher as a cache presents it to the trainer and the evaluation: no model, only disk reads."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainer.cache.identity import check_matches, job_identity
from trainer.cache.store import CacheError, CacheReader, read_manifest
from trainer.losses import SparseTeacher, sparse_per_token_divergence
from trainer.losses.sparse import check_sparse_teacher

if TYPE_CHECKING:
    from trainer.preflight.sequence import Preflight
from trainer.models.teacher import Teacher

log = logging.getLogger(__name__)


@dataclass
class CachedStates:
    """A batch's cached teacher: top-k ``[B, T, k]`` and the log-probability of each target ``[B, T]``,
    both aligned with :func:`~trainer.losses.objective.targets_at_each_position`."""

    sparse: SparseTeacher
    target_logprobs: torch.Tensor


class CachedTeacher(Teacher):
    """The teacher of one data split as its cache holds it: top-k and the log-probability of each
    target, read by the rows' indices on the host. No model runs.

    `reading`: a context manager each read runs in. The training step's teacher is given the
    job's data-loading stopwatch: a disk read is data loading, which the step waits on as on rows."""

    def __init__(self, reader: CacheReader, split: str, device: torch.device, reading=None):
        self.reader, self.split, self.device = reader, split, device
        self.reading = reading if reading is not None else contextlib.nullcontext()

    def read(self, host_batch: dict) -> CachedStates:
        """The batch's cached top-k; checked on the host, where the rows were read, then moved."""
        with self.reading:
            labels = host_batch["labels"].cpu()
            sparse, target_logprobs = self.reader.batch(self.split, host_batch["row_index"].cpu(), labels)
            check_sparse_teacher(sparse, self.reader.manifest.vocab_size, labels.shape)
            return CachedStates(
                SparseTeacher(sparse.logprobs.to(self.device), sparse.ids.to(self.device), checked=True),
                target_logprobs.to(self.device),
            )

    def states(self, batch: dict, host_batch: dict) -> SparseTeacher:
        return self.read(host_batch).sparse

    def evaluation_terms(self, batch: dict, host_batch: dict):
        """A cache knows only its top-k: the KL is over the top-k plus one tail outcome (a lower
        bound of the full KL, tight when the tail is small), and the CE is the stored
        log-probability of each target."""
        cached = self.read(host_batch)
        sparse = cached.sparse.flatten()
        target_logprobs = cached.target_logprobs.reshape(-1)

        def terms(index, student_logits, student_logp, targets):
            chunk = sparse.rows(index)
            kl = sparse_per_token_divergence(student_logits, chunk, kind="fkl").sum()
            return kl, -target_logprobs.index_select(0, index).sum(), chunk.ids[:, 0]

        return terms


def open_cache(teacher_cfg, loss_kind: str, preflight: Preflight, cache_root: Path) -> CacheReader:
    """The cache this job reads, after checking it was built from this job's teacher, tokenizer and
    data (as its `preflight` fingerprinted them)."""
    identity = job_identity(teacher_cfg, preflight, cache_root)
    # Across tokenizers the cache scores the teacher's own ids.
    vocab_size = preflight.teacher_vocab_size if preflight.cross_tokenizer else preflight.vocab_size
    explicit = teacher_cfg.cache != "auto"
    build = "build it with python -m trainer.cache and the same overrides as this job"
    if read_manifest(identity.folder) is None:
        where = "for this teacher, data and teacher.top_k " if not explicit else ""
        raise CacheError(f"there is no teacher cache {where}in {identity.folder}; {build}.")
    reader = CacheReader(identity.folder)
    check_matches(reader.manifest, identity, explicit_folder=explicit,
                  fix=f"{build}, or point teacher.cache at the cache that was.")
    if reader.manifest.vocab_size != vocab_size:
        whose = "teacher's tokenizer" if preflight.cross_tokenizer else "tokenizer"
        raise CacheError(f"the teacher cache in {identity.folder} scores {reader.manifest.vocab_size} token ids but "
                         f"this job's {whose} has {vocab_size}; {build}.")
    tail_samples = reader.manifest.key.get("tail_samples", 0)
    if tail_samples and loss_kind == "rkl":
        raise CacheError(f"the teacher cache in {identity.folder} draws its tail (teacher.tail_samples={tail_samples}), "
                         "against which reverse KL is unbounded; use loss.kind=srkl for a mode-seeking loss, or a "
                         "cache built with teacher.tail_samples=0.")
    log.info("teacher: read from the cache in %s (top-%d, %d of them drawn from the tail; teacher %s); no teacher "
             "is loaded", identity.folder, reader.top_k, tail_samples, reader.manifest.teacher)
    return reader
