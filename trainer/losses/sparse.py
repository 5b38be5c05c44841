"""Divergences against a sparse teacher: its top-k log-probabilities and their token ids.

This is the form an offline teacher cache or an API (``top_logprobs``) gives: for each position,
``k`` token ids and the teacher's log-probabilities of them at temperature 1. The rest of the
teacher's distribution, the tail, is unknown token by token; only its total mass
``1 − Σ top-k probabilities`` is known.

How the tail is handled: both distributions are reduced to ``k + 1`` outcomes — the teacher's
``k`` tokens plus one "any other token" outcome. The teacher's tail outcome carries its missing
mass; the student's carries the sum of its probabilities of every token outside the teacher's
top-k. The divergence of ``kind`` is then taken between these two ``(k+1)``-outcome distributions.

- Temperature: the student is tempered over its full vocabulary before its tail is summed. The
  teacher's ``k + 1`` log-probabilities are divided by ``T`` and renormalised, so its tail is
  tempered as one outcome (the only choice when its tail tokens are unknown).
- When the teacher's tail mass is 0 (its top-k holds all of its mass), the result equals the dense
  loss exactly, for every kind and temperature: each kind's per-token term is then linear in the
  student's tail probabilities, so summing them changes nothing.
- Otherwise, at ``T = 1``, it is a lower bound of the dense loss: all six kinds are f-divergences,
  and merging outcomes never increases an f-divergence. With ``k = 64`` the missing mass of a
  trained LM is usually well under 1%.
- The teacher's tail is never taken below the rounding of its listed log-probabilities: each stored
  ``l`` stands for any value within half the spacing ``s`` of its dtype at ``l``, so their mass is
  known only to ``Σ p·s/2`` (about ``3e-8`` for a float16 top-1 stored as 0). A tail computed below
  that (a confident teacher whose listed mass rounds to 1, or past it) is that floor instead. The
  data cannot tell a smaller tail apart, and ``rkl`` would otherwise be infinite there (the student's
  tail against a teacher tail of 0), where the dense ``rkl`` is finite; with the floor it is finite,
  ``≈ Q_tail·log(Q_tail / floor)`` for that outcome, with finite gradients. Every other kind moves by
  no more than that rounding. ``srkl`` (bounded by ``log(1/skew)``) stays the steadier mode-seeking loss.
- Entries with id ``-1`` are padding (fewer than ``k`` were available, e.g. an API returned 5);
  they carry no mass. Ids must otherwise be distinct within a position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.losses.divergence import (
    compute_dtype,
    divergence_from_log_probs,
    masked_mean,
    tempered_log_probs,
    validate_divergence_params,
)
from trainer.losses.settings import IGNORE_INDEX, LossSettings

PADDING_ID = -1


@dataclass
class SparseTeacher:
    """The teacher's top-k at each position.

    logprobs: ``[..., k]`` log-probabilities at temperature 1 (any float dtype; fp16/bf16 in a cache).
    ids: ``[..., k]`` token ids (int32 or int64), ``-1`` for padding entries.
    """

    logprobs: Tensor
    ids: Tensor
    checked: bool = False
    """Already passed :func:`check_sparse_teacher` on the host (a cache's reader checks it there), so
    the loss does not check it again on the device, where reading the verdict makes the host wait."""

    def flatten(self) -> "SparseTeacher":
        """``[..., k]`` -> ``[N, k]``, matching labels flattened to ``[N]``."""
        return SparseTeacher(self.logprobs.reshape(-1, self.logprobs.shape[-1]), self.ids.reshape(-1, self.ids.shape[-1]))

    def rows(self, index: Tensor) -> "SparseTeacher":
        """The positions in ``index`` (1-D) of a flattened teacher."""
        return SparseTeacher(self.logprobs.index_select(0, index), self.ids.index_select(0, index))


def check_sparse_teacher(teacher: SparseTeacher, vocab_size: int, positions_shape: torch.Size) -> None:
    """Raise ``ValueError`` naming the problem if ``teacher`` cannot be scored against ``vocab_size``."""
    if teacher.logprobs.shape != teacher.ids.shape:
        raise ValueError(
            f"sparse teacher logprobs {list(teacher.logprobs.shape)} and ids {list(teacher.ids.shape)} "
            "differ in shape; store one id per log-probability."
        )
    if teacher.ids.shape[:-1] != positions_shape:
        raise ValueError(
            f"sparse teacher covers positions {list(teacher.ids.shape[:-1])} but the student has "
            f"{list(positions_shape)}; align both with the labels (the caller shifts)."
        )
    if teacher.ids.numel() == 0:
        return
    real = teacher.ids[teacher.ids != PADDING_ID]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab_size):
        raise ValueError(
            f"sparse teacher ids lie in [{int(real.min())}, {int(real.max())}] but the vocabulary has "
            f"{vocab_size} ids; use -1 for padding entries and ids from the shared tokenizer."
        )
    ordered = teacher.ids.sort(dim=-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] != PADDING_ID)
    if bool(repeated.any()):
        raise ValueError("a sparse teacher position lists the same token id twice; store each top-k id once.")


def sparse_per_token_divergence(
    student_logits: Tensor,
    teacher: SparseTeacher,
    *,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> Tensor:
    """Divergence of the student from a sparse teacher at every position, with no masking.

    Args:
        student_logits: ``[..., V]``.
        teacher: top-k of shape ``[..., k]``.

    Returns:
        ``[...]`` in float32 (float64 for float64 logits).
    """
    return sparse_divergence(student_logits, teacher, LossSettings(kind, temperature, beta, skew))


def sparse_divergence(student_logits: Tensor, teacher: SparseTeacher, settings: LossSettings) -> Tensor:
    """:func:`sparse_per_token_divergence` with its settings in one object: ``[..., V]``, ``[..., k]`` -> ``[...]``."""
    validate_divergence_params(settings)
    log_p, log_q = coarse_log_probs(student_logits, teacher, settings.temperature)
    return divergence_from_log_probs(settings, log_p, log_q)


def sparse_distill_loss(
    student_logits: Tensor,
    teacher: SparseTeacher,
    labels: Tensor,
    *,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Mean sparse divergence over the positions whose label is not ``ignore_index``.

    The sparse counterpart of :func:`trainer.losses.distill_loss`: same masking, same mean, 0 when
    every position is masked. ``student_logits`` ``[..., V]``, ``teacher`` ``[..., k]``, labels ``[...]``.
    """
    if not teacher.checked:
        check_sparse_teacher(teacher, student_logits.shape[-1], student_logits.shape[:-1])
    settings = LossSettings(kind, temperature, beta, skew, ignore_index)
    return masked_mean(sparse_divergence(student_logits, teacher, settings), labels, settings)


def coarse_log_probs(student_logits: Tensor, teacher: SparseTeacher, temperature: float) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probabilities over the ``k + 1`` outcomes (top-k, then the tail).

    ``[..., V]`` logits and a ``[..., k]`` teacher -> two ``[..., k+1]`` tensors, never ``-inf``.
    """
    dtype = compute_dtype(student_logits, teacher.logprobs)
    floor = torch.finfo(dtype).min
    padding = teacher.ids == PADDING_ID
    log_q = tempered_log_probs(student_logits, temperature, dtype)
    # One extra column of -inf gives padding entries somewhere harmless to point: the gather
    # reads -inf for them and the scatter below writes -inf over it, whatever the real ids are.
    with_sink = F.pad(log_q, (0, 1), value=float("-inf"))
    ids = torch.where(padding, log_q.shape[-1], teacher.ids.long())
    student_top = with_sink.gather(-1, ids)
    student_tail = with_sink.scatter(-1, ids, float("-inf")).logsumexp(dim=-1, keepdim=True)
    log_q_coarse = torch.cat([student_top, student_tail], dim=-1).clamp(min=floor)

    covers_vocab = student_tail == float("-inf")
    return teacher_coarse_log_probs(teacher, padding, covers_vocab, temperature, dtype), log_q_coarse


def log_rounding_of_mass(stored: Tensor, log_p: Tensor) -> Tensor:
    """``log Σ p·s/2`` ``[..., 1]``: how far the listed mass may be off because each stored log-probability
    is rounded to its dtype, ``s`` being the dtype's spacing at it.

    stored: ``[..., k]`` the log-probabilities as stored (their dtype decides ``s``); log_p: ``[..., k]``
    the same in the compute dtype, ``-inf`` at padding entries."""
    magnitude = stored.detach().abs()
    spacing = torch.nextafter(magnitude, torch.full_like(magnitude, float("inf"))) - magnitude
    spacing = torch.where(torch.isfinite(spacing), spacing, 0.0)  # a stored -inf lists no mass to round
    return (log_p + spacing.to(log_p.dtype).log() - math.log(2)).logsumexp(dim=-1, keepdim=True)


def teacher_coarse_log_probs(teacher: SparseTeacher, padding: Tensor, covers_vocab: Tensor, temperature: float,
                             dtype: torch.dtype) -> Tensor:
    """The teacher's tempered log-probabilities over its ``k + 1`` outcomes ``[..., k+1]``, never ``-inf``.

    padding: ``[..., k]`` its padding entries; covers_vocab: ``[..., 1]`` where its top-k lists every id."""
    teacher_top = torch.where(padding, float("-inf"), teacher.logprobs.to(dtype))
    covered = teacher_top.logsumexp(dim=-1, keepdim=True)
    # log(1 − Σ top-k); rounding in a fp16 cache can push the sum to 1 or past it, so the tail is
    # never below what that rounding hides (see the module docstring).
    computed = torch.where(covered < 0, torch.log(-torch.expm1(covered.clamp(max=-1e-30))), float("-inf"))
    teacher_tail = torch.maximum(computed, log_rounding_of_mass(teacher.logprobs, teacher_top))
    # With every token in the top-k there is no tail outcome; rounding must not invent one.
    teacher_tail = torch.where(covers_vocab, float("-inf"), teacher_tail)
    log_p_coarse = F.log_softmax(torch.cat([teacher_top, teacher_tail], dim=-1) / temperature, dim=-1)
    return log_p_coarse.clamp(min=torch.finfo(dtype).min)
