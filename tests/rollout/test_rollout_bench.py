"""scripts/bench_rollout.py runs and prints its table (tiny shape: seconds, not a measurement)."""

import subprocess
import sys

from conftest import REPO


def test_the_rollout_benchmark_prints_both_engines():
    command = [sys.executable, str(REPO / "scripts" / "bench_rollout.py"), "--vocab", "64", "--hidden", "64",
               "--layers", "1", "--batch", "3", "--prompt-len", "6", "--max-new-tokens", "4", "--repeats", "1",
               "--threads", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ours") or line.startswith("| bare")]
    assert len(rows) == 2 and rows[1].endswith("| 1.00x |")
