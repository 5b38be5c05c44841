"""The bad-input catalogue (issue 6), through the real CLI: each mistake stops the job before its
first step, before any weights load, with one line that names the problem and its fix (exit status
2), and leaves the files already in the run directory as they were. Then the inputs that must not
stop a job: pickled weights when allowed, W&B with no network, secrets in the environment."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from conftest import run_cli, tiny_overrides, write_jsonl

from trainer.data.examples import load_examples, supervised_only
from trainer.data.sources import DataError
from trainer.data.tokenize import TokenizedRow

# Recognisable fake values: a test fails if any of them turns up in a file or in the output.
SECRETS = {
    "WANDB_API_KEY": "fakewandbkey" + "0123456789abcdef0123456789ab",
    "HF_TOKEN": "hf_fakeHubTokenForDistillTests0123",
    "HUGGING_FACE_HUB_TOKEN": "hf_fakeLegacyHubTokenForDistill456",
}
# Logged only once the teacher's weights are loaded: a check must stop the job before this.
WEIGHTS_LOADED = "parameters held per rank"


# ------------------------------------------------------------------------------ odd inputs
def _copy_student(tiny: dict, root: Path, name: str) -> Path:
    folder = root / name
    shutil.copytree(tiny["student"], folder)
    return folder


def _edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _other_tokenizer(tiny: dict, root: Path) -> Path:
    from transformers import AutoTokenizer

    folder = _copy_student(tiny, root, "other_tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["<new>"])
    tokenizer.save_pretrained(folder)
    return folder


def _cross_student_without_chat_template(root: Path) -> Path:
    """A student with another tokenizer (the demo's two-digit one) and no chat template (a base model's)."""
    from conftest import save_model, tiny_llama_config

    from trainer.demo.cross_student import build_pair_tokenizer

    tokenizer = build_pair_tokenizer()
    tokenizer.chat_template = None
    return save_model(tiny_llama_config(len(tokenizer), layers=1), tokenizer, root / "untemplated", seed=2)


def _pickled(tiny: dict, root: Path) -> Path:
    """The student with its weights in pytorch_model.bin only (transformers 5 writes no pickle itself)."""
    import torch
    from safetensors.torch import load_file

    folder = _copy_student(tiny, root, "pickled")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def _truncated_weights(tiny: dict, root: Path) -> Path:
    folder = _copy_student(tiny, root, "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return folder


def _without_tokenizer(tiny: dict, root: Path) -> Path:
    folder = _copy_student(tiny, root, "no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    return folder


def _without_eos(tiny: dict, root: Path) -> Path:
    """The student with no EOS anywhere a rollout looks: its tokenizer, its generation config, its config."""
    folder = _edit_config(_copy_student(tiny, root, "no_eos"), eos_token_id=None)
    for name in ("tokenizer_config.json", "generation_config.json"):
        settings = json.loads((folder / name).read_text())
        settings.pop("eos_token" if name == "tokenizer_config.json" else "eos_token_id")
        (folder / name).write_text(json.dumps(settings))
    return folder


def _short_gpt2(tiny: dict, root: Path, positions: int) -> Path:
    """A GPT-2 with the tiny models' tokenizer and a learned table of `positions` positions."""
    from conftest import save_model
    from transformers import AutoTokenizer, GPT2Config

    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=1, n_head=4, n_positions=positions,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return save_model(config, tokenizer, root / "short_gpt2", seed=7)


