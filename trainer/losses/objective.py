"""The training objective of one micro-batch, as sums over its supervised tokens.

Sums, not means: the step's loss is divided exactly once, by the number of supervised tokens of
the whole step (all accumulation micro-batches on all ranks). Averaging per micro-batch would
weight a short micro-batch's tokens more than a long one's, and change the loss with the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.losses.divergence import dense_divergence, masked_sum
from trainer.losses.fused import token_sums
from trainer.losses.head import LMHead
from trainer.losses.settings import IGNORE_INDEX, LossSettings
from trainer.losses.sparse import SparseTeacher, sparse_divergence


@dataclass(frozen=True)
class Objective:
    """The training objective's settings, built once from the `loss` config group."""

    divergence: LossSettings
    ce_weight: float
    """The weight of the student's cross-entropy on the labels (loss.ce_weight); under sft the
    objective is that CE alone."""
    chunk_size: int | None
    """Tokens per chunk of the fused loss (loss.chunk_size); None: the fused loss's default."""

    @classmethod
    def from_config(cls, loss_cfg) -> "Objective":
        return cls(LossSettings.from_config(loss_cfg), loss_cfg.ce_weight, loss_cfg.chunk_size or None)

    @property
    def sft(self) -> bool:
        """Hard labels only: no teacher runs, no divergence."""
        return self.divergence.kind == "sft"

    @property
    def kd_weight(self) -> float:
        """τ² keeps the soft-target gradients on the same scale as at τ=1 (Hinton et al., 2015)."""
        return (1.0 - self.ce_weight) * self.divergence.temperature**2


@dataclass(frozen=True)
class DenseTeacher:
    """A teacher model's last hidden states ``[B, T, H_t]`` and its head, for the fused loss."""

    hidden: torch.Tensor
    head: LMHead


@dataclass
class TokenSums:
    objective: torch.Tensor
    """Σ over supervised tokens of the combined loss; carries the graph."""
    kd: torch.Tensor
    """Σ of the divergence to the teacher (detached; NaN under sft, where no teacher runs)."""
    ce: torch.Tensor
    """Σ of the student's cross-entropy on the labels (detached)."""


def next_token_view(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int):
    """Position t predicts token t+1; ids past the tokenizer's `vocab_size` are padding rows.

    logits [B, T, V'] -> [B, T-1, vocab_size]; labels [B, T] -> [B, T-1]."""
    return logits[:, :-1, :vocab_size], labels[:, 1:]


def targets_at_each_position(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels -> [B, T] targets aligned with the model's positions: position t predicts
    token t+1, and the last position predicts nothing (masked). Shifting the labels instead of
    slicing `states[:, :-1]` keeps [B, T, H] hidden states (or logits) uncopied."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def fused_micro_batch_sums(student_hidden, student_head: LMHead, teacher: DenseTeacher | SparseTeacher | None,
                           labels, objective: Objective, supervised=None) -> TokenSums:
    """The same sums as :func:`micro_batch_sums`, with the heads applied inside the loss.

    student_hidden: [B, T, H_s]; labels: [B, T]; teacher: the teacher's hidden states [B, T, H_t]
    with its head, or a cached SparseTeacher [B, T, k] aligned with :func:`targets_at_each_position`;
    None under sft. supervised: the flat positions with a target (:func:`supervised_positions`),
    if already known."""
    given = {}
    if not objective.sft and isinstance(teacher, SparseTeacher):
        given = {"sparse_teacher": teacher}
    elif not objective.sft:
        given = {"teacher_hidden": teacher.hidden, "teacher_head": teacher.head}
    sums = token_sums(
        student_hidden, student_head, targets_at_each_position(labels), objective.divergence, **given,
        kd_weight=objective.kd_weight, ce_weight=1.0 if objective.sft else objective.ce_weight,
        chunk_size=objective.chunk_size, supervised=supervised,
    )
    return TokenSums(sums.objective, sums.kd, sums.ce)


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """The flat positions of a ``[B, T]`` batch that have a next-token target, as the fused loss indexes them."""
    return (targets_at_each_position(labels).reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def micro_batch_sums(student_logits, teacher_logits, labels, objective: Objective, vocab_size: int) -> TokenSums:
    """student_logits: [B, T, V']; labels: [B, T]; teacher_logits: [B, T, V'], or a cached
    SparseTeacher [B, T, k] aligned with :func:`targets_at_each_position`; None under sft."""
    student, targets = next_token_view(student_logits, labels, vocab_size)
    ce_sum = F.cross_entropy(
        student.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if objective.sft:
        return TokenSums(ce_sum, torch.full_like(ce_sum, float("nan")).detach(), ce_sum.detach())
    settings = objective.divergence
    if isinstance(teacher_logits, SparseTeacher):
        sparse = SparseTeacher(teacher_logits.logprobs[:, :-1], teacher_logits.ids[:, :-1])
        divergence = sparse_divergence(student, sparse, settings)
    else:
        teacher, _ = next_token_view(teacher_logits, labels, vocab_size)
        divergence = dense_divergence(student, teacher, settings)
    kd_sum = masked_sum(divergence, targets, ignore_index=settings.ignore_index)
    total = objective.kd_weight * kd_sum + objective.ce_weight * ce_sum
    return TokenSums(total, kd_sum.detach(), ce_sum.detach())


def solved_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rows whose every supervised target is the argmax: [B, T, V], [B, T] (aligned) -> bool [B].

    Under teacher forcing this is the same event as greedy decoding reproducing the row."""
    supervised = targets != IGNORE_INDEX
    return ((logits.argmax(dim=-1) == targets) | ~supervised).all(dim=-1)
