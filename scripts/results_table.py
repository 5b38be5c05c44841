"""Knowledge-transfer table of the demo task, written to docs/results.md.

Runs the demo (`python -m trainer`, the real CLI) once per loss, one after another, each in its own
run directory under --work, all at the same number of steps: hard labels only (`loss.kind=sft`)
and each KD divergence (fkl, rkl, jsd, skl, srkl, tvd). Every other setting is the demo's default,
so the runs share the student, its LoRA initialisation, the data order and the learning rate.
The table then holds, on the demo's held-out problems: the teacher itself, the student before
training, and the student after each run: KL(teacher ‖ student) per token, the student's CE on
the labels, top-1 agreement with the teacher and task accuracy (exact match). Every figure is read
from the runs' summary.json or measured here; none is typed in.

A run given as `KIND@FRACTION` is on-policy (`onpolicy.fraction=FRACTION`, GKD's λ: the student
writes that share of the rows' responses itself). Where runs hold them, the table gains a λ column
and the metrics of the student's own samples (`eval/onpolicy_kl`, `eval/teacher_nll_of_student`).

    python scripts/results_table.py                                    # docs/results.md
    python scripts/results_table.py --kinds fkl --out /tmp/one.md      # one run, to time it first
    python scripts/results_table.py --kinds fkl,rkl,rkl@1,jsd@1,rkl@0.5 --out /tmp/onpolicy.md
    python scripts/results_table.py --kinds rkl,rkl@1 --equal-wall rkl@1=rkl --out /tmp/wall.md

`--equal-wall RUN=KIND` adds one comparison at equal wall time: an off-policy KIND run given as many
steps as fit in RUN's training wall time (its `train/wall_s`), at the pace of the KIND run at equal
steps (its `train/wall_s` per step). Both runs must be among `--kinds`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KINDS = ("sft", "fkl", "rkl", "jsd", "skl", "srkl", "tvd")
METRICS = (  # summary key, column, better
    ("eval/kl_to_teacher", "KL(teacher ‖ student) per token ↓", "lower"),
    ("eval/student_ce", "CE on the labels ↓", "lower"),
    ("eval/top1_agreement", "top-1 agreement ↑", "higher"),
    ("eval/exact_match", "task accuracy (exact match) ↑", "higher"),
)
ONPOLICY_METRICS = (  # shown where a run has them: every run whose teacher is a model
    ("eval/onpolicy_kl", "KL(student ‖ teacher) on its own samples ↓", "lower"),
    ("eval/teacher_nll_of_student", "teacher NLL of the student's samples ↓", "lower"),
)
ABOUT = {
    "sft": "hard labels only: cross-entropy on the data's tokens, no teacher",
    "fkl": "forward KL(p‖q), p the teacher, q the student",
    "rkl": "reverse KL(q‖p)",
    "jsd": "Jensen-Shannon, β=0.5",
    "skl": "skew KL(p‖αp+(1−α)q), α=0.1",
    "srkl": "skew reverse KL(q‖αq+(1−α)p), α=0.1",
    "tvd": "total variation ½Σ|p−q|",
}
ONPOLICY_NOTE = ("- **λ** (`onpolicy.fraction`, GKD's λ): the share of each step's rows whose response the student "
                 "samples itself and the teacher scores token by token, sampled as `experiment=demo_onpolicy` "
                 "samples (conf/experiment/demo_onpolicy.yaml: temperature 1, at most 32 new tokens); 0 trains on "
                 "the data's responses (off-policy).")
ONPOLICY_METRICS_NOTE = ("- **on-policy columns**: the student answers the held-out prompts itself (seeded, at "
                         "`onpolicy.temperature`); `eval/onpolicy_kl` is KL(student ‖ teacher) per token of those "
                         "answers over the full vocabulary, `eval/teacher_nll_of_student` the teacher's NLL of their "
                         "tokens. The teacher writes no such answers, so it has none.")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/distill_results"),
                        help="one run directory per loss is made (afresh) under it")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps of every run (default: the demo's, train.max_steps in trainer/config.py)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help="loss.kind of each run, comma-separated; KIND@FRACTION runs it on-policy "
                             "(onpolicy.fraction=FRACTION), e.g. rkl@1")
    parser.add_argument("--equal-wall", default=None, metavar="RUN=KIND",
                        help="also run off-policy KIND for as many steps as fit in the training wall time of RUN "
                             "(e.g. rkl@1=rkl); both must be among --kinds")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--cache", default=os.environ.get("DISTILL_CACHE", "~/.cache/distill"),
                        help="the runs' cache_dir, where the demo teacher is built once")
    return parser.parse_args()


# ------------------------------------------------------------------------------------------- runs
def build_demo(cache: Path) -> float:
    """The demo's teacher, student and data, as `python -m trainer` builds them (same folder, same
    recipe and seed), so no run's wall time includes the build. Returns the seconds it took."""
    from trainer.demo import build_demo_assets

    started = time.perf_counter()
    build_demo_assets(cache / "demo")
    return time.perf_counter() - started


