"""Tokenising each row with both models' tokenizers and aligning them: hand-made tokenisations for the
docstring's example, then tokenizers built here (a byte-level BPE with ChatML, a SentencePiece-style
one with byte fallback and a Llama-3-like template), with whitespace runs, multi-byte characters and
chat markup. No download."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import write_jsonl

from trainer.data import examples as examples_module
from trainer.data.alignment import Tokens, surface_scheme, token_bytes
from trainer.data.batching import _masked_copy, eval_batches
from trainer.data.examples import load_examples
from trainer.data.pairing import (
    Side, collate_pairs, pair_tokenize_row, role_pairs, row_spans, side_of, span_batch,
)
from trainer.data.sources import DataError
from trainer.data.tokenize import TeacherTokens, TokenizedRow, row_format, special_ids, tokenize_row

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama 3's shape: a bos in the text, headers, <|eot_id|> ends a turn, and the content trimmed.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CORPUS = [
    "The price of a café is 5€ today 🙂, and the naïve one pays twice.",
    "Hello world,   hello there.\n\n  Indented line with  two spaces.",
] * 8


def byte_level_chatml(trim_offsets: bool = False):
    """A GPT-2/Qwen-like student: byte-level BPE, no bos, eos <|endoftext|>, ChatML. `trim_offsets`: its
    own offsets leave spaces out (RoBERTa's post-processor), as the student's mask then reads them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def sentencepiece_llama3(chat_template=LLAMA3):
    """A Llama-like teacher: "▁" for spaces, bytes for unknown characters, adds <s>, ends with </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    vocab = {token: index for index, token in enumerate(specials)}
    vocab.update({f"<0x{byte:02X}>": len(specials) + byte for byte in range(256)})
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("c", "a"), ("ca", "f"), ("▁", "caf")]
    for piece in [*"▁abcdefhilnoprstuvwyéï.,5", *(a + b for a, b in merges)]:
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def gpt():
    return byte_level_chatml()


@pytest.fixture(scope="module")
def llama():
    return sentencepiece_llama3()


@pytest.fixture(scope="module")
def gpt_trimmed():
    return byte_level_chatml(trim_offsets=True)


@pytest.fixture(params=["byte-level student", "sentencepiece student", "trimmed byte-level student"])
def pair(request, gpt, llama, gpt_trimmed):
    return {"byte-level student": (gpt, llama), "sentencepiece student": (llama, gpt),
            "trimmed byte-level student": (gpt_trimmed, llama)}[request.param]


ROWS = {
    "prompt/response": {"prompt": "Price?", "response": " The café:  5€ 🙂\n\n  twice naïve."},
    "response without a leading space": {"prompt": "Q:", "response": "the price"},
    "text": {"text": "Hello world,   hello there.\n\n  é€🙂"},
    "messages": {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Price?"},
        {"role": "assistant", "content": "The café:  5€"},
        {"role": "user", "content": "And  🙂?"},
        {"role": "assistant", "content": "twice\n\n naïve"},
    ]},
    "empty response": {"prompt": "Q:", "response": ""},
    "prompt-only": {"prompt": "Price of a café?"},
}


def span_chars(side: Side, token_range: tuple[int, int]) -> str:
    """The characters of side's tokens [i, j), read from their offsets (nothing decoded)."""
    offsets = side.tokens.offsets[slice(*token_range)]
    return side.text[min(start for start, _ in offsets):max(end for _, end in offsets)]


def sides(row, student_tokenizer, teacher_tokenizer):
    kind = row_format(row, "test")
    return (side_of(row, kind, student_tokenizer, special_ids(student_tokenizer), "test", "student"),
            side_of(row, kind, teacher_tokenizer, special_ids(teacher_tokenizer), "test", "teacher"))


def token_pieces(paired: TokenizedRow, student_tokenizer, teacher_tokenizer) -> list[tuple[list[str], list[str]]]:
    """Each span's token strings on both sides."""
    return [(student_tokenizer.convert_ids_to_tokens(paired.input_ids[a:b]),
             teacher_tokenizer.convert_ids_to_tokens(paired.teacher.input_ids[c:d]))
            for a, b, c, d in paired.teacher.spans]


def end_spans(student: Side, teacher: Side) -> set[tuple[int, int, int, int]]:
    return {(*s, *t) for s, t in zip(student.ends, teacher.ends)}


# The docstring's worked example -----------------------------------------------------------------

def test_the_worked_example_of_the_docstring():
    text = "Hi: café €"
    student = Side(text, Tokens(list(range(10)), [(0, 0), (0, 2), (2, 3), (3, 7), (7, 8), (8, 9), (9, 10), (9, 10),
                                                  (9, 10), (10, 10)]),
                   supervised=[False] * 3 + [True] * 7, contents=[(3, 10)], ends=[(9, 10)])
    teacher = Side(text, Tokens(list(range(6)), [(0, 2), (2, 3), (3, 8), (8, 10), (9, 10), (10, 10)]),
                   supervised=[False] * 2 + [True] * 4, contents=[(3, 10)], ends=[(5, 6)])
    assert row_spans(student, teacher) == [(3, 5, 2, 3), (5, 9, 3, 5), (9, 10, 5, 6)]
    # Cut at 9 tokens, the student loses " €" (it needs token 8) and its end; the teacher keeps both.
    cut = Side(text, student.tokens, student.supervised[:8], student.contents, student.ends)
    assert row_spans(cut, teacher) == [(3, 5, 2, 3)]


# Every format ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ROWS))
def test_the_student_side_is_exactly_tokenize_rows(pair, name):
    student_tokenizer, teacher_tokenizer = pair
    row = ROWS[name]
    paired = pair_tokenize_row(row, student_tokenizer, teacher_tokenizer, 512, "test")
    alone = tokenize_row(row, student_tokenizer, 512, "test")
    assert (paired.input_ids, paired.labels, paired.truncated, paired.empty_response, paired.prompt_only) == (
        alone.input_ids, alone.labels, alone.truncated, alone.empty_response, alone.prompt_only)
    # The teacher's ids are what it would train on alone: its own bos, eos and template.
    assert paired.teacher.input_ids == tokenize_row(row, teacher_tokenizer, 512, "test").input_ids


@pytest.mark.parametrize("name", sorted(ROWS))
def test_spans_spell_the_same_characters_on_both_sides(pair, name):
    student_tokenizer, teacher_tokenizer = pair
    row = ROWS[name]
    paired = pair_tokenize_row(row, student_tokenizer, teacher_tokenizer, 512, "test")
    student, teacher = sides(row, student_tokenizer, teacher_tokenizer)
    assert list(student.tokens.ids) == paired.input_ids and list(teacher.tokens.ids) == paired.teacher.input_ids
    ends = end_spans(student, teacher)
    for a, b, c, d in paired.teacher.spans:
        assert a >= 1 and c >= 1 and all(label != -100 for label in paired.labels[a:b])
        assert all(teacher.supervised[c:d])
        if (a, b, c, d) not in ends:
            assert span_chars(student, (a, b)) == span_chars(teacher, (c, d)) != ""


@pytest.mark.parametrize("name", ["prompt/response", "response without a leading space", "text", "empty response"])
def test_the_spans_of_a_response_cover_it_without_gaps_and_end_with_the_eos_pair(pair, name):
    student_tokenizer, teacher_tokenizer = pair
    row = ROWS[name]
    spans = pair_tokenize_row(row, student_tokenizer, teacher_tokenizer, 512, "test").teacher.spans
    student, teacher = sides(row, student_tokenizer, teacher_tokenizer)
    *content, end = spans
    # Both sides end with their eos: one token each, the last.
    student_length, teacher_length = len(student.tokens.ids), len(teacher.tokens.ids)
    assert end == (student_length - 1, student_length, teacher_length - 1, teacher_length)
    covered = [(student.tokens.offsets[a][0], student.tokens.offsets[b - 1][1]) for a, b, _, _ in content]
    if name == "empty response":
        assert covered == []
        return
    assert all(left[1] == right[0] for left, right in zip(covered, covered[1:])) and covered[-1][1] == len(student.text)
    if name == "text":  # the side without a bos predicts its first token from nothing: that stretch is left out
        assert covered[0][0] > 0
    else:  # the response is tokenised on its own on both sides, so it starts a span
        assert covered[0][0] == len(row["prompt"])


def test_byte_fallback_and_byte_level_pieces_of_multi_byte_characters_meet_whole(gpt, llama):
    row = {"prompt": "x", "response": " é€🙂"}
    paired = pair_tokenize_row(row, gpt, llama, 512, "test")
    student, teacher = sides(row, gpt, llama)
    spelled = []
    for a, b, c, d in paired.teacher.spans[:-1]:
        student_bytes = b"".join(token_bytes(token, surface_scheme(gpt))
                                 for token in gpt.convert_ids_to_tokens(paired.input_ids[a:b]))
        teacher_bytes = b"".join(token_bytes(token, surface_scheme(llama))
                                 for token in llama.convert_ids_to_tokens(paired.teacher.input_ids[c:d]))
        assert student_bytes == teacher_bytes
        spelled.append(student_bytes.decode())  # whole characters: no span ends inside one
    assert "".join(spelled) == " é€🙂"
    assert ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"] in [
        llama.convert_ids_to_tokens(paired.teacher.input_ids[c:d]) for _, _, c, d in paired.teacher.spans]


