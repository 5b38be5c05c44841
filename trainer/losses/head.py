"""An LM head as the fused loss applies it: weights plus the model's quirks after the projection."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LMHead:
    """``logits = post(hidden @ weight[:V].T + bias[:V])`` for the first ``V = vocab_size`` ids.

    weight: ``[V', H]`` with ``V' ≥ V`` (checkpoints pad their vocabulary rows: Qwen2.5-7B has
        152064, Qwen2.5-3B 151936, one tokenizer); tied embeddings pass the embedding matrix.
    bias: ``[V']`` or None (GPT-J and Phi-2 heads have one).
    scale: multiplies the logits (Cohere's ``logit_scale``; ``1 / logits_scaling`` for Granite).
    softcap: ``softcap · tanh(z / softcap)`` after scaling (Gemma 2/3 ``final_logit_softcapping``).
    vocab_size: ``V``, the ids both models score; None keeps all ``V'`` rows.
    """

    weight: Tensor
    bias: Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None
    vocab_size: int | None = None

    @property
    def rows(self) -> int:
        return self.vocab_size if self.vocab_size is not None else self.weight.shape[0]

    @property
    def has_quirks(self) -> bool:
        """Whether :meth:`finish` changes the projected logits (beyond upcasting them)."""
        return self.scale != 1.0 or self.softcap is not None

    def projection(
        self, hidden: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, *, out: Tensor | None = None
    ) -> Tensor:
        """``[C, H]`` -> ``[C, V]`` pre-quirk logits in the weight's dtype (as the model's own head).

        ``weight``/``bias`` override the stored ones: the fused loss passes the tensors autograd saw.
        ``out``: a ``[C, V]`` buffer of the weight's dtype to write into (outside autograd only)."""
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        rows = self.rows
        logits = torch.matmul(hidden.to(weight.dtype), weight[:rows].T, out=out)
        if bias is not None:
            logits = logits.add_(bias[:rows]) if out is not None else logits + bias[:rows]
        return logits

    def finish(self, logits: Tensor) -> Tensor:
        """Apply scaling and soft-capping, in float32 or wider, to ``[C, V]`` projected logits."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def logits(self, hidden: Tensor) -> Tensor:
        """``[C, H]`` -> ``[C, V]`` float32 logits: projection then quirks."""
        return self.finish(self.projection(hidden))


def head_quirks(model_config) -> dict:
    """``scale`` and ``softcap`` from a transformers config: the transforms a CausalLM applies to
    its head's output. Architectures with others are caught by the trainer's parity check."""
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    scale = float(getattr(config, "logit_scale", None) or 1.0)  # Cohere multiplies
    logits_scaling = getattr(config, "logits_scaling", None)  # Granite divides
    if logits_scaling:
        scale /= float(logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return {"scale": scale, "softcap": float(softcap) if softcap else None}