def parse_run(spec: str) -> tuple[str, float]:
    """`rkl` -> ("rkl", 0.0); `rkl@0.5` -> ("rkl", 0.5). Exits with a line saying what to write."""
    kind, _, fraction = spec.partition("@")
    try:
        value = float(fraction) if fraction else 0.0
    except ValueError:
        value = -1.0
    if kind not in KINDS or not 0.0 <= value <= 1.0:
        sys.exit(f"cannot read the run {spec!r}; write KIND or KIND@FRACTION with KIND one of {','.join(KINDS)} "
                 "and FRACTION (onpolicy.fraction) in [0, 1], e.g. rkl@1.")
    return kind, value


def run_name(kind: str, fraction: float) -> str:
    """The run's folder and label: the kind, with λ for an on-policy run (`rkl_onpolicy0.5`)."""
    return kind if fraction == 0 else f"{kind}_onpolicy{fraction:g}"


def parse_equal_wall(spec: str | None, specs: list[tuple[str, float]]) -> tuple | None:
    """`rkl@1=rkl` -> (("rkl", 1.0), "rkl"): the run whose wall time is matched, and the off-policy
    kind given that time. Exits with a line saying what to write."""
    if spec is None:
        return None
    target, _, kind = spec.partition("=")
    reference = parse_run(target.strip())
    if kind.strip() not in KINDS or reference not in specs or (kind.strip(), 0.0) not in specs:
        sys.exit(f"cannot read --equal-wall {spec!r}; write RUN=KIND with RUN one of --kinds (e.g. rkl@1) and KIND an "
                 "off-policy kind also in --kinds (e.g. rkl), whose pace per step sets the step count.")
    return reference, kind.strip()


def steps_in_wall_time(reference: dict, pace: dict) -> int:
    """How many steps of the `pace` run fit in the `reference` run's training wall time: the
    reference's `train/wall_s` over the pace run's `train/wall_s` per step, rounded."""
    seconds_per_step = pace["summary"]["train/wall_s"] / pace["summary"]["train/steps"]
    return max(1, round(reference["summary"]["train/wall_s"] / seconds_per_step))


def run_overrides(kind: str, fraction: float, steps: int | None) -> list[str]:
    """The run's command line after `python -m trainer`. On-policy runs sample as the on-policy demo
    does (conf/experiment/demo_onpolicy.yaml), with this kind and λ in place of its own."""
    onpolicy = ["experiment=demo_onpolicy", f"onpolicy.fraction={fraction:g}"] if fraction else []
    return [*onpolicy[:1], f"loss.kind={kind}", *onpolicy[1:], *([f"train.max_steps={steps}"] if steps else []),
            "logger=none"]


