"""Architecture-independent model handling: LoRA targets, tokenizer and vocabulary checks."""

from __future__ import annotations

import pytest
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    Qwen2Config,
)

from trainer.models.checks import check_model_source, check_same_tokenizer, shared_vocab_size
from trainer.models.loading import ModelError
from trainer.models.lora import apply_lora, find_lora_targets

SMALL = dict(vocab_size=64, num_attention_heads=4)
ARCHITECTURES = {
    "llama": (LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2, **SMALL),
              {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "qwen2": (Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2, **SMALL),
              {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "mistral": (MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2, **SMALL),
                {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "gpt2": (GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=64), {"c_attn", "c_proj", "c_fc"}),
    "gpt_neox": (GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, **SMALL),
                 {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
    "phi": (PhiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, **SMALL),
            {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_lora_targets_are_every_block_linear_and_never_the_head(name):
    config, expected = ARCHITECTURES[name]
    model = AutoModelForCausalLM.from_config(config)
    assert set(find_lora_targets(model)) == expected

    class Peft:
        r, alpha, dropout, target_modules = 4, 8, 0.0, "all-linear"

    adapted, _ = apply_lora(model, Peft)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    head = adapted.get_output_embeddings()
    assert not any(p.requires_grad for p in head.parameters())


def test_lora_targets_that_match_nothing_are_refused_with_the_alternatives():
    model = AutoModelForCausalLM.from_config(ARCHITECTURES["gpt2"][0])

    class Peft:
        r, alpha, dropout, target_modules = 4, 8, 0.0, ["q_proj"]

    with pytest.raises(ModelError, match="match no module.*c_attn"):
        apply_lora(model, Peft)


def test_padded_vocabularies_compare_only_the_tokenizer_ids(tiny):
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    teacher, student = AutoConfig.from_pretrained(tiny["teacher"]), AutoConfig.from_pretrained(tiny["student"])
    assert teacher.vocab_size == student.vocab_size + 3  # the tiny teacher has padding rows
    assert shared_vocab_size(tokenizer, teacher, student) == len(tokenizer)
    student.vocab_size = len(tokenizer) - 1
    with pytest.raises(ModelError, match="do not belong together"):
        shared_vocab_size(tokenizer, teacher, student)


def test_tokenizers_that_differ_are_refused(tiny):
    from transformers import AutoTokenizer

    teacher = AutoTokenizer.from_pretrained(tiny["teacher"])
    student = AutoTokenizer.from_pretrained(tiny["student"])
    check_same_tokenizer(teacher, student)
    student.add_tokens(["<new>"])
    with pytest.raises(ModelError, match="tokenizers differ"):
        check_same_tokenizer(teacher, student)


def test_missing_local_folders_are_reported_before_any_download(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        check_model_source("teacher", str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="no config.json"):
        check_model_source("student", str(tmp_path))
    check_model_source("teacher", "Qwen/Qwen2.5-0.5B")  # a hub id is left to from_pretrained
