"""Issue 17 (items 1, 7, 13): settings a new user gets wrong are caught at start-up with one line,
the demo's data never stands in for the user's, and `--help` explains every key."""

from __future__ import annotations

import logging

import pytest
from test_config import composed

from trainer.config import ConfigError, unread_loss_settings, validate
from trainer.metric_names import CROSS_TOKENIZER_EVAL_METRICS, metric_names


def _cpu():
    import torch

    from trainer.ranks import RankInfo

    return RankInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


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
    from trainer.train.job import DistillJob

    with caplog.at_level(logging.WARNING, logger="trainer"):
        DistillJob(composed("loss.kind=fkl", "loss.beta=0.3"), _cpu(), tmp_path)
    assert any("loss.beta=0.3 has no effect with loss.kind=fkl" in r.getMessage() for r in caplog.records)


def test_mfu_as_the_metric_is_refused_where_the_device_has_no_peak(tmp_path):
    from trainer.train.job import DistillJob

    with pytest.raises(ConfigError, match="train.metric=train/mfu has no value on this device"):
        DistillJob(composed("train.metric=train/mfu"), _cpu(), tmp_path)
    DistillJob(composed("train.metric=train/mfu", "train.peak_tflops=1"), _cpu(), tmp_path)


# ------------------------------------------------------------- the demo's data, and the user's
@pytest.fixture
def demo_builds(monkeypatch, tmp_path) -> list:
    """Records each build of the demo's assets (which trains its teacher: minutes) instead of building."""
    from trainer.demo.assets import DemoAssets

    builds = []

    def build(cache_dir, **_):
        builds.append(cache_dir)
        return DemoAssets.in_folder(tmp_path / "demo")

    monkeypatch.setattr("trainer.demo.build_demo_assets", build)
    monkeypatch.setattr("trainer.preflight.demo_assets.dist.barrier", lambda: None)
    return builds


@pytest.fixture
def cross_builds(monkeypatch, tmp_path) -> list:
    """Records each build of the demo's cross-tokenizer student instead of building it."""
    builds = []

    def build(assets, cache_dir, **_):
        builds.append(cache_dir)
        return tmp_path / "cross" / "student"

    monkeypatch.setattr("trainer.demo.build_cross_tokenizer_student", build)
    return builds


def test_the_cross_tokenizer_demo_gets_its_student_built_next_to_the_demos(demo_builds, cross_builds, tmp_path):
    from trainer.preflight.demo_assets import materialise_demo

    cfg = composed("experiment=demo_cross_tokenizer", f"cache_dir={tmp_path / 'cache'}")
    materialise_demo(cfg, _cpu())
    assert cfg.student.path == str(tmp_path / "cross" / "student")
    assert cfg.teacher.path == str(tmp_path / "demo" / "teacher") and cfg.loss.cross_tokenizer == "gold"
    assert cross_builds and set(cross_builds) == set(demo_builds) == {tmp_path / "cache" / "demo"}


def test_the_plain_demo_never_builds_the_cross_tokenizer_student(demo_builds, cross_builds):
    from trainer.preflight.demo_assets import materialise_demo

    materialise_demo(composed(), _cpu())
    assert demo_builds and cross_builds == []


def test_an_unknown_demo_asset_is_refused_by_name_before_anything_is_built(demo_builds):
    from trainer.preflight.demo_assets import materialise_demo

    with pytest.raises(ConfigError) as error:
        materialise_demo(composed("student.path=demo://studnet"), _cpu())
    assert str(error.value).startswith("student.path=demo://studnet is not one of the demo's assets; use one of "
                                       "demo://teacher, demo://student, demo://student_cross_tokenizer")
    assert demo_builds == []


def test_own_data_train_alone_holds_out_from_it_and_builds_no_demo(demo_builds, tmp_path):
    from trainer.preflight.demo_assets import materialise_demo
    from trainer.preflight.splits import data_sources

    cfg = composed("teacher.path=/models/t", "student.path=/models/s", f"data.train={tmp_path}/my.jsonl")
    materialise_demo(cfg, _cpu())
    assert demo_builds == []
    assert data_sources(cfg.data) == {"train": f"{tmp_path}/my.jsonl"}  # no eval split: held out of train


def test_the_plain_demo_still_evaluates_on_its_own_held_out_problems(demo_builds, tmp_path):
    from trainer.preflight.demo_assets import materialise_demo
    from trainer.preflight.splits import data_sources

    cfg = composed()
    materialise_demo(cfg, _cpu())
    assert demo_builds
    assert data_sources(cfg.data) == {"train": str(tmp_path / "demo" / "train.jsonl"),
                                 "eval": str(tmp_path / "demo" / "eval.jsonl")}
    assert cfg.teacher.path == str(tmp_path / "demo" / "teacher")


def test_the_demo_models_on_own_data_hold_out_from_that_data(demo_builds, tmp_path):
    from trainer.preflight.demo_assets import materialise_demo
    from trainer.preflight.splits import data_sources

    cfg = composed(f"data.train={tmp_path}/gen.jsonl", "loss.kind=sft")  # the README's sequence-level example
    materialise_demo(cfg, _cpu())
    assert data_sources(cfg.data) == {"train": f"{tmp_path}/gen.jsonl"}


def test_own_data_eval_alone_evaluates_the_demo_on_it(demo_builds, tmp_path):
    from trainer.preflight.demo_assets import materialise_demo
    from trainer.preflight.splits import data_sources

    cfg = composed(f"data.eval={tmp_path}/mine.jsonl")
    materialise_demo(cfg, _cpu())
    assert data_sources(cfg.data) == {"train": str(tmp_path / "demo" / "train.jsonl"), "eval": f"{tmp_path}/mine.jsonl"}