def test_whitespace_runs_align_space_by_space(gpt, llama):
    paired = pair_tokenize_row({"prompt": "a", "response": " b   c"}, gpt, llama, 512, "test")
    pieces = token_pieces(paired, gpt, llama)
    # The byte-level side keeps two of the three spaces together: they meet two "▁", the third one.
    assert pieces == [(["Ġ"], ["▁"]), (["b"], ["b"]), (["ĠĠ"], ["▁", "▁"]), (["Ġ"], ["▁"]), (["c"], ["c"]),
                      (["<|endoftext|>"], ["</s>"])]


# Chat templates ------------------------------------------------------------------------------------

def test_each_side_renders_its_own_template_and_each_turn_ends_with_its_end_of_turn_markup(gpt, llama):
    row = ROWS["messages"]
    paired = pair_tokenize_row(row, gpt, llama, 512, "test")
    student, teacher = sides(row, gpt, llama)
    assert student.text.startswith("<|im_start|>system\n") and teacher.text.startswith("<s><|start_header_id|>")
    assert [student.text[slice(*chars)] for chars in student.contents] == ["The café:  5€", "twice\n\n naïve"]
    assert [teacher.text[slice(*chars)] for chars in teacher.contents] == ["The café:  5€", "twice\n\n naïve"]
    pieces = token_pieces(paired, gpt, llama)
    turn_ends = [index for index, piece in enumerate(pieces) if piece == (["<|im_end|>", "Ċ"], ["<|eot_id|>"])]
    assert len(turn_ends) == 2 and turn_ends[-1] == len(pieces) - 1
    # Between the two turn ends lies the second answer only: no user markup is in a span.
    second = "".join(span_chars(student, (a, b)) for a, b, _, _ in paired.teacher.spans[turn_ends[0] + 1:turn_ends[1]])
    assert second == "twice\n\n naïve"
    assert not any("user" in span_chars(student, (a, b)) for a, b, _, _ in paired.teacher.spans)


