"""Two tokenisations of one text, aligned by character offsets into spans (for distillation across
tokenizers), and the share of the student's vocabulary that the teacher's also holds.

Each model tokenises the same string with its own tokenizer; a fast tokenizer's
`return_offsets_mapping=True` says which characters `[start, end)` each token covers. A *cut* is a
character position where one tokenisation can be split: every token before it ends at or before it
and every token after it starts at or after it. An aligned span lies between two consecutive cuts
that BOTH tokenisations share, so its m student tokens and its n teacher tokens spell the same
characters; it is kept only when those characters lie inside one supervised range (a response, an
assistant turn), and when a position before it exists on both sides (nothing predicts token 0).

Worked example. text = "x= naïve €" (10 characters: "ï" and "€" are one character each, however
many UTF-8 bytes), supervised = [(2, 10)], the response " naïve €".

    student (byte-level BPE)          teacher (SentencePiece, byte fallback)
    0 "x"    (0, 1)                   0 "<s>"     (0, 0)   no text: belongs to no span
    1 "="    (1, 2)                   1 "x="      (0, 2)
    2 "Ġna"  (2, 5)                   2 "▁naïve"  (2, 8)
    3 "ïve"  (5, 8)                   3 "▁"       (8, 9)
    4 "Ġ"    (8, 9)                   4 "<0xE2>"  (9, 10)  three byte tokens of one character:
    5 "âĤ"   (9, 10)                  5 "<0x82>"  (9, 10)  no cut between them
    6 "¬"    (9, 10)                  6 "<0xAC>"  (9, 10)

    student cuts 0 1 2 5 8 9 10, teacher cuts 0 2 8 9 10, shared 0 2 8 9 10:
    chars [0, 2)  student [0, 2) teacher [1, 2)   outside the supervised text: dropped
    chars [2, 8)  student [2, 4) teacher [2, 3)   2 tokens meet 1
    chars [8, 9)  student [4, 5) teacher [3, 4)   1:1
    chars [9, 10) student [5, 7) teacher [4, 7)   2 tokens meet 3 (one character, in bytes)

Which positions the loss compares: a causal LM's logits at position i predict token i + 1, so the
tokens [a, b) of a span are predicted by the logits at positions [a - 1, b - 1) (`student_positions`,
`teacher_positions`). The span [2, 8) above reads the student at positions 1 and 2 (predicting "Ġna"
then "ïve") and the teacher at position 1 (predicting "▁naïve"). Reading token i's probability at
position i instead is the off-by-one TRL's GOLD trainer has (FIELD_NOTES.md); this module names the
positions so the loss need not work them out again.

How the later loss merges probabilities in a span (the chain rule): the probability of a span's
text is the product of its tokens' conditional probabilities, each read at the position that
predicts it, log q(span) = sum over i in [a, b) of log q_{i-1}(s_i), and likewise log p(span) for the
teacher's n tokens. Both are probabilities of the same characters after the same prefix, so they
compare directly. Over the whole vocabulary the comparison is made at the position predicting the
span's first token (a - 1 and c - 1), with the entry of the span's actual first token multiplied by
the product of the remaining tokens' conditional probabilities: that entry is then the span's
probability and the others the mass of leaving it at its first token. For a 1:1 span the product is
empty: one next-token distribution against one, as in same-tokenizer distillation.

Whitespace: byte-level BPEs ("Ġworld") and SentencePiece ("▁world") both put a space in front of the
word, but offsets may include it ((5, 11)) or trim it ((6, 11), and a token of spaces alone can come
back empty); SentencePiece's prefix "▁" can even claim the first character it does not spell. The
normalisation that makes both sides agree: characters that no token's offsets cover belong to the
token after them, so a cut sits at the end of the token before a gap, except that a token trimmed
to empty offsets `(s, s)` at the end of a gap takes that gap (a run of spaces alone); a token with
empty offsets otherwise (special and template tokens, `(0, 0)`) covers no character and joins the
span after it, and one before any text or after all text joins none. Supervised ranges are taken as
given: a span whose leading space lies outside its range is dropped, as the student's own mask
(trainer/data/tokenize.py) drops that token. A trimmed *trailing* space ("\n " at (25, 26)) cannot
be told from a leading one by offsets alone: it is read as the next token's, which may put a span
one space off; `Tokens.of` asks the tokenizer for untrimmed offsets, so only hand-made ones can.

Vocabulary overlap: each token string is turned into the bytes it stands for before matching (see
`token_bytes`), so "Ġthe", "▁the" and " the" are one string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any
from weakref import WeakKeyDictionary

from tokenizers import Tokenizer

from trainer.data.sources import DataError


@dataclass(frozen=True)
class Tokens:
    """One model's tokenisation of the text: `ids[i]` covers the characters `offsets[i] = (start, end)`."""

    ids: Sequence[int]
    offsets: Sequence[tuple[int, int]]

    @classmethod
    def of(cls, tokenizer: Any, text: str) -> "Tokens":
        """`text` tokenised by a fast tokenizer, with no special tokens added (the caller's text holds
        any chat markup already), and untrimmed offsets: each token's spaces are its own."""
        encoded = _untrimmed_backend(tokenizer).encode(text, add_special_tokens=False)
        return cls(list(encoded.ids), [tuple(pair) for pair in encoded.offsets])


