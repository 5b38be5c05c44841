"""The frozen teacher behind a DeepSpeed engine: partitioned with ZeRO-3 or replicated."""

from __future__ import annotations

import logging

import torch.distributed as dist

from trainer.models import engines, loading
from trainer.ranks import RankInfo

log = logging.getLogger(__name__)


def load_teacher(cfg, rank: RankInfo):
    """The teacher's inference engine, and what it holds per rank (for summary.json)."""
    bf16, default_dtype = engines.precision(cfg, rank.device)
    student_ds = engines.deepspeed_config(cfg, cfg.deepspeed.stage, bf16, rank.world_size)
    sharded = engines.teacher_is_sharded(cfg)
    teacher_ds = engines.teacher_deepspeed_config(student_ds, sharded)
    dtype = default_dtype if cfg.teacher.dtype == "auto" else loading.torch_dtype(cfg.teacher.dtype, rank.device)
    teacher = loading.freeze(loading.load_model("teacher", cfg.teacher, dtype, teacher_ds if sharded else None))
    return engines.build_teacher_engine(teacher, teacher_ds), _bytes_held(teacher, sharded, rank)


def _bytes_held(teacher, sharded: bool, rank: RankInfo) -> dict:
    per_rank = [None] * rank.world_size
    dist.all_gather_object(per_rank, engines.param_bytes_on_rank(teacher))
    full = engines.param_bytes_full(teacher)
    log.info("teacher parameters held per rank: %s bytes of %d (%s)", per_rank, full,
             "partitioned with ZeRO-3" if sharded else "replicated")
    return {"teacher/param_bytes_per_rank": per_rank, "teacher/param_bytes_full": full, "teacher/sharded": sharded}
