"""Aligning two tokenisations by character offsets: hand-made tokenisations for each edge case, then
real offsets from byte-level and SentencePiece-style tokenizers built here (no download)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import CHARACTERS, CHATML, SPECIAL_TOKENS

from trainer.data.alignment import (
    AlignedSpan, Tokens, align, surface_scheme, token_bytes, vocabulary_overlap,
)
from trainer.data.sources import DataError


def tokens(*offsets: tuple[int, int]) -> Tokens:
    """Hand-made tokens: the ids do not matter to the alignment, only the offsets."""
    return Tokens(ids=list(range(len(offsets))), offsets=list(offsets))


def spans_of(alignment) -> list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
    return [(span.student, span.teacher, span.chars) for span in alignment.spans]


# The module docstring's worked example: byte-level student, SentencePiece teacher with a <s>.
EXAMPLE_TEXT = "x= naïve €"
EXAMPLE_STUDENT = tokens((0, 1), (1, 2), (2, 5), (5, 8), (8, 9), (9, 10), (9, 10))
EXAMPLE_TEACHER = tokens((0, 0), (0, 2), (2, 8), (8, 9), (9, 10), (9, 10), (9, 10))


def test_the_worked_example_of_the_docstring():
    alignment = align(EXAMPLE_TEXT, EXAMPLE_STUDENT, EXAMPLE_TEACHER, supervised=[(2, 10)])
    assert spans_of(alignment) == [((2, 4), (2, 3), (2, 8)), ((4, 5), (3, 4), (8, 9)), ((5, 7), (4, 7), (9, 10))]
    assert alignment.one_to_one == 1
    first = alignment.spans[0]
    # The token at i is predicted by the logits at i - 1.
    assert list(first.student_positions) == [1, 2] and list(first.teacher_positions) == [1]


def test_identical_tokenisations_give_one_span_per_supervised_token():
    text = "abc def"
    same = tokens((0, 1), (1, 3), (3, 4), (4, 7))
    alignment = align(text, same, same, supervised=[(0, len(text))])
    # Token 0 has no position before it to predict it, so its span is left out.
    assert spans_of(alignment) == [((i, i + 1), (i, i + 1), same.offsets[i]) for i in (1, 2, 3)]
    assert alignment.one_to_one == 3


@pytest.mark.parametrize("teacher_offsets", [
    ((0, 5), (5, 11)),  # SentencePiece "▁world", the space included
    ((0, 5), (6, 11)),  # byte-level "Ġworld" with trimmed offsets, the space left out
], ids=["space-included", "space-trimmed"])
def test_a_leading_space_belongs_to_its_word_whether_the_offsets_include_it_or_not(teacher_offsets):
    text = "Hello world"
    student = tokens((0, 2), (2, 5), (5, 11))  # "He" "llo" "Ġworld", the space included
    alignment = align(text, student, tokens(*teacher_offsets), supervised=[(0, 11)])
    assert spans_of(alignment) == [((2, 3), (1, 2), (5, 11))]
    assert alignment.one_to_one == 1


def test_a_word_whose_leading_space_lies_outside_the_supervised_text_is_left_out():
    # As the student's own mask leaves out "Ġworld" (5, 11) when the response starts at 6.
    text = "Hello world!"
    student = tokens((0, 5), (5, 11), (11, 12))
    teacher = tokens((0, 5), (6, 11), (11, 12))  # trimmed: the same token, by its offsets inside
    assert spans_of(align(text, student, teacher, supervised=[(6, 12)])) == [((2, 3), (2, 3), (11, 12))]
    assert spans_of(align(text, student, teacher, supervised=[(5, 12)]))[0] == ((1, 2), (1, 2), (5, 11))


def test_a_run_of_spaces_trimmed_to_nothing_keeps_its_spaces():
    # "xa  b": byte-level "x" "a" "Ġ" "Ġb"; trimmed offsets leave the lone "Ġ" empty at the end of its space.
    text = "xa  b"
    untrimmed = tokens((0, 1), (1, 2), (2, 3), (3, 5))
    trimmed = tokens((0, 1), (1, 2), (3, 3), (4, 5))
    alignment = align(text, untrimmed, trimmed, supervised=[(0, 5)])
    assert spans_of(alignment) == [((1, 2), (1, 2), (1, 2)), ((2, 3), (2, 3), (2, 3)), ((3, 4), (3, 4), (3, 5))]
    assert alignment.one_to_one == 3


def test_byte_fallback_tokens_of_one_character_stay_together():
    text = "x€y"
    student = tokens((0, 1), (1, 2), (2, 3))  # "€" one token
    teacher = tokens((0, 1), (1, 2), (1, 2), (1, 2), (2, 3))  # <0xE2><0x82><0xAC>
    alignment = align(text, student, teacher, supervised=[(0, 3)])
    assert spans_of(alignment) == [((1, 2), (1, 4), (1, 2)), ((2, 3), (4, 5), (2, 3))]
    assert alignment.one_to_one == 1


def test_a_character_split_across_byte_level_tokens_meets_byte_fallback_tokens():
    text = "x€"
    student = tokens((0, 1), (1, 2), (1, 2))  # "âĤ" "¬": two tokens of one character
    teacher = tokens((0, 1), (1, 2), (1, 2), (1, 2))
    assert spans_of(align(text, student, teacher, supervised=[(0, 2)])) == [((1, 3), (1, 4), (1, 2))]


def test_offsets_count_characters_not_bytes():
    text = "xnaïve"  # 6 characters, 7 UTF-8 bytes
    in_characters = tokens((0, 1), (1, 3), (3, 6))
    assert align(text, in_characters, in_characters, supervised=[(0, 6)]).one_to_one == 2
    in_bytes = tokens((0, 1), (1, 3), (3, 7))
    with pytest.raises(DataError, match=r"outside the text's 6 characters; give character offsets"):
        align(text, in_bytes, in_characters, supervised=[(0, 6)])


def test_special_tokens_without_offsets_belong_to_no_span_at_the_ends():
    text = "ab"
    student = tokens((0, 0), (0, 1), (1, 2), (0, 0))  # <s> a b </s>
    teacher = tokens((0, 1), (1, 2))
    # The student's <s> makes its "a" predictable; the teacher's "a" at index 0 is not, so that span goes.
    assert spans_of(align(text, student, teacher, supervised=[(0, 2)])) == [((2, 3), (1, 2), (1, 2))]


def test_a_special_token_without_offsets_inside_the_text_joins_the_span_after_it():
    text = "xab"
    student = tokens((0, 1), (1, 2), (0, 0), (2, 3))  # x a <sep> b
    teacher = tokens((0, 1), (1, 2), (2, 3))
    assert spans_of(align(text, student, teacher, supervised=[(0, 3)])) == [
        ((1, 2), (1, 2), (1, 2)), ((2, 4), (2, 3), (2, 3))]


def test_chat_markup_outside_the_supervised_text_is_left_out():
    text = "<|im_start|>assistant\nok<|im_end|>"
    start, answer = len("<|im_start|>"), len("<|im_start|>assistant\n")
    student = tokens((0, start), (start, answer - 1), (answer - 1, answer), (answer, answer + 2),
                     (answer + 2, len(text)))
    teacher = tokens((0, start), (start, answer), (answer, answer + 1), (answer + 1, answer + 2),
                     (answer + 2, len(text)))
    alignment = align(text, student, teacher, supervised=[(answer, len(text))])
    assert spans_of(alignment) == [((3, 4), (2, 4), (answer, answer + 2)), ((4, 5), (4, 5), (answer + 2, len(text)))]


def test_a_token_across_the_edge_of_the_supervised_text_drops_its_span():
    text = "ab=cd"
    student = tokens((0, 1), (1, 2), (2, 4), (4, 5))  # "=c" crosses the edge at 3
    teacher = tokens((0, 1), (1, 2), (2, 3), (3, 4), (4, 5))
    alignment = align(text, student, teacher, supervised=[(3, 5)])
    assert spans_of(alignment) == [((3, 4), (4, 5), (4, 5))]


def test_two_supervised_ranges_keep_only_spans_inside_one_of_them():
    text = "abcdef"
    same = tokens(*[(i, i + 1) for i in range(6)])
    alignment = align(text, same, same, supervised=[(1, 2), (4, 6)])
    assert [span.chars for span in alignment.spans] == [(1, 2), (4, 5), (5, 6)]


def test_nothing_in_common_but_the_ends_gives_one_span():
    text = "xabcd"
    student = tokens((0, 1), (1, 3), (3, 5))
    teacher = tokens((0, 1), (1, 2), (2, 4), (4, 5))
    alignment = align(text, student, teacher, supervised=[(1, 5)])
    assert alignment.spans == (AlignedSpan(student=(1, 3), teacher=(1, 4), chars=(1, 5)),)
    assert alignment.one_to_one == 0


def random_tokens(rng, text: str, boundaries: set[int]) -> Tokens:
    """Tokens cut at `boundaries`, with now and then a character split into byte tokens that share
    its offsets (so it offers no cut inside)."""
    cuts = sorted({0, len(text), *boundaries})
    offsets = []
    for start, end in zip(cuts, cuts[1:]):
        offsets += [(start, end)] * (rng.randint(2, 3) if end - start == 1 and rng.random() < 0.2 else 1)
    return tokens(*offsets)


@pytest.mark.parametrize("seed", range(20))
def test_random_tokenisations_meet_at_exactly_their_shared_boundaries(seed):
    import random

    rng = random.Random(seed)
    text = "".join(rng.choice("ab €ï") for _ in range(40))
    inside = range(1, len(text))
    student_cuts, teacher_cuts = set(rng.sample(inside, 15)), set(rng.sample(inside, 25))
    student, teacher = random_tokens(rng, text, student_cuts), random_tokens(rng, text, teacher_cuts)
    alignment = align(text, student, teacher, supervised=[(0, len(text))])
    shared = sorted({0, len(text)} | (student_cuts & teacher_cuts))
    # Every stretch between shared boundaries is a span, but the first (it holds token 0 of both).
    assert [span.chars for span in alignment.spans] == list(zip(shared, shared[1:]))[1:]
    for span in alignment.spans:
        for side, token_range in ((student, span.student), (teacher, span.teacher)):
            covered = side.offsets[slice(*token_range)]
            assert covered[0][0] == span.chars[0] and covered[-1][1] == span.chars[1]
    assert alignment.one_to_one == sum(student.offsets.count(chars) == teacher.offsets.count(chars) == 1
                                       for chars in zip(shared[1:], shared[2:]))


def test_bad_input_is_one_line_that_says_what_to_do():
    with pytest.raises(DataError, match="has 2 ids but 1 offsets; give one"):
        align("ab", Tokens([0, 1], [(0, 2)]), tokens((0, 2)), supervised=[(0, 2)])
    with pytest.raises(DataError, match=r"supervised range \(0, 3\) lies outside"):
        align("ab", tokens((0, 2)), tokens((0, 2)), supervised=[(0, 3)])
    with pytest.raises(DataError, match="gives no character offsets.*use_fast=True"):
        Tokens.of(SimpleNamespace(is_fast=False, name_or_path="slow"), "ab")
    with pytest.raises(DataError, match="not a fast tokenizer.*use_fast=True"):
        surface_scheme(SimpleNamespace(name_or_path="slow"))


# Real tokenizers ----------------------------------------------------------------------------------

CORPUS = [
    "The price of a café is 5€ today, and the naïve one pays twice.",
    "Hello world, hello there.\n  Indented line with  two spaces.",
    "Distillation moves the teacher's knowledge into the student.",
    "日本語のテキストも少し。 Ünïcödé wörds für alle.",
] * 8


def byte_level_bpe(vocab_size: int, trim_offsets: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def sentencepiece_bpe():
    """A Llama-2-like BPE: "▁" for spaces, a "▁" put in front of the text, bytes for unknown characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"<0x{byte:02X}>": 1 + byte for byte in range(256)}}
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("p", "r"), ("pr", "i"), ("c", "e"), ("pri", "ce"),
              ("▁", "pri"), ("▁pri", "ce")]
    for piece in [*"▁abcdefhilnoprstuvwyéï.,5", *(a + b for a, b in merges)]:
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.fixture(scope="module")
def small():
    return byte_level_bpe(320)


