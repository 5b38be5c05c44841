"""Resumable training state (`checkpoints/`) and the outputs users load (`adapter/`, `model/`, `merged/`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


def find_resume_point(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint folder to continue from, or None for a fresh start.

    DeepSpeed's rank 0 writes the `latest` marker after its own files, without waiting for the
    other ranks or writing atomically: a crash mid-save can leave `latest` naming an incomplete
    tag. Publishing checkpoints atomically is the fault-tolerance issue's work."""
    if resume == "never":
        return None
    root = run_dir / CHECKPOINTS if resume == "auto" else Path(resume)
    return root if (root / "latest").exists() else None


def save_training_state(engine, run_dir: Path, step: int, tokens_seen: int) -> None:
    # Frozen base weights are reloaded from the model folder; saving them would cost a copy of
    # the whole student per checkpoint for a LoRA run.
    engine.save_checkpoint(
        str(run_dir / CHECKPOINTS),
        tag=f"step_{step:08d}",
        client_state={"step": step, "tokens_seen": tokens_seen},
        exclude_frozen_parameters=True,
    )


def load_training_state(engine, checkpoint_root: Path) -> dict:
    path, client_state = engine.load_checkpoint(str(checkpoint_root), load_module_strict=False)
    if path is None:
        raise RuntimeError(f"no checkpoint could be loaded from {checkpoint_root}; start with resume=never.")
    log.info("resumed from %s at step %d", path, client_state["step"])
    return client_state


def gathered_state_dict(model: torch.nn.Module, trainable_only: bool, is_main: bool) -> dict:
    """Full tensors of the student's (trainable) parameters on rank 0.

    Under ZeRO-3 each rank holds a shard: every rank must join each gather. One parameter at a
    time keeps the peak at one full tensor, not one full model."""
    import deepspeed

    state = {}
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if is_main:
                state[name] = param.detach().to("cpu", copy=True)
    return state


def export_student(model, tokenizer, run_dir: Path, peft_kind: str, is_main: bool) -> Path:
    """`adapter/` (LoRA, safetensors) or `model/` (full fine-tuning), loadable with peft/transformers."""
    state = gathered_state_dict(model, trainable_only=peft_kind == "lora", is_main=is_main)
    out_dir = run_dir / ("adapter" if peft_kind == "lora" else "model")
    if is_main:
        model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
    dist.barrier()
    return out_dir


def export_merged(student_path: str, adapter_dir: Path, run_dir: Path, dtype: torch.dtype) -> Path:
    """Base student + adapter folded into plain weights, loaded back the way a user would."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(os.path.expanduser(student_path), dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out_dir = run_dir / "merged"
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(out_dir))
    return out_dir
