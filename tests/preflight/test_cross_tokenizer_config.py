"""Issue 20: loss.cross_tokenizer and its settings are checked at start-up, one line each, before
anything loads; the combinations not built are refused by name (on-policy rollouts are
re-tokenised for the teacher, so on-policy is accepted, and a teacher cache built across tokenizers
serves any student)."""

from __future__ import annotations

import pytest
from test_config import composed
from test_config_trust import refused

from trainer.config import unread_loss_settings, validate


@pytest.mark.parametrize("overrides, phrase", [
    (["loss.cross_tokenizer=bpe"], "loss.cross_tokenizer=bpe is not a method; use null (one tokenizer), uld or gold"),
    (["loss.cross_tokenizer=gold", "loss.uld_weight=-1"], "loss.uld_weight=-1.0 must be a finite number >= 0"),
    (["loss.cross_tokenizer=gold", "loss.uld_top_k=-5"], "loss.uld_top_k=-5 is negative"),
    (["loss.cross_tokenizer=uld", "loss.fused=false"], "loss.cross_tokenizer=uld runs on the fused path only"),
    (["loss.cross_tokenizer=gold", "data.pack=true"], "loss.cross_tokenizer=gold cannot pack rows"),
    (["loss.cross_tokenizer=gold", "teacher.cache=auto", "onpolicy.fraction=0.5"],
     "onpolicy.fraction=0.5 needs a teacher that runs"),
])
def test_a_bad_cross_tokenizer_setting_is_one_line(overrides, phrase):
    assert phrase in refused(*overrides)


@pytest.mark.parametrize("method", ["uld", "gold"])
def test_each_method_is_accepted(method):
    validate(composed(f"loss.cross_tokenizer={method}", "loss.uld_top_k=64"))


def test_a_teacher_cache_across_tokenizers_is_accepted():
    """Built with loss.cross_tokenizer, it serves students of any tokenizer (tests/cache/test_cross_tokenizer_cache.py)."""
    validate(composed("loss.cross_tokenizer=gold", "teacher.cache=auto"))


@pytest.mark.parametrize("fraction", ["0.5", "1"])
def test_on_policy_distillation_across_tokenizers_is_accepted(fraction):
    validate(composed("loss.cross_tokenizer=gold", f"onpolicy.fraction={fraction}"))


def test_under_sft_the_method_is_the_evaluations_and_its_refusals_hold():
    """Hard labels train without the teacher, but the evaluation still compares the two over spans."""
    assert "loss.cross_tokenizer=gold cannot pack rows" in refused("loss.kind=sft", "loss.cross_tokenizer=gold",
                                                                   "data.pack=true")
    cfg = composed("loss.kind=sft", "loss.cross_tokenizer=gold")
    validate(cfg)
    assert unread_loss_settings(cfg.loss) == []


@pytest.mark.parametrize("overrides, phrase", [
    (["loss.cross_tokenizer=uld", "loss.kind=rkl"], "loss.kind=rkl has no effect with loss.cross_tokenizer=uld"),
    (["loss.cross_tokenizer=uld", "loss.uld_weight=0.5"], "loss.uld_weight=0.5 has no effect with loss.cross_tokenizer=uld"),
    (["loss.uld_top_k=8"], "loss.uld_top_k=8 has no effect with loss.cross_tokenizer=null"),
    (["loss.cross_tokenizer=uld"], "loss.cross_tokenizer=uld with loss.ce_weight=0: ULD compares the two distributions sorted"),
])
def test_a_setting_the_method_does_not_read_is_warned_about(overrides, phrase):
    assert any(phrase in warning for warning in unread_loss_settings(composed(*overrides).loss))


def test_gold_reads_every_cross_tokenizer_setting():
    assert unread_loss_settings(composed("loss.cross_tokenizer=gold", "loss.kind=jsd", "loss.uld_weight=0.5",
                                         "loss.uld_top_k=8").loss) == []
