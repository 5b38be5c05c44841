"""One row tokenised by both models, the student's and the teacher's tokens aligned into spans
(distillation across tokenizers), and the spans of a micro-batch as a `SpanBatch` for the loss.

Each model tokenises the row itself, as it would alone: a prompt/response row is `bos + prompt |
response + eos` with that model's bos and eos; a `messages` row is rendered by that model's own chat
template, so the two texts differ in their markup. The supervised characters are the same on both
sides, though: the response (or the text of a text row, or the "content" of each assistant turn, found
verbatim inside that turn on each side). `trainer/data/alignment.py` aligns the two tokenisations of
those characters into spans that spell the same text; a row's spans are in text order, each
`(a, b, c, d)`: student tokens `[a, b)` meet teacher tokens `[c, d)`.

End markers. The eos after a response, or the end-of-turn markup after an assistant turn's content
("<|im_end|>\\n" in ChatML, "<|eot_id|>" in Llama 3), covers no supervised character, so the alignment
leaves it out; yet the student must learn to stop. So each response and each turn adds one more span
after its last one: the student's end tokens (its eos, or the tokens between the content's end and the
turn's end in its rendering) against the teacher's, m:n, when both sides have them and supervise them.
They spell different strings ("</s>" against "<|endoftext|>"): the loss compares them as the same
event, "the answer stops here"; `role_pairs` names the ids with that role so GOLD can treat them as one.

Truncation: each side is cut at `seq_len` on its own; a span that reaches past either cut is dropped.
Only the student's cut sets `TokenizedRow.truncated`, as `tokenize_row` does.

Worked example. row = {"prompt": "Hi:", "response": " café €"}, text "Hi: café €" (10 characters),
the response's characters [3, 10).

    student (SentencePiece, byte fallback)   teacher (byte-level BPE, no bos)
    0 "<s>"      (0, 0)    prompt             0 "Hi"            (0, 2)    prompt
    1 "▁Hi"      (0, 2)    prompt             1 ":"             (2, 3)    prompt
    2 ":"        (2, 3)    prompt             2 "ĠcafÃ©"        (3, 8)
    3 "▁caf"     (3, 7)                       3 "Ġâ"            (8, 10)   a space and part of "€"
    4 "é"        (7, 8)                       4 "Ĥ¬"            (9, 10)   the rest of "€"
    5 "▁"        (8, 9)                       5 "<|endoftext|>" (10, 10)  no characters
    6 "<0xE2>"   (9, 10)   "€" in three bytes
    7 "<0x82>"   (9, 10)
    8 "<0xAC>"   (9, 10)
    9 "</s>"     (10, 10)  no characters

    student cuts in the response 3 7 8 9 10, teacher cuts 3 8 10, shared 3 8 10:
    (3, 5, 2, 3)    " café": 2 student tokens meet 1
    (5, 9, 3, 5)    " €": 4 meet 2
    (9, 10, 5, 6)   the end span: "</s>" meets "<|endoftext|>"

The student's row (ids, labels, flags) is exactly `tokenize_row`'s; it is tokenised a second time
with offsets, which costs one more encoding per row, not more per row as the data grows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from trainer.data.alignment import Tokens, align
from trainer.data.batching import collate
from trainer.data.sources import DataError
from trainer.data.tokenize import (
    PROMPT_ONLY, SpecialIds, TeacherTokens, TokenizedRow, chat_turns, row_format, special_ids, tokenize_row,
)
from trainer.losses.settings import IGNORE_INDEX
from trainer.losses.spans import SpanBatch

Span = tuple[int, int, int, int]


@dataclass(frozen=True)
class Side:
    """One model's tokenisation of a row, as the alignment needs it."""

    text: str
    """The text that model reads: prompt + response, the text, or its own chat rendering."""
    tokens: Tokens
    """Its ids, each with the characters `[start, end)` of `text` it covers; bos and eos cover none."""
    supervised: Sequence[bool]
    """Per token: does that model's loss mask keep it (cut at `seq_len` for the row's spans)."""
    contents: Sequence[tuple[int, int]]
    """The supervised characters of `text`: the response, the text, or each assistant turn's content."""
    ends: Sequence[tuple[int, int]]
    """Per content, the token range `[i, j)` of its end marker (eos, end-of-turn markup); empty if none."""


