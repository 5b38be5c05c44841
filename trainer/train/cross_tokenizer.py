"""A job distilling across tokenizers (loss.cross_tokenizer): what its step and its evaluation read
besides the two models, and the held-out evaluation over aligned spans.

Each row was tokenised by both models and aligned at start-up (trainer/data/pairing.py); a
micro-batch carries the student's rows, the teacher's own ids, and the spans as a
:class:`~trainer.losses.spans.SpanBatch`. The teacher runs on its own ids; the loss compares the two
at the spans (trainer/losses/span_sums.py); the student's CE is on its own labels, as in every job.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.data.batching import to_device
from trainer.data.pairing import collate_pairs
from trainer.data.tokenize import TeacherTokens, TokenizedRow
from trainer.losses.cross_tokenizer import SharedVocab, shared_vocab
from trainer.losses.objective import Objective, TokenSums, targets_at_each_position
from trainer.losses.settings import IGNORE_INDEX
from trainer.losses.span_sums import cross_tokenizer_eval_sums, cross_tokenizer_sums
from trainer.losses.topk_teacher import TopKTeacher
from trainer.models.heads import Scorer
from trainer.models.loading import eval_mode
from trainer.models.teacher import Teacher
from trainer.ranks import all_reduce_sum
from trainer.rollout.engine import RolloutEngine, RolloutSettings
from trainer.rollout.retokenize import RolloutPairing
from trainer.train.evaluation import batches_of_busiest_rank, held_out_prompts, rolled_out

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CrossTokenizer:
    """The method, the ids both vocabularies share, and how the teacher's side of a batch is padded."""

    method: str
    vocab: SharedVocab
    teacher_pad_id: int
    uld_weight: float
    uld_top_k: int | None
    """None: ULD sorts the whole vocabulary."""

    @classmethod
    def for_job(cls, loss_cfg, checked) -> "CrossTokenizer":
        """From the loss config and the start-up checks (trainer/preflight/cross_tokenizer.py)."""
        pairs = checked.shared_ids.pairs
        vocab = shared_vocab(torch.tensor([s for s, _ in pairs], dtype=torch.long),
                             torch.tensor([t for _, t in pairs], dtype=torch.long),
                             checked.vocab_size, checked.teacher_vocab_size)
        return cls(loss_cfg.cross_tokenizer, vocab, _pad_id(checked.teacher_tokenizer), loss_cfg.uld_weight,
                   loss_cfg.uld_top_k or None)

    def collate(self, rows, pad_id: int) -> dict:
        """Both sides of a micro-batch, right-padded, with its spans."""
        return collate_pairs(rows, pad_id, self.teacher_pad_id)

    def micro_batch_sums(self, student_hidden, student_head, teacher, labels, objective: Objective,
                         spans, supervised=None) -> TokenSums:
        """The objective's sums over one micro-batch: the method over its spans, CE on the student's labels."""
        settings = objective.divergence
        teacher_hidden, teacher_head = _hidden_and_head(teacher)
        return cross_tokenizer_sums(
            student_hidden, student_head, teacher_hidden, teacher_head, spans, targets_at_each_position(labels),
            method=self.method, vocab=self.vocab, kd_weight=objective.kd_weight, ce_weight=objective.ce_weight,
            temperature=settings.temperature, uld_weight=self.uld_weight, top_k=self.uld_top_k, kind=settings.kind,
            beta=settings.beta, skew=settings.skew, chunk_size=objective.chunk_size, supervised=supervised)


def _hidden_and_head(teacher) -> tuple:
    """The teacher's side of the loss: hidden states and head (a model), or (None, the cache's
    :class:`TopKTeacher`, which holds the batch's teacher positions itself)."""
    if isinstance(teacher, TopKTeacher):
        return None, teacher
    return teacher.hidden, teacher.head


def _pad_id(tokenizer) -> int:
    """The teacher's padding id: any id does (padding is masked out), its own pad token where it has one."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def teacher_view(batch: dict) -> dict:
    """The teacher's side of a collated pair batch, as a model is called with it."""
    return {"input_ids": batch["teacher_input_ids"], "attention_mask": batch["teacher_attention_mask"]}


_COUNTERS = ("kl", "unshared_mass", "spans", "one_to_one", "agree", "student_ce", "bytes", "tokens", "exact", "rows",
             "teacher_nll", "teacher_tokens")