def test_a_template_that_rewrites_the_content_is_refused_naming_the_row(gpt, llama):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " padded "}]}
    with pytest.raises(DataError, match=r"^data row d.jsonl:3: the teacher's chat template does not write assistant "
                                        r"turn 1's content as it is .*strip the content's outer whitespace") as err:
        pair_tokenize_row(row, gpt, llama, 512, "d.jsonl:3")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("missing", ["student", "teacher"])
def test_a_chat_template_missing_on_one_side_is_one_line_naming_it(gpt, missing):
    bare = sentencepiece_llama3(chat_template=None)
    student, teacher = (bare, gpt) if missing == "student" else (gpt, bare)
    with pytest.raises(DataError, match=rf"^data row d.jsonl:2 has 'messages' but the {missing}'s tokenizer has no "
                                        rf"chat template.*give the {missing} one") as err:
        pair_tokenize_row(ROWS["messages"], student, teacher, 512, "d.jsonl:2")
    assert "\n" not in str(err.value)
    # Rows without messages need no template.
    assert pair_tokenize_row(ROWS["prompt/response"], student, teacher, 512, "d.jsonl:2").teacher.spans


def slow_tokenizer():
    """A pure-Python ("slow") character tokenizer: it has no character offsets to give."""
    from transformers import PreTrainedTokenizer

    class Characters(PreTrainedTokenizer):
        def __init__(self):
            self.vocab = {token: index for index, token in enumerate(["<pad>", "</s>", *"ab "])}
            super().__init__(eos_token="</s>", pad_token="<pad>")

        @property
        def vocab_size(self):
            return len(self.vocab)

        def get_vocab(self):
            return dict(self.vocab)

        def _tokenize(self, text):
            return list(text)

        def _convert_token_to_id(self, token):
            return self.vocab[token]

        def _convert_id_to_token(self, index):
            return list(self.vocab)[index]

    return Characters()


