"""Models as the job finds them (issue 17): a frozen teacher that never runs its dropout, a student
in eval mode only while evaluated, and the start-up checks that refuse, before any weights load,
what would otherwise fail after they did (weight files, vocabulary, positions, attention,
tokenizer files), or warn about pairs that are legal but odd."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, read_jsonl, run_cli, save_model, tiny_overrides
from deepspeed.runtime.engine import DeepSpeedEngine
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig

from trainer.models import checks, loading
from trainer.models.heads import HiddenTap, model_head
from trainer.models.loading import ModelError
from trainer.models.probes import check_head_parity

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
    teacher = loading.freeze(AutoModelForCausalLM.from_config(tiny_gpt2_config(40, **DROPOUT)))
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
    model = loading.freeze(model) if frozen else model.train(found_in)
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
    with loading.eval_mode(EngineModes(model)):
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
    assert "teacher.path and student.path are the same model" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------ weight files
def _model_cfg(path: Path, **settings) -> SimpleNamespace:
    defaults = dict(revision=None, trust_remote_code=False, allow_pickle=False, attn_implementation="sdpa")
    return SimpleNamespace(path=str(path), **{**defaults, **settings})


def _copy(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder


def _sharded(tiny: dict, folder: Path) -> Path:
    """The tiny student saved in several safetensors shards, with its index."""
    model = AutoModelForCausalLM.from_pretrained(tiny["student"])
    model.save_pretrained(folder, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny["student"] / name, folder / name)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def test_intact_weights_single_or_sharded_pass_with_every_tensor_shape(tiny, tmp_path):
    single = checks.stored_shapes("student", _model_cfg(tiny["student"]))
    assert single["model.embed_tokens.weight"][1] == 64
    assert checks.stored_shapes("student", _model_cfg(_sharded(tiny, tmp_path / "sharded"))) == single


def _truncate(file: Path, keep: int | None = None) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2 if keep is None else keep])


def _drop_a_shard(folder: Path) -> None:
    shards = sorted(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    (folder / shards[-1]).unlink()


BROKEN_WEIGHTS = {
    "empty": (lambda folder: _truncate(folder / "model.safetensors", keep=0), "model.safetensors is empty (0 bytes)"),
    "truncated": (lambda folder: _truncate(folder / "model.safetensors"), "model.safetensors is truncated ("),
    "header cut short": (lambda folder: _truncate(folder / "model.safetensors", keep=20),
                         "model.safetensors is truncated (20 bytes, shorter than its own header)"),
    "not safetensors": (lambda folder: (folder / "model.safetensors").write_bytes(b"\x04" + b"\x00" * 7 + b"oops"),
                        "model.safetensors is not a safetensors file"),
    "no weights": (lambda folder: (folder / "model.safetensors").unlink(), "holds no weights"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_WEIGHTS))
def test_broken_weight_files_are_refused_naming_the_file(tiny, tmp_path, case):
    breaks, phrase = BROKEN_WEIGHTS[case]
    folder = _copy(tiny["student"], tmp_path / "student")
    breaks(folder)
    with pytest.raises(ModelError, match="^student.path=.*") as error:
        checks.stored_shapes("student", _model_cfg(folder))
    assert phrase in str(error.value) and "\n" not in str(error.value)


def test_a_missing_or_truncated_shard_is_refused(tiny, tmp_path):
    folder = _sharded(tiny, tmp_path / "sharded")
    _drop_a_shard(folder)
    with pytest.raises(ModelError, match=r"model.safetensors.index.json names \d+ shard files, 1 of which are not there"):
        checks.stored_shapes("teacher", _model_cfg(folder))
    folder = _sharded(tiny, tmp_path / "sharded_truncated")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    _truncate(shard)
    with pytest.raises(ModelError, match=f"{shard.name} is truncated"):
        checks.stored_shapes("teacher", _model_cfg(folder))


def test_attention_is_not_checked_for_a_teacher_that_is_never_loaded(tiny):
    checks.check_model("teacher", _model_cfg(tiny["teacher"], attn_implementation="nonsense"), loads_weights=False)


def test_a_config_whose_vocabulary_disagrees_with_the_weights_is_refused(tiny, tmp_path):
    folder = _copy(tiny["student"], tmp_path / "student")
    config = json.loads((folder / "config.json").read_text())
    rows = config["vocab_size"]
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": rows + 5}))
    with pytest.raises(ModelError, match=f"describes {rows + 5} token rows .* has {rows}, so the config and the "
                                         "weights do not belong together"):
        checks.check_fits("student", _model_cfg(folder), AutoConfig.from_pretrained(folder), seq_len=32)
    checks.check_fits("student", _model_cfg(tiny["student"]), AutoConfig.from_pretrained(tiny["student"]), 32)


def test_embedding_names_match_a_checkpoint_saved_without_the_base_model_prefix():
    shapes = {"embed_tokens.weight": [31, 64], "lm_head.weight": [31, 64]}
    assert checks._stored_name("model.embed_tokens.weight", shapes) == "embed_tokens.weight"
    assert checks._stored_name("lm_head.weight", shapes) == "lm_head.weight"
    assert checks._stored_name("transformer.wte.weight", shapes) is None


# --------------------------------------------------------------------------- positions
POSITION_TABLES = {
    "gpt2": (tiny_gpt2_config(40, positions=16), "transformer.wpe"),
    "opt": (OPTConfig(vocab_size=40, hidden_size=64, ffn_dim=128, num_hidden_layers=1, num_attention_heads=4,
                      max_position_embeddings=16, word_embed_proj_dim=64), "model.decoder.embed_positions"),
    "llama": (LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=4, max_position_embeddings=16), None),
}


@pytest.mark.parametrize("name", sorted(POSITION_TABLES))
def test_seq_len_beyond_a_learned_position_table_is_refused_and_rotary_limits_are_returned(name):
    config, table = POSITION_TABLES[name]
    model = loading.build_on_meta(config, trust_remote_code=False)
    assert checks.check_positions("student", config, model, seq_len=16) == (None if table else 16)
    if table is None:
        assert checks.check_positions("student", config, model, seq_len=512) == 16
        return
    with pytest.raises(ModelError, match=fr"train.seq_len=17 is longer than the student's learned position table "
                                         fr"\({table}: 16 positions\); set train.seq_len=16 or less."):
        checks.check_positions("student", config, model, seq_len=17)


def test_rows_past_a_rotary_models_positions_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="trainer.models"):
        checks.warn_past_positions("teacher", 128, longest_row=128)
        checks.warn_past_positions("teacher", None, longest_row=10_000)
        assert not caplog.records
        checks.warn_past_positions("teacher", 128, longest_row=200)
    assert "teacher: rows of up to 200 tokens are longer than the 128 positions it was made for" in caplog.text


# --------------------------------------------------------------------------- attention
def test_attention_implementations_this_machine_runs_pass():
    for name in (None, "eager", "sdpa", "paged|eager", *checks.usable_attention()):
        checks.check_attention("teacher", name)


@pytest.mark.skipif("flash_attention_2" in checks.usable_attention(), reason="FlashAttention 2 is installed here")
def test_flash_attention_that_is_not_installed_is_refused_naming_what_is():
    from transformers.utils import is_kernels_available

    if is_kernels_available():
        pytest.skip("transformers falls back to the hub's kernels")
    installed = ", ".join(checks.usable_attention())
    with pytest.raises(ModelError, match=f"teacher.attn_implementation=flash_attention_2 needs FlashAttention 2 .*"
                                         f"not installed here .*use one that is: {installed}.$"):
        checks.check_attention("teacher", "flash_attention_2")


def test_an_unknown_attention_implementation_is_refused_naming_what_is_installed():
    with pytest.raises(ModelError, match="student.attn_implementation=fast is not an attention implementation "
                                         "transformers knows; use one of those installed here: eager, sdpa"):
        checks.check_attention("student", "fast")


# ------------------------------------------------------------------------- tokenizers
def test_a_model_folder_without_tokenizer_files_says_so(tiny, gpt2, tmp_path):
    """Before: a Llama folder gave "Couldn't instantiate the backend tokenizer", a GPT-2 one an
    empty tokenizer that "differs" from the teacher's."""
    for name, source in (("llama", tiny["student"]), ("gpt2", gpt2["dropout"])):
        folder = _copy(source, tmp_path / name)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            (folder / file).unlink()
        with pytest.raises(ModelError, match=f"student.path={folder} has no tokenizer files .*; save the tokenizer "
                                             "of the model it was made from into that folder"):
            loading.load_tokenizer("student", _model_cfg(folder))