@torch.no_grad()
def cross_tokenizer_evaluate(teacher: Teacher, student: Scorer, cross: CrossTokenizer, batches: list[dict], device,
                             chunk_size: int, byte_lengths: torch.Tensor) -> dict:
    """Held-out metrics across tokenizers, over every rank's share of the held-out rows.

    The student's own (CE per token and per byte, exact match) as in every job. Against the teacher,
    means over the aligned spans: `eval/kl_to_teacher` (GOLD's coarse KL(teacher ‖ student): the shared
    ids and one bucket of the rest), `eval/top1_agreement` (both argmaxes a shared pair),
    `eval/unshared_mass` (the student's mass on ids the teacher lacks; GOLD pins it, a drifting student
    shows here first); `eval/teacher_ce` is the teacher's NLL per teacher token of the aligned text.
    `teacher`: a model, or a cross-tokenizer cache (trainer/cache/cross.py) of the held-out split."""
    sums = torch.zeros(len(_COUNTERS), dtype=torch.float64)
    with eval_mode(student.engine):
        for host_batch in batches:
            batch = to_device(host_batch, device)
            teacher_hidden, teacher_head = _hidden_and_head(teacher.states(teacher_view(batch), host_batch))
            student_hidden = student.states(batch)
            with teacher.gathered(), student.gathered():
                sums += _batch_counters(teacher_head, student, cross, teacher_hidden, student_hidden, batch,
                                        chunk_size, byte_lengths)
    totals = dict(zip(_COUNTERS, all_reduce_sum(sums).tolist()))
    spans, tokens = totals["spans"], totals["tokens"]
    return {
        "eval/kl_to_teacher": _mean(totals["kl"], spans),
        "eval/student_ce": _mean(totals["student_ce"], tokens),
        "eval/student_ce_per_byte": _mean(totals["student_ce"], totals["bytes"]),
        "eval/teacher_ce": _mean(totals["teacher_nll"], totals["teacher_tokens"]),
        "eval/top1_agreement": _mean(totals["agree"], spans),
        "eval/exact_match": _mean(totals["exact"], totals["rows"]),
        "eval/tokens": tokens,
        "eval/unshared_mass": _mean(totals["unshared_mass"], spans),
        "eval/aligned_spans": spans,
        "eval/one_to_one_spans": totals["one_to_one"],
    }


def _mean(total: float, count: float) -> float:
    return total / count if count else math.nan


def _batch_counters(teacher_head, student: Scorer, cross: CrossTokenizer, teacher_hidden, student_hidden,
                    batch: dict, chunk_size: int, byte_lengths: torch.Tensor) -> torch.Tensor:
    spans = batch["spans"]
    against = cross_tokenizer_eval_sums(student_hidden, student.head, teacher_hidden, teacher_head, spans, cross.vocab,
                                        chunk_size=chunk_size)
    teacher_nll, teacher_tokens = _teacher_nll(teacher_head, teacher_hidden, batch, chunk_size)
    own = _student_counters(student, student_hidden, batch["labels"], chunk_size, byte_lengths)
    return torch.tensor([float(against["kl"]), float(against["unshared_mass"]), float(against["spans"]),
                         float(against["one_to_one"]), float(against["top1_agreement"]), *own,
                         teacher_nll, teacher_tokens], dtype=torch.float64)


def _student_counters(student: Scorer, hidden, labels, chunk_size: int, byte_lengths: torch.Tensor) -> list[float]:
    """[Σ CE, Σ bytes of the supervised text, supervised tokens, rows solved, rows with a target]."""
    targets = targets_at_each_position(labels)
    flat_targets = targets.reshape(-1)
    rows = hidden.reshape(flat_targets.shape[0], -1)
    supervised = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
    lengths = byte_lengths.to(flat_targets.device)
    missed = torch.zeros_like(flat_targets, dtype=torch.bool)
    ce = torch.zeros((), dtype=torch.float64, device=flat_targets.device)
    for start in range(0, supervised.numel(), chunk_size):
        index = supervised[start:start + chunk_size]
        chunk_targets = flat_targets.index_select(0, index)
        log_probs = F.log_softmax(student.logits_of(rows.index_select(0, index)), dim=-1)
        ce += F.nll_loss(log_probs, chunk_targets, reduction="sum").double()
        missed[index] = log_probs.argmax(-1) != chunk_targets
    with_target = (targets != IGNORE_INDEX).any(dim=1)
    solved = (~missed.view_as(targets).any(dim=1) & with_target).sum()
    supervised_bytes = lengths.index_select(0, flat_targets.index_select(0, supervised)).sum()
    return [float(ce), float(supervised_bytes), float(supervised.numel()), float(solved), float(with_target.sum())]


