"""The licence gate (each class of licence, acknowledgement, missing cards, config over card), the
sealed provenance record and the adapter's model card."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli, tiny_overrides
from omegaconf import OmegaConf

from trainer.outputs.record import SELF_HASH, seal, verify, verify_file
from trainer.preflight import licence_check
from trainer.preflight.licences import (
    LICENCES,
    OBLIGATIONS,
    PERMISSIVE,
    RESTRICTED,
    LicenceError,
    classify,
    decide,
    name_complies,
)

TEACHER_LOADED = "teacher parameters held per rank"


# ------------------------------------------------------------------------------ the licence table
@pytest.mark.parametrize("licence, kind", [
    ("llama2", RESTRICTED), ("llama3", RESTRICTED), ("tongyi-qianwen", RESTRICTED),
    ("tongyi-qianwen-license-agreement", RESTRICTED), ("tongyi-qianwen-research", RESTRICTED),
    ("qwen-research", RESTRICTED), ("cc-by-nc-4.0", RESTRICTED),
    ("llama3.1", OBLIGATIONS), ("llama3.2", OBLIGATIONS), ("llama3.3", OBLIGATIONS), ("gemma", OBLIGATIONS),
    ("gemma-terms-of-use", OBLIGATIONS), ("deepseek", OBLIGATIONS), ("qwen", OBLIGATIONS),
    ("apache-2.0", PERMISSIVE), ("MIT", PERMISSIVE), ("bsd-3-clause", PERMISSIVE), ("cc-by-4.0", PERMISSIVE),
    (None, RESTRICTED), ("", RESTRICTED), ("other", RESTRICTED), ("some-new-licence", RESTRICTED),
])
def test_each_licence_is_classified_and_anything_unknown_counts_as_restricted(licence, kind):
    assert classify(licence) == kind


def test_every_entry_names_the_text_it_was_read_from_and_restricted_ones_say_why():
    for entry in LICENCES.values():
        assert entry.source.startswith("https://"), entry.id
        assert entry.kind in (RESTRICTED, OBLIGATIONS, PERMISSIVE)
        if entry.kind == RESTRICTED:
            assert entry.why and entry.example, entry.id


@pytest.mark.parametrize("licence", ["llama3.1", "llama3.2", "llama3.3"])
def test_llama_31_and_later_bind_the_student_to_the_llama_name_and_attribution(licence):
    decision = decide(licence, "test")
    assert decision.allowed_because == OBLIGATIONS and decision.name_prefix == "Llama"
    assert decision.notice == "Built with Llama"
    assert any("Built with Llama" in o for o in decision.obligations)
    assert any('begin with "Llama"' in o for o in decision.obligations)


def test_gemma_makes_the_student_a_model_derivative_and_deepseek_passes_its_restrictions_on():
    assert any("Model Derivative" in o for o in decide("gemma", "test").obligations)
    assert any("use-based restrictions" in o for o in decide("deepseek", "test").obligations)
    assert any("Credit" in o for o in decide("cc-by-4.0", "test").obligations)
    assert decide("apache-2.0", "test").obligations == ()


@pytest.mark.parametrize("licence, because", [
    ("llama3", "forbids using its outputs to improve any other large language model"),
    ("llama2", "forbids using its outputs"), ("tongyi-qianwen", "forbids"), ("qwen-research", "non-commercial"),
])
def test_a_restricted_licence_is_refused_in_one_line_naming_it_why_and_the_fix(licence, because):
    with pytest.raises(LicenceError) as refused:
        decide(licence, "from its model card x")
    message = str(refused.value)
    assert licence in message and because in message and f"teacher.accept_license={licence}" in message
    assert "\n" not in message


def test_acknowledging_the_exact_id_passes_and_any_other_id_is_refused():
    decision = decide("llama3", "test", accept="llama3")
    assert decision.allowed_because == "acknowledged" and decision.accepted == "llama3"
    assert any("acknowledged" in o for o in decision.obligations)
    with pytest.raises(LicenceError, match="teacher.accept_license=llama3.1 names another licence"):
        decide("llama3", "test", accept="llama3.1")
    assert decide(None, "test", accept="unknown").allowed_because == "acknowledged"
    with pytest.raises(LicenceError, match="teacher.license to its id"):
        decide(None, "test", accept="apache-2.0")


def test_llama_3_allows_its_own_family_as_the_student_and_no_other():
    assert decide("llama3", "test", student_licence="llama3").allowed_because == "own family"
    with pytest.raises(LicenceError):
        decide("llama3", "test", student_licence="apache-2.0")
    with pytest.raises(LicenceError):
        decide("llama2", "test", student_licence="llama3")


def test_the_name_duty_counts_spaces_hyphens_and_underscores_as_one():
    assert name_complies("Llama-3-tiny", "Llama 3") and name_complies("llama_tiny", "Llama")
    assert not name_complies("tiny-Llama", "Llama") and not name_complies("Llama-2-tiny", "Llama 3")


# ---------------------------------------------------------------------------------- reading cards
def _card(folder: Path, front_matter: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if front_matter is None:
        (folder / "README.md").unlink(missing_ok=True)
    else:
        (folder / "README.md").write_text(f"---\n{front_matter}\n---\n\n# a model\n")
    return folder


def _cfg(teacher: dict, student: dict | None = None):
    return OmegaConf.create({"teacher": {"license": None, "accept_license": None, "revision": None, "cache": None,
                                         **teacher},
                             "student": {"license": None, "revision": None, **(student or {})}})


def test_the_licence_is_read_from_the_card_and_license_name_stands_for_other(tmp_path):
    plain = _card(tmp_path / "plain", "license: llama3.1")
    other = _card(tmp_path / "other", "license: other\nlicense_name: tongyi-qianwen\nlicense_link: https://x")
    assert licence_check.card_licence(str(plain), None).id == "llama3.1"
    read = licence_check.card_licence(str(other), None)
    assert read.id == "tongyi-qianwen" and "license_name" in read.read_from
    assert read.card_fields() == {"license": "other", "license_name": "tongyi-qianwen", "license_link": "https://x"}


@pytest.mark.parametrize("front_matter", [None, "tags: [x]", "license: other"])
def test_a_missing_card_or_licence_is_unknown_and_refused(tmp_path, front_matter):
    folder = _card(tmp_path / "teacher", front_matter)
    with pytest.raises(LicenceError, match="counts as restricted"):
        licence_check.check_teacher_licence(_cfg({"path": str(folder)}).teacher, is_main=True)


def test_teacher_license_in_config_overrides_the_card(tmp_path):
    folder = _card(tmp_path / "teacher", "license: llama3")
    teacher = _cfg({"path": str(folder), "license": "apache-2.0"}).teacher
    decision = licence_check.check_teacher_licence(teacher, is_main=True)
    assert decision.licence == "apache-2.0" and decision.read_from == "set by teacher.license"


def test_a_cached_teacher_without_a_path_is_unknown_unless_config_states_it(tmp_path):
    from trainer.cache.store import Manifest, write_manifest

    write_manifest(tmp_path / "cache", Manifest(key={}, teacher={"api": "some-api-model", "dump": "d.jsonl"},
                                                dtype="float16", vocab_size=8))
    cached = {"path": None, "cache": str(tmp_path / "cache")}
    with pytest.raises(LicenceError, match="API model some-api-model"):
        licence_check.check_teacher_licence(_cfg(cached).teacher, is_main=True)
    acknowledged = _cfg({**cached, "accept_license": "unknown"}).teacher
    assert licence_check.check_teacher_licence(acknowledged, True).allowed_because == "acknowledged"
    assert licence_check.check_teacher_licence(_cfg({**cached, "license": "mit"}).teacher, True).kind == PERMISSIVE


# ---------------------------------------------------------------------------------- the seal
def test_the_record_hash_is_sha256_of_its_canonical_json_and_catches_tampering():
    record = seal({"b": 1.5, "a": {"z": [1, 2], "é": "ü"}, "loss": float("nan")})
    assert record["loss"] == "nan"  # JSON holds no NaN: the string keeps the value visible
    without = {k: v for k, v in record.items() if k != SELF_HASH}
    canonical = json.dumps(without, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert record[SELF_HASH] == hashlib.sha256(canonical).hexdigest()
    assert verify(json.loads(json.dumps(record, indent=2)))  # the file's layout is not part of it
    assert not verify({**record, "b": 1.25})
    assert not verify({k: v for k, v in record.items() if k != SELF_HASH})


# ---------------------------------------------------------------------------------- real jobs
def _teacher_with_card(tiny, root: Path, front_matter: str | None) -> Path:
    folder = root / "teacher"
    shutil.copytree(tiny["teacher"], folder)
    return _card(folder, front_matter)


def _error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("distill: error:")]


def assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("module", ["trainer", "trainer.cache", "trainer.generate"])
def test_a_restricted_teacher_stops_every_entry_point_before_its_weights_load(tiny, tmp_path, module):
    teacher = _teacher_with_card(tiny, tmp_path, "license: llama3")
    extra = [f"generate.prompts={tiny['eval']}", f"generate.out={tmp_path / 'gen'}"] if module == "trainer.generate" else []
    proc = run_cli(tiny_overrides(tiny, tmp_path / "run", tmp_path / "cache", f"teacher.path={teacher}", *extra),
                   module=module)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = _error_lines(proc)
    assert len(errors) == 1 and "llama3" in errors[0] and "teacher.accept_license=llama3" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert TEACHER_LOADED not in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "gen" / "train.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize("card, accept, expected", [
    (None, None, "licence is unknown"),
    ("license: llama3", "llama3.1", "teacher.accept_license=llama3.1 names another licence"),
])
def test_a_missing_card_or_another_licences_acknowledgement_is_refused(tiny, tmp_path, card, accept, expected):
    teacher = _teacher_with_card(tiny, tmp_path, card)
    extra = [f"teacher.accept_license={accept}"] if accept else []
    proc = run_cli(tiny_overrides(tiny, tmp_path / "run", tmp_path / "cache", f"teacher.path={teacher}", *extra))
    assert proc.returncode == 2 and len(_error_lines(proc)) == 1 and expected in _error_lines(proc)[0], proc.stderr
    assert TEACHER_LOADED not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_an_acknowledged_restricted_teacher_trains_and_the_record_says_so(tiny, tmp_path):
    teacher = _teacher_with_card(tiny, tmp_path, "license: llama3")
    run_dir = tmp_path / "run"
    assert_ok(run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", f"teacher.path={teacher}",
                                     "teacher.accept_license=llama3", "train.max_steps=1")))
    licence = json.loads((run_dir / "provenance.json").read_text())["licence"]
    assert licence["licence"] == "llama3" and licence["allowed_because"] == "acknowledged"
    assert licence["accepted"] == "llama3"
    from huggingface_hub import ModelCard

    card = ModelCard.load(run_dir / "adapter" / "README.md")
    assert card.data.model_name == "Llama-3-student-distilled"  # the name we choose meets the naming duty
    assert "Built with Meta Llama 3" in card.text


@pytest.mark.slow
def test_obligations_are_printed_recorded_and_carried_into_the_card(tiny, tmp_path):
    teacher = _teacher_with_card(tiny, tmp_path, "license: llama3.1")
    run_dir = tmp_path / "run"
    proc = run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", f"teacher.path={teacher}",
                                  "logger.name=tiny-student", "train.max_steps=1"))
    assert_ok(proc)
    printed = proc.stdout + proc.stderr
    assert "licence obligation:" in printed and "Built with Llama" in printed
    assert "set logger.name=Llama-tiny-student" in printed  # the user's name is kept, and flagged
    record = json.loads((run_dir / "provenance.json").read_text())
    assert record["licence"]["kind"] == OBLIGATIONS and record["licence"]["obligations"] == list(
        LICENCES["llama3.1"].obligations)
    assert record["output"] == {"folder": "adapter", "model_name": "tiny-student", "name_complies_with_licence": False}
    from huggingface_hub import ModelCard

    card = ModelCard.load(run_dir / "adapter" / "README.md")
    assert card.data.teacher_license == "llama3.1" and "**Built with Llama**" in card.text
    assert "does not begin with 'Llama'" in card.text


@pytest.fixture(scope="module")
def permissive_run(tiny, tmp_path_factory):
    """A run with the tiny (Apache-2.0) teacher, and its provenance record."""
    root = tmp_path_factory.mktemp("permissive")
    run_dir = root / "run"
    proc = run_cli(tiny_overrides(tiny, run_dir, root / "cache", "train.max_steps=2"))
    assert_ok(proc)
    return run_dir, json.loads((run_dir / "provenance.json").read_text()), proc


@pytest.mark.slow
def test_a_permissive_teacher_passes_and_the_record_hashes_match_the_files(tiny, permissive_run):
    run_dir, record, proc = permissive_run
    printed = proc.stdout + proc.stderr
    assert "licence obligation" not in printed and "permissive; distillation is allowed" in printed
    assert TEACHER_LOADED in printed  # the line the refusals' tests look for is there when weights load
    assert record["licence"]["licence"] == "apache-2.0" and record["licence"]["allowed_because"] == PERMISSIVE
    for role in ("teacher", "student"):
        entry = record[role]
        folder = Path(tiny[role])
        assert "model.safetensors" in entry["weights"] and entry["tokenizer"] and "config.json" in entry["config"]
        for group in ("weights", "tokenizer", "config"):
            for name, digest in entry[group].items():
                assert digest == sha256(folder / name), f"{role} {name}"
    for split in ("train", "eval"):
        [data] = record["data"][split]
        assert data["sha256"] == sha256(tiny[split])
        assert data["rows"] == len(Path(tiny[split]).read_text().splitlines())
    assert record["config"]["teacher"]["path"] == str(tiny["teacher"])
    assert record["packages"]["torch"] and record["packages"]["transformers"] and record["packages"]["peft"]
    assert record["world"]["world_size"] == 1 and record["world"]["ranks"][0]["device"] == "cpu"
    assert record["metrics"]["eval/kl_to_teacher"] > 0 and record["started_at"] <= record["finished_at"]
    assert record["on_policy"] == {"enabled": False, "fraction": 0.0}  # an off-policy job says so
    assert "git_commit" in record["code"]


@pytest.mark.slow
def test_the_record_is_beside_the_adapter_verifies_and_detects_tampering(permissive_run, tmp_path):
    run_dir, record, _ = permissive_run
    assert (run_dir / "adapter" / "provenance.json").read_bytes() == (run_dir / "provenance.json").read_bytes()
    assert verify_file(run_dir / "provenance.json")
    tampered = tmp_path / "provenance.json"
    tampered.write_text(json.dumps({**record, "metrics": {**record["metrics"], "eval/kl_to_teacher": 0.0}}))
    assert not verify_file(tampered)


@pytest.mark.slow
def test_the_model_card_loads_and_the_adapter_still_loads_with_peft(tiny, permissive_run):
    import torch
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, _, _ = permissive_run
    card = ModelCard.load(run_dir / "adapter" / "README.md")
    # A local student is named by its folder (a published card holds no local path; provenance.json does).
    assert card.data.base_model == Path(tiny["student"]).name and card.data.license == "apache-2.0"
    assert "distillation" in card.data.tags and card.data.teacher == str(tiny["teacher"])
    assert card.data.datasets == ["train.jsonl", "eval.jsonl"]
    assert "eval/kl_to_teacher" in card.text
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["student"]), run_dir / "adapter")
    with torch.no_grad():
        assert torch.isfinite(adapted(torch.tensor([[1, 5, 6, 7]])).logits).all()


@pytest.mark.slow
def test_the_cards_how_to_load_snippet_loads_the_adapter(tiny, permissive_run, monkeypatch):
    run_dir, _, _ = permissive_run
    text = (run_dir / "adapter" / "README.md").read_text()
    snippet = text.split("## How to load", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert f'from_pretrained("{Path(tiny["student"]).name}")' in snippet
    monkeypatch.chdir(Path(tiny["student"]).parent)  # where the base model's folder name resolves
    scope: dict = {}
    exec(snippet.replace("path/to/adapter", str(run_dir / "adapter")), scope)
    assert type(scope["model"]).__name__ == "PeftModelForCausalLM" and scope["tokenizer"] is not None


@pytest.mark.parametrize("layout, expected", [
    ("hub_id", "Qwen/Qwen2.5-0.5B"),
    ("hub_snapshot", "Qwen/Qwen2.5-0.5B"),
    ("recorded_hub_id", "my-org/tiny-student"),
    ("recorded_local_path", "my-student"),
    ("plain_folder", "my-student"),
])
def test_the_cards_base_model_is_a_hub_id_where_known_else_the_folders_name(tmp_path, layout, expected):
    from trainer.outputs.card import card_base_model

    folders = {"hub_snapshot": tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / "0123abc"}
    folder = folders.get(layout, tmp_path / "my-student")
    if layout != "hub_id":
        folder.mkdir(parents=True)
        recorded = {"recorded_hub_id": "my-org/tiny-student", "recorded_local_path": str(tmp_path / "elsewhere")}
        (folder / "config.json").write_text(json.dumps({"_name_or_path": recorded.get(layout, "")}))
    assert card_base_model("Qwen/Qwen2.5-0.5B" if layout == "hub_id" else str(folder)) == expected


@pytest.mark.slow
def test_a_changed_data_file_changes_the_record_and_config_overrides_the_card(tiny, permissive_run, tmp_path):
    _, first, _ = permissive_run
    teacher = _teacher_with_card(tiny, tmp_path, "license: llama3")  # the same weights, a card that would refuse
    train = tmp_path / "train.jsonl"
    train.write_text(Path(tiny["train"]).read_text() + json.dumps({"prompt": "1+1=", "response": "2"}) + "\n")
    run_dir = tmp_path / "run"
    assert_ok(run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", f"teacher.path={teacher}",
                                     "teacher.license=apache-2.0", f"data.train={train}", "train.max_steps=2")))
    second = json.loads((run_dir / "provenance.json").read_text())
    assert second["licence"]["read_from"] == "set by teacher.license"
    assert second["data"]["train"][0]["sha256"] == sha256(train) != first["data"]["train"][0]["sha256"]
    assert second["data"]["train"][0]["rows"] == first["data"]["train"][0]["rows"] + 1
    assert second["teacher"]["weights"] == first["teacher"]["weights"]  # the same bytes, wherever they are
    assert second[SELF_HASH] != first[SELF_HASH]


# ------------------------------------------------------------------------------ on-policy runs
ON_POLICY = ("onpolicy.fraction=0.5", "onpolicy.max_new_tokens=16", "onpolicy.temperature=0.7", "onpolicy.top_p=0.9")


def _composed(*overrides: str):
    from hydra import compose, initialize_config_dir

    from trainer.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _record(tiny, tmp_path, *overrides: str) -> dict:
    """A sealed record of a run configured by `overrides` on the tiny models (nothing is trained)."""
    from trainer.outputs.record import build_record, now
    from trainer.preflight.licence_check import CardLicence

    cfg = _composed(f"teacher.path={tiny['teacher']}", f"student.path={tiny['student']}", f"data.train={tiny['train']}",
                    f"data.eval={tiny['eval']}", f"cache_dir={tmp_path / 'cache'}", *overrides)
    record = build_record(cfg, run_dir=tmp_path, out_dir=tmp_path / "adapter", decision=decide("apache-2.0", "test"),
                          student_licence=CardLicence("apache-2.0", "test"), model_name="tiny-distilled",
                          name_complies=None, started_at=now(), metrics={}, ranks=[], memo_file=tmp_path / "memo.json")
    return seal(record)


@pytest.mark.parametrize("overrides, expected", [
    ((), {"enabled": False, "fraction": 0.0}),
    (("onpolicy.fraction=0", "onpolicy.max_new_tokens=16"), {"enabled": False, "fraction": 0.0}),
    (ON_POLICY, {"enabled": True, "fraction": 0.5, "max_new_tokens": 16, "temperature": 0.7, "top_p": 0.9}),
    (("onpolicy.fraction=1",), {"enabled": True, "fraction": 1.0, "max_new_tokens": 64, "temperature": 1.0,
                                "top_p": 1.0}),
])
def test_the_record_says_whether_the_run_was_on_policy_and_with_which_settings(tiny, tmp_path, overrides, expected):
    record = _record(tiny, tmp_path, *overrides)
    assert record["on_policy"] == expected
    assert record["config"]["onpolicy"]["fraction"] == expected["fraction"]
    assert verify(record)
    assert not verify({**record, "on_policy": {**record["on_policy"], "fraction": 0.25}})


def _card_text(tmp_path, on_policy: dict):
    from huggingface_hub import ModelCard

    from trainer.outputs.card import write_card
    from trainer.preflight.licence_check import CardLicence

    path = write_card(tmp_path, name="tiny-distilled", student_id="my-org/tiny-student",
                      student_licence=CardLicence("apache-2.0", "test"), teacher_id="my-org/tiny-teacher",
                      decision=decide("apache-2.0", "test"), name_ok=None, datasets=["train.jsonl"],
                      metrics={"eval/kl_to_teacher": 0.25, "eval/onpolicy_kl": 0.5, "initial/eval/onpolicy_kl": 0.75},
                      lora=True, loss_kind="rkl", steps=40, on_policy=on_policy)
    return ModelCard.load(path)


def test_an_on_policy_card_names_gkd_its_lambda_and_sampling_settings(tmp_path):
    card = _card_text(tmp_path, {"enabled": True, "fraction": 0.5, "max_new_tokens": 16, "temperature": 0.7,
                                 "top_p": 0.9})
    assert ("(loss `rkl`, 40 optimizer steps) with distill, by on-policy distillation (GKD, λ=0.5): the student wrote "
            "the responses of 50% of its training rows itself (temperature 0.7, top-p 0.9, at most 16 new tokens)"
            in card.text)
    assert "on-policy-distillation" in card.data.tags
    assert "| eval/onpolicy_kl | 0.7500 | 0.5000 |" in card.text
    greedy = _card_text(tmp_path, {"enabled": True, "fraction": 1.0, "max_new_tokens": 32, "temperature": 0.0,
                                   "top_p": 0.9})
    assert "(GKD, λ=1): the student wrote the responses of 100% of its training rows itself (greedy, at most 32" in (
        greedy.text)


def test_an_off_policy_card_says_nothing_of_rollouts(tmp_path):
    card = _card_text(tmp_path, {"enabled": False, "fraction": 0.0})
    assert "(loss `rkl`, 40 optimizer steps) with distill." in card.text
    assert "on-policy" not in card.text and "GKD" not in card.text
    assert "on-policy-distillation" not in card.data.tags