@pytest.fixture(scope="module")
def odd(tiny, tmp_path_factory) -> dict:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("odd")
    real_ids = len(AutoTokenizer.from_pretrained(tiny["student"]))
    long_response = {"prompt": "1+1=", "response": "2" * 60}
    (root / "empty.jsonl").write_text("")
    (root / "malformed.jsonl").write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": "1+2=", \n')
    return {
        "root": root,
        "other_tokenizer": _other_tokenizer(tiny, root),
        "cross_student_no_template": _cross_student_without_chat_template(root),
        "short_vocab": _edit_config(_copy_student(tiny, root, "short_vocab"), vocab_size=real_ids - 1),
        "remote_code": _edit_config(_copy_student(tiny, root, "remote_code"), model_type="distill_custom",
                                    auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                              "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}),
        "pickled": _pickled(tiny, root),
        "truncated": _truncated_weights(tiny, root),
        "no_tokenizer": _without_tokenizer(tiny, root),
        "vocab_beyond_weights": _edit_config(_copy_student(tiny, root, "vocab_beyond_weights"), vocab_size=real_ids + 5),
        "short_gpt2": _short_gpt2(tiny, root, positions=16),
        "no_eos": _without_eos(tiny, root),
        "empty": root / "empty.jsonl",
        "malformed": root / "malformed.jsonl",
        "unknown": write_jsonl(root / "unknown.jsonl", [{"question": "1+1=", "answer": "2"}]),
        "long": write_jsonl(root / "long.jsonl", [{"prompt": "1+1=", "response": "2"}] * 2 + [long_response]),
        # Each prompt fills train.seq_len=32, so its response is cut off: nothing left to learn.
        "masked": write_jsonl(root / "masked.jsonl", [{"prompt": "1" * 40, "response": "2"}] * 4),
        "blank": write_jsonl(root / "blank.jsonl", [{"prompt": "1+1=", "response": ""}] * 4),
        "text": write_jsonl(root / "text.jsonl", [{"prompt": "1+1=", "response": "2"}, {"text": "1+1=2"}] * 2),
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": "1+1=", "response": "2"}, {"prompt": "2+2="}] * 2),
        "chat": write_jsonl(root / "chat.jsonl", [{"messages": [{"role": "user", "content": "1+1="},
                                                                {"role": "assistant", "content": "2"}]}] * 4),
        "sharegpt": write_jsonl(root / "sharegpt.jsonl", [{"messages": [{"role": "human", "content": "1+1="},
                                                                        {"role": "gpt", "content": "2"}]}] * 2),
    }


# ------------------------------------------------------------------------------- catalogue
# (overrides given the odd inputs, the phrase the error line must hold, extra environment)
CATALOGUE = {
    "missing_model_folder": (lambda o: [f"student.path={o['root']}/no_such_model"], "does not exist", {}),
    "hub_id_offline": (lambda o: ["student.path=Qwen/Qwen2.5-0.5B"], "is not available offline",
                       {"HF_HUB_OFFLINE": "1", "HF_HOME": "{root}/empty_hf_home"}),
    "tokenizers_differ": (lambda o: [f"student.path={o['other_tokenizer']}"], "tokenizers differ", {}),
    "vocab_smaller_than_tokenizer": (lambda o: [f"student.path={o['short_vocab']}"], "do not belong together", {}),
    "missing_dataset": (lambda o: [f"data.train={o['root']}/gone.jsonl"], "gone.jsonl' does not exist", {}),
    "empty_dataset": (lambda o: [f"data.train={o['empty']}"], "has no rows", {}),
    "malformed_json_line": (lambda o: [f"data.train={o['malformed']}"], "malformed.jsonl:2 is not valid JSON", {}),
    "row_in_no_known_format": (lambda o: [f"data.train={o['unknown']}"], "unknown.jsonl:1 fits no known format", {}),
    "row_longer_than_seq_len": (lambda o: [f"data.train={o['long']}", "data.truncate=false"],
                                "long.jsonl:3 is 66 tokens long", {}),
    "every_row_masked": (lambda o: [f"data.train={o['masked']}"],
                         "none of the 4 training rows has a token to learn", {}),
    "every_response_empty": (lambda o: [f"data.train={o['blank']}"],
                             "every one of the 4 rows of data.train has an empty response", {}),
    "sharegpt_roles": (lambda o: [f"data.train={o['sharegpt']}"], "sharegpt.jsonl:1 has the roles 'human', 'gpt'", {}),
    "loss_beta_out_of_range": (lambda o: ["loss.kind=jsd", "loss.beta=1.5"], "loss.beta=1.5 is out of range", {}),
    "loss_skew_out_of_range": (lambda o: ["loss.kind=skl", "loss.skew=1.0"], "loss.skew=1.0 is out of range", {}),
    "loss_temperature_out_of_range": (lambda o: ["loss.temperature=0"], "loss.temperature=0.0 is out of range", {}),
    "zero_stage_out_of_range": (lambda o: ["deepspeed.stage=5"], "deepspeed.stage=5 is not a ZeRO stage", {}),
    "lora_targets_match_nothing": (lambda o: ["peft.target_modules=[nope_proj]"], "['nope_proj'] match no module", {}),
    "remote_code_not_trusted": (lambda o: [f"student.path={o['remote_code']}"], "student.trust_remote_code=true", {}),
    "pickle_weights_not_allowed": (lambda o: [f"student.path={o['pickled']}"],
                                   "only as pickle (pytorch_model.bin)", {}),
    "truncated_weights": (lambda o: [f"student.path={o['truncated']}"], "model.safetensors is truncated", {}),
    "config_vocab_disagrees_with_weights": (lambda o: [f"student.path={o['vocab_beyond_weights']}"],
                                            "the config and the weights do not belong together", {}),
    "seq_len_beyond_position_table": (lambda o: [f"student.path={o['short_gpt2']}"],
                                      "train.seq_len=32 is longer than the student's learned position table", {}),
    "attention_unknown": (lambda o: ["teacher.attn_implementation=fast"],
                          "teacher.attn_implementation=fast is not an attention implementation", {}),
    "student_without_tokenizer": (lambda o: [f"student.path={o['no_tokenizer']}"], "has no tokenizer files", {}),
    "secret_in_config": (lambda o: [f"logger.name={SECRETS['WANDB_API_KEY']}"], "holds the value of WANDB_API_KEY",
                         {"WANDB_API_KEY": SECRETS["WANDB_API_KEY"]}),
    # Issue 17: caught at start-up, not after the run (or after building the demo's teacher).
    "demo_data_for_own_models": (lambda o: ["data.train=demo://train", "data.eval=null"],
                                 "data.train is the demo's arithmetic (demo://train), but teacher.path=", {}),
    "metric_no_job_writes": (lambda o: ["train.metric=eval/accuracy"],
                             "train.metric='eval/accuracy' is not a number the job writes to summary.json", {}),
    "learning_rate_not_finite": (lambda o: ["train.lr=nan"], "train.lr=nan must be a finite number > 0", {}),
    # Issue 19: on-policy distillation's inputs.
    "onpolicy_fraction_out_of_range": (lambda o: ["onpolicy.fraction=1.5"], "onpolicy.fraction=1.5 is out of range", {}),
    "onpolicy_max_new_tokens_not_positive": (lambda o: ["onpolicy.fraction=1", "onpolicy.max_new_tokens=0"],
                                             "onpolicy.max_new_tokens=0 must be at least 1", {}),
    "onpolicy_text_rows": (lambda o: [f"data.train={o['text']}", "onpolicy.fraction=0.5"],
                           "text.jsonl:2 has no prompt (every token is supervised, as in a text row)", {}),
    "onpolicy_student_without_eos": (lambda o: [f"student.path={o['no_eos']}", "onpolicy.fraction=0.5"],
                                     "onpolicy.fraction=0.5 needs a student that can end its response", {}),
    "onpolicy_with_teacher_cache": (lambda o: ["teacher.cache=auto", "onpolicy.fraction=0.5"],
                                    "onpolicy.fraction=0.5 needs a teacher that runs", {}),
    # Issue 20: distillation across tokenizers.
    "cross_tokenizer_unknown_method": (lambda o: [f"student.path={o['other_tokenizer']}", "loss.cross_tokenizer=bpe"],
                                       "loss.cross_tokenizer=bpe is not a method", {}),
    "cross_tokenizer_chat_template_missing_on_one_side": (
        lambda o: [f"student.path={o['cross_student_no_template']}", "loss.cross_tokenizer=gold",
                   f"data.train={o['chat']}", f"data.eval={o['chat']}"],
        "has 'messages' but the student's tokenizer has no chat template", {}),
    "prompt_only_rows_off_policy": (lambda o: [f"data.train={o['prompts']}"],
                                    "prompts.jsonl:2 has a prompt and no response, which only onpolicy.fraction=1", {}),
    "prompt_only_rows_below_fraction_1": (lambda o: [f"data.train={o['prompts']}", "onpolicy.fraction=0.5"],
                                          "not onpolicy.fraction=0.5; give it a response, or set onpolicy.fraction=1",
                                          {}),
}


def _run_dir_with_history(run_dir: Path) -> dict[Path, bytes]:
    """A run directory that already holds a checkpoint, metrics, Hydra's record and its log; returns
    the files' bytes."""
    (run_dir / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000002" / "x").write_bytes(b"weights of an earlier run")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.5}) + "\n")
    (run_dir / ".hydra").mkdir()
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run_dir / ".hydra" / name).write_text(f"# the earlier run's {name}\n")
    (run_dir / "__main__.log").write_text("[the earlier run's log]\n")
    return {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CATALOGUE))
