"""A rollout re-tokenised for a teacher with another tokenizer (on-policy distillation across
tokenizers): the student's row as `rewritten` writes it, with `.teacher` built from the text it wrote.

The teacher reads its own tokens: its side of the row's prompt (the ids before the original row's last
response, `TeacherTokens.prompt_length`), then its tokenisation of the decoded response, then its end
marker when the student stopped at its EOS. The spans pair the two tokenisations of the response text
(trainer/data/pairing.py's `row_spans`), plus the end span: the student's stopping token against the
teacher's end marker, as the off-policy rows pair their eos tokens.

The student's characters come from decoding its ids incrementally: token i covers the characters that
`decode(ids[:i + 1])` adds to `decode(ids[:i])`. A token holding only part of a multi-byte character
completes no character (the partial decode ends in U+FFFD, which the full text does not have there):
it covers none and joins the span after it, with the token that completes the character.

Worked example. A byte-level student writes " €!" as three tokens; "€" is the bytes E2 82 AC:

    i   token    decode(ids[:i + 1])   characters   covers
    0   "Ġâ"     " \\ufffd"             (0, 1)       " " ("â" is E2: no character yet)
    1   "Ĥ¬"     " €"                  (1, 2)       "€" (82 AC complete it)
    2   "!"      " €!"                 (2, 3)       "!"

A character-level teacher tokenises " €!" as " ", "€", "!": three 1:1 spans. Had "Ġâ" been the
byte E2 alone, it would cover (0, 0) and join "Ĥ¬" in one span against the teacher's "€".

The response text is `decode` without clean-up of spaces (the text must be the concatenation of the
tokens' pieces) and with the special tokens the student wrote mid-response ("<unk>", "<|im_start|>"):
the teacher must judge every token, and a token that covered no characters would make its span's first
token differ between the sides, which the span loss assumes they do not. A teacher with the same
special string reads it as its own special token; one without reads its characters. (The stopping EOS
is not text: it meets the teacher's end marker.) A SentencePiece decoder drops the space its first
piece starts with ("▁The" is "The"), so such a student's response reaches the teacher without its
leading space.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from trainer.data.alignment import Tokens
from trainer.data.pairing import Side, end_of_turn_id, row_spans
from trainer.data.sources import DataError
from trainer.data.tokenize import TeacherTokens, TokenizedRow, special_ids
from trainer.losses.settings import IGNORE_INDEX
from trainer.rollout.prompts import prompt_of, rewritten


@dataclass(frozen=True)
class RolloutEnds:
    """The teacher's end marker for each token a student's rollout may stop at."""

    teacher_eos: list[int]
    """What the teacher's rows end with (`special_ids(teacher).eos`): the end of any stop not below."""
    by_stop: dict[int, list[int]] = field(default_factory=dict)
    """The student's end-of-turn id to the teacher's, when both tokenizers have a chat template."""

    def teacher_end(self, stop_id: int) -> list[int]:
        return self.by_stop.get(stop_id, self.teacher_eos)


def rollout_ends(student_tokenizer: Any, teacher_tokenizer: Any) -> RolloutEnds:
    """Each stop's teacher end: a stop at the student's end-of-turn token ends the teacher's turn too."""
    by_stop = {}
    if student_tokenizer.chat_template and teacher_tokenizer.chat_template:
        student_end, teacher_end = end_of_turn_id(student_tokenizer), end_of_turn_id(teacher_tokenizer)
        if student_end is not None and teacher_end is not None:
            by_stop[student_end] = [teacher_end]
    return RolloutEnds(special_ids(teacher_tokenizer).eos, by_stop)


