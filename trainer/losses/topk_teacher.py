"""A teacher known only by its top-k log-probabilities at each position (a cross-tokenizer teacher
cache, trainer/cache/cross.py), turned back into full rows a chunk at a time for the ULD and GOLD
losses, which compare whole distributions.

Per position the cache holds the teacher's ``k`` most likely ids with their log-probabilities and
the exact log-probability of the token that came next in the text (its *target*, which may lie
outside the top-k). A row is rebuilt as: those ``k`` (+1) values at their ids, and the mass they
leave, ``1 − Σ``, spread evenly over every other id. ULD sorts the row, so the even tail stands for
the teacher's real tail by its mass and its length (not its shape); GOLD splits it between the
shared ids and the bucket in proportion to how many of the unlisted ids each holds. With ``k ≥ V``
every id is listed and the row is the teacher's exactly (up to the cache's float16 rounding), which
is what the tests hold it to. A span's continuation (its inner teacher tokens) reads the targets'
exact values at temperature 1.

The rows are log-probabilities; the losses take them where they take logits (a softmax leaves
log-probabilities as they are, and a temperature divides them as it divides logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from trainer.losses.divergence import tempered_log_probs


@dataclass(frozen=True)
class TopKTeacher:
    """``P`` positions of a cached teacher over a vocabulary of ``vocab_size`` ids.

    Behaves as a head over its own positions: :meth:`logits` of ``[C]`` position indices is
    ``[C, V]`` (an :class:`~trainer.losses.head.LMHead` takes hidden states there)."""

    logprobs: Tensor
    """``[P, k]`` log-probabilities at temperature 1 (any float dtype; read in float32)."""
    ids: Tensor
    """``[P, k]`` int64 their ids; −1 pads a position with fewer entries (or none)."""
    target_ids: Tensor
    """``[P]`` int64 the id of the token that followed each position, −1 where none was cached."""
    target_logprobs: Tensor
    """``[P]`` its exact log-probability (0 where ``target_ids`` is −1)."""
    vocab_size: int

    @property
    def rows(self) -> int:
        """The ids a row has, as :attr:`LMHead.rows` counts them."""
        return self.vocab_size

    @property
    def positions(self) -> int:
        return self.ids.shape[0]

    @property
    def _dtype(self) -> torch.dtype:
        return torch.promote_types(torch.promote_types(self.logprobs.dtype, self.target_logprobs.dtype), torch.float32)

    def to(self, device) -> "TopKTeacher":
        return TopKTeacher(self.logprobs.to(device), self.ids.to(device), self.target_ids.to(device),
                           self.target_logprobs.to(device), self.vocab_size)

    def logits(self, index: Tensor) -> Tensor:
        """The rebuilt rows of positions ``index`` ``[C]``: log-probabilities ``[C, V]``, float32 (or
        the stored dtype where it is wider)."""
        ids, values = self._listed(index)
        listed = ids >= 0
        count = listed.sum(-1)
        left = (1 - torch.where(listed, values.exp(), torch.zeros_like(values)).sum(-1)).clamp(min=0)
        unlisted = (self.vocab_size - count).clamp(min=1)
        # A position whose listed mass rounds to 1 or above still gives its tail a finite value:
        # a tiny one, so the softmax the losses take renormalises it away.
        tail = torch.log(left.clamp(min=torch.finfo(values.dtype).tiny)) - torch.log(unlisted.to(values.dtype))
        rows = tail.unsqueeze(-1).expand(-1, self.vocab_size + 1).contiguous()
        # Padding entries are written to a spare last column, then dropped.
        rows.scatter_(1, torch.where(listed, ids, self.vocab_size), values)
        return rows[:, :self.vocab_size]

    def token_log_probs(self, index: Tensor, token_ids: Tensor, *, temperature: float = 1.0,
                        chunk_size: int = 256) -> Tensor:
        """``log softmax(row/T)[token]`` at positions ``index`` ``[M]`` for ``token_ids`` ``[M]`` -> ``[M]``:
        the stored exact value at temperature 1 where the token is the cached target, else read
        off the rebuilt row (chunked)."""
        index, token_ids = index.reshape(-1), token_ids.reshape(-1)
        if temperature == 1.0:
            exact = self.target_ids.index_select(0, index) == token_ids
            if bool(exact.all()):
                return self.target_logprobs.index_select(0, index).to(self._dtype)
        values = [tempered_log_probs(self.logits(index[start:start + chunk_size]), temperature, self._dtype)
                  .gather(1, token_ids[start:start + chunk_size].unsqueeze(1)).squeeze(1)
                  for start in range(0, index.numel(), chunk_size)]
        return torch.cat(values) if values else torch.zeros(0, dtype=self._dtype, device=index.device)

    def _listed(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """``[C, k + 1]`` ids and float32 log-probabilities: the top-k and the target, the target
        marked −1 where it is one of the top-k already (or absent)."""
        ids = self.ids.index_select(0, index)
        values = self.logprobs.index_select(0, index).to(self._dtype)
        target = self.target_ids.index_select(0, index).unsqueeze(1)
        target = torch.where((ids == target).any(-1, keepdim=True), torch.full_like(target, -1), target)
        target_value = self.target_logprobs.index_select(0, index).to(self._dtype).unsqueeze(1)
        return torch.cat([ids, target], dim=1), torch.cat([values, target_value], dim=1)
