"""Prompt-only rows `{"prompt"}` (issue 19): the student writes their responses under
onpolicy.fraction=1, so they tokenise to the prompt alone, nothing supervised, and keep that they are
prompt-only through the tokenized-rows cache."""

import pytest
import torch
from conftest import text_of, write_jsonl

from trainer.data.examples import load_examples, supervised_only
from trainer.data.sources import DataError
from trainer.data.tokenize import IGNORE_INDEX, tokenize_row
from trainer.rollout.prompts import prompt_of


def test_a_prompt_only_row_is_the_prompt_as_a_prompt_response_row_starts(tokenizer):
    alone = tokenize_row({"prompt": "Say hi: "}, tokenizer, 64, "t.jsonl:1")
    answered = tokenize_row({"prompt": "Say hi: ", "response": "hi"}, tokenizer, 64, "t.jsonl:2")
    assert text_of(tokenizer, alone.input_ids) == "<s>Say hi: "
    assert alone.labels == [IGNORE_INDEX] * len(alone.input_ids) and alone.num_supervised == 0
    assert alone.prompt_only and not alone.empty_response and not alone.truncated
    # The rollout continues it exactly where a dataset's response would start.
    assert prompt_of(alone) == alone.input_ids == prompt_of(answered)
    assert not answered.prompt_only


def test_a_prompt_only_row_longer_than_seq_len_is_cut_and_flagged(tokenizer):
    row = tokenize_row({"prompt": "p" * 40}, tokenizer, 16, "t.jsonl:1")
    assert len(row.input_ids) == 16 and row.truncated and row.prompt_only


@pytest.mark.parametrize("row", [{"prompt": "p", "text": "t"}, {"prompt": "p", "messages": [
    {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}])
def test_a_row_that_fits_another_format_too_is_that_format(tokenizer, row):
    """Prompt-only is the format of last resort: rows that were accepted before it are tokenised as before."""
    tokenized = tokenize_row(row, tokenizer, 64, "t.jsonl:1")
    assert not tokenized.prompt_only and tokenized.num_supervised > 0


def test_prompt_only_rows_survive_the_cache_and_are_no_empty_responses(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1="}, {"prompt": "2+2=", "response": "4"}])
    first = load_examples(str(path), tokenizer, 64, tmp_path / "cache")
    again = load_examples(str(path), tokenizer, 64, tmp_path / "cache")
    assert again.from_cache and again.rows == first.rows
    assert [row.prompt_only for row in again.rows] == [True, False]
    assert again.num_prompt_only == 1 and again.num_empty_responses == 0


def test_a_source_of_prompt_only_rows_is_not_refused_as_all_empty(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1+1="}, {"prompt": "2+2="}])
    examples = load_examples(str(path), tokenizer, 64, None)
    assert examples.num_prompt_only == 2 and examples.num_supervised_tokens == 0


def test_a_cache_written_before_prompt_only_rows_is_rebuilt(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1="}])
    load_examples(str(path), tokenizer, 64, tmp_path / "cache")
    [cache_file] = (tmp_path / "cache").iterdir()
    blob = torch.load(cache_file, weights_only=True)
    del blob["prompt_only"]
    torch.save(blob, cache_file)
    again = load_examples(str(path), tokenizer, 64, tmp_path / "cache")
    assert not again.from_cache and again.rows[0].prompt_only


def test_prompt_only_rows_are_trained_on_only_when_asked_and_only_with_room_to_write(tokenizer):
    short = tokenize_row({"prompt": "1+1="}, tokenizer, 8, "t.jsonl:1")
    full = tokenize_row({"prompt": "1234567890"}, tokenizer, 8, "t.jsonl:2")  # fills seq_len=8
    cut_off = tokenize_row({"prompt": "1234567890", "response": "r"}, tokenizer, 8, "t.jsonl:3")
    learnable = tokenize_row({"prompt": "1", "response": "2"}, tokenizer, 8, "t.jsonl:4")
    rows = [short, full, cut_off, learnable]
    assert supervised_only(rows, 8) == [learnable]
    # A cut-off prompt/response row stays dropped: its prompt is its whole row, with no room either.
    assert supervised_only(rows, 8, prompts_too=True) == [short, learnable]
    with pytest.raises(DataError, match=r"none of the 1 training rows has a token to learn .*a prompt that fills it"):
        supervised_only([full], 8, prompts_too=True)
