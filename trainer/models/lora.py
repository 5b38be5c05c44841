"""LoRA on the student: which modules it targets (found for any architecture) and applying it with peft."""

from __future__ import annotations

import logging

from torch import nn

from trainer.models.loading import ModelError, build_on_meta

log = logging.getLogger(__name__)


def find_lora_targets(model: nn.Module) -> list[str]:
    """Leaf names of every linear layer inside the blocks: q_proj/.../down_proj on Llama,
    c_attn/c_proj/c_fc on GPT-2 (Conv1D), query_key_value/dense_* on GPT-NeoX. The output
    head is excluded: adapting the vocabulary projection costs much and helps little."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if module is head or not isinstance(module, (nn.Linear, Conv1D)):
            continue
        names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_lora_targets(config, peft_cfg, trust_remote_code: bool) -> list[str]:
    """The LoRA targets `apply_lora` will use, found on the student built from its config on the
    meta device, so a wrong name costs nothing."""
    return lora_targets(build_on_meta(config, trust_remote_code), peft_cfg.target_modules)


def lora_targets(model: nn.Module, targets) -> list[str]:
    """`targets` ('all-linear' or a list of module names) resolved on `model`, or ModelError."""
    if targets == "all-linear":
        targets = find_lora_targets(model)
    else:
        targets = [targets] if isinstance(targets, str) else list(targets)
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in present]
        if missing:
            raise ModelError(
                f"peft.target_modules {missing} match no module of the student; "
                f"use peft.target_modules=all-linear or names from {find_lora_targets(model)}."
            )
    if not targets:
        raise ModelError("the student has no linear layers for LoRA; use peft=none for full fine-tuning.")
    return targets


def apply_lora(model: nn.Module, peft_cfg):
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, peft_cfg.target_modules)
    lora = LoraConfig(
        fan_in_fan_out=_targets_are_conv1d(model, targets),
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    # Keep adapters in the base model's dtype: fp32 adapters on a bf16 base break ZeRO-3's
    # all-gather (TRL #6089, DeepSpeed #8072).
    return get_peft_model(model, lora, autocast_adapter_dtype=False), targets


def _targets_are_conv1d(model: nn.Module, targets: list[str]) -> bool:
    """GPT-2-style Conv1D stores its weight transposed; peft must be told so."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets)
