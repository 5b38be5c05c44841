"""Held-out evaluation: how close the student is to the teacher, and how well it does the task."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainer.data.batching import to_device
from trainer.losses.objective import targets_at_each_position
from trainer.losses.settings import IGNORE_INDEX
from trainer.metric_names import teacher_forced
from trainer.models.heads import Scorer
from trainer.models.loading import eval_mode
from trainer.models.teacher import ChunkTerms, Teacher
from trainer.ranks import all_reduce_sum

_COUNTERS = ("kl", "student_ce", "teacher_ce", "agree", "tokens", "exact", "rows")


@torch.no_grad()
def evaluate(teacher: Teacher, student: Scorer, batches: list[dict], device, chunk_size: int) -> dict:
    """Token-weighted means over every rank's share of the held-out rows.

    `eval/exact_match` is the share of rows whose every supervised token is the student's argmax
    under teacher forcing, which is exactly the share that greedy decoding would get right.
    Logits are built `chunk_size` tokens at a time, as in the fused loss. `teacher` is any
    :class:`~trainer.models.teacher.Teacher`: a model, or a cache.

    Held-out rows with no response token (prompt-only rows, whose responses only the student writes)
    give these means nothing to average: they are NaN then, not 0, which would read as a perfect KL
    (see :func:`nothing_to_average`)."""
    sums = torch.zeros(len(_COUNTERS), dtype=torch.float64)
    with eval_mode(student.engine):  # the teacher's engine is frozen in eval mode for good (models.freeze)
        for host_batch in batches:
            batch = to_device(host_batch, device)
            teacher_terms = teacher.evaluation_terms(batch, host_batch)  # the teacher's forward first, on every rank
            student_states = student.states(batch)
            with teacher.gathered(), student.gathered():
                sums += _batch_counters(student, student_states, teacher_terms, batch["labels"], chunk_size)
    totals = dict(zip(_COUNTERS, all_reduce_sum(sums).tolist()))
    tokens, rows = totals["tokens"], totals["rows"]
    return {
        "eval/kl_to_teacher": _mean(totals["kl"], tokens),
        "eval/student_ce": _mean(totals["student_ce"], tokens),
        "eval/teacher_ce": _mean(totals["teacher_ce"], tokens),
        "eval/top1_agreement": _mean(totals["agree"], tokens),
        "eval/exact_match": _mean(totals["exact"], rows),
        "eval/tokens": tokens,
    }


def _mean(total: float, count: float) -> float:
    return total / count if count else math.nan


def nothing_to_average(key: str, metrics: dict) -> bool:
    """Whether `metrics[key]` is NaN only because the held-out rows have no response token: not a
    sign of a diverged student (`DistillJob._refuse_non_finite` lets it pass)."""
    return metrics.get("eval/tokens") == 0 and teacher_forced(key)


def _batch_counters(student: Scorer, student_states, teacher_terms: ChunkTerms, labels, chunk_size: int):
    """The student's [B, T, ·] states, the teacher's terms of the same batch and [B, T] labels ->
    float64 sums of `_COUNTERS`."""
    targets = targets_at_each_position(labels)
    flat_targets = targets.reshape(-1)
    student_rows = student_states.reshape(flat_targets.shape[0], -1)
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

