"""The demo assets: loadable folders, a half-depth student, disjoint data, and a working cache."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from conftest import tiny_demo_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.demo import build_demo_assets, exact_match_rate
from trainer.demo.task import read_jsonl

TINY = tiny_demo_recipe()


def test_models_load_and_student_has_half_the_layers(tiny_demo_assets):
    _, assets = tiny_demo_assets
    teacher = AutoModelForCausalLM.from_pretrained(assets.teacher_path)
    student = AutoModelForCausalLM.from_pretrained(assets.student_path)
    assert student.config.num_hidden_layers * 2 == teacher.config.num_hidden_layers
    assert len(student.model.layers) == student.config.num_hidden_layers
    kept = dict(student.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(kept, dict(teacher.named_parameters())["model.layers.0.mlp.up_proj.weight"])


def test_tokenizers_are_identical_and_character_level(tiny_demo_assets):
    _, assets = tiny_demo_assets
    teacher_tok = AutoTokenizer.from_pretrained(assets.teacher_path)
    student_tok = AutoTokenizer.from_pretrained(assets.student_path)
    assert teacher_tok.get_vocab() == student_tok.get_vocab()
    assert teacher_tok.chat_template == student_tok.chat_template
    assert 20 <= len(teacher_tok) <= 40
    ids = teacher_tok("12+34=", add_special_tokens=False).input_ids
    assert teacher_tok.convert_ids_to_tokens(ids) == list("12+34=")
    chat = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]
    assert teacher_tok.unk_token_id not in teacher_tok.apply_chat_template(chat, tokenize=True)["input_ids"]


def test_rows_are_prompt_response_pairs_and_splits_are_disjoint(tiny_demo_assets):
    _, assets = tiny_demo_assets
    train, held_out = read_jsonl(assets.train_path), read_jsonl(assets.eval_path)
    assert (len(train), len(held_out)) == (TINY.n_train, TINY.n_eval)
    for row in train + held_out:
        assert set(row) == {"prompt", "response"}
        a, b = row["prompt"].removesuffix("=").split("+")
        assert row["response"].endswith(";" + str(int(a) + int(b)))
    assert not {row["prompt"] for row in train} & {row["prompt"] for row in held_out}


def test_second_call_is_a_cache_hit(tiny_demo_assets):
    cache, assets = tiny_demo_assets
    started = time.perf_counter()
    again = build_demo_assets(cache, recipe=TINY, log=lambda _: None)
    assert time.perf_counter() - started < 0.5
    assert again == assets
    assert [p.name for p in cache.iterdir()] == [assets.teacher_path.parent.name]  # no leftovers


def test_another_recipe_or_seed_gets_its_own_folder(tiny_demo_assets):
    _, assets = tiny_demo_assets
    assert TINY.fingerprint(seed=0) != TINY.fingerprint(seed=1)
    assert TINY.fingerprint(seed=0) != dataclasses.replace(TINY, teacher_steps=4).fingerprint(seed=0)
    assert TINY.fingerprint(seed=0) in assets.teacher_path.parent.name


def test_an_interrupted_build_leaves_nothing_that_is_picked_up(tmp_path, monkeypatch):
    import trainer.demo.assets as assets_module

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(assets_module, "train_teacher", crash)
    with pytest.raises(KeyboardInterrupt):
        build_demo_assets(tmp_path, recipe=TINY, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_exact_match_rate_scores_whole_rows():
    class Oracle(torch.nn.Module):
        """Puts all its mass on the next input token: right on every row it is shown."""

        def forward(self, input_ids):
            logits = torch.nn.functional.one_hot(input_ids.roll(-1, dims=1), 40).float()
            return type("Output", (), {"logits": logits})()

    from trainer.demo.tokenizer import build_char_tokenizer

    rows = [{"prompt": "1+2=", "response": "2+1+0=03;3"}]
    assert exact_match_rate(Oracle(), rows, build_char_tokenizer()) == 1.0