@pytest.fixture(scope="module")
def large():
    return byte_level_bpe(480)


def span_bytes(tokenizer, ids, token_range) -> bytes:
    scheme = surface_scheme(tokenizer)
    return b"".join(token_bytes(token, scheme) for token in tokenizer.convert_ids_to_tokens(ids[slice(*token_range)]))


@pytest.mark.parametrize("text", CORPUS[:4])
def test_real_byte_level_offsets_align_into_spans_that_spell_the_same_bytes(small, large, text):
    student, teacher = Tokens.of(small, text), Tokens.of(large, text)
    alignment = align(text, student, teacher, supervised=[(0, len(text))])
    for span in alignment.spans:
        expected = text[slice(*span.chars)].encode()
        assert span_bytes(small, student.ids, span.student) == expected
        assert span_bytes(large, teacher.ids, span.teacher) == expected
    # Every character after the first span (which holds token 0, predicted by nothing) is in some
    # span: no text is lost between them.
    covered = [span.chars for span in alignment.spans]
    assert covered[0][0] == max(student.offsets[0][1], teacher.offsets[0][1]) and covered[-1][1] == len(text)
    assert all(left[1] == right[0] for left, right in zip(covered, covered[1:]))
    # The larger vocabulary merges further, so some spans are many to one, and most stay 1:1.
    assert 0 < alignment.one_to_one < len(alignment.spans)


