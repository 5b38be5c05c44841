"""The student users load: `adapter/` (LoRA), `model/` (full fine-tuning) and `merged/`, saved with `save_pretrained`."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.files import honour_umask
from trainer.train.checkpoints import CheckpointError, _free_space, _write_failure_reason

log = logging.getLogger(__name__)


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
        with _export_failures_reported(out_dir):
            model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(str(out_dir))
            honour_umask(out_dir)  # colleagues on a shared filesystem load the adapter too
    dist.barrier()
    return out_dir


@contextlib.contextmanager
def _export_failures_reported(out_dir: Path):
    """A failed export (a full disk, at the very end) costs no training: the final checkpoint was
    published first, and a job resumed at train.max_steps only exports."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        raise CheckpointError(
            f"writing {out_dir} failed ({_write_failure_reason(error, out_dir)}; {_free_space(out_dir)}), so its "
            "files are incomplete; the final checkpoint is intact: free some space and run the same command again, "
            "which writes them from it without training.") from None


def export_merged(student_cfg, adapter_dir: Path, run_dir: Path, dtype: torch.dtype) -> Path:
    """Base student + adapter folded into plain weights, loaded back the way a user would."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from trainer.models.loading import load_model

    base = load_model("student", student_cfg, dtype, zero3_config=None)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out_dir = run_dir / "merged"
    with _export_failures_reported(out_dir):
        merged.save_pretrained(str(out_dir), safe_serialization=True)
        AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(out_dir))
        honour_umask(out_dir)
    return out_dir
