"""What a training step costs and achieves: model FLOPs, FLOP/s, MFU, data-loading share, peak memory.

FLOPs are *model* FLOPs, the work the maths needs, as published MFU figures count them (PaLM,
Megatron, torchtitan): recomputation under activation checkpointing and padding are not counted.
Per token of a row of T tokens, with N the weights a token multiplies (every linear layer and the
LM head; not the embedding lookup), L layers and an attention width of d (heads × head size):

- teacher, forward only: ``2·N + 4·L·d·T``;
- student: forward plus the backward to its inputs: ``4·N_frozen + 12·L·d·T``, and
  ``6·N_trainable`` for the weights that learn (LoRA adapters, or the whole model without LoRA);
- a teacher read from a cache, or none (``loss.kind=sft``): 0.

The attention term counts the whole T×T score matrix (no causal halving), the convention of the
published MFU figures this is compared with.
"""

from __future__ import annotations

import re
import resource
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

# Dense bf16 tensor-core peaks in FLOP/s, by whole words of torch.cuda.get_device_name(), first match wins.
# Sources: NVIDIA's data sheets (H100/H200 SXM 989.4 TFLOP/s, H100 PCIe 756, A100 312, L40S 362.05,
# L4 121, A10 125, B200 2250 dense).
BF16_PEAK_FLOPS = {
    "H200": 989.4e12,
    "H100 PCIe": 756.0e12,
    "H100": 989.4e12,
    "A100": 312.0e12,
    "L40S": 362.05e12,
    "L4": 121.0e12,
    "A10": 125.0e12,
    "B200": 2250.0e12,
}


@dataclass(frozen=True)
class ModelCost:
    """FLOPs of one model per token: ``per_token + per_token_per_length · T`` for a row of T tokens."""

    per_token: float = 0.0
    per_token_per_length: float = 0.0

    def __add__(self, other: "ModelCost") -> "ModelCost":
        return ModelCost(self.per_token + other.per_token, self.per_token_per_length + other.per_token_per_length)

    def of_rows(self, lengths: list[int]) -> float:
        """FLOPs over documents of these (unpadded) lengths (trainer.data.packing.document_lengths)."""
        return sum(length * (self.per_token + self.per_token_per_length * length) for length in lengths)


def teacher_cost(model: nn.Module) -> ModelCost:
    """A frozen model's forward."""
    return ModelCost(2.0 * _linear_weights(model, trainable=None), 4.0 * _attention_width_sum(model))


def student_cost(model: nn.Module) -> ModelCost:
    """A model trained by backpropagation: forward, backward to the inputs, and weight gradients of
    the parameters that learn."""
    frozen, learning = _linear_weights(model, trainable=False), _linear_weights(model, trainable=True)
    return ModelCost(4.0 * frozen + 6.0 * learning, 12.0 * _attention_width_sum(model))


def _linear_weights(model: nn.Module, trainable: bool | None) -> float:
    """Weights of the linear layers (LM head included), all or only the (non-)trainable ones. Under
    ZeRO-3 a parameter's local tensor is empty and `ds_numel` holds its size."""
    from transformers.pytorch_utils import Conv1D

    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, Conv1D)) and (trainable is None or module.weight.requires_grad == trainable):
            total += getattr(module.weight, "ds_numel", module.weight.numel())
    return float(total)


def _attention_width_sum(model: nn.Module) -> float:
    """L·d: the layers' attention widths summed (0 when the config does not say)."""
    config = getattr(model, "config", None)
    if config is None:
        return 0.0
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    if not (layers and heads and hidden):
        return 0.0
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return float(layers * heads * head_dim)


def peak_flops(device: torch.device, bf16: bool, configured: float | None) -> float | None:
    """The device's peak FLOP/s for MFU: `train.peak_tflops` if set, else the table's bf16 peak for
    a known GPU training in bf16; None (no MFU, FLOP/s only) otherwise, e.g. on CPU."""
    if configured:
        return configured * 1e12
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    # Whole words only: "L4" must not match an L40, nor "A10" an A10G.
    return next((peak for fragment, peak in BF16_PEAK_FLOPS.items() if re.search(rf"\b{fragment}\b", name)), None)


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory so far: allocated GPU memory on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


class Stopwatch:
    """Seconds spent inside `with stopwatch:` blocks, summed until read."""

    def __init__(self):
        self.seconds = 0.0
        self._started = 0.0

    def __enter__(self):
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._started
        return False

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


@dataclass
class Work:
    """What all ranks did over some seconds of training: a log window, or every window of the run."""

    seconds: float = 0.0
    input_tokens: float = 0.0
    flops: float = 0.0
    data_seconds: float = 0.0
    """Summed over ranks."""

    def __add__(self, other: "Work") -> "Work":
        return Work(self.seconds + other.seconds, self.input_tokens + other.input_tokens,
                    self.flops + other.flops, self.data_seconds + other.data_seconds)

    def rates(self, peak: float | None, world_size: int) -> dict:
        """tokens/s and model FLOP/s of all ranks, MFU (None without a peak), data-loading share."""
        seconds = max(self.seconds, 1e-9)
        return {
            "tokens_per_s": self.input_tokens / seconds,
            "tflops_per_s": self.flops / seconds / 1e12,
            "mfu": self.flops / seconds / (peak * world_size) if peak else None,
            "data_share": self.data_seconds / world_size / seconds,
        }
