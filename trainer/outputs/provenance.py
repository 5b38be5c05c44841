"""What rank 0 leaves with a finished run: `provenance.json` in the run directory and in the output
folder (`adapter/` or `model/`), and that folder's model card."""

from __future__ import annotations

import logging
from pathlib import Path

from trainer.config import cache_root
from trainer.outputs.card import card_base_model, card_datasets, write_card
from trainer.outputs.record import FILE_NAME, build_record, cross_tokenizer, gather_ranks, now, on_policy
from trainer.outputs.record import write as write_record

__all__ = ["write", "gather_ranks", "now", "FILE_NAME"]  # what the job calls

log = logging.getLogger(__name__)


def write(cfg, run_dir: Path, out_dir: Path, *, decision, ranks: list[dict], student_licence, model_name: str,
          name_complies, started_at: str, metrics: dict, cache=None, rows_trained: int | None = None) -> dict:
    """Hash, record, seal, write; then the card. Returns the sealed record."""
    from trainer.preflight.splits import data_sources

    record = build_record(
        cfg, run_dir=run_dir, out_dir=out_dir, decision=decision, student_licence=student_licence,
        model_name=model_name, name_complies=name_complies,
        started_at=started_at, metrics=metrics, ranks=ranks, rows_trained=rows_trained,
        cache_manifest=cache.manifest if cache is not None else None,
        cache_folder=cache.folder if cache is not None else None,
        memo_file=cache_root(cfg) / "weight_hashes.json")
    sealed = write_record(record, [run_dir, out_dir])
    card = write_card(
        out_dir, name=model_name, student_id=card_base_model(str(cfg.student.path)),
        student_licence=student_licence,
        teacher_id=_teacher_id(cfg, cache), decision=decision, name_ok=name_complies,
        datasets=card_datasets(data_sources(cfg.data)), metrics=metrics, lora=cfg.peft.kind == "lora",
        loss_kind=cfg.loss.kind, steps=cfg.train.max_steps, on_policy=on_policy(cfg.onpolicy),
        cross_tokenizer=cross_tokenizer(cfg.loss))
    log.info("provenance: %s in %s and %s (record_sha256 %s); model card %s", FILE_NAME, run_dir, out_dir,
             sealed["record_sha256"][:16], card)
    return sealed


def _teacher_id(cfg, cache) -> str:
    """The teacher as people know it: its path or hub id, or what a cache's manifest names."""
    if cfg.teacher.path is not None:
        return str(cfg.teacher.path)
    teacher = cache.manifest.teacher if cache is not None else {}
    return f"api:{teacher['api']}" if "api" in teacher else str(teacher.get("path") or "unknown")