@pytest.fixture(scope="module")
def large_trimmed():
    return byte_level_bpe(480, trim_offsets=True)


def tokenizer_offsets(tokenizer, text: str) -> Tokens:
    """The offsets the tokenizer itself gives, trimmed when its post-processor trims them."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return Tokens(encoded["input_ids"], encoded["offset_mapping"])


@pytest.mark.parametrize("text", CORPUS[:4])
def test_trimmed_real_offsets_align_as_untrimmed_ones_do(large, large_trimmed, text):
    untrimmed_tokens, trimmed_tokens = tokenizer_offsets(large, text), tokenizer_offsets(large_trimmed, text)
    assert untrimmed_tokens.ids == trimmed_tokens.ids and untrimmed_tokens.offsets != trimmed_tokens.offsets
    alignment = align(text, untrimmed_tokens, trimmed_tokens, supervised=[(0, len(text))])
    # A trimmed *trailing* space ("ĊĠ" at (25, 26) for "\n ") reads as the next word's leading one,
    # so that token's span merges with the next; every other span is 1:1, spaces-only tokens included.
    trailing_trimmed = {index for index, (untrimmed, trimmed) in
                        enumerate(zip(untrimmed_tokens.offsets, trimmed_tokens.offsets))
                        if trimmed[1] < untrimmed[1]}
    for span in alignment.spans:
        assert span.student == span.teacher
        assert span.is_one_to_one or trailing_trimmed & set(range(*span.student))
    merged = sum(not span.is_one_to_one for span in alignment.spans)
    assert alignment.one_to_one + 2 * merged == len(trimmed_tokens.ids) - 1


@pytest.mark.parametrize("text", CORPUS[:4])
def test_tokens_of_gives_the_tokenizers_ids_with_untrimmed_offsets(large, large_trimmed, text):
    assert Tokens.of(large_trimmed, text) == Tokens.of(large, text)
    assert Tokens.of(large, text) == tokenizer_offsets(large, text)


def test_real_sentencepiece_offsets_with_byte_fallback_align_with_byte_level_ones(small):
    text = "the price is 5€, naïve"
    teacher_tokenizer = sentencepiece_bpe()
    student, teacher = Tokens.of(small, text), Tokens.of(teacher_tokenizer, text)
    assert "<0xE2>" in teacher_tokenizer.convert_ids_to_tokens(teacher.ids)  # "€" is three byte tokens
    alignment = align(text, student, teacher, supervised=[(3, len(text))])  # past SentencePiece's prefix "▁"
    euro = text.index("€")
    (euro_span,) = [span for span in alignment.spans if span.chars[0] <= euro < span.chars[1]]
    assert euro_span.teacher[1] - euro_span.teacher[0] >= 3
    for span in alignment.spans:
        expected = text[slice(*span.chars)].encode()
        assert span_bytes(small, student.ids, span.student) == expected
        assert span_bytes(teacher_tokenizer, teacher.ids, span.teacher) == expected


@pytest.fixture(scope="module")
def char_tokenizer():
    """conftest's ChatML character tokenizer, built in memory (saving and loading it takes seconds)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        extra_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = CHATML
    return tokenizer


