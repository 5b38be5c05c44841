"""Held-out evaluation: how close the student is to the teacher, and how well it does the task."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.distributed import all_reduce_sum
from trainer.objective import IGNORE_INDEX, next_token_view

_COUNTERS = ("kl", "student_ce", "teacher_ce", "agree", "tokens", "exact", "rows")


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def forward_logits(engine, batch: dict) -> torch.Tensor:
    return engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@torch.no_grad()
def evaluate(teacher_engine, student_engine, batches: list[dict], vocab_size: int, device) -> dict:
    """Token-weighted means over every rank's share of the held-out rows.

    `eval/exact_match` is the share of rows whose every supervised token is the student's argmax
    under teacher forcing, which is exactly the share that greedy decoding would get right."""
    student_engine.eval()
    sums = torch.zeros(len(_COUNTERS), dtype=torch.float64)
    for batch in batches:
        batch = to_device(batch, device)
        teacher_logits = forward_logits(teacher_engine, batch)
        student_logits = forward_logits(student_engine, batch)
        sums += _batch_counters(student_logits, teacher_logits, batch["labels"], vocab_size)
    student_engine.train()
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


def solved_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rows whose every supervised target is the argmax: [B, T, V], [B, T] (aligned) -> bool [B].

    Under teacher forcing this is the same event as greedy decoding reproducing the row."""
    supervised = targets != IGNORE_INDEX
    return ((logits.argmax(dim=-1) == targets) | ~supervised).all(dim=-1)


def _batch_counters(student_logits, teacher_logits, labels, vocab_size: int) -> torch.Tensor:
    student, targets = next_token_view(student_logits, labels, vocab_size)
    teacher, _ = next_token_view(teacher_logits, labels, vocab_size)
    mask = targets != IGNORE_INDEX
    student_logp = F.log_softmax(student.float(), dim=-1)[mask]
    teacher_logp = F.log_softmax(teacher.float(), dim=-1)[mask]
    flat_targets = targets[mask]
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum()
    student_ce = F.nll_loss(student_logp, flat_targets, reduction="sum")
    teacher_ce = F.nll_loss(teacher_logp, flat_targets, reduction="sum")
    agree = (student_logp.argmax(-1) == teacher_logp.argmax(-1)).sum()
    supervised_rows = mask.any(dim=1)
    exact = (solved_rows(student, targets) & supervised_rows).sum()
    return torch.tensor(
        [kl, student_ce, teacher_ce, agree, mask.sum(), exact, supervised_rows.sum()], dtype=torch.float64
    )
