"""One start-up sequence for every entry point (train, cache, generate): settings, demo assets, model
checks, licence gate, tokenizer and vocabulary, data splits and their fingerprints, in that order,
before any weights load. What it resolves is carried in a :class:`Preflight`, so nothing is
resolved or hashed twice."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from trainer.cache.key import weights_fingerprint
from trainer.config import cache_root, validate, validate_generate
from trainer.data.examples import Examples, examples_fingerprint, tokenizer_fingerprint
from trainer.models import checks, loading, lora
from trainer.models.files import ModelFiles, resolve_model
from trainer.models.loading import ModelError
from trainer.outputs.record import now
from trainer.preflight import cross_tokenizer, licence_check, onpolicy
from trainer.preflight.demo_assets import KEYS_READ_BY, demo_prompts_for_the_demo_teacher, materialise_demo
from trainer.preflight.licences import Decision
from trainer.preflight.splits import TrainingRows, data_sources, load_splits, training_rows, warn_past_positions
from trainer.ranks import RankInfo, broadcast_object

ENTRIES = ("train", "cache", "generate")


@dataclass
class Preflight:
    """What an entry point's start-up resolved, read by the job, the cache builder and the generator."""

    entry: str
    started_at: str
    models: dict[str, ModelFiles]
    """By role (`teacher`, `student`), each resolved once; a teacher given only as a cache has none."""
    licence: Decision
    """The teacher licence's decision (the gate passed)."""
    tokenizer: object
    """The student's tokenizer when training (the teacher's is the same), else the teacher's."""
    vocab_size: int | None
    """The token ids both models score; None for generation, which scores nothing."""
    tokenizer_hash: str | None = None
    """:func:`~trainer.data.examples.tokenizer_fingerprint`, where rows are tokenized or a cache keyed."""
    student_licence: licence_check.CardLicence | None = None
    model_name: str | None = None
    name_complies: bool | None = None
    position_limits: dict[str, int | None] = field(default_factory=dict)
    """By role: the positions a model without a learned position table was made for (None: no limit known)."""
    sources: dict = field(default_factory=dict)
    """The data splits' sources by name, as :func:`~trainer.preflight.splits.data_sources` gives them."""
    splits: dict[str, Examples] = field(default_factory=dict)
    """Each split's tokenized rows and their fingerprint."""
    rows: TrainingRows | None = None
    """Training only: the rows stepped and evaluated on."""
    teacher_weights: str | None = None
    """:func:`~trainer.cache.key.weights_fingerprint` of the teacher, where a cache or a generated
    dataset is keyed by it (hashed on rank 0, shared with every rank)."""
    teacher_tokenizer: object | None = None
    """Training across tokenizers (loss.cross_tokenizer) only: the teacher's own tokenizer."""
    teacher_vocab_size: int | None = None
    """The token ids the teacher scores: `vocab_size` unless the job distils across tokenizers."""
    shared_ids: cross_tokenizer.SharedIds | None = None
    """Across tokenizers: the student ids matched to teacher ids (GOLD's exact part)."""
    teacher_tokenizer_hash: str | None = None
    """Across tokenizers, reading a teacher cache: :func:`~trainer.data.examples.tokenizer_fingerprint` of the teacher's."""
    teacher_data_fingerprints: dict[str, str] = field(default_factory=dict)
    """Across tokenizers, reading a teacher cache: split name -> fingerprint of its rows as the teacher
    alone tokenises them, which a cross-tokenizer cache is keyed by (trainer/cache/cross.py)."""
    alignment: dict = field(default_factory=dict)
    """Across tokenizers: the start-up alignment report (`cross_tokenizer/*`, for summary.json)."""

    @property
    def cross_tokenizer(self) -> bool:
        return self.teacher_tokenizer is not None

    @property
    def data_fingerprints(self) -> dict[str, str]:
        """Split name -> fingerprint of its tokenized rows."""
        return {name: examples.fingerprint for name, examples in self.splits.items()}


def check(cfg, rank: RankInfo, entry: str) -> Preflight:
    """Run the start-up sequence of `entry` (train | cache | generate); raises the first problem found."""
    if entry not in ENTRIES:
        raise ValueError(f"entry={entry!r}; use one of {', '.join(ENTRIES)}")
    _validate(cfg, entry)
    materialise_demo(cfg, rank, KEYS_READ_BY[entry])
    started_at = now()
    preflight = _check_pair(cfg, rank, started_at) if entry == "train" else _check_teacher(cfg, rank, entry, started_at)
    if entry != "generate":
        _load_data(cfg, rank, preflight)
    if _keyed_by_teacher_weights(cfg, entry):
        preflight.teacher_weights = broadcast_object(_teacher_weights(cfg, preflight.models["teacher"])
                                                     if rank.is_main else None)
    return preflight


