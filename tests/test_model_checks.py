"""Models as the job finds them (issue 17): a frozen teacher that never runs its dropout, a student
in eval mode only while evaluated, and the start-up checks that refuse, before any weights load,
what would otherwise fail after they did (weight files, vocabulary, positions, attention,
tokenizer files), or warn about pairs that are legal but odd."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, read_jsonl, run_cli, save_model, tiny_overrides
from deepspeed.runtime.engine import DeepSpeedEngine
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config

from trainer import models
from trainer.heads import HiddenTap, check_head_parity, model_head

DROPOUT = dict(resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2)


def tiny_gpt2_config(vocab_size: int, positions: int = 64, layers: int = 2, **extra) -> GPT2Config:
    return GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=layers, n_head=4, n_positions=positions,
                      bos_token_id=1, eos_token_id=2, **extra)


@pytest.fixture(scope="module")
def gpt2(tiny, tmp_path_factory) -> dict:
    """GPT-2s with the tiny models' tokenizer: one with dropout 0.2 everywhere, one with 16 positions."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("gpt2")
    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    vocab = len(tokenizer)
    return {"dropout": save_model(tiny_gpt2_config(vocab, **DROPOUT), tokenizer, root / "dropout", seed=5),
            "short": save_model(tiny_gpt2_config(vocab, positions=16), tokenizer, root / "short", seed=6)}


def modes(model: nn.Module) -> set[bool]:
    """The `.training` flags of the model and every submodule."""
    return {module.training for module in model.modules()}


class EngineModes(nn.Module):
    """A stand-in for a DeepSpeed engine as far as modes go, with DeepSpeed's own train() and
    eval(): they set the wrapped module's mode only, so the engine's `.training` stays True."""

    train, eval = DeepSpeedEngine.train, DeepSpeedEngine.eval

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, **inputs):
        return self.module(**inputs)


def _probe(model: nn.Module) -> torch.Tensor:
    ids = torch.arange(1, 13).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


# ------------------------------------------------------------------------------- modes
def test_a_frozen_model_stays_in_eval_mode_whatever_its_callers_do():
    torch.manual_seed(0)
    teacher = models.freeze(AutoModelForCausalLM.from_config(tiny_gpt2_config(40, **DROPOUT)))
    engine = EngineModes(teacher)
    for switch in (teacher.train, lambda: teacher.train(True), engine.train, lambda: engine.train(True)):
        switch()
        assert modes(teacher) == {False}
        assert torch.equal(_probe(engine), _probe(engine)), "the frozen model's outputs vary between calls"


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen teacher", "student"])
@pytest.mark.parametrize("found_in", [False, True], ids=["found in eval", "found in train"])
def test_the_head_parity_probe_runs_in_eval_mode_and_leaves_every_module_as_it_found_it(frozen, found_in):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_gpt2_config(40, **DROPOUT))
    model = models.freeze(model) if frozen else model.train(found_in)
    engine = EngineModes(model)  # whose own .training is True whatever its module's mode
    during = []
    model.register_forward_pre_hook(lambda module, args: during.append(modes(module)))
    check_head_parity("model", engine, HiddenTap(model), model_head(model, 40), torch.device("cpu"))
    assert during and all(flags == {False} for flags in during)
    assert modes(model) == ({False} if frozen or not found_in else {True})


def test_eval_mode_restores_each_submodule_to_its_own_mode():
    model = AutoModelForCausalLM.from_config(tiny_gpt2_config(40, **DROPOUT)).train()
    model.transformer.h[0].eval()  # a mixed state comes back as it was, not as the top module's
    before = {name: module.training for name, module in model.named_modules()}
    with models.eval_mode(EngineModes(model)):
        assert modes(model) == {False}
    assert {name: module.training for name, module in model.named_modules()} == before


@pytest.mark.slow
def test_a_teacher_with_dropout_distilled_into_itself_starts_at_zero_kl_and_scores_the_same_every_time(
        tiny, gpt2, tmp_path):
    """GPT-2 with dropout 0.2 as teacher and student: the initial KL is exactly that of a model to
    itself, the frozen teacher's CE is the same before and after training, and at every stage every
    submodule is in the mode it should be in (tests/mode_watch.py records them)."""
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny, run_dir, tmp_path / "cache", f"teacher.path={gpt2['dropout']}",
                               f"student.path={gpt2['dropout']}", "train.max_steps=2", "train.eval_every=1",
                               "peft.dropout=0.1")
    proc = run_cli(overrides, env={"PYTHONPATH": str(REPO / "tests")}, module="mode_watch", timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["initial/eval/kl_to_teacher"] < 1e-6, summary["initial/eval/kl_to_teacher"]
    teacher_ce = [row["eval/teacher_ce"] for row in read_jsonl(run_dir / "eval.jsonl")]
    assert len(teacher_ce) >= 3 and len(set(teacher_ce)) == 1, teacher_ce
    line = next(line for line in proc.stdout.splitlines() if line.startswith("MODES "))
    assert json.loads(line[len("MODES "):]) == {
        "setup": {"teacher": [False]},
        "evaluate": {"teacher": [False], "student": [False]},
        "step": {"teacher": [False], "student": [True]},
    }
