"""Data that a job used to misread or accept without a word (issue 17): each is now one line that
names the file and line and what to do, or a warning that counts the rows."""

from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf
from test_data import write_jsonl

from trainer.data.batching import collate
from trainer.data.examples import load_examples
from trainer.data.sources import DataError
from trainer.data.tokenize import TokenizedRow, tokenize_row
from trainer.models.loading import ModelError, load_tokenizer


def tokenize(tokenizer, row):
    return tokenize_row(row, tokenizer, 256, "chats.jsonl:3")


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


def test_a_sharegpt_row_is_told_how_its_fields_map(tokenizer):
    row = {"id": "1", "conversations": [{"from": "human", "value": "1+1="}, {"from": "gpt", "value": "2"}]}
    with pytest.raises(DataError, match=r"chats\.jsonl:3 fits no known format.*ShareGPT's 'conversations' is "
                                        r"'messages' here.*human->user, gpt->assistant"):
        tokenize(tokenizer, row)


def test_a_custom_role_beside_assistant_turns_still_trains(tokenizer):
    row = {"messages": [{"role": "user", "content": "1+1="}, {"role": "observation", "content": "calc: 2"},
                        {"role": "assistant", "content": "2"}]}
    assert tokenize(tokenizer, row).num_supervised > 0


def test_a_conversation_of_known_roles_without_an_assistant_turn_is_still_only_dropped(tokenizer):
    row = {"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": "1+1="}]}
    assert tokenize(tokenizer, row).num_supervised == 0


# --- empty responses -------------------------------------------------------------------------
@pytest.mark.parametrize("row, empty", [
    ({"prompt": "1+1=", "response": ""}, True),
    ({"prompt": "1+1=", "response": " \n"}, True),
    ({"prompt": "1+1=", "response": "2"}, False),
    ({"text": ""}, True),
    ({"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": ""}]}, True),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
                   {"role": "user", "content": "b"}, {"role": "assistant", "content": "2"}]}, False),
])
def test_rows_know_when_their_response_is_empty(tokenizer, row, empty):
    assert tokenize(tokenizer, row).empty_response is empty


def test_a_source_whose_every_response_is_empty_is_refused_from_the_cache_too(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "blank.jsonl", [{"prompt": f"{i}+1=", "response": ""} for i in range(3)])
    for attempt in ("tokenized", "cached"):
        with pytest.raises(DataError, match=r"every one of the 3 rows of data\.train has an empty response "
                                            r"\(first: .*blank\.jsonl:1\).*python -m trainer\.generate"):
            load_examples(str(source), tokenizer, 64, tmp_path / "cache", key="data.train")
    assert list((tmp_path / "cache").iterdir()), "the second attempt read the rows from the cache"