def test_a_tokenizer_without_offsets_is_one_line(gpt):
    slow = slow_tokenizer()
    assert not slow.is_fast
    for student, teacher in ((slow, gpt), (gpt, slow)):
        with pytest.raises(DataError, match=r"gives no character offsets.*use_fast=True") as err:
            pair_tokenize_row({"prompt": "a", "response": "b"}, student, teacher, 512, "test")
        assert "\n" not in str(err.value)


# Truncation and prompt-only rows -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["prompt/response", "messages"])
def test_truncation_drops_the_spans_past_either_sides_cut(pair, name):
    student_tokenizer, teacher_tokenizer = pair
    row = ROWS[name]
    whole = pair_tokenize_row(row, student_tokenizer, teacher_tokenizer, 512, "test")
    longest = max(len(whole.input_ids), len(whole.teacher.input_ids))
    dropped_by_one_side = 0
    for seq_len in range(2, longest + 1):
        cut = pair_tokenize_row(row, student_tokenizer, teacher_tokenizer, seq_len, "test")
        assert cut.input_ids == whole.input_ids[:seq_len] and cut.teacher.input_ids == whole.teacher.input_ids[:seq_len]
        assert cut.truncated == (len(whole.input_ids) > seq_len)
        assert cut.teacher.spans == [span for span in whole.teacher.spans if span[1] <= seq_len and span[3] <= seq_len]
        dropped_by_one_side += any(min(span[1], span[3]) <= seq_len < max(span[1], span[3])
                                   for span in whole.teacher.spans)
    # The two sides differ in length, so some cuts fall inside one side's spans and past the other's.
    assert dropped_by_one_side > 0


def test_prompt_only_rows_have_the_teachers_prompt_and_no_span(gpt, llama):
    row = ROWS["prompt-only"]
    paired = pair_tokenize_row(row, gpt, llama, 512, "test")
    assert paired.prompt_only and paired.teacher.spans == []
    assert paired.teacher.input_ids == [llama.bos_token_id] + llama.encode(row["prompt"], add_special_tokens=False)
    assert paired.input_ids == gpt.encode(row["prompt"], add_special_tokens=False)  # no bos on this side


# Role pairs ----------------------------------------------------------------------------------------

def test_role_pairs_are_the_eos_and_end_of_turn_tokens(gpt, llama):
    end_of_turn = (gpt.convert_tokens_to_ids("<|im_end|>"), llama.convert_tokens_to_ids("<|eot_id|>"))
    assert role_pairs(gpt, llama) == [(gpt.eos_token_id, llama.eos_token_id), end_of_turn]
    assert role_pairs(llama, gpt) == [(student, teacher) for teacher, student in role_pairs(gpt, llama)]
    assert role_pairs(gpt, gpt) == []  # the same strings: the vocabulary overlap pairs them already
    without_template = sentencepiece_llama3(chat_template=None)
    assert role_pairs(gpt, without_template) == [(gpt.eos_token_id, without_template.eos_token_id)]


# Collating -----------------------------------------------------------------------------------------

def hand_made_rows() -> list[TokenizedRow]:
    first = TokenizedRow([10, 11, 12, 13], [-100, 11, 12, 13],
                         teacher=TeacherTokens([20, 21, 22, 23, 24], [(1, 3, 1, 2), (3, 4, 2, 5)]))
    second = TokenizedRow([30, 31, 32], [-100, 31, 32], teacher=TeacherTokens([40, 41, 42], [(2, 3, 1, 3)]))
    return [first, second]