def run_kind(kind: str, fraction: float, args, cache: Path, steps: int | None = None, name: str | None = None) -> dict:
    """One run of the demo with this loss and λ, at `steps` (default: --steps, else the demo's)."""
    name = name or run_name(kind, fraction)
    steps = steps or args.steps
    run_dir = args.work / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: an old checkpoint there would be resumed
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    overrides = run_overrides(kind, fraction, steps)
    command = [sys.executable, "-m", "trainer", *overrides, f"hydra.run.dir={run_dir}", f"cache_dir={cache}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    load = os.getloadavg()[0]
    cpu_before = _children_cpu_s()
    started = time.perf_counter()
    log_path = args.work / f"{name}.log"
    with log_path.open("w") as log:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    cpu = _children_cpu_s() - cpu_before
    load = max(load, os.getloadavg()[0])
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        sys.exit(f"the {name} run failed (exit {proc.returncode}); its log is {log_path}:\n{tail}")
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"{name}: {wall:.0f} s, KL {summary['eval/kl_to_teacher']:.4f}, "
          f"exact match {summary['eval/exact_match']:.4f}", flush=True)
    return {"kind": kind, "fraction": fraction, "name": name, "dir": run_dir, "summary": summary, "wall_s": wall,
            "cpu_s": cpu, "load": load, "command": "python -m trainer " + " ".join(overrides)}


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -------------------------------------------------------------------------------------- teacher
def teacher_eval(cache: Path, max_rows: int) -> dict:
    """The teacher's CE on the labels and task accuracy on the held-out rows the runs evaluate on.

    `eval/exact_match` of the trainer is computed for the student only; the teacher's is computed
    here with the same definition (`trainer.train.evaluation.solved_rows`: every supervised token is the
    argmax under teacher forcing, i.e. greedy decoding gets the row right), on the same rows,
    tokenised as the trainer tokenises them."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.data.batching import collate
    from trainer.data.tokenize import IGNORE_INDEX
    from trainer.demo import build_demo_assets
    from trainer.demo.metrics import encode_rows
    from trainer.demo.task import read_jsonl
    from trainer.losses.objective import solved_rows

    assets = build_demo_assets(cache / "demo")
    # As the trainer loads it (conf/teacher/demo.yaml: dtype auto, which is float32 on a CPU; sdpa).
    model = AutoModelForCausalLM.from_pretrained(assets.teacher_path, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(assets.teacher_path)
    rows = read_jsonl(assets.eval_path)[:max_rows]
    ce_sum, tokens, solved = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            batch = collate(encode_rows(rows[start:start + 64], tokenizer), tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            targets = batch["labels"][:, 1:]
            ce_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                      ignore_index=IGNORE_INDEX, reduction="sum").item()
            tokens += int((targets != IGNORE_INDEX).sum())
            solved += int(solved_rows(logits, targets).sum())
    return {"eval/teacher_ce": ce_sum / max(tokens, 1), "eval/exact_match": solved / max(len(rows), 1),
            "rows": len(rows), "tokens": tokens}


# ---------------------------------------------------------------------------------------- table
def fmt(value, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU") \
        if Path("/proc/cpuinfo").exists() else platform.processor() or "unknown CPU"
    memory = ""
    if Path("/proc/meminfo").exists():
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        memory = f", {kib / 2**20:.0f} GiB"
    return f"{model}, {os.cpu_count()} cores{memory}, no GPU used; {platform.system()} {platform.release()}"


def versions() -> str:
    import deepspeed
    import peft
    import torch
    import transformers

    return (f"Python {platform.python_version()}, torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}")


def spread(runs: list[dict], key: str) -> float:
    values = [run["summary"][key] for run in runs if key in run["summary"]]
    return max(values) - min(values) if values else float("nan")


def shown_metrics(runs: list[dict]) -> tuple:
    """METRICS, then each on-policy metric that some run's summary holds."""
    return METRICS + tuple(m for m in ONPOLICY_METRICS if any(m[0] in run["summary"] for run in runs))


