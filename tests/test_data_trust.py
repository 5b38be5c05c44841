"""Data that a job used to misread or accept without a word (issue 17): each is now one line that
names the file and line and what to do, or a warning that counts the rows."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from trainer import data
from trainer.data import DataError, TokenizedRow
from trainer.models import ModelError, load_tokenizer


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
