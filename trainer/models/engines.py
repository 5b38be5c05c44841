"""DeepSpeed engines for the frozen teacher and the trained student.

The teacher gets an engine with no optimizer. Partitioned (ZeRO-3) it keeps only its parameter
shards and gathers each layer just in time for the forward; replicated (stage 0) every rank holds
it whole. Following TRL and DeepSpeed-Chat, it is partitioned by default exactly when the student
is, since a ZeRO-3 student means the models are too big to replicate.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def deepspeed_config(cfg, stage: int, bf16: bool, world_size: int) -> dict:
    """The JSON config DeepSpeed reads, from the `deepspeed` and `train` groups."""
    zero = {"stage": stage}
    if stage == 3:
        # Save adapters and full students by gathering explicitly (checkpoints.py), not via 16-bit dumps.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.deepspeed.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.micro_batch_size * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.deepspeed.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # ZeRO vets optimizers by exact class; ours is torch's AdamW plus a skip (nonfinite.py).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our own logger reports progress
        "wall_clock_breakdown": False,
    }
    from omegaconf import OmegaConf

    return _deep_merge(config, OmegaConf.to_container(cfg.deepspeed.extra, resolve=True))


def precision(cfg, device: torch.device) -> tuple[bool, torch.dtype]:
    """Whether to train in bf16 (auto: on GPUs), and the dtype models load in by default."""
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    return bf16, torch.bfloat16 if bf16 else torch.float32


def teacher_is_sharded(cfg) -> bool:
    return cfg.teacher.shard if cfg.teacher.shard is not None else cfg.deepspeed.stage == 3


def teacher_deepspeed_config(student_config: dict, sharded: bool) -> dict:
    config = copy.deepcopy(student_config)
    config["zero_optimization"] = {"stage": 3 if sharded else 0}
    return config


def build_teacher_engine(teacher: nn.Module, ds_config: dict):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=teacher, config=ds_config)
    engine.eval()
    return engine


def build_student_engine(student: nn.Module, ds_config: dict, cfg):
    """The engine and its optimizer: torch's AdamW, not DeepSpeed's fused Adam (no compiled ops,
    CPU included), made to skip non-finite steps."""
    import deepspeed

    from trainer.models.optimizer import SkippingAdamW

    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = SkippingAdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup=cfg.train.warmup_steps, total=cfg.train.max_steps)
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
