"""What an on-policy step's record shows a person on the progress bar and hands W&B."""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from trainer.outputs.tracking import Tracker, _for_wandb, _progress_fields

OFF_POLICY_STEP = {"step": 3, "loss": 0.5, "tokens_per_s": 1234.0, "tflops_per_s": None, "mfu": None,
                   "data_share": 0.031, "peak_memory_gib": None}
ROLLOUTS = {"rollout_tokens_per_s": 812.5, "rollout_share": 0.354, "rollout_mean_length": 41.6,
            "rollout_truncation_rate": 0.125, "rollout_rows": 8}


def test_an_on_policy_step_shows_its_generation_share_and_mean_length_before_data_loading():
    fields = _progress_fields({**OFF_POLICY_STEP, **ROLLOUTS})
    assert fields == {"loss": "0.5000", "tok/s": "1234", "gen": "35%", "gen_len": "42", "data": "3%"}
    assert list(fields) == ["loss", "tok/s", "gen", "gen_len", "data"]


def test_an_off_policy_step_shows_no_generation_fields():
    assert not {"gen", "gen_len"} & set(_progress_fields(OFF_POLICY_STEP))


def test_wandb_gets_the_rollout_keys_as_they_are():
    logged = _for_wandb({**OFF_POLICY_STEP, **ROLLOUTS})
    assert {key: logged[key] for key in ROLLOUTS} == ROLLOUTS


def test_the_rollout_keys_reach_metrics_jsonl_unchanged(tmp_path):
    cfg = OmegaConf.create({"logger": {"kind": "none"}, "train": {"max_steps": 4}})
    tracker = Tracker(tmp_path, cfg, {}, first_step=0, enabled=True)
    tracker.log_step({**OFF_POLICY_STEP, **ROLLOUTS})
    tracker.close()
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {key: record[key] for key in ROLLOUTS} == ROLLOUTS