def test_bad_input_stops_the_job_with_one_line_and_keeps_the_run_directory(case, tiny, odd, tmp_path):
    overrides, phrase, env = CATALOGUE[case]
    run_dir = tmp_path / "run"
    before = _run_dir_with_history(run_dir)
    env = {name: value.format(root=tmp_path) for name, value in env.items()}
    proc = run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", *overrides(odd)), env=env, timeout=300)

    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n{output[-4000:]}"
    last = _last_line(proc.stderr)
    assert last.startswith("distill: error: ") and phrase in last, last
    assert "Traceback" not in proc.stderr
    assert WEIGHTS_LOADED not in output, "the job loaded weights before refusing"
    assert all(path.read_bytes() == content for path, content in before.items()), "a file of the run was changed"
    assert not any(secret in output for secret in SECRETS.values())


@pytest.mark.slow
def test_unknown_config_key_is_named_by_hydra_and_keeps_the_run_directory(tiny, tmp_path):
    """Hydra rejects the key while composing the config, before any of our code runs: its own
    message (naming the key and the schema it is not in) and exit status 1, not 2; no traceback."""
    run_dir = tmp_path / "run"
    before = _run_dir_with_history(run_dir)
    proc = run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", "train.lrr=1"), timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Could not override 'train.lrr'" in proc.stderr and "Key 'lrr' not in 'TrainConfig'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert all(path.read_bytes() == content for path, content in before.items())


