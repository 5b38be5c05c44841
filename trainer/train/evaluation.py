"""Held-out evaluation: how close the student is to the teacher, and how well it does the task."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.cache.teacher import CachedStates
from trainer.losses import sparse_per_token_divergence
from trainer.losses.objective import IGNORE_INDEX, targets_at_each_position
from trainer.models.heads import Scorer
from trainer.models.loading import eval_mode
from trainer.ranks import all_reduce_sum

_COUNTERS = ("kl", "student_ce", "teacher_ce", "agree", "tokens", "exact", "rows")


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


@torch.no_grad()
def evaluate(teacher, student: Scorer, batches: list[dict], device, chunk_size: int) -> dict:
    """Token-weighted means over every rank's share of the held-out rows.

    `eval/exact_match` is the share of rows whose every supervised token is the student's argmax
    under teacher forcing, which is exactly the share that greedy decoding would get right.
    Logits are built `chunk_size` tokens at a time, as in the fused loss. `teacher` is a
    :class:`Scorer` or a :class:`~trainer.cache.teacher.CachedTeacher`."""
    sums = torch.zeros(len(_COUNTERS), dtype=torch.float64)
    with eval_mode(student.engine):  # the teacher's engine is frozen in eval mode for good (models.freeze)
        for batch in batches:
            batch = to_device(batch, device)
            teacher_states = teacher.states(batch)
            student_states = student.states(batch)
            with teacher.gathered(), student.gathered():
                sums += _batch_counters(student, student_states, teacher, teacher_states, batch["labels"], chunk_size)
    totals = dict(zip(_COUNTERS, all_reduce_sum(sums).tolist()))
    tokens, rows = max(totals["tokens"], 1.0), max(totals["rows"], 1.0)
    return {
        "eval/kl_to_teacher": totals["kl"] / tokens,
        "eval/student_ce": totals["student_ce"] / tokens,
        "eval/teacher_ce": totals["teacher_ce"] / tokens,
        "eval/top1_agreement": totals["agree"] / tokens,
        "eval/exact_match": totals["exact"] / rows,
        "eval/tokens": totals["tokens"],
    }


def _batch_counters(student: Scorer, student_states, teacher, teacher_states, labels, chunk_size: int):
    """[B, T, ·] states of both models and [B, T] labels -> float64 sums of `_COUNTERS`."""
    targets = targets_at_each_position(labels)
    flat_targets = targets.reshape(-1)
    student_rows = student_states.reshape(flat_targets.shape[0], -1)
    teacher_terms = _teacher_terms(teacher, teacher_states, flat_targets.shape[0])
    supervised = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
    missed = torch.zeros_like(flat_targets, dtype=torch.bool)
    # kl, student_ce, teacher_ce, agree: summed on the device, read once per batch.
    sums = torch.zeros(4, dtype=torch.float64, device=flat_targets.device)
    for start in range(0, supervised.numel(), chunk_size):
        index = supervised[start:start + chunk_size]
        chunk_targets = flat_targets.index_select(0, index)
        student_logits = student.logits_of(student_rows.index_select(0, index))
        student_logp = F.log_softmax(student_logits, dim=-1)
        kl, teacher_ce, teacher_top = teacher_terms(index, student_logits, student_logp, chunk_targets)
        student_top = student_logp.argmax(-1)
        sums += torch.stack([
            kl, F.nll_loss(student_logp, chunk_targets, reduction="sum"), teacher_ce,
            (student_top == teacher_top).sum(),
        ]).double()
        missed[index] = student_top != chunk_targets
    supervised_rows = (targets != IGNORE_INDEX).any(dim=1)
    exact = (~missed.view_as(targets).any(dim=1) & supervised_rows).sum()
    counts = torch.tensor([supervised.numel(), float(exact), float(supervised_rows.sum())], dtype=torch.float64)
    return torch.cat([sums.cpu(), counts])


def _teacher_terms(teacher, teacher_states, positions: int):
    """A function of one chunk giving Σ KL(teacher ‖ student), Σ teacher CE and the teacher's top-1.

    A cached teacher knows only its top-k: its KL is over the top-k plus one tail outcome (a lower
    bound of the full KL, tight when the tail is small) and its CE comes from the stored
    log-probability of each target."""
    if isinstance(teacher_states, CachedStates):
        sparse = teacher_states.sparse.flatten()
        target_logprobs = teacher_states.target_logprobs.reshape(-1)

        def cached(index, student_logits, student_logp, targets):
            chunk = sparse.rows(index)
            kl = sparse_per_token_divergence(student_logits, chunk, kind="fkl").sum()
            return kl, -target_logprobs.index_select(0, index).sum(), chunk.ids[:, 0]

        return cached
    teacher_rows = teacher_states.reshape(positions, -1)

    def dense(index, student_logits, student_logp, targets):
        teacher_logp = F.log_softmax(teacher.logits_of(teacher_rows.index_select(0, index)), dim=-1)
        kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum()
        return kl, F.nll_loss(teacher_logp, targets, reduction="sum"), teacher_logp.argmax(-1)

    return dense
