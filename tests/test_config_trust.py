"""Issue 17 (items 1, 7, 13): settings a new user gets wrong are caught at start-up with one line,
the demo's data never stands in for the user's, and `--help` explains every key."""

from __future__ import annotations

import logging

import pytest
from test_config import composed

from trainer.config import ConfigError, unread_loss_settings, validate
from trainer.summary import metric_names


def refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as error:
        validate(composed(*overrides))
    message = str(error.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------- values checked too late
@pytest.mark.parametrize("override, phrase", [
    ("train.lr=nan", "train.lr=nan must be a finite number > 0"),
    ("train.lr=inf", "train.lr=inf must be a finite number > 0"),
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1 must be a finite number >= 0"),
    ("train.weight_decay=nan", "train.weight_decay=nan must be a finite number >= 0"),
    ("train.warmup_steps=-1", "train.warmup_steps=-1 is negative"),
    ("peft.dropout=1.0", "peft.dropout=1.0 is out of range"),
    ("peft.dropout=-0.1", "peft.dropout=-0.1 is out of range"),
    ("data.max_eval_rows=0", "data.max_eval_rows=0 leaves nothing to evaluate on"),
])
def test_values_that_failed_late_are_refused_at_start_up(override, phrase):
    assert phrase in refused(override)


@pytest.mark.parametrize("override", ["train.lr=2e-4", "train.weight_decay=0.01", "train.warmup_steps=0",
                                      "peft.dropout=0.05", "data.max_eval_rows=1"])
def test_their_sensible_neighbours_still_pass(override):
    validate(composed(override))


# ------------------------------------------------------------------------------- train.metric
def test_a_metric_no_job_writes_is_refused_naming_the_valid_ones():
    message = refused("train.metric=eval/accuracy")
    assert "train.metric='eval/accuracy' is not a number the job writes to summary.json" in message
    for name in ("eval/kl_to_teacher", "eval/exact_match", "initial/eval/...", "train/tokens_per_s", "train/mfu"):
        assert name in message


@pytest.mark.parametrize("metric", metric_names())
def test_every_metric_the_job_writes_is_accepted(metric):
    validate(composed(f"train.metric={metric}"))


def test_the_valid_names_cover_the_contract_and_the_sweeps():
    names = set(metric_names())
    assert {"eval/kl_to_teacher", "eval/student_ce", "eval/teacher_ce", "eval/top1_agreement",
            "train/tokens_per_s", "initial/eval/kl_to_teacher"} <= names
    assert "loss/fused" not in names and "teacher/sharded" not in names  # not numbers to optimise


# ------------------------------------------------------------------------- loss.beta, loss.skew
@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "skl", "srkl", "tvd", "sft"])
def test_an_out_of_range_beta_or_skew_is_refused_whatever_the_kind(kind):
    assert "loss.beta=1.5 is out of range" in refused(f"loss.kind={kind}", "loss.beta=1.5")
    assert "loss.skew=1.0 is out of range" in refused(f"loss.kind={kind}", "loss.skew=1.0")


@pytest.mark.parametrize("overrides, warned", [
    (["loss.kind=fkl", "loss.beta=0.3"], ["loss.beta=0.3 has no effect with loss.kind=fkl; it is read only by "
                                          "loss.kind=jsd"]),
    (["loss.kind=jsd", "loss.skew=0.2"], ["loss.skew=0.2 has no effect with loss.kind=jsd; it is read only by "
                                          "loss.kind=skl, srkl"]),
    (["loss.kind=sft", "loss.temperature=2", "loss.ce_weight=0.5"],
     ["loss.temperature=2.0 has no effect with loss.kind=sft", "loss.ce_weight=0.5 has no effect with loss.kind=sft"]),
    (["loss.kind=jsd", "loss.beta=0.3"], []),
    (["loss.kind=skl", "loss.skew=0.2", "loss.temperature=2", "loss.ce_weight=0.5"], []),
    (["loss.kind=sft"], []),
])
def test_a_loss_key_the_kind_does_not_read_is_warned_about(overrides, warned):
    warnings = unread_loss_settings(composed(*overrides).loss)
    assert len(warnings) == len(warned)
    for warning, phrase in zip(warnings, warned):
        assert warning.startswith(phrase) and "\n" not in warning


def test_the_job_logs_the_unread_loss_keys_before_loading_anything(caplog, tmp_path):
    import torch

    from trainer.distributed import RankInfo
    from trainer.job import DistillJob

    cfg = composed("loss.kind=fkl", "loss.beta=0.3")
    rank = RankInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="trainer"):
        DistillJob(cfg, rank, tmp_path)
    assert any("loss.beta=0.3 has no effect with loss.kind=fkl" in r.getMessage() for r in caplog.records)


def test_mfu_as_the_metric_is_refused_where_the_device_has_no_peak(tmp_path):
    import torch

    from trainer.distributed import RankInfo
    from trainer.job import DistillJob

    cpu = RankInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.metric=train/mfu has no value on this device"):
        DistillJob(composed("train.metric=train/mfu"), cpu, tmp_path)
    DistillJob(composed("train.metric=train/mfu", "train.peak_tflops=1"), cpu, tmp_path)
