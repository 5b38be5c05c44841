"""Where a run's numbers go: `metrics.jsonl`, `summary.json`, W&B and the progress bar.

Only rank 0 writes; other ranks get a tracker that does nothing, so the loop never branches on rank.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

from trainer.files import write_text_atomically

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id"


class Tracker:
    def __init__(self, run_dir: Path, cfg, resolved_config: dict, first_step: int, enabled: bool):
        self.enabled = enabled
        self.run_dir = run_dir
        self.wandb_run = None
        if enabled and cfg.logger.kind == "wandb":  # first, so its log lines do not land on the progress bar
            self.wandb_run = _start_wandb(run_dir, cfg, resolved_config)
        self.progress = tqdm(
            total=cfg.train.max_steps, initial=first_step, desc="distill", unit="step",
            disable=not enabled, dynamic_ncols=True,
        )

    def log_step(self, metrics: dict) -> None:
        """One optimizer step's metrics (must hold `step`)."""
        if not self.enabled:
            return
        _append_jsonl(self.run_dir / "metrics.jsonl", metrics)
        if self.wandb_run is not None:
            self.wandb_run.log(_for_wandb(metrics), step=metrics["step"])
        self.progress.set_postfix(_progress_fields(metrics), refresh=False)

    def advance(self, steps: int = 1) -> None:
        self.progress.update(steps)

    def log_eval(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        _append_jsonl(self.run_dir / "eval.jsonl", {"step": step, **metrics})
        if self.wandb_run is not None:
            self.wandb_run.log(_finite_only(metrics), step=step)
        self.progress.write(f"eval at step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def write_summary(self, summary: dict) -> None:
        if not self.enabled:
            return
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        if self.wandb_run is not None:
            for key, value in summary.items():
                self.wandb_run.summary[key] = value

    def write_report(self) -> None:
        """`report.md` and its plots into the run directory, and the same plots and a summary
        table to W&B (`trainer.report`). The run's weights and summary are saved by then, so a
        report that fails to draw costs nothing but a warning saying how to make it again."""
        if not self.enabled:
            return
        try:
            from trainer.report import log_report_to_wandb, write_report

            write_report(self.run_dir)
            if self.wandb_run is not None:
                log_report_to_wandb(self.wandb_run, self.run_dir)
        except Exception as error:
            log.warning("the run report could not be written (%s: %s); make it again with: "
                        "python -m trainer.report %s", type(error).__name__, error, self.run_dir)

    def close(self, failed: bool = False) -> None:
        """Idempotent. `failed`: the W&B run is marked failed (exit code 1), not finished."""
        self.progress.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else None)
            self.wandb_run = None


def wandb_mode(logger_cfg) -> str:
    if logger_cfg.mode != "auto":
        return logger_cfg.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _start_wandb(run_dir: Path, cfg, resolved_config: dict):
    import wandb

    # A requeued or resumed job continues the W&B run it started instead of opening a new one.
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    mode = wandb_mode(cfg.logger)
    server = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    unreachable = mode == "online" and _unreachable(server)
    if unreachable:
        mode = "offline"  # wandb.init would otherwise wait 90 s for a server it cannot reach
    settings = dict(project=cfg.logger.project, entity=cfg.logger.entity, name=cfg.logger.name or run_dir.name,
                    group=cfg.logger.group or _sweep_group(), tags=list(cfg.logger.tags), config=resolved_config,
                    dir=str(run_dir), id=run_id, resume="allow", mode=mode)
    run = _init_when_released(wandb, settings)
    run_files = run.dir.rsplit("/files", 1)[0]
    if unreachable:
        log.warning("W&B: %s is unreachable (%s), so this run is written offline; upload it once online with: "
                    "wandb sync %s", server, unreachable, run_files)
    elif mode == "offline":
        log.info("W&B is offline; upload the run later with: wandb sync %s", run_files)
    return run


def _unreachable(url: str, timeout: float = 3.0) -> str | None:
    """Why a TCP connection to the W&B server at `url` fails within `timeout` seconds; None if it
    opens. Run in a thread because name resolution has no timeout of its own."""
    parsed = urlsplit(url)
    address = (parsed.hostname or "", parsed.port or (80 if parsed.scheme == "http" else 443))
    outcome = ["no answer within %g s" % timeout]

    def probe():
        try:
            socket.create_connection(address, timeout=timeout).close()
            outcome[0] = None
        except OSError as error:
            outcome[0] = error.strerror or type(error).__name__

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0]


def _init_when_released(wandb, settings: dict, patience_s: float = 120.0):
    """`wandb.init`, waiting while the run is still held by the W&B process of a job that was
    killed (SIGKILL, or a rank lost under torchrun): that process lingers until it notices its
    parent is gone, and W&B refuses the run id meanwhile ("run ID ... is in use")."""
    import time

    deadline = time.monotonic() + patience_s
    while True:
        try:
            return wandb.init(**settings)
        except Exception as error:  # wandb's ServerResponseError; its module path changes between versions
            if "is in use" not in str(error) or time.monotonic() > deadline:
                raise
            log.info("W&B run %s is still held by a stopped job's W&B process; retrying.", settings["id"])
            time.sleep(2.0)


def _sweep_group() -> str | None:
    """The runs of one Hydra multirun (a grid, an Optuna study, a submitit sweep) share a W&B
    group named after the sweep's directory. A W&B sweep's runs are grouped by W&B itself."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return f"sweep {HydraConfig.get().sweep.dir}"


def _append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _progress_fields(metrics: dict) -> dict:
    """What the progress bar shows after the step count: loss, speed, MFU (or FLOP/s), the share of
    time spent generating rollouts and their mean length (on-policy runs only), data loading, memory."""
    fields = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{metrics['tokens_per_s']:.0f}"}
    if metrics.get("mfu") is not None:
        fields["MFU"] = f"{metrics['mfu']:.1%}"
    elif metrics.get("tflops_per_s") is not None:
        fields["TFLOP/s"] = f"{metrics['tflops_per_s']:.3g}"
    if metrics.get("rollout_share") is not None:  # present only when onpolicy.fraction > 0
        fields["gen"] = f"{metrics['rollout_share']:.0%}"
        if metrics.get("rollout_mean_length") is not None:
            fields["gen_len"] = f"{metrics['rollout_mean_length']:.0f}"
    if metrics.get("data_share") is not None:
        fields["data"] = f"{metrics['data_share']:.0%}"
    if metrics.get("peak_memory_gib") is not None:
        fields["mem"] = f"{metrics['peak_memory_gib']:.1f}GiB"
    return fields


def _for_wandb(metrics: dict) -> dict:
    """Finite numbers only; a per-rank list becomes one chart per rank (memory/rank<r>_peak_gib)."""
    flat = dict(metrics)
    for rank, value in enumerate(flat.pop("peak_memory_gib_per_rank", None) or []):
        flat[f"memory/rank{rank}_peak_gib"] = value
    return _finite_only(flat)


def _finite_only(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v) and k != "step"}


def forget_steps_after(run_dir: Path, step: int) -> None:
    """A run resumed at `step` redoes the steps after it: drop their records from `metrics.jsonl`
    and `eval.jsonl`, so each step is logged once."""
    for name in ("metrics.jsonl", "eval.jsonl"):
        path = run_dir / name
        if not path.exists():
            continue
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        if len(kept) != len(lines):
            write_text_atomically(path, "".join(kept))
