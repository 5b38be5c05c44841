"""Distillation across tokenizers at start-up: the two tokenizers checked, and the alignment report.

With `loss.cross_tokenizer=null` the teacher and the student must share one tokenizer (a one-line
refusal that names this option). With `uld` or `gold` that check becomes a report: the share of the
student's vocabulary whose text the teacher's vocabulary holds exactly (GOLD's exact part covers
those ids, its ULD part the rest), and, on the first training rows, how the two tokenisations meet:
how many aligned spans are one token against one token, and how much of the student's supervised
text the spans cover (a token inside no span is taught by the CE term alone).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from trainer.data.alignment import vocabulary_overlap
from trainer.data.tokenize import TokenizedRow
from trainer.models import checks
from trainer.models.loading import ModelError

log = logging.getLogger(__name__)

REPORTED_ROWS = 64
"""The training rows the alignment report looks at: enough for a share, cheap at start-up."""

LOW_OVERLAP = 0.25
"""Below this share of the student's ids matched in the teacher's, GOLD's exact part sees little
and a warning says so (Llama 3 against Qwen2 share far more; a character-level student far less)."""


@dataclass(frozen=True)
class SharedIds:
    """The student ids matched to teacher ids (exact text, or the same role: eos, end of turn)."""

    pairs: tuple[tuple[int, int], ...]
    vocab_share: float
    """Matched student ids (by text) over all of the student's ids."""


def check_tokenizers(method: str | None, teacher_tokenizer, student_tokenizer) -> None:
    """One tokenizer unless a cross-tokenizer method is set; with one, both must give character
    offsets (fast tokenizers), which aligning them needs."""
    if method is None:
        checks.check_same_tokenizer(teacher_tokenizer, student_tokenizer)
        return
    for role, tokenizer in (("teacher", teacher_tokenizer), ("student", student_tokenizer)):
        if not getattr(tokenizer, "is_fast", False):
            raise ModelError(f"loss.cross_tokenizer={method} aligns the two tokenisations by character offsets, which "
                             f"the {role}'s tokenizer ({type(tokenizer).__name__}) does not give; put a fast tokenizer "
                             f"(tokenizer.json) in {role}.path.")
    if teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab():
        log.warning("loss.cross_tokenizer=%s with one tokenizer on both sides: the result is the same-tokenizer "
                    "loss's, computed more slowly; set loss.cross_tokenizer=null.", method)


def shared_ids(student_tokenizer, teacher_tokenizer, role_pairs=()) -> SharedIds:
    """The exact-text matches, then the role pairs (eos to eos) for ids neither side has matched."""
    overlap = vocabulary_overlap(student_tokenizer, teacher_tokenizer)
    pairs = list(overlap.pairs)
    taken_student, taken_teacher = {s for s, _ in pairs}, {t for _, t in pairs}
    for student_id, teacher_id in role_pairs:
        if student_id not in taken_student and teacher_id not in taken_teacher:
            pairs.append((student_id, teacher_id))
            taken_student.add(student_id)
            taken_teacher.add(teacher_id)
    return SharedIds(tuple(sorted(pairs)), overlap.share)


def alignment_report(method: str, shared: SharedIds, student_size: int, teacher_size: int,
                     rows: list[TokenizedRow], is_main: bool = True) -> dict:
    """What summary.json records of the alignment (`cross_tokenizer/*`), logged once at start-up."""
    sample = [row for row in rows if row.teacher is not None][:REPORTED_ROWS]
    spans = [span for row in sample for span in row.teacher.spans]
    one_to_one = sum(b - a == 1 and d - c == 1 for a, b, c, d in spans)
    covered = sum(b - a for a, b, _, _ in spans)
    supervised = sum(row.num_supervised for row in sample)
    report = {"cross_tokenizer/method": method, "cross_tokenizer/vocab_share": shared.vocab_share,
              "cross_tokenizer/shared_ids": len(shared.pairs), "cross_tokenizer/student_ids": student_size,
              "cross_tokenizer/teacher_ids": teacher_size,
              "cross_tokenizer/one_to_one_share": one_to_one / len(spans) if spans else 0.0,
              "cross_tokenizer/supervised_coverage": covered / supervised if supervised else 0.0}
    if not is_main:
        return report
    log.info("cross-tokenizer (%s): %.1f%% of the student's %d ids have an exact match among the teacher's %d "
             "(%d shared ids with eos/end of turn); on the first %d training rows, %d aligned spans, %.1f%% of "
             "them one token to one token, covering %.1f%% of the student's supervised tokens.", method,
             100 * shared.vocab_share, student_size, teacher_size, len(shared.pairs), len(sample), len(spans),
             100 * report["cross_tokenizer/one_to_one_share"], 100 * report["cross_tokenizer/supervised_coverage"])
    if shared.vocab_share < LOW_OVERLAP and method == "gold":
        log.warning("only %.1f%% of the student's ids are in the teacher's vocabulary: GOLD's exact part sees few "
                    "of them and its ULD part (loss.uld_weight) carries the rest.", 100 * shared.vocab_share)
    return report