def _validate(cfg, entry: str) -> None:
    validate(cfg)
    if entry == "generate":
        demo_prompts_for_the_demo_teacher(cfg)
        validate_generate(cfg.generate)


def _check_pair(cfg, rank: RankInfo, started_at: str) -> Preflight:
    """Training: tokenizers, configs and the teacher's licence only, so that a mismatch, or a licence
    that does not allow distillation, is reported before any weights load."""
    checks.check_model("student", cfg.student)
    models = {"student": resolve_model(cfg.student.path, cfg.student.revision)}
    # The student's licence goes into its model card, and decides the exception some teacher
    # licences make for students of their own family.
    student_licence = licence_check.student_licence(cfg.student)
    if cfg.teacher.path is not None:  # a missing teacher folder is reported as such, not as a missing card
        # A cached teacher's weights are never loaded, so only its tokenizer and config must be safe.
        checks.check_model("teacher", cfg.teacher, loads_weights=not cfg.teacher.cache)
        models["teacher"] = resolve_model(cfg.teacher.path, cfg.teacher.revision)
    licence = licence_check.check_teacher_licence(cfg.teacher, rank.is_main, student_licence)
    model_name = licence_check.model_name(cfg, licence)
    name_complies = licence_check.check_name(licence, model_name, rank.is_main)
    tokenizer = loading.load_tokenizer("student", cfg.student)
    student_config = loading.load_config("student", cfg.student)
    teacher_tokenizer = None
    if cfg.teacher.path is not None:  # else a teacher cache that records its own teacher (e.g. an API model)
        # First: with another tokenizer (and no cross_tokenizer method) nothing else about the pair matters.
        teacher_tokenizer = loading.load_tokenizer("teacher", cfg.teacher)
        cross_tokenizer.check_tokenizers(_cross_method(cfg), teacher_tokenizer, tokenizer)
    elif _cross_method(cfg) is not None:  # a cross-tokenizer cache keeps the teacher's tokenizer
        teacher_tokenizer = cached_teacher_tokenizer(Path(cfg.teacher.cache).expanduser())
        cross_tokenizer.check_tokenizers(_cross_method(cfg), teacher_tokenizer, tokenizer)
    onpolicy.check_student_stops(cfg.onpolicy, tokenizer, models["student"], student_config)
    limits: dict[str, int | None] = {}
    student, limits["student"] = checks.check_fits("student", cfg.student, student_config, cfg.train.seq_len)
    if cfg.peft.kind == "lora":
        lora.lora_targets(student, cfg.peft.target_modules)
    teacher_config = loading.load_config("teacher", cfg.teacher) if cfg.teacher.path is not None else None
    cross = _cross_method(cfg) is not None and teacher_tokenizer is not None
    # Across tokenizers each model scores its own ids; with one tokenizer, the ids both score.
    vocab_size = checks.shared_vocab_size(tokenizer, None if cross else teacher_config, student_config)
    if teacher_config is not None:
        teacher = None
        if not cfg.teacher.cache:  # a cached teacher is never run: its weights and positions do not matter
            teacher, limits["teacher"] = checks.check_fits("teacher", cfg.teacher, teacher_config, cfg.train.seq_len)
        if rank.is_main:
            checks.warn_about_pair(cfg.teacher, cfg.student, teacher, student)
    preflight = Preflight("train", started_at, models, licence, tokenizer, vocab_size, student_licence=student_licence,
                          model_name=model_name, name_complies=name_complies, position_limits=limits)
    if cross:
        _add_teacher_tokenizer(preflight, teacher_tokenizer, teacher_config)
    return preflight


def _cross_method(cfg) -> str | None:
    """The cross-tokenizer method: the loss's, and under sft the evaluation's (the teacher still scores
    the held-out rows, over aligned spans)."""
    return cfg.loss.cross_tokenizer


def _add_teacher_tokenizer(preflight: Preflight, teacher_tokenizer, teacher_config) -> None:
    from trainer.data.pairing import role_pairs

    preflight.teacher_tokenizer = teacher_tokenizer
    preflight.teacher_vocab_size = checks.shared_vocab_size(teacher_tokenizer, teacher_config)
    preflight.shared_ids = cross_tokenizer.shared_ids(preflight.tokenizer, teacher_tokenizer,
                                                      role_pairs(preflight.tokenizer, teacher_tokenizer))