def render(runs: list[dict], teacher: dict, args, build_s: float, total_s: float, invocation: str,
           matched: dict | None = None) -> str:
    """docs/results.md: the table at equal steps, the comparison at equal wall time if `matched`
    (run_equal_wall's), every run's command and times, and how it was measured."""
    first = runs[0]["summary"]
    steps = sorted({int(run["summary"]["train/steps"]) for run in runs})
    metrics = shown_metrics(runs)
    onpolicy = any(run["fraction"] for run in runs)
    best = {key: (min if better == "lower" else max)(run["summary"][key] for run in runs if key in run["summary"])
            for key, _, better in metrics}

    def cells(values: dict, bold: bool) -> list[str]:
        out = []
        for key, _, _ in metrics:
            text = fmt(values.get(key))
            out.append(f"**{text}**" if bold and len(runs) > 1 and values.get(key) == best[key] else text)
        return out

    lam = ["λ (`onpolicy.fraction`)"] if onpolicy else []
    header = ["model", *lam, *(label for _, label, _ in metrics)]
    teacher_cells = {"eval/kl_to_teacher": "— (the reference)", "eval/student_ce": fmt(first["eval/teacher_ce"]),
                     "eval/top1_agreement": "— (the reference)", "eval/exact_match": fmt(teacher["eval/exact_match"])}
    no_lambda = [""] if onpolicy else []
    rows = [
        ["teacher", *no_lambda, *(teacher_cells.get(key, "—") for key, _, _ in metrics)],
        ["student before training", *no_lambda, *cells({k[len('initial/'):]: v for k, v in first.items()
                                                        if k.startswith("initial/")}, bold=False)],
    ]
    for run in runs:
        name = "after hard labels (`sft`)" if run["kind"] == "sft" else f"after KD (`{run['kind']}`)"
        rows.append([name, *([f"{run['fraction']:g}"] if onpolicy else []), *cells(run["summary"], bold=True)])
    table = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1),
             *("| " + " | ".join(row) + " |" for row in rows)]

    run_rows = runs_table(runs + ([matched["run"]] if matched else []), onpolicy)

    def leaders(key: str) -> str:
        return ", ".join(f"`{run['name']}`" for run in runs if run["summary"][key] == best[key])

    ours, theirs = teacher["eval/teacher_ce"], first["eval/teacher_ce"]
    ce_check = (f"the teacher CE the script measures alongside, {ours:.4f}, matches the runs', so it scored the "
                "same rows" if abs(ours - theirs) <= 1e-4 * max(1.0, theirs) else
                f"but the teacher CE the script measures alongside, {ours:.4f}, is not the runs' {theirs:.4f}: "
                "the teacher's accuracy may be on other rows or another tokenisation")
    initial_spread = max(spread(runs, "initial/" + key) for key, _, _ in metrics)
    same_start = (f"identical in all {len(runs)} runs" if initial_spread == 0
                  else f"they differ by at most {initial_spread:.2g} across the {len(runs)} runs")
    build = ("the demo teacher was already cached" if build_s < 5 else
             f"building the demo teacher took {build_s:.0f} s, once, before the runs (in no run's time)")
    lines = [
        "# Knowledge transfer on the demo task",
        "",
        "Written by `scripts/results_table.py`; every figure below is read from the runs' `summary.json` "
        "or measured by the script, none is typed in. Regenerate with the command below.",
        "",
        f"Held-out problems: the demo's {teacher['rows']} problems that appear in no training row "
        f"({teacher['tokens']} supervised tokens). Every run trains the same student (the demo teacher with "
        f"half of its layers dropped, LoRA r=16) for {', '.join(map(str, steps))} steps from the same LoRA "
        "initialisation, data order and learning rate; only `loss.kind` "
        + ("and `onpolicy.fraction` differ" if onpolicy else "differs") + " (KD kinds at "
        "`loss.temperature=1`, `loss.ce_weight=0`, the demo's defaults). Best trained value of each column in bold.",
        "",
        *table,
        "",
        f"Lowest KL to the teacher: {leaders('eval/kl_to_teacher')}; highest task accuracy: "
        f"{leaders('eval/exact_match')}. The KL column is the same measure for every run, forward KL from the "
        "teacher per supervised token, whatever loss the run trained with. "
        "Expect several points of run-to-run movement in exact match on this task (see docs/demo.md); "
        "one run per loss is shown.",
        "",
        "- **teacher**: CE is the runs' `eval/teacher_ce`; task accuracy is computed by the script with the "
        "trainer's definition (`trainer.train.evaluation.solved_rows`: every answer token is the argmax under teacher "
        f"forcing, i.e. greedy decoding is right) on the same rows; {ce_check}. KL and agreement "
        "are measured against the teacher, so it has none.",
        f"- **student before training**: `initial/*` of the runs' summaries ({same_start}: "
        "LoRA starts as the identity).",
        "- **KD kinds**: " + "; ".join(f"`{kind}` {ABOUT[kind]}" for kind in KINDS if kind != "sft") + ".",
        *([ONPOLICY_NOTE] if onpolicy else []),
        *([ONPOLICY_METRICS_NOTE] if len(metrics) > len(METRICS) else []),
        "",
        *(equal_wall_section(matched, metrics) if matched else []),
        *cross_tokenizer_section(CROSS_TOKENIZER_RESULTS),
        "## Runs",
        "",
        *run_rows,
        "",
        f"The runs were in `{args.work}`, each with its `report.md` and plots, and `comparison.md` there "
        f"overlays them (`python -m trainer.report`); {build}.",
        "",
        "## How it was measured",
        "",
        f"- command: `{invocation}`, {total_s / 60:.1f} min in all",
        f"- machine: {machine()}",
        f"- software: {versions()}",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        "- the runs ran one after another, each a fresh process; wall times include start-up and both "
        "evaluations. Other work on the machine (a load average above its core count) slows a run "
        "severalfold, in CPU time too (threads contend for the cores), so compare times only at similar load.",
    ]
    return "\n".join(lines) + "\n"


