"""The embedded demo, exactly as `python -m trainer` runs it: knowledge moves from teacher to student."""

from __future__ import annotations

import json

import pytest
from conftest import read_jsonl, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The demo (forward KL) and its hard-label baseline, same student, data and steps."""
    root = tmp_path_factory.mktemp("demo")
    env = {"DISTILL_CACHE": str(root / "cache")}
    summaries = {}
    for name, extra in (("kd", []), ("sft", ["experiment=demo_sft"])):
        proc = run_cli([f"hydra.run.dir={root / name}", "logger=none", *extra], env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-5000:]
        assert proc.stdout.strip().splitlines()[-1].startswith("RESULT eval/kl_to_teacher=")
        summaries[name] = json.loads((root / name / "summary.json").read_text())
    summaries["cache"] = root / "cache"
    return summaries


def test_the_demo_teacher_solves_held_out_problems(demo_runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.demo.assets import build_demo_assets
    from trainer.demo.metrics import exact_match_rate

    assets = build_demo_assets(demo_runs["cache"] / "demo")  # the cache the demo runs built
    rows = [json.loads(line) for line in assets.eval_path.read_text().splitlines()]
    teacher = AutoModelForCausalLM.from_pretrained(assets.teacher_path)
    assert exact_match_rate(teacher, rows, AutoTokenizer.from_pretrained(assets.teacher_path)) >= 0.9


def test_distillation_moves_the_student_towards_the_teacher(demo_runs):
    kd = demo_runs["kd"]
    assert kd["eval/kl_to_teacher"] < 0.5 * kd["initial/eval/kl_to_teacher"]
    assert kd["eval/exact_match"] > kd["initial/eval/exact_match"] + 0.2
    assert kd["eval/top1_agreement"] > kd["initial/eval/top1_agreement"]


def test_distillation_ends_closer_to_the_teacher_than_hard_labels_at_equal_steps(demo_runs):
    """KD's lead in KL held on every machine measured (0.028 vs 0.244; 0.022 vs 0.187). Exact
    match is not compared: the demo's teacher is trained on each machine, and which student solves
    more problems changed with it (KD 0.84 vs 0.68 on one CPU, 0.92 vs 0.97 on another, 0.38 vs
    0.60 in CI), so a test of it would assert a draw, not a property of distillation."""
    kd, sft = demo_runs["kd"], demo_runs["sft"]
    assert kd["train/steps"] == sft["train/steps"]
    assert kd["eval/kl_to_teacher"] < 0.5 * sft["eval/kl_to_teacher"]


def test_the_demo_generation_line_writes_the_teachers_greedy_and_right_answers(demo_runs, tmp_path):
    """`python -m trainer.generate` as the README's demo line runs it, on the 300 held-out prompts
    rather than the 4000 training ones, to stay quick. Unset, the sampling settings are the demo
    teacher's own: greedy, which gets its sums right (at temperature 1 it gets 14% right)."""
    from trainer.demo.assets import build_demo_assets

    out = tmp_path / "generated"
    args = [f"hydra.run.dir={tmp_path / 'run'}", "generate.prompts=demo://eval", f"generate.out={out}",
            "generate.batch_size=64"]
    cache = demo_runs["cache"]  # the demo's teacher, as the demo runs built it
    proc = run_cli(args, env={"DISTILL_CACHE": str(cache)}, timeout=900, module="trainer.generate")
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "generate: greedy decoding (temperature=0.0" in proc.stdout + proc.stderr
    assert json.loads((out / "generation.json").read_text())["key"]["temperature"] == 0.0
    expected = {row["prompt"]: row["response"] for row in read_jsonl(build_demo_assets(cache / "demo").eval_path)}
    rows = read_jsonl(out / "train.jsonl")
    assert len(rows) == len(expected) == 300
    assert sum(row["response"] == expected[row["prompt"]] for row in rows) >= 0.9 * len(rows)


def test_the_onpolicy_demo_runs_from_the_cached_demo_and_the_student_writes_its_answers(demo_runs, tmp_path):
    """`python -m trainer experiment=demo_onpolicy`, cut to a few steps: every trained row is a rollout
    no longer than the answer it replaces allows, and the job ends on its RESULT line."""
    run_dir = tmp_path / "onpolicy"
    args = [f"hydra.run.dir={run_dir}", "logger=none", "experiment=demo_onpolicy", "train.max_steps=4",
            "train.log_every=2"]
    proc = run_cli(args, env={"DISTILL_CACHE": str(demo_runs["cache"])}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("RESULT eval/kl_to_teacher=")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train/steps"] == 4
    assert 0 < summary["train/rollout_mean_length"] <= 32 and 0 < summary["train/rollout_share"] < 1
    windows = [row for row in read_jsonl(run_dir / "metrics.jsonl") if "rollout_rows" in row]
    assert [row["rollout_rows"] for row in windows] == [2 * 16, 2 * 16]  # λ=1: every row of 2 steps × 16


def test_the_untrained_cross_tokenizer_student_writes_column_steps_but_no_pair_yet(demo_runs, tmp_path):
    """The student `experiment=demo_cross_tokenizer` starts from, cut from the demo's own teacher.
    Measured on the first 300 training rows of one CPU's demo build: teacher-forced exact match
    (trainer/demo/metrics.py) 0.00, as for the same-tokenizer demo student (0.00); it has to be 0,
    since every answer holds a two-digit column sum, one pair token, and the untrained student
    never ranks a pair first. Greedy, it writes a first column step in the answer's shape
    ("7+5+0=12;") in 73% of these 64 rows on one build and 48% on another (one torch thread, as CI
    builds it). Whether that step adds up is not asserted: it did in 50% of rows on the first build
    and 12% on the second, since the student is the teacher cut in half, and how it behaves then
    changes with the teacher each machine trains."""
    import re

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.demo.assets import build_demo_assets
    from trainer.demo.cross_student import build_cross_tokenizer_student
    from trainer.demo.metrics import exact_match_rate

    assets = build_demo_assets(demo_runs["cache"] / "demo")  # the cache the demo runs built
    path = build_cross_tokenizer_student(assets, tmp_path, log=lambda _: None)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    rows = read_jsonl(assets.train_path)[:64]
    assert exact_match_rate(model, rows, tokenizer) == 0.0
    batch = tokenizer([row["prompt"] for row in rows], return_tensors="pt")  # 3-digit prompts: one length
    written = model.generate(**batch, max_new_tokens=40, do_sample=False)[:, batch.input_ids.shape[1]:]
    steps = [re.match(r"\d\+\d\+[01]=\d\d;", tokenizer.decode(ids, skip_special_tokens=True))
             for ids in written]
    assert sum(step is not None for step in steps) >= len(rows) / 3
