"""scripts/bench_onpolicy.py runs and reports every contender it can (tiny shape: seconds, not a
measurement). CI installs no TRL, so there it runs ours and the rollout phase only; with TRL
installed (the `bench` extra) its two trainers too."""

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO

PROMPT_LEN, NEW_TOKENS, BATCH, STEPS, WARMUP = 6, 5, 2, 3, 1


@pytest.mark.slow
def test_the_onpolicy_benchmark_reports_each_contender_counting_tokens_alike(tmp_path):
    contenders = ["ours"] + (["trl-gkd", "trl-distillation"] if importlib.util.find_spec("trl") else [])
    command = [sys.executable, str(REPO / "scripts" / "bench_onpolicy.py"), "--work", str(tmp_path), "--vocab", "64",
               "--teacher-hidden", "64", "--student-hidden", "32", "--teacher-layers", "1", "--student-layers", "1",
               "--prompt-len", str(PROMPT_LEN), "--max-new-tokens", str(NEW_TOKENS), "--batch", str(BATCH),
               "--steps", str(STEPS), "--warmup", str(WARMUP), "--threads", "1", "--rollout-repeats", "1",
               "--contenders", ",".join(contenders)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = [line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert table[:len(contenders) + 1] == ["contender", *contenders]
    assert "ours (HFRolloutEngine)" in table and "bare model.generate" in table
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["summary"]) == set(contenders)
    rows = (STEPS - WARMUP) * BATCH
    for name, run in results["rounds"][0].items():
        # Every contender counts the trained rows' prompt and rollout tokens, generation timed inside.
        assert 0 < run["mean_rollout_length"] <= NEW_TOKENS, name
        assert run["timed_tokens"] == pytest.approx(rows * (PROMPT_LEN + run["mean_rollout_length"])), name
        assert 0 < run["generation_share"] < 1, name
        assert run["tokens_per_s"] == pytest.approx(run["timed_tokens"] / run["timed_s"]), name
    assert len(results["rollout_phase"]["bare model.generate"]) == 1
