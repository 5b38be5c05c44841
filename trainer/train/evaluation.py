"""Held-out evaluation: how close the student is to the teacher, and how well it does the task.

`evaluate` scores the held-out responses (teacher forcing); `onpolicy_evaluate` scores the
responses the student writes itself to the held-out prompts, which is what it meets at inference.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from trainer.data.batching import collate, to_device
from trainer.data.sources import DataError
from trainer.data.tokenize import TokenizedRow
from trainer.losses.objective import targets_at_each_position
from trainer.losses.settings import IGNORE_INDEX
from trainer.metric_names import teacher_forced
from trainer.models.heads import Scorer
from trainer.models.loading import eval_mode
from trainer.models.teacher import ChunkLogProbs, ChunkTerms, Teacher
from trainer.ranks import all_reduce_sum, max_over_ranks
from trainer.rollout.engine import RolloutEngine, RolloutSettings
from trainer.rollout.prompts import prompt_of, rewritten, rollout_seed

log = logging.getLogger(__name__)

_COUNTERS = ("kl", "student_ce", "teacher_ce", "agree", "bytes", "tokens", "exact", "rows")


@torch.no_grad()
def evaluate(teacher: Teacher, student: Scorer, batches: list[dict], device, chunk_size: int,
             byte_lengths: torch.Tensor | None = None) -> dict:
    """Token-weighted means over every rank's share of the held-out rows.

    `eval/student_ce_per_byte` divides the student's summed CE by the UTF-8 bytes of the supervised
    text (`byte_lengths` ``[V]``: each id's, :func:`~trainer.data.alignment.token_byte_lengths`):
    nats per byte compare across tokenizers, nats per token do not. Without `byte_lengths` it is NaN.

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
                sums += _batch_counters(student, student_states, teacher_terms, batch["labels"], chunk_size,
                                        byte_lengths)
    totals = dict(zip(_COUNTERS, all_reduce_sum(sums).tolist()))
    tokens, rows = totals["tokens"], totals["rows"]
    return {
        "eval/kl_to_teacher": _mean(totals["kl"], tokens),
        "eval/student_ce": _mean(totals["student_ce"], tokens),
        "eval/student_ce_per_byte": _mean(totals["student_ce"], totals["bytes"]) if byte_lengths is not None else math.nan,
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


def _batch_counters(student: Scorer, student_states, teacher_terms: ChunkTerms, labels, chunk_size: int,
                    byte_lengths: torch.Tensor | None = None):
    """The student's [B, T, ·] states, the teacher's terms of the same batch and [B, T] labels ->
    float64 sums of `_COUNTERS`."""
    targets = targets_at_each_position(labels)
    flat_targets = targets.reshape(-1)
    student_rows = student_states.reshape(flat_targets.shape[0], -1)
    supervised = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
    missed = torch.zeros_like(flat_targets, dtype=torch.bool)
    # kl, student_ce, teacher_ce, agree, bytes: summed on the device, read once per batch.
    sums = torch.zeros(5, dtype=torch.float64, device=flat_targets.device)
    lengths = None if byte_lengths is None else byte_lengths.to(flat_targets.device)
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
            lengths.index_select(0, chunk_targets).sum() if lengths is not None else kl.new_zeros(()),
        ]).double()
        missed[index] = student_top != chunk_targets
    supervised_rows = (targets != IGNORE_INDEX).any(dim=1)
    exact = (~missed.view_as(targets).any(dim=1) & supervised_rows).sum()
    counts = torch.tensor([supervised.numel(), float(exact), float(supervised_rows.sum())], dtype=torch.float64)
    return torch.cat([sums.cpu(), counts])



# The step at which held-out rollouts are seeded. Training steps count from 0, so -1 is never one of
# theirs: a held-out prompt gets the same seed before, during and after training (the comparison is
# fair: only the student changed), and never the seed of a training rollout.
EVAL_ROLLOUT_STEP = -1

_ONPOLICY_COUNTERS = ("kl", "teacher_nll", "tokens")


@torch.no_grad()
def onpolicy_evaluate(rows: list[TokenizedRow], engine: RolloutEngine, settings: RolloutSettings, seed: int,
                      teacher: Teacher, student: Scorer, *, device, chunk_size: int, pad_id: int, batch_size: int,
                      seq_len: int) -> dict:
    """The student's own responses to this rank's held-out prompts, scored by the teacher: token-weighted
    means over every rank of KL(student ‖ teacher) over the full vocabulary at temperature 1
    (`eval/onpolicy_kl`) and of the teacher's NLL of each generated token (`eval/teacher_nll_of_student`),
    with `eval/onpolicy_tokens` the count they average over.

    `rows` are this rank's share of the held-out rows; rows with no prompt (text rows) are left out. Row
    `i`'s rollout is seeded with `rollout_seed(seed, EVAL_ROLLOUT_STEP, i's index)`; it is cut to
    `seq_len` with its prompt, as training rows are. Every rank calls `engine.generate` and runs the
    models once per batch, as many batches as the busiest rank (ZeRO-3 forwards are collective).
    Returns {} (with a warning) when no rank had a token to score. `teacher` must score new text."""
    if not teacher.scores_new_text:
        raise ValueError(f"{type(teacher).__name__} cannot score the student's rollouts; evaluate them with a "
                         "teacher model (teacher.cache=null)")
    prompted = held_out_prompts(rows)
    sums = torch.zeros(len(_ONPOLICY_COUNTERS), dtype=torch.float64)
    with eval_mode(student.engine):
        for batch in batches_of_busiest_rank(prompted, batch_size):
            batch_rows = rolled_out(batch, engine, settings, seed, seq_len)
            sums += _scored(batch_rows or [_filler(pad_id)], teacher, student, device, chunk_size, pad_id)
    totals = dict(zip(_ONPOLICY_COUNTERS, all_reduce_sum(sums).tolist()))
    if totals["tokens"] == 0:
        log.warning("eval/onpolicy_kl is left out: no held-out row has a prompt the student could answer within "
                    "train.seq_len=%d (text rows have none); hold out prompt/response or messages rows to measure it.",
                    seq_len)
        return {}
    return {
        "eval/onpolicy_kl": totals["kl"] / totals["tokens"],
        "eval/teacher_nll_of_student": totals["teacher_nll"] / totals["tokens"],
        "eval/onpolicy_tokens": totals["tokens"],
    }