def pair_tokenize_row(
    row: Any, student_tokenizer: Any, teacher_tokenizer: Any, seq_len: int, origin: str, *,
    specials: SpecialIds | None = None, teacher_specials: SpecialIds | None = None,
) -> TokenizedRow:
    """`tokenize_row`'s student row, with `.teacher`: the teacher's ids and the spans both supervise.

    `specials`/`teacher_specials` are each tokenizer's `special_ids`, computed here when not given.
    """
    kind = row_format(row, origin)
    if kind == "messages":
        _require_chat_template(student_tokenizer, "student", origin)
        _require_chat_template(teacher_tokenizer, "teacher", origin)
    specials = special_ids(student_tokenizer) if specials is None else specials
    teacher_specials = special_ids(teacher_tokenizer) if teacher_specials is None else teacher_specials
    # The sides first: a tokenizer without offsets is refused there in one line, before tokenize_row
    # would fail on it with a less helpful one.
    student = side_of(row, kind, student_tokenizer, specials, origin, "student")
    teacher = side_of(row, kind, teacher_tokenizer, teacher_specials, origin, "teacher")
    tokenized = tokenize_row(row, student_tokenizer, seq_len, origin, specials=specials)
    if list(student.tokens.ids[:seq_len]) != tokenized.input_ids:
        raise DataError(f"data row {origin}: the student's tokenizer gives other ids with character offsets than "
                        "without, so its spans would point at the wrong tokens; re-save it with save_pretrained "
                        "so that its tokenizer.json and tokenizer_config.json agree")
    # The student's own labels say what it learns (its tokenizer's offsets may be trimmed where the
    # alignment's are not); each side's mask is cut at seq_len, which drops the spans past the cut.
    student = replace(student, supervised=[label != IGNORE_INDEX for label in tokenized.labels])
    # Found before the cut: a last response past it still ends the teacher's prompt there.
    teacher_prompt = min(response_start(teacher.supervised), seq_len)
    teacher = replace(teacher, supervised=teacher.supervised[:seq_len])
    tokenized.teacher = TeacherTokens(list(teacher.tokens.ids[:seq_len]), row_spans(student, teacher),
                                      truncated=len(teacher.tokens.ids) > seq_len,
                                      prompt_length=teacher_prompt)
    return tokenized


@dataclass(frozen=True)
class TeacherSideRow:
    """The teacher's side of a row alone, as `pair_tokenize_row` makes it whatever the student: what
    a cross-tokenizer teacher cache is built from (trainer/cache/cross.py)."""

    row: TokenizedRow
    """Its ids cut at `seq_len`, and as labels the tokens the teacher's side supervises (`Side.supervised`)."""
    text: str
    """The text the teacher reads (its own chat rendering of a `messages` row)."""
    offsets: list[tuple[int, int]]
    """Per id, the characters `[start, end)` of `text` it covers (bos and eos cover none)."""


def teacher_side_row(row: Any, tokenizer: Any, seq_len: int, origin: str, *,
                     specials: SpecialIds | None = None) -> TeacherSideRow:
    """One row as the teacher's side of every pairing sees it: the same ids and the same supervised
    tokens as `pair_tokenize_row`'s `.teacher`, for any student."""
    kind = row_format(row, origin)
    if kind == "messages":
        _require_chat_template(tokenizer, "teacher", origin)
    side = side_of(row, kind, tokenizer, special_ids(tokenizer) if specials is None else specials, origin, "teacher")
    ids = list(side.tokens.ids[:seq_len])
    labels = [token if kept else IGNORE_INDEX for token, kept in zip(ids, side.supervised)]
    tokenized = TokenizedRow(ids, labels, truncated=len(side.tokens.ids) > seq_len,
                             prompt_only=kind == PROMPT_ONLY)
    return TeacherSideRow(tokenized, side.text, list(side.tokens.offsets[:seq_len]))


