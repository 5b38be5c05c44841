"""A collated micro-batch's aligned spans, as flat index tensors: what the data layer hands the
cross-tokenizer loss (trainer/data/pairing.py builds it, trainer/losses/span_sums.py reads it).

A span pairs student tokens ``[a, b)`` of batch row ``r`` with teacher tokens ``[c, d)`` of the same
row (trainer/data/alignment.py). The loss reads each side at the positions that *predict* those
tokens (``a - 1 .. b - 2`` and ``c - 1 .. d - 2``): the first of them carries the full next-token
distribution; the others (the span's *inner* tokens) only the probability of their own token, whose
product is the span's continuation mass (trainer/losses/cross_tokenizer.py, "Spans"). Positions are
flat indices into the ``[B, T]`` batch of their side (``r · T + position``), as the fused loss
indexes ``hidden.reshape(-1, H)``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass(frozen=True)
class SpanBatch:
    """``N`` spans of one micro-batch; ``M_s`` and ``M_t`` inner tokens on each side. All int64."""

    student_first: Tensor
    """``[N]`` flat student position predicting each span's first student token (``r·T_s + a − 1``)."""
    teacher_first: Tensor
    """``[N]`` flat teacher position predicting each span's first teacher token (``r·T_t + c − 1``)."""
    student_tokens: Tensor
    """``[N]`` each span's student token count ``m = b − a`` (≥ 1)."""
    teacher_tokens: Tensor
    """``[N]`` each span's teacher token count ``n = d − c`` (≥ 1)."""
    student_inner: Tensor
    """``[M_s]`` flat student positions predicting the inner tokens ``a+1 .. b−1`` of each span, in span order."""
    student_inner_ids: Tensor
    """``[M_s]`` the student token id each of those positions predicts."""
    student_inner_span: Tensor
    """``[M_s]`` the span (0 .. N−1) each inner token belongs to."""
    teacher_inner: Tensor
    """``[M_t]`` flat teacher positions predicting the inner tokens ``c+1 .. d−1``."""
    teacher_inner_ids: Tensor
    """``[M_t]`` the teacher token id each of those positions predicts."""
    teacher_inner_span: Tensor
    """``[M_t]`` the span each teacher inner token belongs to."""

    @property
    def count(self) -> int:
        return self.student_first.numel()

    def to(self, device, non_blocking: bool = False) -> "SpanBatch":
        return SpanBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    @classmethod
    def empty(cls) -> "SpanBatch":
        return cls(**{f.name: torch.zeros(0, dtype=torch.long) for f in fields(cls)})