CROSS_TOKENIZER_RESULTS = REPO / "docs" / "results_cross_tokenizer.md"


def cross_tokenizer_section(path: Path) -> list[str]:
    """The demo across tokenizers (hard labels, ULD, GOLD at equal steps), its rows copied from the
    table `scripts/cross_tokenizer_table.py` wrote to `path`; nothing when there is none."""
    if not path.is_file():
        return []
    text = path.read_text().splitlines()
    start = next((i for i, line in enumerate(text) if line.startswith("| run |")), None)
    if start is None:
        return []
    end = next((i for i in range(start, len(text)) if not text[i].startswith("|")), len(text))
    teacher = [line for line in text[end:] if line.startswith("The teacher's CE")][:1]
    about = [line for line in text[:start] if line.strip()][-1:]  # the paragraph that says what the runs are
    return [
        "## Across tokenizers",
        "",
        f"Hard labels, ULD and GOLD at equal steps, copied from `{path.relative_to(REPO)}` (written by "
        "`scripts/cross_tokenizer_table.py` from the runs' `summary.json`; their commands and machine are there).",
        "",
        *about,
        "",
        *text[start:end],
        "",
        *teacher,
        *([""] if teacher else []),
    ]


def runs_table(runs: list[dict], onpolicy: bool) -> list[str]:
    """Each run's command, steps, times and load; with on-policy runs, the share of the training
    time spent generating rollouts (`train/rollout_share`)."""
    generating = ["of which generating", "rollouts: mean length, truncated"] if onpolicy else []
    header = ["run", "command", "steps", "wall time of the process", "of which training", *generating,
              "CPU time (user + sys)", "load average (1 min, higher of start and end)"]
    lines = ["| " + " | ".join(header) + " |", "| --- | --- |" + " ---: |" * (len(header) - 2)]
    for run in runs:
        s = run["summary"]
        share = s.get("train/rollout_share")
        length, cut = s.get("train/rollout_mean_length"), s.get("train/rollout_truncation_rate")
        rolled = isinstance(share, (int, float))
        gen = [f"{share:.0%}" if rolled else "—", f"{length:.1f}, {cut:.1%}" if rolled else "—"] if onpolicy else []
        cells = [f"`{run['name']}`", f"`{run['command']}`", str(int(s["train/steps"])), f"{run['wall_s']:.0f} s",
                 f"{s['train/wall_s']:.0f} s", *gen, f"{run['cpu_s']:.0f} s", f"{run['load']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def equal_wall_section(matched: dict, metrics: tuple) -> list[str]:
    """The on-policy run beside the off-policy one at equal steps and the one given its wall time."""
    reference, pace, run = matched["reference"], matched["pace"], matched["run"]
    ref_s, pace_s = reference["summary"], pace["summary"]
    header = ["run", "λ", "steps", "training wall time", *(label for _, label, _ in metrics)]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for row in (reference, pace, run):
        s = row["summary"]
        lines.append("| " + " | ".join([f"`{row['name']}`", f"{row['fraction']:g}", str(int(s["train/steps"])),
                                          f"{s['train/wall_s']:.0f} s", *(fmt(s.get(key)) for key, _, _ in metrics)])
                     + " |")
    per_step = pace_s["train/wall_s"] / pace_s["train/steps"]
    return [
        "## At equal wall time",
        "",
        f"`{reference['name']}` trained for {ref_s['train/wall_s']:.0f} s (`train/wall_s`, its summary). The "
        f"off-policy `{pace['name']}` run at equal steps took {per_step:.3f} s a step ({pace_s['train/wall_s']:.0f} s "
        f"for {int(pace_s['train/steps'])}), so {ref_s['train/wall_s']:.0f} s / {per_step:.3f} s = "
        f"{matched['steps']} steps fit in the same time; `{run['name']}` is that run "
        f"(`train.max_steps={matched['steps']}`, its learning-rate schedule stretched to them), and it trained for "
        f"{run['summary']['train/wall_s']:.0f} s. Training wall time (`train/wall_s`) runs from the first "
        "evaluation to the last, start-up excluded; every run evaluates as often (before, four times between, "
        "after), so the pace per step carries a share of that fixed cost and the matched run lands a little short "
        "of the time it was given. It moves with the machine's load (see Runs).",
        "",
        *lines,
        "",
    ]


def main() -> None:
    args = parse_args()
    invocation = "python scripts/results_table.py " + " ".join(sys.argv[1:])
    specs = [parse_run(k.strip()) for k in args.kinds.split(",") if k.strip()]
    equal_wall = parse_equal_wall(args.equal_wall, specs)  # checked before any run, not after them
    cache = Path(os.path.expanduser(args.cache)).resolve()
    started = time.perf_counter()
    build_s = build_demo(cache)
    runs = [run_kind(kind, fraction, args, cache) for kind, fraction in specs]
    matched = run_equal_wall(equal_wall, runs, args, cache) if equal_wall else None
    from omegaconf import OmegaConf

    max_rows = OmegaConf.load(runs[0]["dir"] / ".hydra" / "config.yaml").data.max_eval_rows
    teacher = teacher_eval(cache, max_rows)  # the rows the runs evaluated on
    from trainer.report import write_comparison, write_report

    every_run = runs + ([matched["run"]] if matched else [])
    for run in every_run:
        write_report(run["dir"])
    write_comparison([run["dir"] for run in every_run], args.work)
    total = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(runs, teacher, args, build_s, total, invocation.strip(), matched))
    print(f"wrote {args.out} in {total / 60:.1f} min", flush=True)


def run_equal_wall(equal_wall: tuple, runs: list[dict], args, cache: Path) -> dict:
    """The off-policy run given the reference run's training wall time, as steps at the pace of
    the same kind's off-policy run at equal steps (the pace measured, not assumed)."""
    (ref_kind, ref_fraction), kind = equal_wall
    reference = next(run for run in runs if (run["kind"], run["fraction"]) == (ref_kind, ref_fraction))
    pace = next(run for run in runs if (run["kind"], run["fraction"]) == (kind, 0.0))
    steps = steps_in_wall_time(reference, pace)
    run = run_kind(kind, 0.0, args, cache, steps=steps, name=f"{kind}_equal_wall_{reference['name']}")
    return {"run": run, "reference": reference, "pace": pace, "steps": steps}


if __name__ == "__main__":
    main()
