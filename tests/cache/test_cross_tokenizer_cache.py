"""Issue 20: a teacher cache built across tokenizers serves students of any tokenizer.

One cache, built once with loss.cross_tokenizer, listing every id of the tiny teacher (so the only
difference from the live teacher is the cache's float16 rounding), trains a student with the teacher's
own tokenizer and one whose tokenizer merges digit pairs, with no teacher folder at all; each trains
as it does against the live teacher. Its entries locate themselves in the teacher's text.
"""

from __future__ import annotations

import json

import pytest
from conftest import assert_ok, read_jsonl, run_cli, save_model, tiny_llama_config, tiny_overrides

pytestmark = pytest.mark.slow

VOCAB = 31  # the tiny teacher's ids: a top-k of all of them is its whole distribution
LOSSES = ("loss", "kd_loss", "ce_loss")


@pytest.fixture(scope="module")
def pair_student(tmp_path_factory):
    from trainer.demo.cross_student import build_pair_tokenizer

    tokenizer = build_pair_tokenizer()
    return save_model(tiny_llama_config(len(tokenizer), layers=1), tokenizer,
                      tmp_path_factory.mktemp("pair") / "student", seed=2)


@pytest.fixture(scope="module")
def cross_cache(tiny, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cross_cache")
    folder = tmp_path / "teacher_cache"
    args = tiny_overrides(tiny, tmp_path / "build_run", tmp_path / "cache_dir", f"teacher.top_k={VOCAB}",
                          f"teacher.cache={folder}", "teacher.cache_shard_rows=16", "loss.cross_tokenizer=gold")
    assert_ok(run_cli(args, module="trainer.cache"))
    return folder


def train(tiny, tmp_path, name: str, student, *extra: str, nproc: int = 1) -> tuple[list[dict], dict]:
    run_dir = tmp_path / name
    assert_ok(run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", f"student.path={student}",
                                     "loss.cross_tokenizer=gold", "train.max_steps=4", "train.lr=0.01", "peft=none",
                                     *extra), nproc=nproc))
    return read_jsonl(run_dir / "metrics.jsonl"), json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("which, ranks", [("teacher's tokenizer", ()), ("digit pairs", ("deepspeed=zero3",))])
def test_one_cross_tokenizer_cache_serves_students_of_different_tokenizers(which, ranks, tiny, pair_student,
                                                                           cross_cache, tmp_path):
    """The digit-pair student on two ranks under ZeRO-3: each rank reads its own rows' entries."""
    student = tiny["student"] if which == "teacher's tokenizer" else pair_student
    nproc = 2 if ranks else 1
    live, live_summary = train(tiny, tmp_path, "live", student, *ranks, nproc=nproc)
    cached, summary = train(tiny, tmp_path, "cached", student, "teacher.path=null", f"teacher.cache={cross_cache}",
                            *ranks, nproc=nproc)
    assert summary["teacher/source"] == "cache"
    for a, b in zip(live, cached, strict=True):
        for key in LOSSES:
            assert b[key] == pytest.approx(a[key], rel=2e-2), (key, a, b)
    for key in ("eval/kl_to_teacher", "eval/teacher_ce", "eval/unshared_mass", "eval/student_ce_per_byte"):
        assert summary[key] == pytest.approx(live_summary[key], rel=2e-2, abs=1e-3), key
    assert summary["eval/aligned_spans"] == live_summary["eval/aligned_spans"] > 0


def test_each_entry_names_the_token_and_the_characters_it_predicts(tiny, cross_cache):
    from transformers import AutoTokenizer

    from trainer.cache.store import CacheReader
    from trainer.data.pairing import teacher_side_row
    from trainer.data.sources import read_rows

    reader = CacheReader(cross_cache)
    assert reader.cross_tokenizer and reader.manifest.vocab_size == VOCAB
    tokenizer = AutoTokenizer.from_pretrained(cross_cache / "tokenizer")
    for index, (origin, row) in enumerate(read_rows(tiny["train"], key="data.train")[:4]):
        side = teacher_side_row(row, tokenizer, 32, origin)
        entry = reader.row("train", index)
        positions = entry.token_positions.tolist()
        assert [side.row.input_ids[j] for j in positions] == entry.token_ids.tolist()
        spelled = "".join(side.text[start:end] for start, end in entry.char_offsets.tolist())
        assert spelled == row["response"], "the entries cover the response, character by character, then eos"


def test_a_cross_tokenizer_cache_is_not_read_as_one_of_a_single_tokenizer(tiny, cross_cache, tmp_path):
    proc = run_cli(tiny_overrides(tiny, tmp_path / "run", tmp_path / "cache", f"teacher.cache={cross_cache}"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("distill: error:")][-1]
    assert "loss.cross_tokenizer" in line and "python -m trainer.cache" in line, line


def test_a_student_job_without_a_teacher_needs_the_tokenizer_a_cross_tokenizer_cache_keeps(tiny, pair_student,
                                                                                         cross_cache, tmp_path):
    """A cache built for one tokenizer keeps none: the job says how to build the one it needs."""
    import shutil

    bare = tmp_path / "bare_cache"
    shutil.copytree(cross_cache, bare, ignore=shutil.ignore_patterns("tokenizer"))
    proc = run_cli(tiny_overrides(tiny, tmp_path / "run", tmp_path / "cache", f"student.path={pair_student}",
                                  "teacher.path=null", f"teacher.cache={bare}", "loss.cross_tokenizer=gold"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("distill: error:")][-1]
    assert "keeps no teacher tokenizer" in line and "loss.cross_tokenizer=gold" in line, line
