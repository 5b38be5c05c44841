"""Data that a job used to misread or accept without a word (issue 17): each is now one line that
names the file and line and what to do, or a warning that counts the rows."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from test_data import build_tokenizer

from trainer import data
from trainer.data import DataError, TokenizedRow
from trainer.models import ModelError, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def tokenize(tokenizer, row):
    return data.tokenize_row(row, tokenizer, 256, "chats.jsonl:3")


# --- conversations ---------------------------------------------------------------------------
def test_a_conversation_that_starts_with_the_assistant_is_named(tokenizer):
    row = {"messages": [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "1+1="}]}
    with pytest.raises(DataError, match=r"chats\.jsonl:3 starts with an assistant turn.*put the user"):
        tokenize(tokenizer, row)


def test_sharegpt_roles_are_named_with_the_roles_to_use(tokenizer):
    row = {"messages": [{"role": "human", "content": "1+1="}, {"role": "gpt", "content": "2"}]}
    with pytest.raises(DataError) as refused:
        tokenize(tokenizer, row)
    message = str(refused.value)
    assert "chats.jsonl:3 has the roles 'human', 'gpt' and no 'assistant' turn" in message
    assert "system, user, assistant" in message and "human->user, gpt->assistant" in message


def test_other_unknown_roles_without_an_assistant_turn_are_named(tokenizer):
    row = {"messages": [{"role": "user", "content": "1+1="}, {"role": "bot", "content": "2"}]}
    with pytest.raises(DataError, match=r"roles 'user', 'bot' and no 'assistant' turn") as refused:
        tokenize(tokenizer, row)
    assert "ShareGPT" not in str(refused.value)


def test_sharegpt_from_and_value_keys_are_named(tokenizer):
    row = {"messages": [{"from": "human", "value": "1+1="}, {"from": "gpt", "value": "2"}]}
    with pytest.raises(DataError, match=r"chats\.jsonl:3 has messages\[0\] in ShareGPT's form.*'role'/'content'"):
        tokenize(tokenizer, row)


def test_a_custom_role_beside_assistant_turns_still_trains(tokenizer):
    row = {"messages": [{"role": "user", "content": "1+1="}, {"role": "observation", "content": "calc: 2"},
                        {"role": "assistant", "content": "2"}]}
    assert tokenize(tokenizer, row).num_supervised > 0


def test_a_conversation_of_known_roles_without_an_assistant_turn_is_still_only_dropped(tokenizer):
    row = {"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": "1+1="}]}
    assert tokenize(tokenizer, row).num_supervised == 0


# --- no pad token ----------------------------------------------------------------------------
def _tokenizer_folder(tmp_path, **specials):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(["<unk>", "<s>", "a", "b"])}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), **specials)
    fast.save_pretrained(tmp_path)
    return OmegaConf.create({"path": str(tmp_path), "revision": None, "trust_remote_code": False})


def test_a_tokenizer_without_pad_or_eos_pads_with_its_unk(tmp_path):
    tokenizer = load_tokenizer("student", _tokenizer_folder(tmp_path, unk_token="<unk>"))
    assert tokenizer.pad_token == "<unk>"


def test_a_tokenizer_with_no_token_to_pad_with_is_refused_naming_its_config_file(tmp_path):
    with pytest.raises(ModelError, match=r"student tokenizer of .* has no pad, eos, unk or bos token.*"
                                         r"\"pad_token\".*tokenizer_config\.json"):
        load_tokenizer("student", _tokenizer_folder(tmp_path))


def test_collate_without_a_pad_id_names_a_real_fix():
    with pytest.raises(DataError, match=r"add a \"pad_token\" to the model folder's tokenizer_config\.json"):
        data.collate([TokenizedRow([1, 2], [-100, 2])], pad_id=None)