def test_real_chat_markup_of_a_character_tokenizer_stays_out_of_the_spans(char_tokenizer, small):
    tokenizer = char_tokenizer  # ChatML, one token a character
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "the price is 4"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    answer = text.index("the price")
    supervised = [(answer, text.index("<|im_end|>", answer) + len("<|im_end|>"))]
    student, teacher = Tokens.of(small, text), Tokens.of(tokenizer, text)
    alignment = align(text, student, teacher, supervised)
    assert alignment.spans[0].chars[0] == answer and alignment.spans[-1].chars[1] == supervised[0][1]
    assert any(span.chars == (supervised[0][1] - len("<|im_end|>"), supervised[0][1]) and span.is_one_to_one
               for span in alignment.spans)  # "<|im_end|>" is one special token on both sides


def test_the_byte_level_alphabet_is_the_tokenizers_librarys():
    from tokenizers import pre_tokenizers

    from trainer.data.alignment import _byte_level_table

    table = _byte_level_table()
    assert sorted(table) == sorted(pre_tokenizers.ByteLevel.alphabet()) and sorted(table.values()) == list(range(256))
    assert token_bytes("Ġthe", "byte_level") == b" the" and token_bytes("Ċ", "byte_level") == b"\n"


def test_surface_forms_become_the_bytes_they_stand_for(small, char_tokenizer):
    assert surface_scheme(small) == "byte_level"
    assert surface_scheme(sentencepiece_bpe()) == "sentencepiece"
    assert surface_scheme(char_tokenizer) == "plain"
    assert token_bytes("▁the", "sentencepiece") == b" the" == token_bytes("Ġthe", "byte_level")
    assert token_bytes("<0xE2>", "sentencepiece") == b"\xe2" == token_bytes("â", "byte_level")


