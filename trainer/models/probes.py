"""Start-up probes on each model: proofs, on a few tokens, that what the trainer assumes holds.

- `check_head_parity`: the fused loss's head(hidden) reproduces the model's own logits.
- `check_documents_stay_apart`: a packed row's documents do not attend to each other.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.losses import LMHead
from trainer.models.heads import HiddenTap, gathered
from trainer.models.loading import ModelError, eval_mode


@torch.no_grad()
def check_head_parity(role: str, engine, tap: HiddenTap, head: LMHead, device: torch.device) -> float:
    """Fail at start-up if ``head(hidden)`` differs from the model's own logits; returns the gap.

    Runs a 16-token probe through the model both ways. Every rank runs it (ZeRO-3 forwards are
    collective)."""
    probe = torch.arange(1, 17, device=device).remainder(head.rows).unsqueeze(0)
    batch = {"input_ids": probe, "attention_mask": torch.ones_like(probe)}
    with eval_mode(engine):  # no dropout: the two forwards must be comparable
        reference = engine(**batch).logits[..., : head.rows].float()
        hidden = tap.hidden_states(engine, batch)
        with gathered(head):
            ours = head.logits(hidden.reshape(-1, hidden.shape[-1])).view_as(reference)
    gap = float((ours - reference).abs().max())
    tolerance = (1e-4 if head.weight.dtype == torch.float32 else 3e-2) * max(1.0, float(reference.abs().max()))
    if not gap <= tolerance:
        raise ModelError(
            f"the {role}'s logits differ from its head applied to its hidden states by {gap:.3g}: its "
            "architecture transforms logits in a way the fused loss does not know; set loss.fused=false."
        )
    return gap



@torch.no_grad()
def check_documents_stay_apart(role: str, model: nn.Module, device: torch.device) -> None:
    """Raise ModelError unless two documents packed in one row give the logits each gives alone."""
    from trainer.models.heads import model_inputs

    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab, (1, n), generator=generator) for n in (5, 7))
    packed = {"input_ids": torch.cat([first, second], dim=1),
              "position_ids": torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)}
    with eval_mode(model):  # no dropout: the two forwards must be comparable
        together = model(**model_inputs({k: v.to(device) for k, v in packed.items()})).logits[0, 5:].float()
        alone = model(input_ids=second.to(device), use_cache=False).logits[0].float()
    # Attention across documents moves logits by O(1); bf16 kernels alone by about 1%.
    if not torch.allclose(together, alone, atol=0.02 * max(1.0, float(alone.abs().max())), rtol=0.02):
        raise ModelError(
            f"the {role} ({type(model).__name__}, attn_implementation={getattr(model.config, '_attn_implementation', '?')}) "
            "lets packed documents attend to each other; set data.pack=false, or attn_implementation=sdpa or "
            "flash_attention_2 if the architecture supports packed sequences.")
