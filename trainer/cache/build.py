"""Building a teacher cache: the teacher runs once over every split and its top-k is written shard by shard.

Shards are dealt round-robin to ranks. Which rank computes a shard changes nothing in it (rows are
batched the same way within a shard), so a build resumed on another number of ranks writes the same
files. Under ZeRO-3 every forward is collective, so ranks run in lockstep (see `in_lockstep`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.cache.cross import TOKENIZER_FOLDER, teacher_side_splits, with_positions
from trainer.cache.identity import CacheIdentity, check_matches, job_identity
from trainer.cache.store import Manifest, RowTopK, SplitInfo, read_manifest, shard_path, write_manifest, write_shard
from trainer.cache.tail import draw_seed, top_and_sampled_tail
from trainer.config import cache_root
from trainer.data.batching import collate, to_device
from trainer.data.tokenize import TokenizedRow
from trainer.losses import PADDING_ID, default_chunk_size
from trainer.losses.objective import targets_at_each_position
from trainer.losses.settings import IGNORE_INDEX
from trainer.models import engines
from trainer.models.heads import Scorer, fused_unsupported_reason
from trainer.models.probes import check_head_parity
from trainer.models.teacher import load_teacher
from trainer.preflight.sequence import Preflight, check
from trainer.ranks import RankInfo, broadcast_object, in_lockstep

log = logging.getLogger(__name__)


@dataclass
class _Batch:
    """One micro-batch of one shard; the shard is written after its last batch."""

    split: str
    shard: int
    index: int
    """Its place within the shard, which seeds its tail draws."""
    rows: list[TokenizedRow]
    last_of_shard: bool
    sides: list | None = None
    """Across tokenizers, each row's :class:`~trainer.data.pairing.TeacherSideRow`."""


def build_cache(cfg, rank: RankInfo) -> Path:
    """Build (or finish) the cache for this config; returns its folder."""
    preflight = check(cfg, rank, "cache")  # the cache is the teacher's outputs, made to train students
    across = bool(cfg.loss.cross_tokenizer)
    identity = job_identity(cfg.teacher, preflight, cache_root(cfg), cross_tokenizer=across)
    manifest = _start_manifest(cfg, identity, preflight, rank)
    if across and rank.is_main:  # a student job reads the teacher's tokenizer from here (trainer/cache/cross.py)
        preflight.tokenizer.save_pretrained(str(identity.folder / TOKENIZER_FOLDER))
    if manifest.complete:
        log.info("cache: %s is already complete", identity.folder)
        return identity.folder
    todo = broadcast_object(_missing_shards(identity.folder, manifest) if rank.is_main else None)
    log.info("cache: %d of %d shards to compute in %s", len(todo),
             sum(info.num_shards for info in manifest.splits.values()), identity.folder)
    # The job's precision and DeepSpeed layout: the cache is built as the teacher would run in training.
    precision = engines.precision(cfg.train, rank.device)
    configs = engines.engine_configs(cfg.deepspeed, cfg.train, cfg.teacher, precision, rank.world_size)
    engine, _ = load_teacher(cfg.teacher, configs, precision, rank)
    scorer = _teacher_scorer(cfg.loss.fused, engine, preflight.vocab_size, rank)
    # Across tokenizers, the rows as the teacher's side of a pairing holds them (any student's).
    sides = teacher_side_splits(preflight.sources, preflight.tokenizer, cfg.train.seq_len) if across else None
    rows = ({name: [side.row for side in split] for name, split in sides.items()} if across
            else {name: examples.rows for name, examples in preflight.splits.items()})
    _compute_shards(cfg, scorer, identity.folder, manifest, rows, sides, todo[rank.rank::rank.world_size],
                    preflight.tokenizer, rank, collective=configs.teacher_sharded)
    dist.barrier()
    if rank.is_main:
        manifest.complete = True
        write_manifest(identity.folder, manifest)
        log.info("cache: complete in %s", identity.folder)
    dist.barrier()
    return identity.folder


def _start_manifest(cfg, identity: CacheIdentity, preflight: Preflight, rank: RankInfo) -> Manifest:
    """The folder's manifest if it is this cache (resuming), a new one if the folder is empty; a
    cache of anything else is refused, never overwritten."""
    existing = read_manifest(identity.folder)
    if existing is not None:
        check_matches(existing, identity, explicit_folder=False,
                      fix="nothing was overwritten; set teacher.cache to a new folder for this cache.")
        return existing
    manifest = Manifest(
        key=identity.key, teacher={"path": cfg.teacher.path, "revision": cfg.teacher.revision},
        dtype=cfg.teacher.cache_dtype, vocab_size=preflight.vocab_size,
        splits={name: SplitInfo(data=identity.data[name], source=str(preflight.sources[name]),
                                rows=len(examples), shard_rows=cfg.teacher.cache_shard_rows)
                for name, examples in preflight.splits.items()},
    )
    dist.barrier()  # every rank has read the folder before rank 0 writes to it
    if rank.is_main:
        write_manifest(identity.folder, manifest)
    return manifest


