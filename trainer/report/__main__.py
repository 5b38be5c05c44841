"""`python -m trainer.report RUN_DIR [RUN_DIR ...] [--out DIR]`

One run: (re)write its report.md and plots. Several runs, or a Hydra multirun folder: each run's
report, then one comparison table and plot in --out (default: the folder holding them all). The
last line printed is `REPORT <path of what was written last>`, for scripts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.report import NotARunDirectory, common_parent, expand_run_dirs, write_comparison, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.report", description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="a run directory (holds metrics.jsonl), or a multirun folder of them")
    parser.add_argument("--out", type=Path, default=None,
                        help="where comparison.md and comparison.png go (several runs only; "
                             "default: the folder holding every run)")
    args = parser.parse_args(argv)
    try:
        run_dirs = expand_run_dirs(args.run_dirs)
        written = [write_report(run_dir) for run_dir in run_dirs]
        if len(run_dirs) > 1:
            written.append(write_comparison(run_dirs, args.out or common_parent(run_dirs)))
    except NotARunDirectory as error:
        print(f"distill: error: {error}", file=sys.stderr, flush=True)
        return 2
    for path in written:
        print(f"REPORT {path.resolve()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