def _check_teacher(cfg, rank: RankInfo, entry: str, started_at: str) -> Preflight:
    """A cache build or generation: the teacher alone, whose outputs are made to train students."""
    checks.check_model("teacher", cfg.teacher)
    models = {"teacher": resolve_model(cfg.teacher.path, cfg.teacher.revision)}
    licence = licence_check.check_teacher_licence(cfg.teacher, rank.is_main)
    tokenizer = loading.load_tokenizer("teacher", cfg.teacher)
    config = loading.load_config("teacher", cfg.teacher)
    vocab_size = checks.shared_vocab_size(tokenizer, config) if entry == "cache" else None
    # Generation has no train.seq_len to hold the teacher to: its prompts and responses have their own lengths.
    seq_len = cfg.train.seq_len if entry == "cache" else None
    _, limit = checks.check_fits("teacher", cfg.teacher, config, seq_len)
    return Preflight(entry, started_at, models, licence, tokenizer, vocab_size, position_limits={"teacher": limit})


def _load_data(cfg, rank: RankInfo, preflight: Preflight) -> None:
    """Each split's rows, fingerprinted once; a training job's rows to step and evaluate on; a cache
    build's warning about rows past the teacher's positions (it runs the teacher on every split)."""
    preflight.tokenizer_hash = tokenizer_fingerprint(preflight.tokenizer)
    preflight.sources = data_sources(cfg.data)
    preflight.splits = load_splits(cfg.data, cfg.train.seq_len, cache_root(cfg) / "tokenized", preflight.tokenizer,
                                   preflight.tokenizer_hash, rank, teacher_tokenizer=preflight.teacher_tokenizer)
    if preflight.entry == "train":
        preflight.rows = training_rows(preflight.splits, cfg.data, cfg.train, cfg.onpolicy, preflight.position_limits,
                                       rank.is_main)
    if preflight.cross_tokenizer and cfg.teacher.cache:
        _add_teacher_fingerprints(cfg, preflight)
    if preflight.cross_tokenizer:
        preflight.alignment = cross_tokenizer.alignment_report(
            cfg.loss.cross_tokenizer, preflight.shared_ids, preflight.vocab_size, preflight.teacher_vocab_size,
            preflight.rows.train, rank.is_main)
    elif rank.is_main:
        warn_past_positions(preflight.position_limits, [row for split in preflight.splits.values() for row in split.rows])


def _add_teacher_fingerprints(cfg, preflight: Preflight) -> None:
    """What a cross-tokenizer cache is keyed by: the teacher's tokenizer and, per split, the
    fingerprint of the rows as the teacher alone tokenises them (the cache build's own rows)."""
    preflight.teacher_tokenizer_hash = tokenizer_fingerprint(preflight.teacher_tokenizer)
    preflight.teacher_data_fingerprints = {
        name: examples_fingerprint(source, preflight.teacher_tokenizer_hash, cfg.train.seq_len, key=f"data.{name}")
        for name, source in preflight.sources.items()}


def cached_teacher_tokenizer(folder: Path):
    """The teacher's tokenizer a cross-tokenizer cache keeps (trainer/cache/cross.py), for a job with teacher.path=null."""
    from trainer.cache.cross import TOKENIZER_FOLDER

    if not (folder / TOKENIZER_FOLDER).is_dir():
        raise ModelError(f"teacher.path is null and the teacher cache in {folder} keeps no teacher tokenizer, which "
                         "loss.cross_tokenizer needs to align the rows; build the cache with python -m trainer.cache "
                         "loss.cross_tokenizer=gold, or set teacher.path to the teacher.")
    return loading.load_tokenizer("teacher", SimpleNamespace(path=str(folder / TOKENIZER_FOLDER), revision=None,
                                                               trust_remote_code=False))


def _keyed_by_teacher_weights(cfg, entry: str) -> bool:
    """A generated dataset and a teacher cache name the weights they came from; a job reading a cache
    checks them, unless teacher.path=null trusts the cache's own record."""
    if entry == "train":
        return bool(cfg.teacher.cache) and cfg.teacher.path is not None
    return True


def _teacher_weights(cfg, teacher: ModelFiles) -> str:
    if teacher.folder is None:
        raise ModelError(f"teacher.path={teacher.path} is not on this machine, so the weights its outputs are keyed "
                         "by cannot be read; download it, or (reading a teacher cache) set teacher.path=null to "
                         "trust the cache's own record.")
    return weights_fingerprint(teacher.folder, cache_root(cfg) / "weight_hashes.json")
