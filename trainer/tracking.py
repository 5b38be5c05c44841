"""Where a run's numbers go: `metrics.jsonl`, `summary.json`, W&B and the progress bar.

Only rank 0 writes; other ranks get a tracker that does nothing, so the loop never branches on rank.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id"


class Tracker:
    def __init__(self, run_dir: Path, cfg, resolved_config: dict, first_step: int, enabled: bool):
        self.enabled = enabled
        self.run_dir = run_dir
        self.wandb_run = None
        self.progress = tqdm(
            total=cfg.train.max_steps, initial=first_step, desc="distill", unit="step",
            disable=not enabled, dynamic_ncols=True,
        )
        if enabled and cfg.logger.kind == "wandb":
            self.wandb_run = _start_wandb(run_dir, cfg, resolved_config)

    def log_step(self, metrics: dict) -> None:
        """One optimizer step's metrics (must hold `step`)."""
        if not self.enabled:
            return
        _append_jsonl(self.run_dir / "metrics.jsonl", metrics)
        if self.wandb_run is not None:
            self.wandb_run.log(_finite_only(metrics), step=metrics["step"])
        self.progress.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)

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

    def close(self) -> None:
        self.progress.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def wandb_mode(cfg) -> str:
    if cfg.logger.mode != "auto":
        return cfg.logger.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _start_wandb(run_dir: Path, cfg, resolved_config: dict):
    import wandb

    # A requeued or resumed job continues the W&B run it started instead of opening a new one.
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    mode = wandb_mode(cfg)
    run = wandb.init(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        name=cfg.logger.name or run_dir.name,
        group=cfg.logger.group or _sweep_group(),
        tags=list(cfg.logger.tags),
        config=resolved_config,
        dir=str(run_dir),
        id=run_id,
        resume="allow",
        mode=mode,
    )
    if mode == "offline":
        log.info("W&B is offline; upload the run later with: wandb sync %s", run.dir.rsplit("/files", 1)[0])
    return run


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


def _finite_only(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v) and k != "step"}