def test_collate_pairs_gives_the_flat_positions_of_the_spans_docstrings():
    batch = collate_pairs(hand_made_rows(), pad_id=0, teacher_pad_id=9)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13], [30, 31, 32, 0]]
    assert batch["teacher_input_ids"].tolist() == [[20, 21, 22, 23, 24], [40, 41, 42, 9, 9]]
    assert batch["teacher_attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    spans = batch["spans"]
    # T_s = 4, T_t = 5. Row 0: (1,3,1,2) reads student 0 and teacher 0; (3,4,2,5) student 2, teacher 1.
    # Row 1: (2,3,1,3) reads student 4 + 1 = 5 and teacher 5 + 0 = 5.
    assert spans.student_first.tolist() == [0, 2, 5]
    assert spans.teacher_first.tolist() == [0, 1, 5]
    assert spans.student_tokens.tolist() == [2, 1, 1] and spans.teacher_tokens.tolist() == [1, 3, 2]
    # Inner tokens: student token 2 of span 0 (predicted at 1); teacher tokens 3, 4 of span 1 (at 2, 3)
    # and token 2 of row 1's span (at 5 + 1).
    assert (spans.student_inner.tolist(), spans.student_inner_ids.tolist(), spans.student_inner_span.tolist()) == (
        [1], [12], [0])
    assert (spans.teacher_inner.tolist(), spans.teacher_inner_ids.tolist(), spans.teacher_inner_span.tolist()) == (
        [2, 3, 6], [23, 24, 42], [1, 1, 2])
    assert all(tensor.dtype == torch.long for tensor in vars(spans).values())


def test_collated_span_positions_predict_the_spans_tokens_in_real_rows(gpt, llama):
    rows = [pair_tokenize_row(ROWS[name], gpt, llama, 512, "test") for name in ("messages", "prompt/response", "text")]
    batch = collate_pairs(rows, pad_id=gpt.pad_token_id, teacher_pad_id=llama.pad_token_id)
    spans = batch["spans"]
    student_flat, teacher_flat = batch["input_ids"].reshape(-1), batch["teacher_input_ids"].reshape(-1)
    flat = [(r, span) for r, row in enumerate(rows) for span in row.teacher.spans]
    assert spans.count == len(flat)
    # The token after each first position is the span's first token, on each side.
    assert student_flat[spans.student_first + 1].tolist() == [rows[r].input_ids[a] for r, (a, _, _, _) in flat]
    assert teacher_flat[spans.teacher_first + 1].tolist() == [rows[r].teacher.input_ids[c] for r, (_, _, c, _) in flat]
    assert student_flat[spans.student_inner + 1].tolist() == spans.student_inner_ids.tolist()
    assert teacher_flat[spans.teacher_inner + 1].tolist() == spans.teacher_inner_ids.tolist()
    assert len(spans.student_inner) == sum(b - a - 1 for _, (a, b, _, _) in flat)
    assert len(spans.teacher_inner) == sum(d - c - 1 for _, (_, _, c, d) in flat)


def test_collate_pairs_refuses_rows_without_teacher_tokens_and_a_teacher_without_a_pad():
    with pytest.raises(DataError, match=r"row 7 has no teacher tokens.*load_examples\(\.\.\., teacher_tokenizer="):
        collate_pairs([TokenizedRow([1, 2], [-100, 2], index=7)], pad_id=0, teacher_pad_id=0)
    with pytest.raises(DataError, match="teacher's tokenizer has no pad token"):
        collate_pairs(hand_made_rows(), pad_id=0, teacher_pad_id=None)
    assert span_batch([], 0, 0).count == 0


def test_an_evaluation_filler_row_keeps_the_teachers_ids_but_no_span():
    rows = hand_made_rows()
    # eval_batches pads a rank's share with masked copies of row 0; across tokenizers the spans are the mask.
    filler = _masked_copy(rows[0])
    assert filler.num_supervised == 0 and filler.input_ids == rows[0].input_ids
    assert filler.teacher.input_ids == rows[0].teacher.input_ids and filler.teacher.spans == []
    assert rows[0].teacher.spans  # the row itself is untouched
    assert len(eval_batches(rows, rank=2, world_size=3, batch_size=1, pad_id=0)) == 1


# Loading --------------------------------------------------------------------------------------------

def test_load_examples_with_a_teacher_tokenizer_caches_its_ids_and_spans(gpt, llama, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[name] for name in sorted(ROWS)])
    cache = tmp_path / "cache"
    alone = load_examples(str(path), gpt, 512, cache)
    paired = load_examples(str(path), gpt, 512, cache, teacher_tokenizer=llama)
    assert paired.fingerprint != alone.fingerprint and not paired.from_cache  # the student-only cache is not read
    assert all(row.teacher is not None for row in paired.rows) and all(row.teacher is None for row in alone.rows)
    assert [(row.input_ids, row.labels) for row in paired.rows] == [(row.input_ids, row.labels) for row in alone.rows]
    assert any(row.teacher.spans for row in paired.rows) and any(not row.teacher.spans for row in paired.rows)

    # Another teacher tokenizer is another key.
    other_teacher = sentencepiece_llama3(LLAMA3.replace("\n\n", "\n"))
    other = load_examples(str(path), gpt, 512, None, teacher_tokenizer=other_teacher).fingerprint
    assert other != paired.fingerprint

    def must_not_tokenize(*args, **kwargs):
        raise AssertionError("pair_tokenize_row ran although the cache should have answered")

    monkeypatch.setattr(examples_module, "pair_tokenize_row", must_not_tokenize)
    again = load_examples(str(path), gpt, 512, cache, teacher_tokenizer=llama,
                          teacher_tokenizer_hash=examples_module.tokenizer_fingerprint(llama))
    assert again.from_cache and again.rows == paired.rows and again.fingerprint == paired.fingerprint


