"""The demo across tokenizers, as a table: runs of `experiment=demo_cross_tokenizer` side by side.

Reads each given run directory's `summary.json` and `.hydra/overrides.yaml` (what the run was told)
and writes docs/results_cross_tokenizer.md; every figure is read from the runs, none is typed in.

    python scripts/cross_tokenizer_table.py --run sft=/tmp/xt_demo_sft --run uld=/tmp/xt_demo_uld \\
        --run gold=/tmp/xt_demo_gold --out docs/results_cross_tokenizer.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf
from results_table import machine, versions  # scripts/ is on the path when run as a script

COLUMNS = (
    ("eval/student_ce_per_byte", "CE per byte ↓"),
    ("eval/student_ce", "CE per student token ↓"),
    ("eval/kl_to_teacher", "KL over aligned spans ↓"),
    ("eval/top1_agreement", "top-1 agreement (spans) ↑"),
    ("eval/unshared_mass", "mass on ids the teacher lacks"),
    ("eval/exact_match", "task accuracy (exact match) ↑"),
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, metavar="NAME=RUN_DIR",
                        help="a finished run directory, named as the table shows it (repeat)")
    parser.add_argument("--out", type=Path, default=Path("docs/results_cross_tokenizer.md"))
    return parser.parse_args()


def read_run(spec: str) -> dict:
    name, _, folder = spec.partition("=")
    if not folder:
        raise SystemExit(f"--run {spec!r}: give NAME=RUN_DIR, e.g. gold=/tmp/xt_demo_gold")
    folder = Path(folder)
    summary_file = folder / "summary.json"
    if not summary_file.exists():
        raise SystemExit(f"--run {spec!r}: {summary_file} does not exist; point it at a finished run's directory")
    overrides_file = folder / ".hydra" / "overrides.yaml"
    overrides = [line.removeprefix("- ").strip() for line in overrides_file.read_text().splitlines()
                 if line.startswith("- ")] if overrides_file.exists() else []
    config = OmegaConf.load(folder / ".hydra" / "config.yaml")
    return {"name": name, "summary": json.loads(summary_file.read_text()), "overrides": overrides,
            "kind": config.loss.kind, "ce_weight": config.loss.ce_weight}


def fmt(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def method_of(run: dict) -> str:
    """What the run trained on: hard labels, or the cross-tokenizer method (and its CE share)."""
    if run["kind"] == "sft":
        return "hard labels (`sft`)"
    method = f"`{run['summary']['cross_tokenizer/method']}`"
    return method + (f" + CE ({run['ce_weight']:g})" if run["ce_weight"] else "")


def render(runs: list[dict]) -> str:
    first = runs[0]["summary"]
    header = "| run | loss | steps | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = ["# The demo across tokenizers", "",
             "Written by `scripts/cross_tokenizer_table.py` from the runs' `summary.json`; no figure is typed in.", "",
             "The teacher writes one token a character; the student (`demo://student_cross_tokenizer`) writes two "
             "digits as one token, so 100 of its 131 ids are strings the teacher's vocabulary lacks; it starts from "
             "the demo student's weights, re-headed by string (trainer/demo/cross_student.py). Same data, steps and "
             "learning rate for every run; LoRA r=16. CE per byte (nats per UTF-8 byte of the answers) compares "
             "across tokenizers; KL, agreement and unshared mass are over the aligned spans (GOLD's coarse "
             "KL(teacher ‖ student): the ids both hold, and one bucket for the rest).", "",
             header, "| " + " | ".join(["---"] * (3 + len(COLUMNS))) + " |",
             "| student before training |  |  | " + " | ".join(fmt(first.get(f"initial/{key}")) for key, _ in COLUMNS) + " |"]
    for run in runs:
        summary = run["summary"]
        lines.append(f"| `{run['name']}` | {method_of(run)} | {summary.get('train/steps')} | "
                     + " | ".join(fmt(summary.get(key)) for key, _ in COLUMNS) + " |")
    lines += ["", "The teacher's CE per token of its own on the same aligned answers: "
              f"{fmt(first.get('eval/teacher_ce'))} (`eval/teacher_ce` of the runs).", "", "## Runs", "",
              "| run | command | training wall time | start-up alignment |", "| --- | --- | ---: | --- |"]
    for run in runs:
        summary = run["summary"]
        command = " ".join(["python -m trainer", *run["overrides"]])
        alignment = ("—" if summary.get("cross_tokenizer/vocab_share") is None else
                     f"{summary['cross_tokenizer/vocab_share']:.1%} of the student's ids shared; "
                     f"{summary['cross_tokenizer/one_to_one_share']:.1%} of spans 1:1")
        lines.append(f"| `{run['name']}` | `{command}` | {summary.get('train/wall_s', 0):.0f} s | {alignment} |")
    lines += ["", f"Machine: {machine()}; {versions()}. The runs shared the machine with other work (their wall "
              "times are not a speed measurement).", ""]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    runs = [read_run(spec) for spec in args.run]
    args.out.write_text(render(runs))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