def _teacher_nll(head, hidden, batch: dict, chunk_size: int) -> tuple[float, float]:
    """The teacher's Σ NLL of its own tokens inside the aligned spans, and how many there are: each
    span's first token (read at `teacher_first`, the token after it in the row) and its inner ones.
    `hidden` None: `head` is a cached teacher, which stored each of those log-probabilities exactly."""
    spans = batch["spans"]
    ids = batch["teacher_input_ids"].reshape(-1)
    positions = torch.cat([spans.teacher_first, spans.teacher_inner])
    targets = torch.cat([ids.index_select(0, spans.teacher_first + 1), spans.teacher_inner_ids])
    if hidden is None:
        return float(-head.token_log_probs(positions, targets, chunk_size=chunk_size).double().sum()), \
            float(positions.numel())
    rows = hidden.reshape(ids.shape[0], -1)
    nll = torch.zeros((), dtype=torch.float64, device=ids.device)
    for start in range(0, positions.numel(), chunk_size):
        index = positions[start:start + chunk_size]
        log_probs = F.log_softmax(head.logits(rows.index_select(0, index)), dim=-1)
        nll += F.nll_loss(log_probs, targets[start:start + chunk_size], reduction="sum").double()
    return float(nll), float(positions.numel())


_ONPOLICY_COUNTERS = ("kl", "spans", "teacher_nll", "teacher_tokens")


@torch.no_grad()
def cross_tokenizer_onpolicy_evaluate(rows: list[TokenizedRow], engine: RolloutEngine, settings: RolloutSettings,
                                      seed: int, pairing: RolloutPairing, teacher: Scorer, student: Scorer,
                                      cross: CrossTokenizer, *, device, chunk_size: int, pad_id: int,
                                      batch_size: int) -> dict:
    """The student's own responses to this rank's held-out prompts (seeded as `onpolicy_evaluate`
    seeds them), re-tokenised for the teacher and scored over the aligned spans, means over every rank:
    `eval/onpolicy_kl` is GOLD's coarse KL(teacher ‖ student) per span (as `eval/kl_to_teacher`: the
    two vocabularies compare only through the shared ids and one bucket, so the same-tokenizer
    KL(student ‖ teacher) per token has no counterpart), `eval/teacher_nll_of_student` the teacher's
    NLL per teacher token of the aligned text, over `eval/onpolicy_tokens` teacher tokens and
    `eval/onpolicy_spans` spans. Returns {} (with a warning) when no rank had a span to score."""
    sums = torch.zeros(len(_ONPOLICY_COUNTERS), dtype=torch.float64)
    filler = TokenizedRow([pad_id], [IGNORE_INDEX], teacher=TeacherTokens([cross.teacher_pad_id], [], prompt_length=1))
    with eval_mode(student.engine):
        for batch in batches_of_busiest_rank(held_out_prompts(rows), batch_size):
            batch_rows = rolled_out(batch, engine, settings, seed, pairing.seq_len, pairing)
            sums += _onpolicy_counters(teacher, student, cross, cross.collate(batch_rows or [filler], pad_id), device,
                                       chunk_size)
    totals = dict(zip(_ONPOLICY_COUNTERS, all_reduce_sum(sums).tolist()))
    if totals["spans"] == 0:
        log.warning("eval/onpolicy_kl is left out: no held-out rollout had a span both tokenizers supervise within "
                    "train.seq_len=%d; hold out prompt/response or messages rows, or raise train.seq_len.",
                    pairing.seq_len)
        return {}
    return {
        "eval/onpolicy_kl": totals["kl"] / totals["spans"],
        "eval/teacher_nll_of_student": _mean(totals["teacher_nll"], totals["teacher_tokens"]),
        "eval/onpolicy_tokens": totals["teacher_tokens"],
        "eval/onpolicy_spans": totals["spans"],
    }


def _onpolicy_counters(teacher: Scorer, student: Scorer, cross: CrossTokenizer, host_batch: dict, device,
                       chunk_size: int) -> torch.Tensor:
    """Both models on one collated batch of re-tokenised rollouts: float64 `_ONPOLICY_COUNTERS`."""
    batch = to_device(host_batch, device)
    teacher_hidden = teacher.states(teacher_view(batch))  # the teacher's forward first, on every rank
    student_hidden = student.states(batch)
    with teacher.gathered(), student.gathered():
        against = cross_tokenizer_eval_sums(student_hidden, student.head, teacher_hidden, teacher.head, batch["spans"],
                                            cross.vocab, chunk_size=chunk_size)
        teacher_nll, teacher_tokens = _teacher_nll(teacher.head, teacher_hidden, batch, chunk_size)
    return torch.tensor([float(against["kl"]), float(against["spans"]), teacher_nll, teacher_tokens],
                        dtype=torch.float64)
