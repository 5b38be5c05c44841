"""DeepSpeed engines for the frozen teacher and the trained student.

The teacher gets an engine with no optimizer. Partitioned (ZeRO-3) it keeps only its parameter
shards and gathers each layer just in time for the forward; replicated (stage 0) every rank holds
it whole. Following TRL and DeepSpeed-Chat, it is partitioned by default exactly when the student
is, since a ZeRO-3 student means the models are too big to replicate.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Precision:
    """The job's one decision on precision: every model, DeepSpeed config and FLOP peak reads it."""

    bf16: bool
    """Train in bf16 (DeepSpeed's `bf16.enabled`)."""
    default_dtype: torch.dtype
    """What a model with `dtype: auto` loads in."""

    def model_dtype(self, requested: str) -> torch.dtype:
        """The dtype a model loads in: its `dtype` key (`float32`, `bfloat16`, ...), or the default for `auto`."""
        return self.default_dtype if requested == "auto" else getattr(torch, requested)


def precision(train_cfg, device: torch.device) -> Precision:
    """Whether to train in bf16 (`train.precision=auto`: on GPUs), and the dtype models load in by default."""
    bf16 = train_cfg.precision == "bf16" or (train_cfg.precision == "auto" and device.type == "cuda")
    return Precision(bf16, torch.bfloat16 if bf16 else torch.float32)


@dataclass(frozen=True)
class EngineConfigs:
    """Each model's DeepSpeed config, built once per job from the `deepspeed` and `train` groups."""

    student: dict
    teacher: dict
    """The student's, at ZeRO stage 3 when the teacher is partitioned, else 0 (no optimizer states)."""
    teacher_sharded: bool


def engine_configs(deepspeed_cfg, train_cfg, teacher_cfg, precision: Precision, world_size: int) -> EngineConfigs:
    student = deepspeed_config(deepspeed_cfg, train_cfg, precision.bf16, world_size)
    sharded = teacher_is_sharded(teacher_cfg, deepspeed_cfg)
    return EngineConfigs(student, teacher_deepspeed_config(student, sharded), sharded)


def deepspeed_config(deepspeed_cfg, train_cfg, bf16: bool, world_size: int) -> dict:
    """The JSON config DeepSpeed reads, from the `deepspeed` and `train` groups."""
    stage = deepspeed_cfg.stage
    zero = {"stage": stage}
    if stage == 3:
        # Save adapters and full students by gathering explicitly (checkpoints.py), not via 16-bit dumps.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if deepspeed_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if deepspeed_cfg.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": train_cfg.micro_batch_size,
        "gradient_accumulation_steps": train_cfg.grad_accum,
        "train_batch_size": train_cfg.micro_batch_size * train_cfg.grad_accum * world_size,
        "gradient_clipping": deepspeed_cfg.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # ZeRO vets optimizers by exact class; ours is torch's AdamW plus a skip (nonfinite.py).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our own logger reports progress
        "wall_clock_breakdown": False,
    }
    from omegaconf import OmegaConf

    return _deep_merge(config, OmegaConf.to_container(deepspeed_cfg.extra, resolve=True))


def teacher_is_sharded(teacher_cfg, deepspeed_cfg) -> bool:
    return teacher_cfg.shard if teacher_cfg.shard is not None else deepspeed_cfg.stage == 3


def teacher_deepspeed_config(student_config: dict, sharded: bool) -> dict:
    config = copy.deepcopy(student_config)
    config["zero_optimization"] = {"stage": 3 if sharded else 0}
    return config


def build_teacher_engine(teacher: nn.Module, ds_config: dict):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=teacher, config=ds_config)
    engine.eval()
    return engine


def build_student_engine(student: nn.Module, ds_config: dict, train_cfg):
    """The engine and its optimizer: torch's AdamW, not DeepSpeed's fused Adam (no compiled ops,
    CPU included), made to skip non-finite steps."""
    import deepspeed

    from trainer.models.optimizer import SkippingAdamW

    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = SkippingAdamW(trainable, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup=train_cfg.warmup_steps, total=train_cfg.max_steps)
    )
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    _skip_lone_replica_allreduce(engine, ds_config)
    return engine, optimizer


def _skip_lone_replica_allreduce(engine, ds_config: dict) -> None:
    """One replica has nothing to average with: at stage 0 on one rank DeepSpeed would still flatten
    every gradient into a bucket, all-reduce it with itself, divide it by 1 and copy it back, every
    step (2% of a step at bench_e2e's tiny shape). The result is the same without it, bit for bit.
    Stages 1-3 keep it: their optimizers do their own bookkeeping in that path."""
    import torch.distributed as dist

    alone = not dist.is_initialized() or dist.get_world_size() == 1
    if alone and ds_config["zero_optimization"]["stage"] == 0:
        engine.enable_backward_allreduce = False


def warmup_cosine(step: int, *, warmup: int, total: int, floor: float = 0.1) -> float:
    """LR multiplier: linear up to 1 over `warmup` steps, then cosine down to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(total - warmup, 1))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def param_bytes_on_rank(model: nn.Module) -> int:
    """Bytes of parameters this rank holds: its shard under ZeRO-3, everything otherwise."""
    total = 0
    for param in model.parameters():
        local = param.ds_tensor if hasattr(param, "ds_tensor") else param
        total += local.numel() * local.element_size()
    return total


def param_bytes_full(model: nn.Module) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())


def _deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