def held_out_prompts(rows: list[TokenizedRow]) -> list[tuple[TokenizedRow, list[int]]]:
    """Each row with a prompt, and its prompt."""
    return [(row, prompt) for row, prompt in ((row, _prompt_or_none(row)) for row in rows) if prompt is not None]


def batches_of_busiest_rank(prompted: list, batch_size: int) -> list[list]:
    """`prompted` in batches, as many as the busiest rank has (the last ones empty here if need be)."""
    count = _batches_on_busiest_rank(len(prompted), batch_size)
    return [prompted[start:start + batch_size] for start in range(0, count * batch_size, batch_size)]


def _prompt_or_none(row: TokenizedRow) -> list[int] | None:
    """The row's prompt; None for a row whose every token is supervised (a text row), which an
    off-policy job may hold out and which on-policy evaluation has nothing to ask of."""
    try:
        return prompt_of(row)
    except DataError:
        return None


def _batches_on_busiest_rank(rows: int, batch_size: int) -> int:
    """How many batches the rank with the most prompts runs: every rank runs that many."""
    count = torch.tensor([-(-rows // batch_size)], dtype=torch.int64)
    return int(max_over_ranks(count).item())


def rolled_out(prompted: list[tuple[TokenizedRow, list[int]]], engine: RolloutEngine, settings: RolloutSettings,
               seed: int, seq_len: int, pairing=None) -> list[TokenizedRow]:
    """The rows rewritten with the student's rollouts as their responses (`pairing`, across tokenizers:
    re-tokenised for the teacher too, trainer/rollout/retokenize.py). Called on every rank for every
    batch, with no prompts on a rank that has run out (the engine is a collective)."""
    prompts = [prompt for _, prompt in prompted]
    seeds = [rollout_seed(seed, EVAL_ROLLOUT_STEP, row.index) for row, _ in prompted]
    rollouts = engine.generate(prompts, seeds, settings.within(seq_len, prompts))
    if pairing is not None:
        return [pairing(row, tokens, stopped)
                for (row, _), tokens, stopped in zip(prompted, rollouts.tokens, rollouts.stopped_at_eos)]
    return [rewritten(row, tokens, seq_len) for (row, _), tokens in zip(prompted, rollouts.tokens)]


def _filler(pad_id: int) -> TokenizedRow:
    """A one-token row with nothing supervised, for a rank whose prompts ran out: it still runs the forwards."""
    return TokenizedRow([pad_id], [IGNORE_INDEX])


def _scored(rows: list[TokenizedRow], teacher: Teacher, student: Scorer, device, chunk_size: int,
            pad_id: int) -> torch.Tensor:
    """Both models on the rewritten rows; float64 sums of `_ONPOLICY_COUNTERS` over their generated tokens."""
    host_batch = collate(rows, pad_id)
    batch = to_device(host_batch, device)
    teacher_log_probs = teacher.log_probs_of(batch, host_batch)  # the teacher's forward first, on every rank
    student_states = student.states(batch)
    with teacher.gathered(), student.gathered():
        return _onpolicy_counters(student, student_states, teacher_log_probs, batch["labels"], chunk_size)


def _onpolicy_counters(student: Scorer, student_states, teacher_log_probs: ChunkLogProbs, labels,
                       chunk_size: int) -> torch.Tensor:
    """The student's [B, T, ·] states, the teacher's log-probabilities of the same batch and [B, T]
    labels -> float64 [Σ KL(student ‖ teacher), Σ teacher NLL of the targets, supervised positions]."""
    flat_targets = targets_at_each_position(labels).reshape(-1)
    student_rows = student_states.reshape(flat_targets.shape[0], -1)
    supervised = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
    sums = torch.zeros(2, dtype=torch.float64, device=flat_targets.device)
    for start in range(0, supervised.numel(), chunk_size):
        index = supervised[start:start + chunk_size]
        student_logp = F.log_softmax(student.logits_of(student_rows.index_select(0, index)), dim=-1)
        teacher_logp = teacher_log_probs(index)
        # Per position in float32 (the vocabulary sum), then summed over positions in float64.
        kl = (student_logp.exp() * (student_logp - teacher_logp)).sum(-1).double().sum()
        nll = -teacher_logp.gather(1, flat_targets.index_select(0, index)[:, None]).double().sum()
        sums += torch.stack([kl, nll])
    return torch.cat([sums.cpu(), torch.tensor([float(supervised.numel())], dtype=torch.float64)])