def response_start(supervised: Sequence[bool]) -> int:
    """Where the last run of supervised tokens starts (the last response, or the last assistant turn),
    or the length when none is: the side's prompt for a rollout, as `prompt_of` finds the student's."""
    end = len(supervised)
    while end > 0 and not supervised[end - 1]:
        end -= 1
    start = end
    while start > 0 and supervised[start - 1]:
        start -= 1
    return start if end else len(supervised)


def _require_chat_template(tokenizer: Any, side: str, origin: str) -> None:
    if not tokenizer.chat_template:
        raise DataError(f"data row {origin} has 'messages' but the {side}'s tokenizer has no chat template, and each "
                        f"model renders the conversation with its own; give the {side} one (chat_template in its "
                        "tokenizer_config.json) or use prompt/response rows")


# One side of a row --------------------------------------------------------------------------------

def side_of(row: dict, kind: str, tokenizer: Any, specials: SpecialIds, origin: str, side: str) -> Side:
    """How one model tokenises `row` (of format `kind`), with offsets, as `tokenize_row` would."""
    if kind == "prompt/response":
        return _prompt_response_side(row["prompt"], row["response"], tokenizer, specials)
    if kind == "text":
        return _text_side(row["text"], tokenizer, specials)
    if kind == PROMPT_ONLY:
        return _prompt_only_side(row["prompt"], tokenizer, specials)
    return _chat_side(row["messages"], tokenizer, origin, side)


def _prompt_response_side(prompt: str, response: str, tokenizer: Any, specials: SpecialIds) -> Side:
    # Two encodings, as tokenize_row does: the response starts a token on both sides.
    text = prompt + response
    before, after = Tokens.of(tokenizer, prompt), Tokens.of(tokenizer, response)
    shift = len(prompt)
    ids = [*specials.bos, *before.ids, *after.ids, *specials.eos]
    offsets = ([(0, 0)] * len(specials.bos) + list(before.offsets)
               + [(start + shift, end + shift) for start, end in after.offsets]
               + [(len(text), len(text))] * len(specials.eos))
    unsupervised = len(specials.bos) + len(before.ids)
    supervised = [False] * unsupervised + [True] * (len(ids) - unsupervised)
    ends = [(len(ids) - len(specials.eos), len(ids))]
    return Side(text, Tokens(ids, offsets), supervised, [(shift, len(text))], ends)


def _text_side(text: str, tokenizer: Any, specials: SpecialIds) -> Side:
    encoded = Tokens.of(tokenizer, text)
    ids = [*specials.bos, *encoded.ids, *specials.eos]
    offsets = [(0, 0)] * len(specials.bos) + list(encoded.offsets) + [(len(text), len(text))] * len(specials.eos)
    return Side(text, Tokens(ids, offsets), [True] * len(ids), [(0, len(text))],
                [(len(ids) - len(specials.eos), len(ids))])


def _prompt_only_side(prompt: str, tokenizer: Any, specials: SpecialIds) -> Side:
    encoded = Tokens.of(tokenizer, prompt)
    ids = [*specials.bos, *encoded.ids]
    return Side(prompt, Tokens(ids, [(0, 0)] * len(specials.bos) + list(encoded.offsets)), [False] * len(ids), [], [])


