"""Issue 18: one start-up sequence (`trainer.preflight.check`) for every entry point, and what it
resolves computed once: each data split, the tokenizer and the teacher's weights are hashed once a job."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_config import composed

from trainer.ranks import RankInfo

CPU = RankInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


class _InputsChecked(Exception):
    """Raised where the job would start loading weights: the start-up checks are behind it."""


def _stop():
    raise _InputsChecked


@pytest.fixture
def one_rank():
    """An in-process group of one rank (gloo), for the barriers and broadcasts of the start-up."""
    from trainer.launch.distributed import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield CPU
    dist.destroy_process_group()


def _job_config(tiny: dict, tmp_path: Path, *extra: str):
    return composed(f"teacher.path={tiny['teacher']}", f"student.path={tiny['student']}",
                    f"data.train={tiny['train']}", f"data.eval={tiny['eval']}", f"cache_dir={tmp_path / 'cache'}",
                    "train.seq_len=32", "logger=none", *extra)


@pytest.fixture
def hashing(monkeypatch) -> Counter:
    """Counts every hash of a data file (by path), of the tokenizer, and of the teacher's weights."""
    from trainer.data import examples
    from trainer.preflight import sequence

    counts: Counter = Counter()

    def counted(name, function, key=None):
        def wrapper(*args, **kwargs):
            counts[key(*args) if key else name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(examples, "_hash_path", counted(None, examples._hash_path, key=lambda path: Path(path).name))
    tokenizer = counted("tokenizer", examples.tokenizer_fingerprint)
    for module in (examples, sequence):  # where it is defined (load_examples calls it) and where preflight does
        monkeypatch.setattr(module, "tokenizer_fingerprint", tokenizer)
    monkeypatch.setattr(sequence, "weights_fingerprint", counted("teacher weights", sequence.weights_fingerprint))
    return counts


def test_a_training_job_hashes_each_split_and_its_tokenizer_once(tiny, tmp_path, one_rank, hashing):
    from trainer.train.job import DistillJob

    job = DistillJob(_job_config(tiny, tmp_path), one_rank, tmp_path / "run", inputs_checked=_stop)
    with pytest.raises(_InputsChecked):
        job.setup()
    identity = job.identity  # what every checkpoint records
    assert hashing == {"train.jsonl": 1, "eval.jsonl": 1, "tokenizer": 1}
    fingerprints = job.preflight.data_fingerprints
    assert identity["data.eval"] == f"rows with sha256 {fingerprints['eval'][:16]} at train.seq_len=32"
    assert identity["student.path"] == str(Path(tiny["student"]).absolute())


def test_a_job_reading_a_teacher_cache_hashes_its_data_and_teacher_once(tiny, tmp_path, one_rank, hashing):
    from trainer.cache.store import CacheError
    from trainer.train.job import DistillJob

    job = DistillJob(_job_config(tiny, tmp_path, "teacher.cache=auto"), one_rank, tmp_path / "run")
    with pytest.raises(CacheError, match="there is no teacher cache"):  # after the cache's identity is known
        job.setup()
    assert job.identity
    assert hashing == {"train.jsonl": 1, "eval.jsonl": 1, "tokenizer": 1, "teacher weights": 1}


def test_a_training_job_without_a_cache_never_hashes_the_teachers_weights(tiny, tmp_path, one_rank):
    from trainer import preflight

    checked = preflight.check(_job_config(tiny, tmp_path), one_rank, "train")
    assert checked.teacher_weights is None
    assert checked.rows.eval_split == "eval" and len(checked.rows.eval) == 16
    assert set(checked.models) == {"teacher", "student"} and checked.models["teacher"].folder == Path(tiny["teacher"])


@pytest.mark.parametrize("entry", ["train", "cache", "generate"])
def test_every_entry_point_starts_with_the_one_preflight_sequence(entry, tiny, tmp_path, monkeypatch):
    """The job, the cache builder and the generator each run `preflight.check` with their entry
    (its first step is `_validate`), before anything of their own."""
    from trainer.cache.build import build_cache
    from trainer.generate.responses import generate_dataset
    from trainer.preflight import sequence
    from trainer.train.job import DistillJob

    entries = []

    def first_step(cfg, entry):
        entries.append(entry)
        raise _InputsChecked

    cfg = _job_config(tiny, tmp_path, f"generate.prompts={tiny['train']}", f"generate.out={tmp_path / 'out'}")
    monkeypatch.setattr(sequence, "_validate", first_step)
    run = {"train": lambda: DistillJob(cfg, CPU, tmp_path / "run").setup(),
           "cache": lambda: build_cache(cfg, CPU), "generate": lambda: generate_dataset(cfg, CPU)}[entry]
    with pytest.raises(_InputsChecked):
        run()
    assert entries == [entry]