def test_two_byte_level_bpes_from_one_text_share_the_smaller_vocabulary(small, large):
    overlap = vocabulary_overlap(small, large)
    # BPE learns merges in the same order on the same text: the smaller vocabulary is a prefix.
    assert overlap.share == 1.0 and len(overlap.pairs) == len(small)
    assert all(small.convert_ids_to_tokens(s) == large.convert_ids_to_tokens(t) for s, t in overlap.pairs)
    backwards = vocabulary_overlap(large, small)
    assert backwards.share == pytest.approx(len(small) / len(large))


def test_sentencepiece_and_byte_level_pieces_match_by_their_text(small):
    teacher = sentencepiece_bpe()
    overlap = vocabulary_overlap(small, teacher)
    pairs = dict(overlap.pairs)
    student_vocab, teacher_vocab = small.get_vocab(), teacher.get_vocab()
    assert pairs[student_vocab["Ġthe"]] == teacher_vocab["▁the"]
    assert pairs[student_vocab["â"]] == teacher_vocab["<0xE2>"]  # one byte of "€" on both sides
    assert pairs[student_vocab["e"]] == teacher_vocab["e"]  # the piece, not its byte fallback <0x65>
    assert len(set(pairs.values())) == len(pairs)  # one to one
    assert overlap.share == pytest.approx(len(pairs) / len(small)) and 0 < overlap.share < 1