# ------------------------------------------------------------------------------ pairs
def _pair_warnings(caplog, teacher_cfg, student_cfg, teacher=None, student=None) -> list[str]:
    caplog.clear()
    meta = loading.build_on_meta(tiny_gpt2_config(40), trust_remote_code=False)
    teacher, student = (meta if model is None else model for model in (teacher, student))
    with caplog.at_level(logging.WARNING, logger="trainer.models"):
        checks.warn_about_pair(teacher_cfg, student_cfg, teacher, student)
    return [record.getMessage() for record in caplog.records]


def test_the_same_model_as_teacher_and_student_is_warned_about(tiny, tmp_path, caplog):
    link = tmp_path / "link"
    link.symlink_to(tiny["student"])
    for teacher_path in (tiny["student"], f"{tiny['student']}/", link):
        warnings = _pair_warnings(caplog, _model_cfg(teacher_path), _model_cfg(tiny["student"]))
        assert len(warnings) == 1 and warnings[0].startswith("teacher.path and student.path are the same model")
    hub = _model_cfg("Qwen/Qwen2.5-0.5B")
    assert len(_pair_warnings(caplog, hub, _model_cfg("Qwen/Qwen2.5-0.5B"))) == 1
    assert _pair_warnings(caplog, hub, _model_cfg("Qwen/Qwen2.5-0.5B", revision="v2")) == []


def test_a_student_larger_than_its_teacher_is_warned_about(tiny, caplog):
    small = loading.build_on_meta(tiny_gpt2_config(40), trust_remote_code=False)
    large = loading.build_on_meta(tiny_gpt2_config(40, layers=4), trust_remote_code=False)
    teacher_cfg, student_cfg = _model_cfg(tiny["teacher"]), _model_cfg(tiny["student"])
    assert _pair_warnings(caplog, teacher_cfg, student_cfg, teacher=large, student=small) == []
    warnings = _pair_warnings(caplog, teacher_cfg, student_cfg, teacher=small, student=large)
    assert len(warnings) == 1 and warnings[0].startswith(
        f"the student ({checks._in_words(checks.parameter_count(large))} parameters) is larger than the teacher "
        f"({checks._in_words(checks.parameter_count(small))})")
