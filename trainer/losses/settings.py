"""What a divergence is computed with: one frozen object instead of five keywords passed down.

`IGNORE_INDEX` is defined here, not in trainer/data/ where labels are made: losses/ is the lowest
package (it imports only torch), -100 is the value torch's `cross_entropy` and transformers ignore
by default, and the public losses' `ignore_index=-100` default is part of the contract. data/
imports it from here, so every label and every mask reads the same constant.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossSettings:
    """The `loss.*` settings a divergence reads (see trainer/losses/divergence.py for each kind)."""

    kind: str
    """`fkl`, `rkl`, `jsd`, `skl`, `srkl` or `tvd`; `sft` (hard labels only) has no divergence."""
    temperature: float = 1.0
    """Both models' logits are divided by it before the softmax."""
    beta: float = 0.5
    """`jsd`'s mixture weight of the teacher, 0 < beta < 1."""
    skew: float = 0.1
    """`skl`/`srkl`'s share of the other side in the mixture, 0 <= skew < 1."""
    ignore_index: int = IGNORE_INDEX
    """Label value of the positions left out."""

    @classmethod
    def from_config(cls, loss_cfg) -> "LossSettings":
        """From the `loss` config group (its other keys belong to the objective, not the divergence)."""
        return cls(kind=loss_cfg.kind, temperature=loss_cfg.temperature, beta=loss_cfg.beta, skew=loss_cfg.skew)