# ------------------------------------------------------------------ inputs that must run
def _assert_ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.mark.slow
def test_pickled_weights_load_when_allowed(tiny, odd, tmp_path):
    proc = run_cli(tiny_overrides(tiny, tmp_path / "run", tmp_path / "cache", f"student.path={odd['pickled']}",
                                  "student.allow_pickle=true", "train.max_steps=1"), timeout=300)
    _assert_ok(proc)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_wandb_online_without_network_falls_back_to_offline_with_a_warning(tiny, tmp_path):
    from trainer.launch.distributed import free_port

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the connection is refused
    run_dir = tmp_path / "run"
    proc = run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", "logger=wandb", "logger.mode=online",
                                  "train.max_steps=1"),
                   env={"WANDB_BASE_URL": closed, "WANDB_API_KEY": SECRETS["WANDB_API_KEY"]}, timeout=300)
    _assert_ok(proc)
    output = proc.stdout + proc.stderr
    assert f"W&B: {closed} is unreachable" in output and "wandb sync " in output
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.slow
def test_secrets_appear_in_no_file_of_the_run_and_in_no_output(tiny, tmp_path):
    """A W&B run (written offline) with every secret in the environment. The W&B server address
    holds the hub token, so the fallback warning would print it: the log redaction must catch it."""
    from trainer.launch.distributed import free_port

    run_dir = tmp_path / "run"
    server = f"http://127.0.0.1:{free_port()}/{SECRETS['HF_TOKEN']}"
    proc = run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", "logger=wandb", "logger.mode=online",
                                  "train.max_steps=2"), env={**SECRETS, "WANDB_BASE_URL": server}, timeout=300)
    _assert_ok(proc)
    assert "[redacted]:HF_TOKEN is unreachable" in proc.stdout + proc.stderr
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert any(".hydra" in path.parts for path in files) and any("wandb" in path.parts for path in files)
    assert any("checkpoints" in path.parts for path in files)
    for secret in SECRETS.values():
        assert secret not in proc.stdout + proc.stderr
        leaked = [path for path in files if secret.encode() in path.read_bytes()]
        assert not leaked, f"a secret was written to {leaked}"


