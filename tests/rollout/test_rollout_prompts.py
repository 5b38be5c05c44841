"""trainer.rollout.prompts on rows tokenised by trainer.data (the char tokenizer of conftest)."""

import pytest

from conftest import text_of
from trainer.data.sources import DataError
from trainer.data.tokenize import IGNORE_INDEX, TokenizedRow, tokenize_row
from trainer.rollout.prompts import prompt_of, rewritten, rollout_rows, rollout_seed


def encoded(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


CONVERSATION = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "6"},
]


def test_the_prompt_of_a_prompt_response_row_is_its_prompt(tokenizer):
    row = tokenize_row({"prompt": "12+30=", "response": "42"}, tokenizer, seq_len=64, origin="t")
    assert text_of(tokenizer, prompt_of(row)) == "<s>12+30="


def test_the_prompt_of_a_messages_row_ends_before_its_last_assistant_turn(tokenizer):
    row = tokenize_row({"messages": CONVERSATION}, tokenizer, seq_len=256, origin="t")
    expected = tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False, add_generation_prompt=True)
    # The first assistant turn stays in the prompt as context.
    assert text_of(tokenizer, prompt_of(row)) == expected
    assert "4<|im_end|>" in text_of(tokenizer, prompt_of(row))


def test_a_text_row_has_no_prompt_and_says_what_to_do(tokenizer):
    row = tokenize_row({"text": "no prompt here"}, tokenizer, seq_len=64, origin="t")
    with pytest.raises(DataError, match="has no prompt.*onpolicy.fraction=0") as error:
        prompt_of(row)
    assert "\n" not in str(error.value)


def test_a_row_without_supervised_tokens_is_all_prompt():
    row = TokenizedRow([1, 2, 3], [IGNORE_INDEX] * 3)
    assert prompt_of(row) == [1, 2, 3]


def test_rewritten_supervises_exactly_the_generated_tokens(tokenizer):
    row = tokenize_row({"messages": CONVERSATION}, tokenizer, seq_len=256, origin="t")
    row.index = 7
    generated = encoded(tokenizer, "five") + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    new = rewritten(row, generated, seq_len=256)
    prompt = prompt_of(row)
    assert new.input_ids == prompt + generated
    assert new.labels == [IGNORE_INDEX] * len(prompt) + generated
    assert new.index == 7 and not new.truncated and new.num_supervised == len(generated)


@pytest.mark.parametrize("seq_len", [64, 12, 10, 8, 3])
def test_rewritten_with_the_rows_own_response_is_the_row(tokenizer, seq_len):
    # The data code's own row, cut at every length: rewriting it with its response changes nothing.
    source = {"prompt": "12+30=", "response": "42"}
    full = tokenize_row(source, tokenizer, seq_len=64, origin="t")
    cut = tokenize_row(source, tokenizer, seq_len=seq_len, origin="t")
    response = full.input_ids[len(prompt_of(full)):]
    assert rewritten(full, response, seq_len) == cut


def test_rollout_rows_and_seeds_are_a_function_of_seed_step_and_row():
    rows = list(range(40))
    assert rollout_rows(5, rows, 0.5, seed=1) == rollout_rows(5, rows, 0.5, seed=1)
    assert rollout_rows(5, rows, 0.5, seed=1) != rollout_rows(6, rows, 0.5, seed=1)
    assert rollout_rows(5, rows, 0.5, seed=1) != rollout_rows(5, rows, 0.5, seed=2)
    assert rollout_seed(1, 5, 3) == rollout_seed(1, 5, 3)
    seeds = {rollout_seed(seed, step, row) for seed in (1, 2) for step in range(5) for row in range(20)}
    assert len(seeds) == 200 and all(0 <= seed < 2**63 for seed in seeds)


@pytest.mark.parametrize("ranks, micro_batch", [(1, 8), (2, 4), (4, 1), (3, 2)])
def test_rollout_rows_are_the_same_however_rows_are_split(ranks, micro_batch):
    step, rows = 11, list(range(100, 124))
    whole = dict(zip(rows, rollout_rows(step, rows, 0.5, seed=3)))
    for rank in range(ranks):
        mine = rows[rank::ranks]
        for start in range(0, len(mine), micro_batch):
            chunk = mine[start:start + micro_batch]
            assert rollout_rows(step, chunk, 0.5, seed=3) == [whole[row] for row in chunk]


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_rollout_rows_share_is_near_the_fraction(fraction):
    picked = [p for step in range(20) for p in rollout_rows(step, list(range(500)), fraction, seed=0)]
    share = sum(picked) / len(picked)
    if fraction in (0.0, 1.0):
        assert share == fraction
    else:
        assert abs(share - fraction) < 0.02  # 10,000 draws: the standard error is at most 0.005


def test_a_fraction_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="fraction"):
        rollout_rows(0, [1], 1.5, seed=0)