@pytest.mark.parametrize("overrides, named", [
    (["teacher.path=/models/t", "student.path=/models/s"], "teacher.path=/models/t"),
    (["student.path=/models/s"], "student.path=/models/s"),
    (["teacher.path=null", "teacher.cache=/caches/api", "student.path=/models/s"], "teacher.path=null"),
])
def test_own_models_with_the_demos_data_are_refused_before_anything_is_built(demo_builds, overrides, named):
    from trainer.preflight.demo_assets import materialise_demo

    with pytest.raises(ConfigError) as error:
        materialise_demo(composed(*overrides), _cpu())
    message = str(error.value)
    assert message.startswith("data.train is the demo's arithmetic (demo://train), but " + named)
    assert "set data.train to your data" in message and "\n" not in message
    assert demo_builds == []


def test_a_cache_build_or_generation_reads_no_demo_asset_it_does_not_use(demo_builds, tmp_path):
    from trainer.preflight.demo_assets import CACHE_KEYS, GENERATE_KEYS, materialise_demo
    from trainer.preflight.splits import data_sources

    cache = composed("teacher.path=/models/t", f"data.train={tmp_path}/my.jsonl")  # student.path left at the demo's
    materialise_demo(cache, _cpu(), CACHE_KEYS)
    assert data_sources(cache.data) == {"train": f"{tmp_path}/my.jsonl"}
    generate = composed("teacher.path=/models/t", f"generate.prompts={tmp_path}/prompts.jsonl")  # data.* the demo's
    materialise_demo(generate, _cpu(), GENERATE_KEYS)
    assert demo_builds == [] and generate.data.train == "demo://train"


@pytest.fixture(scope="module")
def held_out_run(tiny, tmp_path_factory):
    """One tiny job given data.train only, as the README's example is."""
    from conftest import run_cli, tiny_overrides

    root = tmp_path_factory.mktemp("held_out")
    overrides = [o for o in tiny_overrides(tiny, root / "run", root / "cache", "train.max_steps=1")
                 if not o.startswith("data.eval=")]
    proc = run_cli(overrides, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, proc


@pytest.mark.slow
def test_a_job_given_only_data_train_holds_out_of_it_and_records_so(tiny, held_out_run):
    import hashlib
    import json

    root, proc = held_out_run
    assert "61 training rows (0 truncated to train.seq_len=32), 3 held-out rows" in proc.stdout + proc.stderr  # 5% of 64 held out
    record = json.loads((root / "run" / "provenance.json").read_text())
    assert list(record["data"]) == ["train"]
    assert record["data"]["train"][0]["sha256"] == hashlib.sha256(tiny["train"].read_bytes()).hexdigest()
    assert record["held_out"] == {"from": "data.train", "eval_fraction": 0.05, "seed": 0, "max_eval_rows": 1000}
    assert record["config"]["data"]["eval"] is None
    assert not list((root / "cache").glob("demo*")), "the demo's assets were built"


@pytest.mark.slow
def test_the_metric_names_are_the_numbers_a_real_summary_holds(held_out_run):
    import json
    import numbers

    root, _ = held_out_run
    summary = json.loads((root / "run" / "summary.json").read_text())
    prefixes = ("eval/", "initial/", "train/")
    written = {key for key, value in summary.items() if key.startswith(prefixes)
               and (isinstance(value, numbers.Number) or key.endswith("mfu"))}  # mfu: null on a CPU
    cross_tokenizer_only = {f"{prefix}eval/{name}" for name in CROSS_TOKENIZER_EVAL_METRICS for prefix in ("", "initial/")}
    assert written == set(metric_names()) - cross_tokenizer_only  # one tokenizer: no spans to report


# ----------------------------------------------------------------------------------- --help
def _leaf_keys(node, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    keys = []
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and key != "extra":  # deepspeed.extra is one key: a free-form dict
            keys += _leaf_keys(child, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


@pytest.fixture(scope="module")
def help_page() -> str:
    from conftest import run_cli

    proc = run_cli(["loss.kind=jsd", "train.lr=2e-4", "--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_help_lists_every_key_of_the_config_with_its_meaning(help_page):
    lines = help_page.splitlines()
    starts = {line.split("=", 1)[0]: index for index, line in enumerate(lines) if "=" in line and not line[0].isspace()}
    composed_keys = _leaf_keys(composed())
    assert len(composed_keys) > 80
    for key in composed_keys:
        assert key in starts, f"--help does not list {key}"
        meaning = lines[starts[key] + 1]
        assert meaning.startswith("    ") and len(meaning.split()) >= 2, f"--help gives {key} no meaning: {meaning!r}"


def test_help_meanings_are_the_schemas_field_docs_and_values_the_command_lines(help_page):
    from trainer.launch.help import config_keys

    text = " ".join(help_page.split())
    for key, doc in config_keys():
        assert doc, f"trainer/config.py documents no meaning for {key}"
        assert f"{key}=" in text and doc in text, key
    assert "loss.kind=jsd " in text and "train.lr=0.0002 " in text
    assert "teacher: cache, demo" in text  # Hydra's groups, still listed
    assert "loss.beta=0.5 jsd's mixture weight of the teacher, 0 < beta < 1." in text


def test_an_initial_metric_is_refused_when_the_job_resumes_without_measuring_it(tmp_path):
    from trainer.train.resume import check_metric_survives_resume

    with pytest.raises(ConfigError, match=r"train.metric=initial/eval/kl_to_teacher is measured before the first "
                                          r"step, and this job resumes from .*step_00000040 at step 40"):
        check_metric_survives_resume("initial/eval/kl_to_teacher", tmp_path / "step_00000040", 40)
    check_metric_survives_resume("eval/kl_to_teacher", tmp_path, 40)