def test_some_empty_responses_are_counted_in_a_warning(tokenizer, tmp_path, caplog):
    rows = [{"prompt": "1+1=", "response": "2"}, {"prompt": "1+2=", "response": ""}, {"prompt": "2+2=", "response": "4"}]
    source = write_jsonl(tmp_path / "some.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        examples = load_examples(str(source), tokenizer, 64, None, key="data.train")
    assert len(examples) == 3 and examples.num_empty_responses == 1
    assert "1 of 3 rows of data.train have an empty response (first: " in caplog.text
    assert "some.jsonl:2" in caplog.text


def test_a_tokenized_cache_from_before_the_empty_flag_is_rebuilt(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "some.jsonl", [{"prompt": "1+1=", "response": ""}, {"prompt": "1+2=", "response": "3"}])
    load_examples(str(source), tokenizer, 64, tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").iterdir()
    blob = torch.load(cache_file, weights_only=True)
    del blob["empty_response"]  # as written before the flag existed
    torch.save(blob, cache_file)
    examples = load_examples(str(source), tokenizer, 64, tmp_path / "cache")
    assert not examples.from_cache and [row.empty_response for row in examples.rows] == [True, False]


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
        collate([TokenizedRow([1, 2], [-100, 2])], pad_id=None)


# --- a float16 teacher cache as the loss sees it ---------------------------------------------
def test_a_cached_batch_keeps_the_caches_dtype_so_reverse_kl_floors_the_tail_at_its_rounding(tmp_path):
    """The loss reads the rounding of the teacher's log-probabilities from their dtype: a float16
    cache must reach it as float16, not widened to float32 (whose rounding is 10⁻⁴⁵, not 10⁻⁸)."""
    from trainer.cache.store import CacheReader, Manifest, RowTopK, SplitInfo, shard_path, write_manifest, write_shard
    from trainer.losses import sparse_distill_loss

    labels = torch.tensor([[-100, 5, 6, 7]])  # positions 0-2 predict the three supervised tokens
    confident = torch.tensor([[0.0, -25.0, -25.0]] * 3)  # log(1 − 1e-10) rounds to 0: the listed mass is 1+
    row = RowTopK(confident, torch.tensor([[5, 1, 2]] * 3, dtype=torch.int32), torch.zeros(3))
    shard = shard_path(tmp_path, "train", 0)
    shard.parent.mkdir(parents=True)
    write_shard(shard, [row], torch.float16)
    write_manifest(tmp_path, Manifest(key={"top_k": 3}, teacher={}, dtype="float16", vocab_size=10, complete=True,
                                      splits={"train": SplitInfo(data="x", source="x", rows=1, shard_rows=1)}))
    sparse, _ = CacheReader(tmp_path).batch("train", torch.tensor([0]), labels)
    assert sparse.logprobs.dtype == torch.float16

    student = torch.zeros(1, 4, 10, requires_grad=True)  # uniform: 70% of its mass in the teacher's tail
    loss = sparse_distill_loss(student, sparse, torch.tensor([[5, 6, 7, -100]]), kind="rkl")
    # Per position 0.1·log(0.1) + 2·0.1·log(0.1 / e⁻²⁵) + 0.7·log(0.7 / 2⁻²⁵) = 16.19, the tail outcome
    # against float16's rounding; against float32's (2⁻¹⁵⁰) it would be 77.
    assert loss.item() == pytest.approx(16.19, abs=0.01)


# --- teacher-written data: the teacher's own sampling settings ------------------------------
def _generate_settings(**values):
    from trainer.config import GenerateConfig

    return OmegaConf.merge(OmegaConf.structured(GenerateConfig), values)


@pytest.mark.parametrize("written, expected", [
    (None, {"temperature": 0.0, "top_p": 1.0, "top_k": 0}),  # transformers decodes greedily without do_sample
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}, {"temperature": 0.6, "top_p": 0.95, "top_k": 20}),
    ({"do_sample": False, "temperature": 0.7}, {"temperature": 0.0, "top_p": 1.0, "top_k": 0}),
    ({"do_sample": True}, {"temperature": 1.0, "top_p": 1.0, "top_k": 0}),
])
def test_unset_sampling_settings_are_the_teachers_own(tmp_path, written, expected):
    import json

    from trainer.generate.sampling import fill_sampling

    if written is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(written))
    settings = _generate_settings()
    fill_sampling(settings, tmp_path, log_it=False)
    assert {key: settings[key] for key in expected} == expected


def test_sampling_settings_that_are_set_are_kept(tmp_path):
    from trainer.generate.sampling import fill_sampling

    (tmp_path / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.6, "top_p": 0.95}')
    settings = _generate_settings(temperature=1.0)
    fill_sampling(settings, tmp_path, log_it=False)
    assert (settings.temperature, settings.top_p, settings.top_k) == (1.0, 0.95, 0)


def test_with_no_overrides_the_demo_teacher_answers_the_demo_prompts_and_no_other_teacher_does():
    from trainer.config import ConfigError, validate_generate
    from trainer.preflight.demo_assets import demo_prompts_for_the_demo_teacher

    demo = OmegaConf.create({"teacher": {"path": "demo://teacher"}, "generate": _generate_settings()})
    demo_prompts_for_the_demo_teacher(demo)
    assert demo.generate.prompts == "demo://train" and demo.generate.out == "outputs/generated"
    own = OmegaConf.create({"teacher": {"path": "/models/teacher"}, "generate": _generate_settings()})
    demo_prompts_for_the_demo_teacher(own)
    with pytest.raises(ConfigError, match="generate.prompts is not set"):
        validate_generate(own.generate)