def pair_rollout(row: TokenizedRow, generated_ids: list[int], stopped_at_eos: bool, student_tokenizer: Any,
                 teacher_tokenizer: Any, seq_len: int, *, ends: RolloutEnds | None = None) -> TokenizedRow:
    """`rewritten(row, generated_ids, seq_len)` with `.teacher`: the teacher's prompt ids of `row`, its
    tokens of the decoded response and its end marker, and the spans both supervise.

    `row` is the original paired row; `generated_ids` the rollout (its EOS last when `stopped_at_eos`,
    as `Rollouts` gives it); `ends` is :func:`rollout_ends`, computed here when not given. Each side is
    cut at `seq_len` on its own, and a span past either cut is dropped, as `pair_tokenize_row` does.
    """
    if row.teacher is None or row.teacher.prompt_length is None:
        raise DataError(f"row {row.index} has no teacher prompt to re-tokenise a rollout after; load the data with "
                        "load_examples(..., teacher_tokenizer=...)")
    ends = rollout_ends(student_tokenizer, teacher_tokenizer) if ends is None else ends
    paired = rewritten(row, generated_ids, seq_len)
    prompt_length = len(prompt_of(row))
    kept = paired.input_ids[prompt_length:]
    stopped = stopped_at_eos and len(kept) == len(generated_ids)  # else the cut took the EOS
    student = _student_side(paired, prompt_length, kept[:-1] if stopped else kept, student_tokenizer)
    teacher_end = ends.teacher_end(kept[-1]) if stopped else []
    teacher = _teacher_side(row.teacher.input_ids[:row.teacher.prompt_length], student.text, teacher_end,
                            teacher_tokenizer, seq_len)
    teacher_ids = list(teacher.tokens.ids)
    paired.teacher = TeacherTokens(teacher_ids[:seq_len], row_spans(student, teacher),
                                   truncated=len(teacher_ids) > seq_len, prompt_length=row.teacher.prompt_length)
    return paired


def _student_side(paired: TokenizedRow, prompt_length: int, response_ids: list[int], tokenizer: Any) -> Side:
    """The rewritten row's tokens: the prompt's cover nothing, the response's what decoding adds, the EOS
    (the row's last token when it is not part of the response) nothing at the end."""
    text, offsets = decoded_offsets(tokenizer, response_ids)
    ids = paired.input_ids
    stop = len(ids) - prompt_length - len(response_ids)
    return Side(text, Tokens(ids, [(0, 0)] * prompt_length + offsets + [(len(text), len(text))] * stop),
                supervised=[label != IGNORE_INDEX for label in paired.labels], contents=[(0, len(text))],
                ends=[(len(ids) - stop, len(ids))])


def _teacher_side(prompt_ids: list[int], text: str, end_ids: list[int], tokenizer: Any, seq_len: int) -> Side:
    """The teacher's prompt, its own tokens of `text` and `end_ids`; supervised after the prompt, to `seq_len`."""
    response = Tokens.of(tokenizer, text)
    ids = [*prompt_ids, *response.ids, *end_ids]
    offsets = [(0, 0)] * len(prompt_ids) + list(response.offsets) + [(len(text), len(text))] * len(end_ids)
    supervised = ([False] * len(prompt_ids) + [True] * (len(ids) - len(prompt_ids)))[:seq_len]
    return Side(text, Tokens(ids, offsets), supervised, [(0, len(text))], [(len(ids) - len(end_ids), len(ids))])


def decoded_offsets(tokenizer: Any, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """`ids` decoded (special tokens kept, no clean-up), and the characters `[start, end)` of that text
    each one adds: a token completing no character covers none (see the module docstring)."""
    if not ids:
        return "", []
    # One call for all prefixes: quadratic in the response's length, in the tokenizer's Rust loop.
    prefixes = tokenizer.backend_tokenizer.decode_batch([ids[:end] for end in range(1, len(ids) + 1)],
                                                        skip_special_tokens=False)
    text = prefixes[-1]
    offsets, reached = [], 0
    for prefix in prefixes:
        # The characters this prefix has settled: a trailing partial character (U+FFFD) differs from the text.
        settled = max(len(os.path.commonprefix([prefix, text])), reached)
        offsets.append((reached, settled))
        reached = settled
    return text, offsets


@dataclass(frozen=True)
class RolloutPairing:
    """`pair_rollout` for one job: its two tokenizers, `train.seq_len`, and the ends found once."""

    student_tokenizer: Any
    teacher_tokenizer: Any
    seq_len: int
    ends: RolloutEnds

    @classmethod
    def for_tokenizers(cls, student_tokenizer: Any, teacher_tokenizer: Any, seq_len: int) -> "RolloutPairing":
        return cls(student_tokenizer, teacher_tokenizer, seq_len, rollout_ends(student_tokenizer, teacher_tokenizer))

    def __call__(self, row: TokenizedRow, generated_ids: list[int], stopped_at_eos: bool) -> TokenizedRow:
        return pair_rollout(row, generated_ids, stopped_at_eos, self.student_tokenizer, self.teacher_tokenizer,
                            self.seq_len, ends=self.ends)
