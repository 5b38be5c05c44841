"""Hidden states and heads read from real transformers models reproduce their own logits."""

from __future__ import annotations

import pytest
import torch
from test_models import ARCHITECTURES
from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig

from trainer.config import PeftConfig
from trainer.models.heads import HiddenTap, Scorer, fused_unsupported_reason, model_head
from trainer.models.loading import ModelError
from trainer.models.lora import apply_lora
from trainer.models.probes import check_head_parity

SMALL = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
QUIRKY = {
    # Soft-capping at 0.5 and scales far from 1 make a missed quirk obvious.
    "gemma2": Gemma2Config(final_logit_softcapping=0.5, head_dim=16, **SMALL),
    "cohere": CohereConfig(logit_scale=4.0, **SMALL),
    "granite": GraniteConfig(logits_scaling=0.25, **SMALL),
}
ALL_CONFIGS = {**{name: config for name, (config, _) in ARCHITECTURES.items()}, **QUIRKY}


def build(name: str, lora: bool):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ALL_CONFIGS[name], attn_implementation="eager")
    if lora:
        model, _ = apply_lora(model, PeftConfig(r=4))
    return model.eval()


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("name", sorted(ALL_CONFIGS))
def test_head_applied_to_the_tapped_hidden_states_reproduces_the_model_logits(name, lora):
    model = build(name, lora)
    assert fused_unsupported_reason(model) is None
    tap, head = HiddenTap(model), model_head(model, vocab_size=60)
    gap = check_head_parity(name, model, tap, head, torch.device("cpu"))
    assert gap < 1e-4
    ids = torch.randint(0, 60, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        hidden = tap.hidden_states(model, batch)
        full = model(**batch).logits
    assert hidden.shape == (2, 9, model.config.get_text_config().hidden_size)
    torch.testing.assert_close(head.logits(hidden.reshape(18, -1)).view(2, 9, 60), full[..., :60].float(),
                               rtol=1e-4, atol=1e-4)


def test_a_forward_through_the_tap_never_builds_logits():
    model = build("llama", lora=True)
    tap = HiddenTap(model)
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(out.shape))
    ids = torch.randint(0, 60, (2, 9))
    tap.hidden_states(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert seen == [torch.Size([2, 0, 64])]


def test_an_unknown_logit_transform_fails_the_parity_check_with_the_fix():
    model = build("gemma2", lora=False)
    head = model_head(model, vocab_size=60)
    head.softcap = None  # as if the config did not say
    with pytest.raises(ModelError, match="loss.fused=false"):
        check_head_parity("teacher", model, HiddenTap(model), head, torch.device("cpu"))


def test_an_adapted_head_is_named_as_the_reason_to_use_full_logits():
    adapted, _ = apply_lora(build("llama", lora=False), PeftConfig(r=4, target_modules=["lm_head"]))
    assert "not a plain Linear" in fused_unsupported_reason(adapted)


def test_plain_and_fused_scorers_give_the_same_logits():
    model = build("phi", lora=False)  # Phi's head has a bias
    ids = torch.randint(0, 60, (1, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    fused, plain = Scorer(model, 60, fused=True), Scorer(model, 60, fused=False)
    with torch.no_grad():
        rows = [scorer.logits_of(scorer.states(batch).reshape(7, -1)) for scorer in (fused, plain)]
    torch.testing.assert_close(rows[0], rows[1], rtol=1e-4, atol=1e-4)
