"""Running a model up to its LM head, and the head itself as the fused loss applies it.

The fused loss needs each model's last hidden states and head weights instead of its logits. A
forward pre-hook on the head keeps the head's input and hands the head an empty slice, so the model
runs end to end through its DeepSpeed engine (ZeRO-3 gathering, autocast) yet never builds logits.
What the CausalLM does after its head (Gemma's soft-cap, Cohere's scale) is read from the config
into :class:`~trainer.losses.LMHead`; :func:`check_head_parity` proves at start-up that head(hidden)
reproduces the model's own logits, so an architecture with another quirk is caught, not mistrained.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from trainer.losses import LMHead, head_quirks
from trainer.models.loading import ModelError


def model_inputs(batch: dict) -> dict:
    """What a model is called with. A packed batch (trainer/data/packing.py) passes position ids that
    restart at each document and no padding mask, transformers' packed-sequence format, in which
    each token attends only within its document; a padding mask would turn that off."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


class HiddenTap:
    """Captures the input of a model's LM head while :meth:`hidden_states` runs the model."""

    def __init__(self, model: nn.Module):
        self.head_module = model.get_output_embeddings()
        self.active = False
        self.captured: torch.Tensor | None = None
        # First in line: under ZeRO-3 DeepSpeed's own pre-hook wraps the head's input in a function
        # that expects the head's backward to have run; a tensor taken after it would trip
        # "active_backward_submodules is empty" when the loss's gradient reaches it.
        self.head_module.register_forward_pre_hook(self._take_input, prepend=True)

    def _take_input(self, module, args):
        if not self.active:
            return None
        hidden = args[0]
        self.captured = hidden
        # An empty slice: the head and everything after it run on zero positions.
        return (hidden[..., :0, :],) + tuple(args[1:])

    def hidden_states(self, engine, batch: dict) -> torch.Tensor:
        """``[B, T, H]``: what the head would have been applied to."""
        self.active = True
        try:
            engine(**model_inputs(batch))
        finally:
            self.active = False
        hidden, self.captured = self.captured, None
        if hidden is None:
            raise ModelError("the model never called its output embeddings; set loss.fused=false for this architecture.")
        return hidden


def fused_unsupported_reason(model: nn.Module) -> str | None:
    """Why the fused loss cannot serve this model, or None when it can."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return f"its output head is a {type(head).__name__}, not a plain Linear (is it adapted?)"
    return None


def model_head(model: nn.Module, vocab_size: int) -> LMHead:
    """The head's own parameters (not copies: ZeRO-3 fills them in place when gathered)."""
    head = model.get_output_embeddings()
    return LMHead(weight=head.weight, bias=head.bias, vocab_size=vocab_size, **head_quirks(model.config))


@contextlib.contextmanager
def gathered(*heads: LMHead):
    """Whole head weights for the duration, on every rank.

    Under ZeRO-3 each rank holds a shard, and DeepSpeed gathers a weight only while its own module
    runs forward: a bare read elsewhere sees an empty tensor ("size mismatch ... (0)", TRL #5891).
    A trainable head must stay gathered through the backward too, so that its gradient lands on
    the whole weight before DeepSpeed reduces and partitions it. Every rank must enter this together
    (it is a collective). Elsewhere it does nothing."""
    params = [t for head in heads for t in (head.weight, head.bias) if t is not None]
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


class Scorer:
    """One model behind its engine, as the loss and the evaluation see it.

    Fused: :meth:`states` gives the head's input ``[B, T, H]`` and :meth:`logits_of` applies the
    head to a few rows at a time. Plain: :meth:`states` gives the full logits ``[B, T, V']`` and
    :meth:`logits_of` only slices off padding rows."""

    def __init__(self, engine, vocab_size: int, fused: bool):
        self.engine, self.vocab_size, self.fused = engine, vocab_size, fused
        model = getattr(engine, "module", engine)  # a DeepSpeed engine, or a bare model
        self.head = model_head(model, vocab_size) if fused else None
        self.tap = HiddenTap(model) if fused else None

    def states(self, batch: dict) -> torch.Tensor:
        if self.fused:
            return self.tap.hidden_states(self.engine, batch)
        return self.engine(**model_inputs(batch)).logits

    def logits_of(self, rows: torch.Tensor) -> torch.Tensor:
        """``[C, H]`` hidden rows (fused) or ``[C, V']`` logit rows (plain) -> ``[C, V]`` float32 logits."""
        if self.fused:
            return self.head.logits(rows)
        return rows[:, : self.vocab_size].float()

    def gathered(self):
        """The head weights whole on every rank while the loss or the evaluation reads them."""
        return gathered(self.head) if self.fused else contextlib.nullcontext()
