"""Every config composes; bad values fail at start-up with a message that names the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from trainer.config import ConfigError, evaluation_interval, register_configs, validate

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_the_default_is_the_demo():
    cfg = composed()
    assert cfg.teacher.path == "demo://teacher" and cfg.student.path == "demo://student"
    assert cfg.peft.kind == "lora" and cfg.deepspeed.stage == 0 and cfg.logger.kind == "wandb"
    validate(cfg)


# What conf/loss/default.yaml and conf/train/default.yaml held before the schema's dataclasses became
# the one place for these defaults: `python -m trainer` with no overrides must still compose them.
DEMO_LOSS = {"kind": "fkl", "temperature": 1.0, "beta": 0.5, "skew": 0.1, "ce_weight": 0.0, "fused": True,
             "chunk_size": 0}
DEMO_TRAIN = {"max_steps": 300, "micro_batch_size": 16, "grad_accum": 1, "lr": 4.0e-3, "warmup_steps": 10,
              "weight_decay": 0.0, "seq_len": 512, "seed": 0, "precision": "auto", "log_every": 10,
              "eval_every": None, "max_nonfinite_steps": 5, "metric": "eval/kl_to_teacher"}


def test_the_default_loss_and_train_settings_are_the_demos():
    cfg = composed()
    assert {key: cfg.loss[key] for key in DEMO_LOSS} == DEMO_LOSS
    assert {key: cfg.train[key] for key in DEMO_TRAIN} == DEMO_TRAIN


@pytest.mark.parametrize("group", ["peft", "deepspeed", "logger", "experiment", "data"])
def test_every_option_of_every_group_composes_and_validates(group):
    assert group_options(group), f"conf/{group}/ holds no option"  # else the loop below checks nothing
    for option in group_options(group):
        cfg = composed(f"{group}={option}")
        validate(cfg)
        OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("overrides, steps", [
    ((), [60, 120, 180, 240]),  # the demo's 300 steps
    (("train.max_steps=4",), [1, 2, 3]),
    (("train.max_steps=1001",), [201, 402, 603, 804]),
    (("train.eval_every=0",), []),
    (("train.eval_every=100",), [100, 200]),
])
def test_by_default_the_job_evaluates_four_times_between_before_and_after_training(overrides, steps):
    train = composed(*overrides).train
    every = evaluation_interval(train)
    assert [step for step in range(1, train.max_steps) if every and step % every == 0] == steps


def test_zero3_groups_set_stage_3():
    assert composed("deepspeed=zero3").deepspeed.stage == 3
    assert composed("deepspeed=zero3_offload").deepspeed.offload_param is True


@pytest.mark.parametrize("override", ["train.lrr=1", "loss.temprature=2", "peft.rank=8"])
def test_unknown_keys_are_rejected_by_name(override):
    with pytest.raises(Exception, match=override.split(".")[1].split("=")[0]):
        composed(override)


def test_a_wrongly_typed_value_is_rejected():
    with pytest.raises(Exception, match="max_steps"):
        composed("train.max_steps=many")


@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.kind=kl", "loss.kind"),
        ("loss.temperature=0", "temperature"),
        ("loss.beta=1.5", "beta"),
        ("loss.skew=1.0", "skew"),
        ("loss.ce_weight=2", "loss.ce_weight"),
        ("deepspeed.stage=4", "deepspeed.stage"),
        ("peft.kind=qlora", "peft.kind"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("train.lr=-1", "train.lr"),
        ("logger.kind=tensorboard", "logger.kind"),
        ("resume=/no/such/checkpoint", "resume"),
        ("teacher.tail_samples=64", "teacher.tail_samples"),
        ("teacher.tail_samples=-1", "teacher.tail_samples"),
        ("train.peak_tflops=0", "train.peak_tflops"),
        ("train.eval_every=-1", "train.eval_every"),
    ],
)
def test_out_of_range_values_fail_validation_with_one_line(override, key):
    overrides = [override] + (["loss.kind=jsd"] if "beta" in override else []) + (["loss.kind=skl"] if "skew" in override else [])
    with pytest.raises(ConfigError) as error:
        validate(composed(*overrides))
    message = str(error.value)
    assert key in message and "\n" not in message


def hydra_composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def test_the_slurm_launcher_runs_one_task_per_gpu_and_requeues_on_its_signal():
    launcher = hydra_composed("hydra/launcher=slurm").hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8
    assert launcher.signal_delay_s >= 60 and launcher.max_num_timeout > 0
    assert hydra_composed("hydra/launcher=local").hydra.launcher._target_.endswith("LocalLauncher")


def test_the_optuna_search_optimises_the_jobs_metric_over_existing_keys():
    cfg = hydra_composed("hparams_search=optuna")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert cfg.train.metric == "eval/kl_to_teacher"
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, key


def test_the_wandb_sweep_drives_the_same_entry_point_with_hydra_overrides():
    import yaml

    sweep = yaml.safe_load((CONF.parent / "scripts" / "wandb_sweep.yaml").read_text())
    assert sweep["program"] == "trainer" and "${args_no_hyphens}" in sweep["command"]
    # What the agent passes: one `key=value` per parameter; Hydra must accept each.
    sample = {key: spec["values"][0] if "values" in spec else spec["min"] for key, spec in sweep["parameters"].items()}
    cfg = composed(*(f"{key}={value}" for key, value in sample.items()))
    validate(cfg)
    assert sweep["metric"]["name"] == cfg.train.metric


@pytest.mark.parametrize("overrides,message", [
    (["onpolicy.fraction=-0.1"], r"^onpolicy.fraction=-0.1 is out of range; use a share of rows in \[0, 1\]"),
    (["onpolicy.max_new_tokens=0"], r"^onpolicy.max_new_tokens=0 must be at least 1"),
    (["onpolicy.temperature=-1"], r"^onpolicy.temperature=-1.0 must be a finite number >= 0"),
    (["onpolicy.top_p=0"], r"^onpolicy.top_p=0.0 must be in \(0, 1\]"),
    (["onpolicy.fraction=0.5", "data.pack=true"], r"^onpolicy.fraction=0.5 cannot pack rows .*set data.pack=false.$"),
    (["onpolicy.fraction=1", "teacher.cache=auto"], r"^onpolicy.fraction=1.0 needs a teacher that runs"),
])
def test_onpolicy_settings_out_of_range_fail_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(composed(*overrides))


def test_onpolicy_is_off_by_default_and_its_settings_compose():
    cfg = composed("onpolicy.fraction=0.5", "onpolicy.temperature=0", "onpolicy.top_p=0.9")
    validate(cfg)
    assert composed().onpolicy.fraction == 0.0


def test_a_sweep_over_onpolicy_fraction_expands_to_one_valid_job_per_value():
    """`python -m trainer -m onpolicy.fraction=0,0.5,1 loss.kind=rkl,jsd`: what Hydra's basic sweeper
    makes of it, each job composed and validated as the job would be."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(["onpolicy.fraction=0,0.5,1", "loss.kind=rkl,jsd"])
    (jobs,) = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    assert len(jobs) == 6
    seen = set()
    for job in jobs:
        cfg = composed(*job)
        validate(cfg)
        seen.add((cfg.onpolicy.fraction, cfg.loss.kind))
    assert seen == {(fraction, kind) for fraction in (0.0, 0.5, 1.0) for kind in ("rkl", "jsd")}


def test_the_onpolicy_demo_is_the_demo_with_every_response_the_students_under_reverse_kl():
    from trainer.demo.recipe import DemoRecipe
    from trainer.demo.task import worked_sum

    cfg = composed("experiment=demo_onpolicy")
    validate(cfg)
    assert (cfg.onpolicy.fraction, cfg.loss.kind, cfg.onpolicy.temperature) == (1.0, "rkl", 1.0)
    # The longest demo answer (one token a character, the character tokenizer) and its EOS fit.
    widest = 10 ** DemoRecipe().max_digits - 1
    assert cfg.onpolicy.max_new_tokens >= len(worked_sum(widest, widest)) + 1
    demo = composed()
    assert (cfg.train, cfg.student, cfg.teacher, cfg.data) == (demo.train, demo.student, demo.teacher, demo.data)
