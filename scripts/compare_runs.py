"""Print the held-out metrics of several runs side by side: `python scripts/compare_runs.py RUN_DIR...`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [
    ("eval/kl_to_teacher", "KL(teacher || student) (lower)"),
    ("eval/top1_agreement", "top-1 agreement (higher)"),
    ("eval/exact_match", "task accuracy (higher)"),
    ("eval/student_ce", "CE on labels (lower)"),
]


def load(run_dir: Path) -> tuple[str, dict]:
    return run_dir.name, json.loads((run_dir / "summary.json").read_text())


def main(run_dirs: list[str]) -> None:
    runs = [load(Path(d)) for d in run_dirs]
    first = runs[0][1]
    header = f"{'held-out metric':<32}{'student before':>16}" + "".join(f"{name:>16}" for name, _ in runs)
    print(header)
    for key, label in ROWS:
        line = f"{label:<32}{first['initial/' + key]:>16.4f}" + "".join(f"{s[key]:>16.4f}" for _, s in runs)
        print(line)
    print(f"{'teacher CE on labels':<32}{first['eval/teacher_ce']:>16.4f}")
    print(f"steps: {first['train/steps']}; runs: " + ", ".join(str(Path(d).resolve()) for d in run_dirs))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python scripts/compare_runs.py RUN_DIR [RUN_DIR ...]")
    main(sys.argv[1:])