def _chat_side(messages: list[dict], tokenizer: Any, origin: str, side: str) -> Side:
    """The conversation in this model's template; each assistant turn's content is found in its turn."""
    text, turns = chat_turns(messages, tokenizer, origin)
    tokens = Tokens.of(tokenizer, text)
    answers = [message["content"] for message in messages if message["role"] == "assistant"]
    contents = [_content_in_turn(text, answer, turn, number, origin, side)
                for number, (answer, turn) in enumerate(zip(answers, turns), start=1)]
    supervised = [any(low <= start and end <= high for low, high in turns) for start, end in tokens.offsets]
    ends = [_tokens_between(tokens.offsets, content[1], turn[1]) for content, turn in zip(contents, turns)]
    return Side(text, tokens, supervised, contents, ends)


def _content_in_turn(text: str, content: str, turn: tuple[int, int], number: int, origin: str,
                     side: str) -> tuple[int, int]:
    start = text.find(content, *turn)
    if start < 0:
        raise DataError(f"data row {origin}: the {side}'s chat template does not write assistant turn {number}'s "
                        "content as it is (it trims or rewrites it), so it cannot be aligned with the other model's "
                        "tokens; strip the content's outer whitespace, or use prompt/response rows")
    return start, start + len(content)


def _tokens_between(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """The token range `[i, j)` spelling the characters `[start, end)`, or an empty one when a token
    crosses either edge (then the markup shares a token with the content, and no end span is made)."""
    inside = [index for index, (low, high) in enumerate(offsets) if start <= low and high <= end and low < high]
    if not inside:
        return 0, 0
    first, last = inside[0], inside[-1] + 1
    crosses = any(low < start < high or low < end < high for low, high in offsets)
    return (0, 0) if crosses or len(inside) != last - first else (first, last)


# Spans ----------------------------------------------------------------------------------------------

def row_spans(student: Side, teacher: Side) -> list[Span]:
    """Each content's aligned spans, then its end span, where both sides supervise all their tokens
    (a side's `supervised` is cut at `seq_len`, so a span past either cut is dropped)."""
    spans = []
    for number, (student_chars, teacher_chars) in enumerate(zip(student.contents, teacher.contents)):
        content = student.text[slice(*student_chars)]
        alignment = align(content, _relative(student.tokens, student_chars), _relative(teacher.tokens, teacher_chars),
                          supervised=[(0, len(content))])
        for span in alignment.spans:
            if (_inside(student.tokens, span.student, student_chars)
                    and _inside(teacher.tokens, span.teacher, teacher_chars)):
                spans.append((*span.student, *span.teacher))
        spans.append((*student.ends[number], *teacher.ends[number]))
    return [span for span in spans if _kept(span, student, teacher)]


def _relative(tokens: Tokens, chars: tuple[int, int]) -> Tokens:
    """`tokens` with offsets into the characters `chars` alone: those before them empty at 0, those
    after them empty at the end, so `align` leaves them out and the ids keep their indices."""
    start, end = chars
    length = end - start
    return Tokens(tokens.ids, [(min(max(low - start, 0), length), min(max(high - start, 0), length))
                               for low, high in tokens.offsets])


def _inside(tokens: Tokens, token_range: tuple[int, int], chars: tuple[int, int]) -> bool:
    """No token of the span reaches outside the content (one across its edge, clipped, would seem to)."""
    return all(chars[0] <= low and high <= chars[1] for low, high in tokens.offsets[slice(*token_range)])


def _kept(span: Span, student: Side, teacher: Side) -> bool:
    a, b, c, d = span
    return (1 <= a < b <= len(student.supervised) and 1 <= c < d <= len(teacher.supervised)
            and all(student.supervised[a:b]) and all(teacher.supervised[c:d]))


# Role pairs -----------------------------------------------------------------------------------------

_PROBE = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]


