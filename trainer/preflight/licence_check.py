"""The licence gate: read the teacher's licence (config, model card, or a cache's manifest), decide,
and say what the decision binds the student to. Every entry point that runs or reads a teacher
calls :func:`check_teacher_licence` before any weights load.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from trainer.preflight.licences import Decision, decide, name_complies, normalise

log = logging.getLogger(__name__)

# Licence ids a hub card gives as `license: other` plus `license_name: <id>`.
OTHER_NAMES = frozenset({"tongyi-qianwen", "tongyi-qianwen-research", "qwen", "qwen-research", "deepseek"})


@dataclass(frozen=True)
class CardLicence:
    """A model's licence as its card (or the config) states it."""

    id: str | None
    """The id the gate classifies: `license`, or `license_name` when `license` is `other`; None if absent."""
    read_from: str
    """Where it came from (or why there is none), in words."""
    license: str | None = None
    """The card fields, kept as written for the student's model card."""
    license_name: str | None = None
    license_link: str | None = None

    def card_fields(self) -> dict:
        """`license`, `license_name`, `license_link` for a Hugging Face card; 'unknown' when there is none."""
        if self.license is not None:
            return {"license": self.license, "license_name": self.license_name, "license_link": self.license_link}
        if self.id is None:
            return {"license": "unknown"}
        if normalise(self.id) in OTHER_NAMES:
            return {"license": "other", "license_name": self.id}
        return {"license": self.id}


def check_teacher_licence(teacher_cfg, is_main: bool, student: CardLicence | None = None) -> Decision:
    """The decision for this job's teacher, logged (rank 0); LicenceError when the job must stop.
    `student`: the student's licence, when there is a student (training), for the exception some
    licences make for their own family's models."""
    teacher = teacher_licence(teacher_cfg)
    decision = decide(teacher.id, teacher.read_from, teacher_cfg.accept_license, student.id if student else None)
    if is_main:
        announce(decision)
    return decision


def teacher_licence(teacher_cfg) -> CardLicence:
    if teacher_cfg.license:
        return CardLicence(teacher_cfg.license, "set by teacher.license")
    if teacher_cfg.path is not None:
        return card_licence(teacher_cfg.path, teacher_cfg.revision)
    return _cached_teacher_licence(Path(teacher_cfg.cache).expanduser())


def student_licence(student_cfg) -> CardLicence:
    if student_cfg.license:
        return CardLicence(student_cfg.license, "set by student.license")
    return card_licence(student_cfg.path, student_cfg.revision)


def _cached_teacher_licence(folder: Path) -> CardLicence:
    """teacher.path is null: the cache's manifest says who the teacher was (a model folder, or an
    API model whose licence no card states)."""
    from trainer.cache.store import CacheError, read_manifest

    manifest = read_manifest(folder)
    if manifest is None:
        raise CacheError(f"there is no teacher cache in {folder}; build it with python -m trainer.cache and the "
                         "same overrides as this job, or point teacher.cache at one.")
    teacher = manifest.teacher
    if teacher.get("license"):
        return CardLicence(teacher["license"], f"recorded in the manifest of {folder}")
    path = teacher.get("path")
    if path and Path(os.path.expanduser(path)).is_dir():
        return card_licence(path, teacher.get("revision"))
    who = f"API model {teacher['api']}" if "api" in teacher else f"{path or 'an unnamed teacher'}"
    return CardLicence(None, f"teacher.path is null and the cache {folder} names its teacher, {who}, without a licence")


def card_licence(path: str, revision: str | None) -> CardLicence:
    """The `license:` of a model's card (README.md front matter), read from its folder or the hub."""
    card = _card_file(path, revision)
    if card is None:
        return CardLicence(None, f"no model card, README.md, found for {path}")
    try:
        from huggingface_hub.repocard import metadata_load

        metadata = metadata_load(card) or {}
    except Exception as error:  # unreadable YAML: the card states nothing we can rely on
        return CardLicence(None, f"the front matter of {card} could not be read ({type(error).__name__})")
    licence = metadata.get("license")
    if isinstance(licence, list):  # the hub wants one id; a list of one is still unambiguous
        licence = licence[0] if len(licence) == 1 else None
    if not isinstance(licence, str) or not licence.strip():
        return CardLicence(None, f"the front matter of {card} has no license")
    name, link = metadata.get("license_name"), metadata.get("license_link")
    read_from = f"from its model card {card}"
    if licence.strip().lower() == "other" and isinstance(name, str) and name.strip():
        return CardLicence(name.strip(), f"license_name {read_from}", licence, name, link)
    return CardLicence(licence.strip(), read_from, licence, name, link)


def _card_file(path: str, revision: str | None) -> Path | None:
    folder = Path(os.path.expanduser(path))
    if folder.is_dir():
        return folder / "README.md" if (folder / "README.md").is_file() else None
    try:  # a hub id: transformers fetches no card, so ask for it (from the local hub cache when offline)
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(path, "README.md", revision=revision))
    except Exception:  # not on the hub, no card, offline and not cached: all mean no card to read
        return None


def announce(decision: Decision) -> None:
    """What the decision means, for the person starting the job: obligations one sentence a line."""
    said = f"licence: the teacher's licence is {decision.licence} ({decision.read_from})"
    if decision.allowed_because == "acknowledged":
        log.warning("%s, which restricts distillation; you acknowledged it with teacher.accept_license=%s, and "
                    "provenance.json records that.", said, decision.accepted)
    elif decision.allowed_because == "own family":
        log.warning("%s, which allows distillation only into its own family's models; the student is under %s, so "
                    "it is one.", said, decision.student_licence)
    elif decision.obligations:
        log.warning("%s: distillation is allowed, with obligations for whoever publishes the student.", said)
    else:
        log.info("%s: permissive; distillation is allowed.", said)
    for obligation in decision.obligations:
        log.warning("licence obligation: %s", obligation)


def model_name(cfg, decision: Decision) -> str:
    """logger.name when set (the user's choice, never changed); else one we choose, which meets the
    teacher's naming duty ("Llama" first) when its licence has one."""
    if cfg.logger.name:
        return str(cfg.logger.name)
    name = f"{Path(str(cfg.student.path).rstrip('/')).name}-distilled"
    if decision.name_prefix and not name_complies(name, decision.name_prefix):
        name = suggested_name(name, decision.name_prefix)
    return name


def check_name(decision: Decision, name: str, is_main: bool) -> bool | None:
    """Whether `name` meets the licence's naming duty (None: there is none); warns when it does not.
    We cannot rename a user's model, but the warning comes at start-up, before the work is done."""
    if decision.name_prefix is None:
        return None
    complies = name_complies(name, decision.name_prefix)
    if not complies and is_main:
        log.warning("licence: %s requires the student's name to begin with %r when it is distributed; this run's "
                    "name %r does not: set logger.name=%s before you publish it.", decision.licence,
                    decision.name_prefix, name, suggested_name(name, decision.name_prefix))
    return complies


def suggested_name(name: str, prefix: str) -> str:
    return f"{prefix.replace(' ', '-')}-{name}"
