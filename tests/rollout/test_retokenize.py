"""Issue 20: a rollout re-tokenised for a teacher with another tokenizer, by hand: the demo's
character-level teacher against its two-digit student, and byte-level BPEs that split "€" (three
bytes) differently, so that a token completing no character must join the span after it. No download."""

from __future__ import annotations

import pytest

from trainer.data.pairing import pair_tokenize_row
from trainer.data.sources import DataError
from trainer.data.tokenize import TokenizedRow
from trainer.demo.cross_student import build_pair_tokenizer
from trainer.demo.tokenizer import build_char_tokenizer
from trainer.rollout.prompts import rewritten
from trainer.rollout.retokenize import RolloutPairing, decoded_offsets, pair_rollout, rollout_ends

EURO_IN_TWO = [("Ġ", "â"), ("Ĥ", "¬")]  # " €" as "Ġâ" + "Ĥ¬": the space and E2, then 82 AC


def byte_bpe(merges: list[tuple[str, str]]):
    """A byte-level BPE with every byte a token, these merges, no bos and <|endoftext|> as eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(["<|endoftext|>", *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def chars():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def pairs():
    return build_pair_tokenizer()


def pieces(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


def span_pieces(paired: TokenizedRow, student, teacher) -> list[tuple[list[str], list[str]]]:
    return [(pieces(student, paired.input_ids[a:b]), pieces(teacher, paired.teacher.input_ids[c:d]))
            for a, b, c, d in paired.teacher.spans]


# Decoding incrementally ---------------------------------------------------------------------------

def test_the_docstrings_example_a_token_holding_part_of_a_character_covers_the_part_it_completes():
    student = byte_bpe(EURO_IN_TWO)
    ids = student.encode(" €!", add_special_tokens=False)
    assert pieces(student, ids) == ["Ġâ", "Ĥ¬", "!"]
    assert decoded_offsets(student, ids) == (" €!", [(0, 1), (1, 2), (2, 3)])


def test_bytes_that_complete_no_character_cover_none():
    student = byte_bpe([])
    ids = student.encode(" €!", add_special_tokens=False)
    assert pieces(student, ids) == ["Ġ", "â", "Ĥ", "¬", "!"]
    assert decoded_offsets(student, ids) == (" €!", [(0, 1), (1, 1), (1, 1), (1, 2), (2, 3)])


def test_special_tokens_written_mid_response_are_text_and_an_unfinished_character_ends_the_text(pairs):
    ids = [*pairs.encode("12", add_special_tokens=False), pairs.bos_token_id, *pairs.encode("3", add_special_tokens=False)]
    assert decoded_offsets(pairs, ids) == ("12<s>3", [(0, 2), (2, 5), (5, 6)])
    unfinished = byte_bpe([]).encode("a€", add_special_tokens=False)[:2]  # "a" and the first byte of "€"
    assert decoded_offsets(byte_bpe([]), unfinished) == ("a\ufffd", [(0, 1), (1, 2)])
    assert decoded_offsets(pairs, []) == ("", [])


# The two-digit student against the character teacher --------------------------------------------

@pytest.fixture(scope="module")
def arithmetic_row(pairs, chars):
    return pair_tokenize_row({"prompt": "12+34=", "response": "46"}, pairs, chars, 32, "test")


def test_the_teacher_reads_its_own_prompt_then_the_students_text_in_its_tokens_then_its_eos(pairs, chars,
                                                                                            arithmetic_row):
    generated = [*pairs.encode("46;7", add_special_tokens=False), pairs.eos_token_id]
    paired = pair_rollout(arithmetic_row, generated, True, pairs, chars, 32)
    student_row = rewritten(arithmetic_row, generated, 32)
    assert (paired.input_ids, paired.labels, paired.truncated) == (student_row.input_ids, student_row.labels, False)
    assert pieces(chars, paired.teacher.input_ids) == ["<s>", *"12+34=", *"46;7", "</s>"]
    assert paired.teacher.prompt_length == arithmetic_row.teacher.prompt_length == 7
    assert span_pieces(paired, pairs, chars) == [(["46"], ["4", "6"]), ([";"], [";"]), (["7"], ["7"]),
                                                 (["</s>"], ["</s>"])]
    assert not paired.teacher.truncated


def test_a_rollout_cut_by_max_new_tokens_has_no_end_span(pairs, chars, arithmetic_row):
    generated = pairs.encode("4612", add_special_tokens=False)
    paired = pair_rollout(arithmetic_row, generated, False, pairs, chars, 32)
    assert pieces(chars, paired.teacher.input_ids) == ["<s>", *"12+34=", *"4612"]
    assert span_pieces(paired, pairs, chars) == [(["46"], ["4", "6"]), (["12"], ["1", "2"])]


def test_each_side_is_cut_at_seq_len_and_spans_past_either_cut_are_dropped(pairs, chars):
    row = pair_tokenize_row({"prompt": "12+34=", "response": "46"}, pairs, chars, 10, "test")
    generated = [*pairs.encode("4612", add_special_tokens=False), pairs.eos_token_id]
    paired = pair_rollout(row, generated, True, pairs, chars, 10)
    # The student's 5 prompt tokens + "46" "12" </s> fit in 10; the teacher's 7 + 4 + 1 do not.
    assert len(paired.input_ids) == 8 and not paired.truncated
    assert len(paired.teacher.input_ids) == 10 and paired.teacher.truncated
    assert span_pieces(paired, pairs, chars) == [(["46"], ["4", "6"])]
    # Cut on the student's side, its EOS is gone: the text ends where the cut does, with no end span.
    short = pair_rollout(row, [*pairs.encode("461234", add_special_tokens=False), pairs.eos_token_id], True, pairs,
                         chars, 7)
    assert pieces(pairs, short.input_ids[5:]) == ["46", "12"] and short.truncated
    assert all(pieces(pairs, short.input_ids[a:b]) != ["</s>"] for a, b, _, _ in short.teacher.spans)


def test_a_prompt_only_row_is_answered_after_the_teachers_whole_prompt(pairs, chars):
    row = pair_tokenize_row({"prompt": "12+34="}, pairs, chars, 32, "test")
    assert row.teacher.prompt_length == len(row.teacher.input_ids) == 7 and row.teacher.spans == []
    paired = pair_rollout(row, [*pairs.encode("46", add_special_tokens=False), pairs.eos_token_id], True, pairs,
                          chars, 32)
    assert pieces(chars, paired.teacher.input_ids) == ["<s>", *"12+34=", "4", "6", "</s>"]
    assert span_pieces(paired, pairs, chars) == [(["46"], ["4", "6"]), (["</s>"], ["</s>"])]


def test_a_messages_row_keeps_the_teachers_template_up_to_the_last_answer_and_ends_its_turn(pairs, chars):
    messages = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"},
                {"role": "user", "content": "12+34="}, {"role": "assistant", "content": "46"}]
    row = pair_tokenize_row({"messages": messages}, pairs, chars, 64, "test")
    end_of_turn = pairs.convert_tokens_to_ids("<|im_end|>")
    paired = pair_rollout(row, [*pairs.encode("46", add_special_tokens=False), end_of_turn], True, pairs, chars, 64)
    prompt = chars.apply_chat_template(messages[:3], tokenize=False, add_generation_prompt=True)
    assert chars.decode(paired.teacher.input_ids) == prompt + "46<|im_end|>"
    assert span_pieces(paired, pairs, chars) == [(["46"], ["4", "6"]), (["<|im_end|>"], ["<|im_end|>"])]
    assert rollout_ends(pairs, chars).teacher_end(end_of_turn) == [chars.convert_tokens_to_ids("<|im_end|>")]


def test_a_special_token_written_mid_response_is_the_teachers_own_when_it_has_that_string(pairs, chars, arithmetic_row):
    unknown = pairs.convert_tokens_to_ids("<unk>")
    generated = [*pairs.encode("4", add_special_tokens=False), unknown, *pairs.encode("6", add_special_tokens=False)]
    paired = pair_rollout(arithmetic_row, generated, False, pairs, chars, 32)
    assert pieces(chars, paired.teacher.input_ids[7:]) == ["4", "<unk>", "6"]
    assert span_pieces(paired, pairs, chars) == [(["4"], ["4"]), (["<unk>"], ["<unk>"]), (["6"], ["6"])]


def test_a_row_without_teacher_tokens_is_refused_saying_how_to_load_it(pairs, chars):
    with pytest.raises(DataError, match="load_examples"):
        pair_rollout(TokenizedRow([1, 2], [-100, -100], index=3), [4], False, pairs, chars, 32)


# Byte-level tokenizers that split "€" differently ------------------------------------------------

@pytest.mark.parametrize("student_merges, teacher_merges, expected", [
    (EURO_IN_TWO, [], [(["Ġâ"], ["Ġ"]), (["Ĥ¬"], ["â", "Ĥ", "¬"]), (["!"], ["!"]),
                       (["<|endoftext|>"], ["<|endoftext|>"])]),
    # Student bytes "â" and "Ĥ" complete no character: they join "¬", and with the teacher's "Ġâ"
    # crossing the space, " €" is one span of 4 against 2.
    ([], EURO_IN_TWO, [(["Ġ", "â", "Ĥ", "¬"], ["Ġâ", "Ĥ¬"]), (["!"], ["!"]),
                       (["<|endoftext|>"], ["<|endoftext|>"])]),
])
def test_a_multibyte_character_split_across_tokens(student_merges, teacher_merges, expected):
    student, teacher = byte_bpe(student_merges), byte_bpe(teacher_merges)
    row = pair_tokenize_row({"prompt": "Q:", "response": " x"}, student, teacher, 32, "test")
    pairing = RolloutPairing.for_tokenizers(student, teacher, 32)
    paired = pairing(row, [*student.encode(" €!", add_special_tokens=False), student.eos_token_id], True)
    assert teacher.decode(paired.teacher.input_ids) == "Q: €!<|endoftext|>"
    assert span_pieces(paired, student, teacher) == expected
