"""On-policy distillation's start-up checks (trainer/preflight/onpolicy.py) at unit level, on rows and
model folders made here: which student can stop a rollout, which rows are trained on at which
onpolicy.fraction, and what start-up says about them. The CLI cases (one line, no weights loaded)
are in test_bad_inputs.py."""

from __future__ import annotations

import json
import logging
import shutil
from types import SimpleNamespace

import pytest
from conftest import write_jsonl
from transformers import AutoConfig, AutoTokenizer

from trainer.data.examples import load_examples
from trainer.data.sources import DataError
from trainer.models.files import resolve_model
from trainer.models.loading import ModelError
from trainer.preflight.onpolicy import check_student_stops
from trainer.preflight.splits import training_rows


def _onpolicy(fraction: float, max_new_tokens: int = 4) -> SimpleNamespace:
    return SimpleNamespace(fraction=fraction, max_new_tokens=max_new_tokens)


def _student(tiny, tmp_path, *, tokenizer_eos: bool, generation_eos: bool | None, config_eos: bool):
    """A copy of the tiny student with its EOS kept or removed in each place; `generation_eos=None`:
    no generation_config.json at all."""
    folder = tmp_path / "student"
    shutil.copytree(tiny["student"], folder)
    edits = {"tokenizer_config.json": ("eos_token", tokenizer_eos), "config.json": ("eos_token_id", config_eos),
             "generation_config.json": ("eos_token_id", generation_eos)}
    for name, (key, keep) in edits.items():
        if keep is None:
            (folder / name).unlink()
        elif not keep:
            settings = json.loads((folder / name).read_text())
            settings[key] = None
            (folder / name).write_text(json.dumps(settings))
    return AutoTokenizer.from_pretrained(folder), resolve_model(str(folder), None), AutoConfig.from_pretrained(folder)


@pytest.mark.parametrize(("tokenizer_eos", "generation_eos", "config_eos"), [
    (True, False, False),  # the tokenizer's EOS
    (False, True, False),  # generation_config.json's (Llama 3 ends a turn with <|eot_id|>)
    (False, None, True),  # no generation_config.json: transformers derives it from config.json
])
def test_a_student_with_an_eos_anywhere_a_rollout_looks_passes(tiny, tmp_path, tokenizer_eos, generation_eos,
                                                               config_eos):
    check_student_stops(_onpolicy(1.0), *_student(tiny, tmp_path, tokenizer_eos=tokenizer_eos,
                                                  generation_eos=generation_eos, config_eos=config_eos))


@pytest.mark.parametrize("generation_eos", [False, None])
def test_a_student_without_an_eos_is_refused_only_on_policy(tiny, tmp_path, generation_eos):
    student = _student(tiny, tmp_path, tokenizer_eos=False, generation_eos=generation_eos, config_eos=False)
    check_student_stops(_onpolicy(0.0), *student)
    with pytest.raises(ModelError, match=r"^onpolicy.fraction=0.25 needs a student that can end its response, .*"
                                         r"set eos_token in .*/student/tokenizer_config.json, or onpolicy.fraction=0.$"):
        check_student_stops(_onpolicy(0.25), *student)


# ---------------------------------------------------------------------------------- rows
def _rows(tokenizer, tmp_path, train: list[dict], held_out: list[dict], fraction: float, *, seq_len: int = 16,
          metric: str = "eval/kl_to_teacher"):
    paths = {"train": write_jsonl(tmp_path / "train.jsonl", train), "eval": write_jsonl(tmp_path / "eval.jsonl", held_out)}
    splits = {name: load_examples(str(path), tokenizer, seq_len, None, key=f"data.{name}") for name, path in paths.items()}
    data = SimpleNamespace(train=str(paths["train"]), eval=str(paths["eval"]), max_eval_rows=100, pack=False)
    train = SimpleNamespace(seq_len=seq_len, seed=0, metric=metric)
    return training_rows(splits, data, train, _onpolicy(fraction), {}, is_main=True)


def test_prompt_only_rows_are_trained_on_at_fraction_1_unless_their_prompt_fills_seq_len(tokenizer, tmp_path, caplog):
    train = [{"prompt": "1+1="}, {"prompt": "9" * 20}, {"prompt": "2+2=", "response": "4"}]
    with caplog.at_level(logging.WARNING):
        rows = _rows(tokenizer, tmp_path, train, [{"prompt": "3+3="}], 1.0)
    assert [row.index for row in rows.train] == [0, 2] and rows.train[0].prompt_only
    assert [row.prompt_only for row in rows.eval] == [True]
    warnings = [record.getMessage() for record in caplog.records]
    assert any("dropped 1 of 3 training rows" in line and "a prompt-only row whose prompt fills it" in line
               for line in warnings), warnings
    # Held-out rows with no response: said at start-up, naming what it means for train.metric.
    assert any("no held-out row has a response token" in line and "train.metric=eval/kl_to_teacher is one of them"
               for line in warnings), warnings


def test_prompts_that_leave_less_room_than_max_new_tokens_are_warned_about(tokenizer, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _rows(tokenizer, tmp_path, [{"prompt": "1+1="}, {"prompt": "9" * 14}], [{"prompt": "1", "response": "1"}], 1.0)
    [line] = [record.getMessage() for record in caplog.records]
    assert line.startswith("data: 1 of 2 training rows have prompts that leave fewer than onpolicy.max_new_tokens=4 "
                           "positions within train.seq_len=16"), line


def test_held_out_prompt_only_rows_are_allowed_off_policy_and_said_to_leave_the_metrics_nan(tokenizer, tmp_path,
                                                                                           caplog):
    with caplog.at_level(logging.WARNING):
        rows = _rows(tokenizer, tmp_path, [{"prompt": "1", "response": "2"}], [{"prompt": "3+3="}], 0.0,
                     metric="train/tokens_per_s")
    assert len(rows.train) == 1 and rows.eval[0].prompt_only
    [line] = [record.getMessage() for record in caplog.records]
    assert "eval/* metrics will be NaN" in line and "train.metric" not in line


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_a_prompt_only_training_row_below_fraction_1_is_refused_by_file_and_line(tokenizer, tmp_path, fraction):
    train = [{"prompt": "1", "response": "2"}, {"prompt": "3+3="}]
    with pytest.raises(DataError, match=rf"^data row .*train.jsonl:2 has a prompt and no response, which only "
                                        rf"onpolicy.fraction=1 can train on .*not onpolicy.fraction={fraction}; give "
                                        "it a response, or set onpolicy.fraction=1$"):
        _rows(tokenizer, tmp_path, train, [{"prompt": "1", "response": "1"}], fraction)


def test_a_text_row_is_refused_on_policy_by_file_and_line_and_trained_on_off_policy(tokenizer, tmp_path):
    train = [{"prompt": "1", "response": "2"}, {"text": "3+3=6"}]
    held_out = [{"prompt": "1", "response": "1"}]
    assert len(_rows(tokenizer, tmp_path, train, held_out, 0.0).train) == 2
    with pytest.raises(DataError, match=r"^data row .*train.jsonl:2 has no prompt \(every token is supervised, as in "
                                        r"a text row\), so the student cannot write its response; .*onpolicy.fraction=0$"):
        _rows(tokenizer, tmp_path, train, held_out, 0.5)