def test_a_cache_file_without_teacher_tokens_is_not_read_for_a_pair(gpt, llama, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS["prompt/response"]])
    paired = load_examples(str(path), gpt, 512, tmp_path / "cache", teacher_tokenizer=llama)
    [cache_file] = (tmp_path / "cache").iterdir()
    blob = torch.load(cache_file, weights_only=True)
    for key in [key for key in blob if key.startswith("teacher_")]:
        del blob[key]
    torch.save(blob, cache_file)
    again = load_examples(str(path), gpt, 512, tmp_path / "cache", teacher_tokenizer=llama)
    assert not again.from_cache and again.rows == paired.rows


def test_long_rows_are_still_refused_with_truncate_false(gpt, llama, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS["prompt/response"]])
    with pytest.raises(DataError, match=r"d.jsonl:1 is \d+ tokens long, more than train.seq_len=8"):
        load_examples(str(path), gpt, 8, None, truncate=False, teacher_tokenizer=llama)


def test_a_row_only_the_teachers_tokens_overflow_is_refused_with_truncate_false_and_cached_as_cut(gpt, llama, tmp_path):
    row = ROWS["prompt/response"]
    student_length = len(tokenize_row(row, gpt, 512, "test").input_ids)
    teacher_length = len(tokenize_row(row, llama, 512, "test").input_ids)
    assert teacher_length > student_length  # SentencePiece spells "€" and "🙂" in bytes
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    cut = load_examples(str(path), gpt, student_length, tmp_path / "cache", teacher_tokenizer=llama)
    assert not cut.rows[0].truncated and cut.rows[0].teacher.truncated
    cached = load_examples(str(path), gpt, student_length, tmp_path / "cache", teacher_tokenizer=llama)
    assert cached.from_cache and cached.rows[0].teacher.truncated
    with pytest.raises(DataError, match=rf"d.jsonl:1 is {teacher_length} tokens long in the teacher's tokenizer, "
                                        rf"more than train.seq_len={student_length}"):
        load_examples(str(path), gpt, student_length, tmp_path / "cache", truncate=False, teacher_tokenizer=llama)


@pytest.mark.slow
def test_tokenising_both_sides_grows_linearly_with_the_rows(gpt, llama, tmp_path):
    rows = [ROWS[name] for name in sorted(ROWS)] * 500

    def seconds(count: int) -> float:
        path = write_jsonl(tmp_path / f"{count}.jsonl", rows[:count])
        started = time.perf_counter()
        load_examples(str(path), gpt, 512, None, teacher_tokenizer=llama)
        return time.perf_counter() - started

    seconds(50)  # warm up
    small, large = seconds(500), seconds(3000)
    assert large / small < 12, f"6x the rows took {large / small:.1f}x the time ({small:.2f}s, {large:.2f}s)"
