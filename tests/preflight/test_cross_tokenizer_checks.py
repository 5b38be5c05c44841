"""Issue 20: across tokenizers, start-up checks both tokenizers, pairs their ids, and reports how
the two tokenisations meet before any weights load."""

from __future__ import annotations

import logging

import pytest

from trainer.data.pairing import pair_tokenize_row, role_pairs
from trainer.demo.cross_student import build_pair_tokenizer
from trainer.demo.tokenizer import build_char_tokenizer
from trainer.models.loading import ModelError
from trainer.preflight.cross_tokenizer import alignment_report, check_tokenizers, shared_ids


@pytest.fixture(scope="module")
def teacher():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def student():
    return build_pair_tokenizer()


def test_two_tokenizers_without_a_method_are_refused_naming_the_option(teacher, student):
    with pytest.raises(ModelError, match=r"tokenizers differ .*set loss.cross_tokenizer=gold \(or uld\)") as error:
        check_tokenizers(None, teacher, student)
    assert "\n" not in str(error.value)


def test_a_method_accepts_two_tokenizers_and_warns_when_they_are_one(teacher, student, caplog):
    check_tokenizers("gold", teacher, student)
    with caplog.at_level(logging.WARNING):
        check_tokenizers("uld", teacher, teacher)
    assert "one tokenizer on both sides" in caplog.text


def test_a_tokenizer_without_offsets_is_refused_in_one_line_naming_its_side(teacher):
    from transformers import ByT5Tokenizer

    slow = ByT5Tokenizer()
    assert not slow.is_fast
    with pytest.raises(ModelError, match=r"the student's tokenizer \(ByT5Tokenizer\) does not give") as error:
        check_tokenizers("gold", teacher, slow)
    assert "\n" not in str(error.value) and "student.path" in str(error.value)


def test_the_shared_ids_are_the_exact_matches_and_the_role_pairs_one_to_one(teacher, student):
    shared = shared_ids(student, teacher, role_pairs(student, teacher))
    student_ids, teacher_ids = [s for s, _ in shared.pairs], [t for _, t in shared.pairs]
    assert len(set(student_ids)) == len(student_ids) and len(set(teacher_ids)) == len(teacher_ids)
    by_student = dict(shared.pairs)
    for text in ("1", "+", "=", "</s>"):
        assert by_student[student.convert_tokens_to_ids(text)] == teacher.convert_tokens_to_ids(text)
    assert student.convert_tokens_to_ids("12") not in by_student, "the teacher has no two-digit token"
    assert shared.vocab_share == pytest.approx(len(teacher) / len(student))


def test_a_role_pair_never_takes_an_id_an_exact_match_holds(teacher, student):
    taken = shared_ids(student, teacher)
    student_eos = student.eos_token_id
    claimed = shared_ids(student, teacher, [(student_eos, teacher.convert_tokens_to_ids("1"))])
    assert claimed.pairs == taken.pairs


def test_the_report_counts_one_to_one_spans_and_coverage_on_the_first_rows(teacher, student, caplog):
    rows = [pair_tokenize_row({"prompt": "12+34=", "response": "46"}, student, teacher, 32, "row 1"),
            pair_tokenize_row({"prompt": "1+2=", "response": "3"}, student, teacher, 32, "row 2")]
    shared = shared_ids(student, teacher, role_pairs(student, teacher))
    with caplog.at_level(logging.INFO):
        report = alignment_report("gold", shared, len(student), len(teacher), rows)
    # "46"+eos: "46" meets "4","6" and the eos pair; "3"+eos: two 1:1 spans.
    assert report["cross_tokenizer/one_to_one_share"] == pytest.approx(3 / 4)
    assert report["cross_tokenizer/supervised_coverage"] == 1.0
    assert report["cross_tokenizer/vocab_share"] == shared.vocab_share
    assert "4 aligned spans, 75.0% of them one token to one token" in caplog.text
