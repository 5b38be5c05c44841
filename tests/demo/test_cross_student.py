"""The demo's cross-tokenizer student: a tokenizer with two digits a token, and the demo student
re-headed for it, built from the demo assets into a cache folder of its own."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.data.alignment import vocabulary_overlap
from trainer.demo import build_cross_tokenizer_student
from trainer.demo.cross_student import DIGIT_PAIRS, build_pair_tokenizer, cross_student_folder
from trainer.demo.tokenizer import build_char_tokenizer
from trainer.models.loading import load_model, load_tokenizer


@pytest.fixture(scope="module")
def pair_tokenizer():
    return build_pair_tokenizer()


@pytest.fixture(scope="module")
def cross_student(tiny_demo_assets, tmp_path_factory):
    """(cache folder, student folder, the demo assets it was built from)."""
    _, assets = tiny_demo_assets
    cache = tmp_path_factory.mktemp("cross-cache")
    return cache, build_cross_tokenizer_student(assets, cache, log=lambda _: None), assets


def test_no_token_has_the_id_it_has_in_the_teachers_tokenizer(pair_tokenizer):
    teacher, student = build_char_tokenizer().get_vocab(), pair_tokenizer.get_vocab()
    assert set(teacher) < set(student) and set(student) - set(teacher) == set(DIGIT_PAIRS)
    assert all(student[token] != teacher[token] for token in teacher)


def test_two_digits_are_one_token_and_offsets_point_into_the_text(pair_tokenizer):
    text = "347+285=7+5+0=12;4"
    encoded = pair_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    tokens = pair_tokenizer.convert_ids_to_tokens(encoded.input_ids)
    assert tokens == ["34", "7", "+", "28", "5", "=", "7", "+", "5", "+", "0", "=", "12", ";", "4"]
    assert [text[start:end] for start, end in encoded.offset_mapping] == tokens
    assert pair_tokenizer.decode(pair_tokenizer(text).input_ids, skip_special_tokens=True) == text
    assert pair_tokenizer(text).input_ids[0] == pair_tokenizer.bos_token_id


def test_the_chat_template_renders_without_unknown_tokens(pair_tokenizer):
    chat = [{"role": "user", "content": "12+34="}, {"role": "assistant", "content": "2+4+0=06;1+3+0=04;46"}]
    ids = pair_tokenizer.apply_chat_template(chat, tokenize=True)["input_ids"]
    assert pair_tokenizer.unk_token_id not in ids
    assert pair_tokenizer.convert_tokens_to_ids("<|im_start|>") in ids


def test_the_shared_vocabulary_is_the_teachers_whole_vocabulary(pair_tokenizer):
    """The teacher's 31 tokens (6 specials, 25 characters) are all the student's too; its 100 pairs
    are not the teacher's: a share of 31 / 131 of the student's vocabulary."""
    teacher = build_char_tokenizer()
    overlap = vocabulary_overlap(pair_tokenizer, teacher)
    assert len(overlap.pairs) == len(teacher) == 31 and len(pair_tokenizer) == 131
    assert overlap.share == pytest.approx(31 / 131)
    assert all(pair_tokenizer.convert_ids_to_tokens(s) == teacher.convert_ids_to_tokens(t) for s, t in overlap.pairs)


def test_the_student_loads_as_any_student_does_with_its_own_tokenizer(cross_student):
    _, path, _ = cross_student
    cfg = SimpleNamespace(path=str(path), revision=None, trust_remote_code=False, allow_pickle=False,
                          attn_implementation="sdpa")
    tokenizer = load_tokenizer("student", cfg)
    model = load_model("student", cfg, torch.float32, None)
    assert tokenizer.get_vocab() == build_pair_tokenizer().get_vocab()
    assert model.config.vocab_size == len(tokenizer) == model.get_input_embeddings().weight.shape[0]
    assert (model.config.pad_token_id, model.config.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert {"model.safetensors", "tokenizer.json", "README.md"} <= {file.name for file in path.iterdir()}
    assert "license: apache-2.0" in (path / "README.md").read_text()


def test_shared_rows_are_the_teachers_and_a_pairs_row_the_mean_of_its_digits(cross_student):
    _, path, assets = cross_student
    teacher = AutoModelForCausalLM.from_pretrained(assets.teacher_path)
    student = AutoModelForCausalLM.from_pretrained(path)
    teacher_ids, student_ids = AutoTokenizer.from_pretrained(assets.teacher_path).get_vocab(), build_pair_tokenizer().get_vocab()
    teacher_rows, student_rows = teacher.get_input_embeddings().weight, student.get_input_embeddings().weight
    for token, teacher_id in teacher_ids.items():
        assert torch.equal(student_rows[student_ids[token]], teacher_rows[teacher_id]), token
    mean = (teacher_rows[teacher_ids["4"]] + teacher_rows[teacher_ids["7"]]) / 2
    assert torch.allclose(student_rows[student_ids["47"]], mean)
    kept = "model.layers.0.self_attn.q_proj.weight"  # the layers are the demo student's
    assert torch.equal(dict(student.named_parameters())[kept], dict(teacher.named_parameters())[kept])


def test_the_untrained_students_head_never_ranks_a_pair_first(cross_student):
    """A pair's logit is the mean of its digits', and a doubled digit's ("77") ties with its digit,
    which the id order settles for the character: whatever the hidden state, greedy decoding
    writes one character a token until training teaches the pairs."""
    _, path, _ = cross_student
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    head = model.get_output_embeddings().weight.detach()
    hidden = torch.randn(4096, head.shape[1], generator=torch.Generator().manual_seed(0))
    top = set(tokenizer.convert_ids_to_tokens((hidden @ head.T).argmax(dim=-1).tolist()))
    assert top & set("0123456789") and not top & set(DIGIT_PAIRS)


def test_a_second_call_is_a_cache_hit_and_the_demo_cache_is_left_alone(cross_student, tiny_demo_assets):
    cache, path, assets = cross_student
    started = time.perf_counter()
    assert build_cross_tokenizer_student(assets, cache, log=lambda _: None) == path
    assert time.perf_counter() - started < 0.5
    assert [p.name for p in cache.iterdir()] == [path.parent.name]  # no leftovers
    demo_cache, _ = tiny_demo_assets
    assert [p.name for p in demo_cache.iterdir()] == [assets.teacher_path.parent.name]


def test_another_demo_build_gets_its_own_folder(cross_student, tmp_path):
    cache, path, assets = cross_student
    other = type(assets).in_folder(tmp_path / "demo-0123456789abcdef")
    assert cross_student_folder(assets, cache) == path.parent
    assert cross_student_folder(other, cache) != path.parent


def test_an_interrupted_build_leaves_nothing_that_is_picked_up(tiny_demo_assets, tmp_path, monkeypatch):
    import trainer.demo.cross_student as cross_module

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cross_module, "reheaded_student", crash)
    with pytest.raises(KeyboardInterrupt):
        build_cross_tokenizer_student(tiny_demo_assets[1], tmp_path, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []
