"""What the three entry points share: launcher arguments, one run directory for all ranks, and
user errors reported as one line.

`python -m trainer` (train), `python -m trainer.cache` (build a teacher cache) and
`python -m trainer.generate` (teacher-written responses) all take the same Hydra config.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from trainer.errors import UserError
from trainer.launch.console import hold_third_party_output, send_third_party_output_to_log


def prepare_argv(argv: list[str]) -> list[str]:
    hold_third_party_output()  # first: before anything imports DeepSpeed
    _refuse_secrets_in(argv)
    argv = _strip_launcher_local_rank(argv)
    overrides = _parsed_overrides(argv)
    if any(a in ("-m", "--multirun") for a in argv):
        # The sweeper and its launcher give each job its own directory under the sweep's.
        _check_run_dir(_dir_override(overrides, "hydra.sweep.dir", "multirun/"), "hydra.sweep.dir")
        return argv
    from trainer.launch.distributed import fill_launcher_env

    fill_launcher_env()
    argv = _shared_run_dir_args(argv)
    _check_run_dir(_dir_override(_parsed_overrides(argv), "hydra.run.dir", "outputs/"), "hydra.run.dir")
    return argv


def _stop(message: str) -> None:
    """A user error found before Hydra starts: one line, exit status 2, as `run_entry` reports them."""
    print(f"distill: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _parsed_overrides(argv: list[str]) -> list:
    """The command line's overrides as Hydra will read them. One Hydra cannot read is refused here, in
    one line naming it, rather than in Hydra's own report (exit status 1)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for override in get_args_parser().parse_args(argv[1:]).overrides:
        try:
            parsed.append(parser.parse_override(override))
        except HydraException as error:
            _stop(f"Hydra cannot read the override {override!r} ({str(error).splitlines()[0]}); "
                  f"{_quoting_advice(override)}")
    return parsed


def _quoting_advice(override: str) -> str:
    key, _, value = override.partition("=")
    if not value:
        return "write it as key=value (see https://hydra.cc/docs/advanced/override_grammar/basic/)."
    advice = (f"quote a value holding '=', '~', spaces or brackets, with the shell's quotes around Hydra's: "
              f"'{key}=\"{value}\"'")
    if value.startswith("~"):
        advice += " (Hydra does not expand ~: write $HOME/... for your home folder)"
    return advice + "."


def _dir_override(overrides: list, key: str, default: str) -> str:
    """The last value given for `key` on the command line, else `default` (where the config's own
    default puts it)."""
    values = [o.value() for o in overrides if o.key_or_group == key and isinstance(o.value(), str)]
    return values[-1] if values else default


def _check_run_dir(value: str, key: str) -> None:
    """Hydra creates the run directory before any of our code runs, and fails with a traceback where
    it cannot: check the part of the path known now (up to any `${...}`)."""
    from trainer.launch.rundir import unusable_reason

    known = value.split("${", 1)[0]
    folder = Path(known) if known == value or known.endswith("/") else Path(known).parent
    reason = unusable_reason(folder if str(folder) else Path("."))
    if reason:
        _stop(f"the run directory {value} cannot be used: {reason}; choose another with {key}=<folder>.")


def _refuse_secrets_in(argv: list[str]) -> None:
    """Before Hydra saves the overrides to `.hydra/`: a token typed on the command line would stay there."""
    from trainer.secrets import secret_values

    for name, value in secret_values().items():
        if any(value in arg for arg in argv[1:]):
            _stop(f"an override holds the value of {name}; keep secrets in the environment only "
                  "(the overrides are saved with the run) and remove it from the command line.")


