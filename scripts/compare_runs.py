"""Print the held-out metrics of several runs side by side: `python scripts/compare_runs.py RUN_DIR...`.

On-policy runs add a row for λ (`onpolicy.fraction`, read from each run's `.hydra/config.yaml`) and
the metrics of the student's own samples, `eval/onpolicy_kl` and `eval/teacher_nll_of_student`,
wherever a run has them (a run with a teacher cache has not)."""

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
ONPOLICY_ROWS = [
    ("eval/onpolicy_kl", "on-policy KL(s || t) (lower)"),
    ("eval/teacher_nll_of_student", "teacher NLL of samples (lower)"),
]
WIDTH = 16


def load(run_dir: Path) -> tuple[str, dict, float | None]:
    """The run's folder name, its summary.json and its onpolicy.fraction (None: a config without it)."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        sys.exit(f"{run_dir} has no summary.json: pass the folders of finished runs.")
    return run_dir.name, json.loads(summary_path.read_text()), _fraction(run_dir / ".hydra" / "config.yaml")


def _fraction(config_path: Path) -> float | None:
    if not config_path.is_file():
        return None
    from omegaconf import OmegaConf

    fraction = OmegaConf.select(OmegaConf.load(config_path), "onpolicy.fraction")
    return float(fraction) if fraction is not None else None


def cell(value) -> str:
    return f"{value:>{WIDTH}.4f}" if isinstance(value, (int, float)) else f"{'—':>{WIDTH}}"


def main(run_dirs: list[str]) -> None:
    runs = [load(Path(d)) for d in run_dirs]
    first = runs[0][1]
    print(f"{'held-out metric':<32}{'student before':>{WIDTH}}" + "".join(f"{name:>{WIDTH}}" for name, _, _ in runs))
    if any(fraction for _, _, fraction in runs):
        print(f"{'on-policy λ (onpolicy.fraction)':<32}{'':>{WIDTH}}" + "".join(cell(f) for _, _, f in runs))
    shown = ROWS + [row for row in ONPOLICY_ROWS if any(row[0] in summary for _, summary, _ in runs)]
    for key, label in shown:
        print(f"{label:<32}{cell(first.get('initial/' + key))}" + "".join(cell(s.get(key)) for _, s, _ in runs))
    print(f"{'teacher CE on labels':<32}{cell(first.get('eval/teacher_ce'))}")
    print(f"steps: {first.get('train/steps')}; runs: " + ", ".join(str(Path(d).resolve()) for d in run_dirs))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python scripts/compare_runs.py RUN_DIR [RUN_DIR ...]")
    main(sys.argv[1:])