# ------------------------------------------------------------------------------ unit level
def test_long_rows_are_truncated_and_counted_unless_refused(tiny, odd, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    examples = load_examples(str(odd["long"]), tokenizer, 32, tmp_path / "cache")
    assert examples.num_truncated == 1 and max(len(row.input_ids) for row in examples.rows) == 32
    # The refusal holds on a cache hit too: the flag is checked on the rows, not kept in the key.
    with pytest.raises(DataError, match=r"long\.jsonl:3 is 66 tokens long.*data\.truncate=true"):
        load_examples(str(odd["long"]), tokenizer, 32, tmp_path / "cache", truncate=False)
    assert len(load_examples(str(odd["long"]), tokenizer, 66, tmp_path / "cache", truncate=False)) == 3


def test_rows_without_a_token_to_learn_are_dropped_and_none_left_is_refused():
    learnable, masked = TokenizedRow([1, 2, 3], [-100, 2, 3]), TokenizedRow([1, 2, 3], [-100] * 3)
    assert supervised_only([masked, learnable, masked], 32) == [learnable]
    with pytest.raises(DataError, match="none of the 2 training rows has a token to learn"):
        supervised_only([masked, masked], 32)


def test_a_native_model_type_with_an_auto_map_loads_without_running_its_code(tiny, tmp_path):
    """transformers ignores `auto_map` for a model type it knows unless trust_remote_code is set,
    so such a checkpoint is not refused (and no module of its own is imported)."""
    from types import SimpleNamespace

    from trainer.models import checks, loading
    folder = _edit_config(_copy_student(tiny, tmp_path, "native"), auto_map={"AutoConfig": "missing_module.Config"})
    cfg = SimpleNamespace(path=str(folder), revision=None, trust_remote_code=False, allow_pickle=False)
    checks.check_model("student", cfg)
    assert loading.load_config("student", cfg).model_type == "llama"


def test_transformers_own_refusal_of_custom_code_is_one_line(odd):
    """A hub id is not on disk to check beforehand: transformers refuses it, and that is one line."""
    from types import SimpleNamespace

    from trainer.models import loading
    cfg = SimpleNamespace(path=str(odd["remote_code"]), revision=None, trust_remote_code=False)
    with pytest.raises(loading.ModelError) as refused:
        loading.load_config("student", cfg)
    assert "\n" not in str(refused.value) and "student.trust_remote_code=true" in str(refused.value)


def test_log_records_never_hold_a_secret(monkeypatch, caplog):
    from trainer.launch import secrets

    monkeypatch.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    previous = logging.getLogRecordFactory()
    try:
        secrets.redact_secrets_in_logs()
        with caplog.at_level(logging.INFO):
            logging.getLogger("some.library").info("GET with header Authorization: Bearer %s", SECRETS["HF_TOKEN"])
    finally:
        logging.setLogRecordFactory(previous)
    assert SECRETS["HF_TOKEN"] not in caplog.text and "[redacted]:HF_TOKEN" in caplog.text


def test_an_unreachable_wandb_server_is_found_within_the_timeout():
    import time

    from trainer.launch.distributed import free_port
    from trainer.outputs.tracking import _unreachable

    started = time.perf_counter()
    assert _unreachable(f"http://127.0.0.1:{free_port()}", timeout=2.0)
    assert time.perf_counter() - started < 2.5


def test_lora_targets_are_checked_on_the_config_alone(tiny):
    from types import SimpleNamespace

    from transformers import AutoConfig

    from trainer.models import loading, lora
    config = AutoConfig.from_pretrained(tiny["student"])
    assert "q_proj" in lora.check_lora_targets(config, SimpleNamespace(target_modules="all-linear"), False)
    assert lora.check_lora_targets(config, SimpleNamespace(target_modules=["q_proj", "v_proj"]), False)
    with pytest.raises(loading.ModelError, match=r"\['nope_proj'\] match no module.*q_proj"):
        lora.check_lora_targets(config, SimpleNamespace(target_modules=["nope_proj"]), False)