def _missing_shards(folder: Path, manifest: Manifest) -> list[tuple[str, int]]:
    return [(split, shard) for split, info in sorted(manifest.splits.items()) for shard in range(info.num_shards)
            if not shard_path(folder, split, shard).is_file()]


def _teacher_scorer(fused_wanted: bool, engine, vocab_size: int, rank: RankInfo) -> Scorer:
    fused = fused_wanted and fused_unsupported_reason(engine.module) is None
    scorer = Scorer(engine, vocab_size, fused)
    if fused:
        check_head_parity("teacher", engine, scorer.tap, scorer.head, rank.device)
    return scorer


def _compute_shards(cfg, scorer: Scorer, folder: Path, manifest: Manifest, splits: dict[str, list[TokenizedRow]],
                    sides: dict | None, mine: list, tokenizer, rank: RankInfo, collective: bool) -> None:
    """`collective`: the teacher is partitioned, so every forward needs every rank (see in_lockstep).
    `sides`: across tokenizers, each row's teacher side, whose positions and offsets are stored too."""
    batch_size = cfg.train.micro_batch_size
    work = []
    for split, shard in mine:
        shard_rows = manifest.splits[split].shard_rows
        span = slice(shard * shard_rows, (shard + 1) * shard_rows)
        rows, row_sides = splits[split][span], sides[split][span] if sides else None
        starts = range(0, len(rows), batch_size)
        work += [_Batch(split, shard, i, rows[s:s + batch_size], s == starts[-1],
                        row_sides[s:s + batch_size] if row_sides else None) for i, s in enumerate(starts)]
    dtype = getattr(torch, manifest.dtype)
    entries = Entries(manifest.key["top_k"], manifest.key.get("tail_samples", 0))
    chunk_size = cfg.loss.chunk_size or default_chunk_size(scorer.vocab_size)
    pending: list[RowTopK] = []

    def run(item: _Batch) -> None:
        batch = to_device(collate(item.rows, tokenizer.pad_token_id), rank.device)
        draws = torch.Generator(rank.device).manual_seed(draw_seed(item.split, item.shard, item.index))
        found = batch_top_k(scorer, batch, entries, chunk_size, draws)
        if item.sides is not None:
            found = [with_positions(row, side) for row, side in zip(found, item.sides)]
        pending.extend(found)
        if item.last_of_shard:
            write_shard(shard_path(folder, item.split, item.shard), pending, dtype)
            log.info("cache: %s shard %d written (%d rows)", item.split, item.shard, len(pending))
            pending.clear()

    def filler() -> None:
        probe = torch.full((1, 1), tokenizer.pad_token_id, device=rank.device)
        scorer.states({"input_ids": probe, "attention_mask": torch.ones_like(probe)})
        with scorer.gathered():
            pass

    with torch.no_grad():
        in_lockstep(work, run, filler, collective=collective)


@dataclass
class Entries:
    """What a cache keeps per position: ``top_k`` entries, the last ``tail_samples`` of them drawn
    from the teacher's tail (:mod:`trainer.cache.tail`) rather than its next most likely tokens."""

    top_k: int
    tail_samples: int = 0


def batch_top_k(scorer: Scorer, batch: dict, entries: Entries, chunk_size: int,
                draws: torch.Generator | None = None) -> list[RowTopK]:
    """The teacher's top-k (or top and sampled tail) at each supervised position of each row of a collated batch."""
    top_k = entries.top_k
    targets = targets_at_each_position(batch["labels"])
    flat_targets = targets.reshape(-1)
    states = scorer.states(batch)
    rows = states.reshape(flat_targets.shape[0], -1)
    supervised = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
    kept = min(top_k, scorer.vocab_size)
    values, ids, target_logprobs = [], [], []
    with scorer.gathered():
        for start in range(0, supervised.numel(), chunk_size):
            index = supervised[start:start + chunk_size]
            logprobs = F.log_softmax(scorer.logits_of(rows.index_select(0, index)), dim=-1)
            chunk_values, chunk_ids = _entries_of(logprobs, kept, entries.tail_samples, draws)
            values.append(chunk_values)
            ids.append(chunk_ids)
            target_logprobs.append(logprobs.gather(1, flat_targets.index_select(0, index).unsqueeze(1)).squeeze(1))
    values = F.pad(torch.cat(values) if values else torch.zeros(0, kept), (0, top_k - kept)).cpu()
    ids = F.pad(torch.cat(ids) if ids else torch.zeros(0, kept, dtype=torch.long), (0, top_k - kept),
                value=PADDING_ID).cpu()
    target_logprobs = torch.cat(target_logprobs).cpu() if target_logprobs else torch.zeros(0)
    counts = (targets != IGNORE_INDEX).sum(dim=1).tolist()
    return [RowTopK(*parts) for parts in zip(values.split(counts), ids.split(counts), target_logprobs.split(counts))]


def _entries_of(logprobs, kept: int, tail_samples: int, draws) -> tuple[torch.Tensor, torch.Tensor]:
    if tail_samples and kept < logprobs.shape[-1]:
        return top_and_sampled_tail(logprobs, kept, tail_samples, draws)
    top = logprobs.topk(kept, dim=-1)  # a vocabulary no larger than k is listed whole: no tail to draw
    return top.values, top.indices
