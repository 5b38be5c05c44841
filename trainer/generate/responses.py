"""The teacher answers every prompt; the answers are written as a dataset the trainer reads.

    <out>/train.jsonl       one row per (prompt, sample), in prompt order: prompt/response or messages rows
    <out>/generation.json   who generated it and how (teacher, sampling settings), and whether it is complete
    <out>/shards/00000.jsonl, ...   the same rows, `generate.shard_rows` prompts per shard

Shards are written whole (temporary name, then rename) and dealt round-robin to ranks. Each shard
seeds its own sampling from `generate.seed` and its index, so a resumed or re-ranked run writes the
same rows; under ZeRO-3 ranks generate in lockstep (`synced_gpus`), since every forward is collective.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.cache.key import differences
from trainer.config import ConfigError
from trainer.data.sources import read_rows
from trainer.files import write_text_atomically
from trainer.generate.prompts import Prompt, read_prompt
from trainer.generate.sampling import fill_sampling
from trainer.models import engines
from trainer.models.teacher import load_teacher
from trainer.preflight.sequence import check
from trainer.ranks import RankInfo, broadcast_object, in_lockstep

log = logging.getLogger(__name__)

MANIFEST = "generation.json"
DATASET = "train.jsonl"


@dataclass
class _Batch:
    shard: int
    prompts: list[Prompt]
    last_of_shard: bool
    first_of_shard: bool


def generate_dataset(cfg, rank: RankInfo) -> Path:
    """Write (or finish) the generated dataset; returns the path of its train.jsonl."""
    preflight = check(cfg, rank, "generate")  # the responses are the teacher's outputs, made to train students
    tokenizer = preflight.tokenizer
    fill_sampling(cfg.generate, preflight.models["teacher"].folder, log_it=rank.is_main)
    prompts = [read_prompt(row, origin, tokenizer) for origin, row in read_rows(cfg.generate.prompts, key="generate.prompts")]
    out = Path(cfg.generate.out).expanduser()
    record = broadcast_object(_record(cfg, preflight.teacher_weights, prompts) if rank.is_main else None)
    if _start(out, record, rank):
        log.info("generate: %s is already complete", out / DATASET)
        return out / DATASET
    shard_rows = cfg.generate.shard_rows
    num_shards = -(-len(prompts) // shard_rows)
    todo = broadcast_object([s for s in range(num_shards) if not _shard_path(out, s).is_file()] if rank.is_main else None)
    log.info("generate: %d of %d shards to write in %s", len(todo), num_shards, out)
    precision = engines.precision(cfg.train, rank.device)
    configs = engines.engine_configs(cfg.deepspeed, cfg.train, cfg.teacher, precision, rank.world_size)
    engine, _ = load_teacher(cfg.teacher, configs, precision, rank)
    _generate_shards(cfg.generate, engine.module, tokenizer, prompts, out, todo[rank.rank::rank.world_size], rank,
                     sharded=configs.teacher_sharded)
    dist.barrier()
    if rank.is_main:
        _merge(out, num_shards)
        record["complete"] = True
        write_text_atomically(out / MANIFEST, json.dumps(record, indent=2))
        log.info("generate: %d rows in %s", len(prompts) * cfg.generate.samples_per_prompt, out / DATASET)
    dist.barrier()
    return out / DATASET


def _record(cfg, teacher_weights: str, prompts: list[Prompt]) -> dict:
    """What decides the rows: the teacher's weights (their fingerprint), the prompts and every sampling setting."""
    prompt_rows = json.dumps([p.as_row("") for p in prompts], sort_keys=True).encode()
    settings = {key: cfg.generate[key] for key in ("max_new_tokens", "temperature", "top_p", "top_k",
                                                   "samples_per_prompt", "batch_size", "shard_rows", "seed")}
    return {
        "key": {"teacher": teacher_weights,
                "prompts": hashlib.sha256(prompt_rows).hexdigest(), **settings},
        "teacher": {"path": cfg.teacher.path, "revision": cfg.teacher.revision},
        "prompts": str(cfg.generate.prompts), "rows": len(prompts) * cfg.generate.samples_per_prompt,
        "complete": False,
    }


def _start(out: Path, record: dict, rank: RankInfo) -> bool:
    """True if `out` already holds this complete dataset; refuse a folder that holds another."""
    existing = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else None
    if existing is not None:
        differing = differences(record["key"], existing["key"])
        if differing:
            raise ConfigError(f"{out} holds responses generated with a different {', '.join(differing)}; nothing was "
                              "overwritten: set generate.out to a new folder, or restore those settings to resume.")
        return bool(existing["complete"])
    dist.barrier()  # every rank has looked before rank 0 writes
    if rank.is_main:
        write_text_atomically(out / MANIFEST, json.dumps(record, indent=2))
    return False


def _shard_path(out: Path, shard: int) -> Path:
    return out / "shards" / f"{shard:05d}.jsonl"


def _generate_shards(settings, model, tokenizer, prompts: list[Prompt], out: Path, mine: list[int], rank: RankInfo,
                     sharded: bool) -> None:
    """`settings`: the `generate` group; `sharded`: the teacher is partitioned (its forwards are collective)."""
    work = []
    for shard in mine:
        shard_prompts = prompts[shard * settings.shard_rows:(shard + 1) * settings.shard_rows]
        starts = range(0, len(shard_prompts), settings.batch_size)
        work += [_Batch(shard, shard_prompts[s:s + settings.batch_size], s == starts[-1], s == 0) for s in starts]
    written: list[dict] = []

    def run(item: _Batch) -> None:
        if item.first_of_shard:
            torch.manual_seed(settings.seed * 1_000_003 + item.shard)
        responses = sample(model, tokenizer, [p.ids for p in item.prompts], settings, rank.device, sharded)
        for index, prompt in enumerate(item.prompts):
            per_prompt = responses[index * settings.samples_per_prompt:(index + 1) * settings.samples_per_prompt]
            written.extend(prompt.as_row(text) for text in per_prompt)
        if item.last_of_shard:
            text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in written)
            write_text_atomically(_shard_path(out, item.shard), text)
            log.info("generate: shard %d written (%d rows)", item.shard, len(written))
            written.clear()

    def filler() -> None:
        sample(model, tokenizer, [[tokenizer.eos_token_id]], settings, rank.device, sharded)

    with torch.no_grad():
        in_lockstep(work, run, filler, collective=sharded)


def sample(model, tokenizer, prompt_ids: list[list[int]], settings, device, synced: bool) -> list[str]:
    """`samples_per_prompt` decoded responses per prompt, prompt by prompt, without special tokens."""
    longest = max(len(ids) for ids in prompt_ids)
    pad = tokenizer.pad_token_id
    # Left padding: every prompt ends where generation starts.
    input_ids = torch.tensor([[pad] * (longest - len(ids)) + ids for ids in prompt_ids], device=device)
    attention_mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=device)
    greedy = settings.temperature == 0
    sampling = {} if greedy else {"temperature": settings.temperature, "top_p": settings.top_p,
                                  "top_k": settings.top_k or None}
    output = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=not greedy, **sampling,
        max_new_tokens=settings.max_new_tokens, num_return_sequences=settings.samples_per_prompt,
        pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, synced_gpus=synced,
    )
    return tokenizer.batch_decode(output[:, longest:], skip_special_tokens=True)


def _merge(out: Path, num_shards: int) -> None:
    text = "".join(_shard_path(out, shard).read_text() for shard in range(num_shards))
    write_text_atomically(out / DATASET, text)