def run_entry(task, cfg):
    """Join the process group, hold the run directory (rank 0's, on every rank) for the job's life,
    run `task(cfg, rank, run_dir)` and return its result on every rank. The task calls
    `run_dir.keep_record()` once its inputs passed their checks (see trainer/launch/rundir.py).

    A wrong setting or input is the user's to fix: one line, no traceback, exit status 2. Every
    rank validates the same inputs, so every rank stops there."""
    from hydra.core.hydra_config import HydraConfig

    from trainer.launch.distributed import finish_together, init_distributed
    from trainer.launch.rundir import claim_run_dir
    from trainer.launch.secrets import redact_secrets_in_logs

    redact_secrets_in_logs()  # before anything logs: no token of the environment reaches a log
    send_third_party_output_to_log()
    rank = init_distributed()
    _quiet_other_ranks(rank.is_main)
    try:
        with claim_run_dir(Path(HydraConfig.get().runtime.output_dir), rank, cfg) as run_dir:
            result = task(cfg, rank, run_dir)
    except UserError as error:  # what the user can fix (a setting, an input, disk space, a learning rate)
        print(f"distill: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finish_together()
    return result


def run_and_announce(task, cfg, label: str) -> None:
    """:func:`run_entry` for a task `task(cfg, rank)` that returns a path; rank 0 prints `<label> <path>`
    last, for scripts. Its results go elsewhere (a cache, a dataset folder), so the run directory's
    record is written at the start, as Hydra would."""
    def recorded_first(cfg, rank, run_dir):
        run_dir.keep_record()
        return task(cfg, rank)

    path = run_entry(recorded_first, cfg)
    if os.environ.get("RANK", "0") == "0":  # run_entry has set it, under torchrun or not
        print(f"{label} {path.resolve()}", flush=True)


def _quiet_other_ranks(is_main: bool) -> None:
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    if not is_main:
        logging.getLogger("trainer").setLevel(logging.WARNING)


def _strip_launcher_local_rank(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher appends `--local_rank=N`, which Hydra's parser rejects; torchrun
    passes LOCAL_RANK in the environment, so move it there."""
    kept = []
    for arg in argv:
        if arg.startswith("--local_rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        else:
            kept.append(arg)
    return kept


def _shared_run_dir_args(argv: list[str]) -> list[str]:
    """One run directory for every rank: each rank resolving `${now:...}` on its own may land in
    a different one. Under SLURM it is named after the job and step, so a requeued job comes back
    to it and resumes; under torchrun it is named after the agent's start, so workers restarted by
    torchrun come back to it too; elsewhere rank 0 decides and the others follow. Non-zero ranks
    skip `.hydra/`."""
    if any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    chosen = _slurm_run_dir()
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if chosen is None and int(os.environ["WORLD_SIZE"]) == 1 and not under_torchrun:
        return argv
    if chosen is None:
        from datetime import datetime

        from trainer.launch.distributed import init_distributed
        from trainer.ranks import broadcast_object

        rank = init_distributed()
        started = _launcher_start_time() if under_torchrun else datetime.now()
        chosen = broadcast_object(started.strftime(RUN_DIR_FORMAT) if rank.is_main else None)
    extra = [f"hydra.run.dir={chosen}"]
    if os.environ["RANK"] != "0":
        extra += ["hydra.output_subdir=null", "hydra/job_logging=none"]
    return argv + extra


RUN_DIR_FORMAT = "outputs/%Y-%m-%d/%H-%M-%S"


def _launcher_start_time():
    """When this process's torchrun agent started. Workers that torchrun restarts (--max-restarts)
    are new processes of the same agent: named after its start, their run directory is the one
    the first workers wrote their checkpoints to, so the restarted job resumes from them."""
    from datetime import datetime

    try:
        with open(f"/proc/{os.getppid()}/stat") as stat:
            # Field 22, counted after the parenthesised command name (which may hold spaces).
            ticks_since_boot = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as stat:
            boot = next(int(line.split()[1]) for line in stat if line.startswith("btime"))
    except OSError:  # no /proc (not Linux): a restart starts a new run directory
        return datetime.now()
    return datetime.fromtimestamp(boot + ticks_since_boot / os.sysconf("SC_CLK_TCK"))


def _slurm_run_dir() -> str | None:
    """`outputs/slurm-<job id>.<step id>` inside a SLURM job: the same on every task and after a
    requeue (which keeps the job id and numbers the steps afresh), different for each srun of an
    interactive allocation."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        return None
    return f"outputs/slurm-{job}.{os.environ.get('SLURM_STEP_ID', 'batch')}"