_UNTRIMMED: WeakKeyDictionary = WeakKeyDictionary()


def _untrimmed_backend(tokenizer: Any):
    """The tokenizer's `tokenizers` backend without its post-processor, made once per tokenizer.

    Without special tokens the post-processor does one thing more: a byte-level one (RoBERTa's,
    some GPT-2 exports) trims spaces off the offsets, and a trimmed trailing space is the one case
    the alignment cannot read back (see the module docstring). The ids are the tokenizer's own.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} gives no character offsets, which "
                        "aligning two tokenizers needs; load it with use_fast=True (a tokenizer.json)")
    if tokenizer not in _UNTRIMMED:
        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.post_processor = None
        _UNTRIMMED[tokenizer] = backend
    return _UNTRIMMED[tokenizer]


@dataclass(frozen=True)
class AlignedSpan:
    """Student tokens `[a, b)` and teacher tokens `[c, d)` (indices into each side's ids) that spell
    the text's characters `chars = [start, end)`."""

    student: tuple[int, int]
    teacher: tuple[int, int]
    chars: tuple[int, int]

    @property
    def is_one_to_one(self) -> bool:
        return self.student[1] - self.student[0] == 1 and self.teacher[1] - self.teacher[0] == 1

    @property
    def student_positions(self) -> range:
        """The student positions whose logits predict the span's tokens: `[a - 1, b - 1)`."""
        return range(self.student[0] - 1, self.student[1] - 1)

    @property
    def teacher_positions(self) -> range:
        """The teacher positions whose logits predict the span's tokens: `[c - 1, d - 1)`."""
        return range(self.teacher[0] - 1, self.teacher[1] - 1)


@dataclass(frozen=True)
class Alignment:
    """The spans both sides supervise, in text order."""

    spans: tuple[AlignedSpan, ...]

    @property
    def one_to_one(self) -> int:
        """How many spans are one student token against one teacher token."""
        return sum(span.is_one_to_one for span in self.spans)


def align(text: str, student: Tokens, teacher: Tokens, supervised: Sequence[tuple[int, int]]) -> Alignment:
    """Align two tokenisations of `text` into spans cut where both can be cut, keeping those inside a
    supervised character range `[start, end)` that a position before them predicts on both sides."""
    _check_ranges(text, supervised, "supervised range")
    student_cuts, teacher_cuts = _cuts(text, student, "student"), _cuts(text, teacher, "teacher")
    shared = sorted(student_cuts.keys() & teacher_cuts.keys())
    spans = []
    for start, end in zip(shared, shared[1:]):
        span = AlignedSpan(student=(student_cuts[start], student_cuts[end]),
                           teacher=(teacher_cuts[start], teacher_cuts[end]), chars=(start, end))
        if _is_supervised(span, supervised) and span.student[0] > 0 and span.teacher[0] > 0:
            spans.append(span)
    return Alignment(tuple(spans))


def _cuts(text: str, tokens: Tokens, side: str) -> dict[int, int]:
    """{character position of each cut: the index of the first token after it}, position 0 included.

    Tokens with empty offsets impose nothing, so they fall after the cut before them (into the next
    span); the first span starts at the first token that covers text.
    """
    if len(tokens.ids) != len(tokens.offsets):
        raise DataError(f"the {side}'s tokenisation has {len(tokens.ids)} ids but {len(tokens.offsets)} offsets; "
                        "give one (start, end) pair per token")
    _check_ranges(text, tokens.offsets, f"{side} token offset")
    offsets = _with_trimmed_spaces_restored(tokens.offsets)
    covering = [index for index, (start, end) in enumerate(offsets) if end > start]
    if not covering:
        return {}
    ends = list(accumulate((offsets[index][1] for index in covering), max))
    later_starts = list(accumulate((offsets[index][0] for index in reversed(covering)), min))[::-1]
    cuts = {0: covering[0]}
    for position, (index, end) in enumerate(zip(covering, ends)):
        if position + 1 == len(covering) or end <= later_starts[position + 1]:
            cuts[end] = index + 1
    return cuts


def _with_trimmed_spaces_restored(offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Offsets where a token trimmed to nothing at `(s, s)` after a gap gets the gap back.

    Byte-level tokenizers that trim offsets give a token of spaces alone `(s, s)` with s the end of
    its spaces; those characters are its own, not the next word's. Special tokens sit at `(0, 0)`,
    never after a gap, so they stay empty.
    """
    restored, reached = [], 0
    for start, end in offsets:
        restored.append((reached, start) if start == end and start > reached else (start, end))
        reached = max(reached, restored[-1][1])
    return restored


def _check_ranges(text: str, ranges: Sequence[tuple[int, int]], what: str) -> None:
    for start, end in ranges:
        if not 0 <= start <= end <= len(text):
            raise DataError(f"{what} ({start}, {end}) lies outside the text's {len(text)} characters; give character "
                            "offsets (a fast tokenizer's return_offsets_mapping), not byte offsets")


def _is_supervised(span: AlignedSpan, supervised: Sequence[tuple[int, int]]) -> bool:
    start, end = span.chars
    return any(low <= start and end <= high for low, high in supervised)


# Vocabulary overlap -------------------------------------------------------------------------------

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True)
class VocabularyOverlap:
    """Which student ids have a teacher id that stands for the same bytes."""

    share: float
    """Matched student ids over all of the student's ids (added tokens included)."""
    pairs: tuple[tuple[int, int], ...]
    """(student id, teacher id), sorted by student id; one to one in both directions."""


def vocabulary_overlap(student_tokenizer: Any, teacher_tokenizer: Any) -> VocabularyOverlap:
    """The share of the student's vocabulary whose text the teacher's vocabulary holds exactly, and
    the matched id pairs (the ids GOLD's exact KL compares)."""
    student = _preferred_ids(student_tokenizer)
    teacher = _preferred_ids(teacher_tokenizer)
    pairs = tuple(sorted((student_id, teacher[text]) for text, student_id in student.items() if text in teacher))
    return VocabularyOverlap(share=len(pairs) / len(student_tokenizer), pairs=pairs)


def _preferred_ids(tokenizer: Any) -> dict[bytes, int]:
    """{bytes: the one id that stands for them}. Where several do (SentencePiece's "a" and its byte
    fallback "<0x61>"), the regular piece wins, as the tokenizer emits it; then the lowest id."""
    scheme = surface_scheme(tokenizer)
    added = tokenizer.get_added_vocab()  # special and chat tokens: their strings are their text

    def rank(item: tuple[str, int]) -> tuple[bool, int]:
        token, index = item
        is_fallback = scheme == "sentencepiece" and token not in added and _BYTE_FALLBACK.fullmatch(token)
        return bool(is_fallback), index

    preferred: dict[bytes, int] = {}
    for token, index in sorted(tokenizer.get_vocab().items(), key=rank):
        preferred.setdefault(token.encode() if token in added else token_bytes(token, scheme), index)
    return preferred


def surface_scheme(tokenizer: Any) -> str:
    """How the tokenizer writes text into token strings, read from its decoder: `byte_level` (GPT-2,
    Llama 3, Qwen: each byte one printable character, "Ġ" a space), `sentencepiece` ("▁" a space,
    "<0xNN>" one byte) or `plain` (the string is the text)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} is not a fast tokenizer, so its token "
                        "strings cannot be read as text; load it with use_fast=True (a tokenizer.json)")
    decoder = json.dumps(json.loads(backend.to_str()).get("decoder"))
    if '"ByteLevel"' in decoder:
        return "byte_level"
    if '"Metaspace"' in decoder or '"\\u2581"' in decoder or '"ByteFallback"' in decoder:
        return "sentencepiece"
    return "plain"


def token_bytes(token: str, scheme: str) -> bytes:
    """The UTF-8 bytes a token string stands for. Bytes, not text, because a token may hold part of
    a character ("âĤ" is two of "€"'s three bytes), and the same part must match on both sides."""
    if scheme == "byte_level":
        table = _byte_level_table()
        # A character outside the alphabet (a token added by hand) stands for itself.
        return bytes(table[char] for char in token) if all(char in table for char in token) else token.encode()
    if scheme == "sentencepiece":
        fallback = _BYTE_FALLBACK.fullmatch(token)
        return bytes([int(fallback.group(1), 16)]) if fallback else token.replace("\u2581", " ").encode()
    return token.encode()


_TABLE: dict[str, int] = {}


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the
    others (space, control bytes) for the characters from U+0100 on, in byte order."""
    if not _TABLE:
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        shifted = [byte for byte in range(256) if byte not in printable]
        _TABLE.update({chr(byte): byte for byte in printable})
        _TABLE.update({chr(256 + rank): byte for rank, byte in enumerate(shifted)})
    return _TABLE


def token_byte_lengths(tokenizer: Any, rows: int) -> list[int]:
    """How many UTF-8 bytes of text each of `rows` ids stands for: what CE per byte divides by, the
    one measure of a model's fit that compares across tokenizers. Special tokens (bos, eos, chat
    markup) and the padding rows past the tokenizer's ids stand for none: their loss still counts
    in CE per byte's numerator, as a cost of the text around them."""
    scheme = surface_scheme(tokenizer)
    special = set(tokenizer.all_special_ids)
    added = tokenizer.get_added_vocab()
    lengths = [0] * rows
    for token, index in tokenizer.get_vocab().items():
        if index < rows and index not in special:
            lengths[index] = len(token.encode() if token in added else token_bytes(token, scheme))
    return lengths