def role_pairs(student_tokenizer: Any, teacher_tokenizer: Any) -> list[tuple[int, int]]:
    """(student id, teacher id) of tokens with one role and different strings: the two eos tokens, and
    each chat template's end-of-turn token when both have a template. One to one: a later pair that
    reuses an id on either side is left out (the eos pair wins)."""
    candidates = [(student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id)]
    if student_tokenizer.chat_template and teacher_tokenizer.chat_template:
        candidates.append((end_of_turn_id(student_tokenizer), end_of_turn_id(teacher_tokenizer)))
    pairs: list[tuple[int, int]] = []
    for student_id, teacher_id in candidates:
        if student_id is None or teacher_id is None or any(student_id == s or teacher_id == t for s, t in pairs):
            continue
        if student_tokenizer.convert_ids_to_tokens(student_id) != teacher_tokenizer.convert_ids_to_tokens(teacher_id):
            pairs.append((student_id, teacher_id))
    return pairs


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The first token after the assistant's content in a probe conversation, or None when it shares a
    token with the content."""
    side = _chat_side(_PROBE, tokenizer, "(the end-of-turn probe)", "model")
    first, last = side.ends[0]
    return side.tokens.ids[first] if last > first else None


# Collating ------------------------------------------------------------------------------------------

def collate_pairs(rows: Sequence[TokenizedRow], pad_id: int, teacher_pad_id: int) -> dict:
    """`collate(rows, pad_id)` plus the teacher's `teacher_input_ids` and `teacher_attention_mask`
    (`[B, T_t]`, right-padded to its longest row) and `spans`, the rows' spans as a `SpanBatch`."""
    missing = next((row for row in rows if row.teacher is None), None)
    if missing is not None:
        raise DataError(f"row {missing.index} has no teacher tokens, which distillation across tokenizers needs; "
                        "load the data with load_examples(..., teacher_tokenizer=...)")
    if teacher_pad_id is None:
        raise DataError("the teacher's tokenizer has no pad token; add a \"pad_token\" to its tokenizer_config.json "
                        "(any token will do: padding is masked out)")
    batch = collate(rows, pad_id)
    teacher_width = max((len(row.teacher.input_ids) for row in rows), default=0)
    teacher_ids = torch.full((len(rows), teacher_width), teacher_pad_id, dtype=torch.long)
    teacher_mask = torch.zeros((len(rows), teacher_width), dtype=torch.long)
    for index, row in enumerate(rows):
        length = len(row.teacher.input_ids)
        teacher_ids[index, :length] = torch.tensor(row.teacher.input_ids, dtype=torch.long)
        teacher_mask[index, :length] = 1
    batch["teacher_input_ids"], batch["teacher_attention_mask"] = teacher_ids, teacher_mask
    batch["spans"] = span_batch(rows, batch["input_ids"].shape[1], teacher_width)
    return batch


def span_batch(rows: Sequence[TokenizedRow], student_width: int, teacher_width: int) -> SpanBatch:
    """The rows' spans as flat positions into `[B, T_s]` and `[B, T_t]` (see trainer/losses/spans.py)."""
    fields: dict[str, list[int]] = {name: [] for name in (
        "student_first", "teacher_first", "student_tokens", "teacher_tokens", "student_inner", "student_inner_ids",
        "student_inner_span", "teacher_inner", "teacher_inner_ids", "teacher_inner_span")}
    for index, row in enumerate(rows):
        student_base, teacher_base = index * student_width, index * teacher_width
        for a, b, c, d in row.teacher.spans:
            number = len(fields["student_first"])
            fields["student_first"].append(student_base + a - 1)
            fields["teacher_first"].append(teacher_base + c - 1)
            fields["student_tokens"].append(b - a)
            fields["teacher_tokens"].append(d - c)
            # Inner token i (a < i < b) is predicted by the position before it, i - 1.
            for position in range(a, b - 1):
                fields["student_inner"].append(student_base + position)
                fields["student_inner_ids"].append(row.input_ids[position + 1])
                fields["student_inner_span"].append(number)
            for position in range(c, d - 1):
                fields["teacher_inner"].append(teacher_base + position)
                fields["teacher_inner_ids"].append(row.teacher.input_ids[position + 1])
                fields["teacher_inner_span"].append(number)
    return SpanBatch(**{name: torch.tensor(values, dtype=torch.long) for name, values in fields.items()})
