"""Third-party noise stays off the terminal and lands in the run's log file, once (`trainer.launch.console`)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
from conftest import run_cli, tiny_overrides

from trainer.launch import console

# What DeepSpeed, setuptools, transformers and torch put on a user's terminal before (issue 17, item 12).
KNOWN_NOISE = {
    "deepspeed accelerator": "we were unable to detect it",
    "aio probe": "-laio",
    "op build": "deepspeed_shm_comm_op built successfully",
    "untested optimizer": "untested optimizer, proceed with caution",
    "transformers FutureWarning": "`is_gradient_checkpointing` is deprecated",
    "torch.distributed FutureWarning": "`torch.distributed.all_gather_into_tensor` is deprecated",
}


def record(name: str, level: int, message: str, **extra) -> logging.LogRecord:
    made = logging.LogRecord(name, level, __file__, 1, message, None, None)
    made.__dict__.update(extra)
    return made


@pytest.mark.parametrize("name, level, message, extra, shown", [
    ("trainer.train.job", logging.INFO, "student: 17408 trainable parameters", {}, True),
    ("trainer.train.job", logging.DEBUG, "details", {}, True),
    ("hydra._internal", logging.INFO, "#0 : loss.temperature=2", {}, True),
    ("compilers.C.base", logging.INFO, "gcc /tmp/x/test.o -laio -o /tmp/x/a.out", {}, False),
    ("DeepSpeed", logging.WARNING, "You are using ZeRO with an untested optimizer, proceed with caution", {}, False),
    ("py.warnings", logging.WARNING, "x.py:1: FutureWarning: deprecated", {"warning_category": FutureWarning}, False),
    ("py.warnings", logging.WARNING, "x.py:1: DeprecationWarning: old", {"warning_category": DeprecationWarning},
     False),
    ("py.warnings", logging.WARNING, "x.py:1: UserWarning: odd input", {"warning_category": UserWarning}, True),
    ("transformers.modeling_utils", logging.WARNING, "Some weights were newly initialized", {}, True),
    ("DeepSpeed", logging.ERROR, "anything at all", {}, True),
    ("torch.distributed", logging.CRITICAL, "a rank died", {}, True),
])
def test_the_terminal_keeps_ours_errors_and_warnings_for_the_user(name, level, message, extra, shown):
    assert console.belongs_on_terminal(record(name, level, message, **extra)) is shown


def test_deepspeeds_cpu_fallback_note_shows_only_where_torch_could_have_used_a_gpu(monkeypatch):
    note = record("DeepSpeed", logging.WARNING, "Setting accelerator to CPU. If you have GPU or other "
                  "accelerator, we were unable to detect it.")
    monkeypatch.setattr(console, "_torch_has_gpu_support", lambda: False)
    assert not console.belongs_on_terminal(note)
    monkeypatch.setattr(console, "_torch_has_gpu_support", lambda: True)  # a CUDA build that found no GPU
    assert console.belongs_on_terminal(note)


def test_each_third_party_message_passes_once_and_ours_every_time():
    once = console.OncePerMessage()
    repeated = [record("py.warnings", logging.WARNING, "c10d_logger.py:83: FutureWarning: deprecated")
                for _ in range(3)]
    ours = [record("trainer.train.job", logging.INFO, "step") for _ in range(3)]
    assert [once.filter(r) for r in repeated] == [True, False, False]
    assert [once.filter(r) for r in ours] == [True, True, True]
    assert once.filter(record("py.warnings", logging.WARNING, "another message"))


def test_the_terminal_shows_a_real_third_party_warning_once():
    terminal = console.TerminalFilter()
    warning = [record("transformers.modeling_utils", logging.WARNING, "newly initialized") for _ in range(2)]
    assert [terminal.filter(r) for r in warning] == [True, False]


def test_each_environment_builds_its_ops_in_a_folder_of_its_own(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first, second = console.own_extensions_dir("/envs/a/.venv"), console.own_extensions_dir("/envs/b/.venv")
    assert first != second and first.parent == second.parent == tmp_path / "torch_extensions"
    assert first == console.own_extensions_dir("/envs/a/.venv")
    assert first.name.startswith("venv-")


def test_a_users_extensions_folder_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    console.use_own_extensions_dir()
    assert console.os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "mine")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    console.use_own_extensions_dir()
    assert console.os.environ["TORCH_EXTENSIONS_DIR"] == str(console.own_extensions_dir())


@pytest.fixture()
def extensions_dir(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(console, "_deepspeed_can_build", lambda name: True)
    return tmp_path


def build_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "building DeepSpeed's CPU communication op" in r.getMessage()]


def test_the_silent_op_build_is_announced_first(extensions_dir, caplog):
    with caplog.at_level(logging.INFO, logger="trainer"):
        console.announce_comm_op_build("cpu")
    assert len(build_messages(caplog)) == 1 and str(extensions_dir) in build_messages(caplog)[0]


def test_no_announcement_once_built_on_a_gpu_or_on_other_ranks(extensions_dir, caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="trainer"):
        console.announce_comm_op_build("cuda")
        monkeypatch.setenv("RANK", "1")
        console.announce_comm_op_build("cpu")
        monkeypatch.setenv("RANK", "0")
        (extensions_dir / console.COMM_OP_NAME).mkdir()
        (extensions_dir / console.COMM_OP_NAME / f"{console.COMM_OP_NAME}.so").write_bytes(b"")
        console.announce_comm_op_build("cpu")
    assert build_messages(caplog) == []


def test_what_deepspeed_prints_becomes_a_log_record(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="deepspeed.comm"), console.prints_to_log("deepspeed.comm"):
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    assert capsys.readouterr().out == ""
    assert [r.getMessage() for r in caplog.records] == [
        "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"]


@pytest.fixture()
def bare_logging(monkeypatch):
    """The logging state of a fresh process (no root handlers), restored afterwards."""
    root, deepspeed_logger = logging.getLogger(), logging.getLogger(console.DEEPSPEED_LOGGER)
    saved = root.handlers[:], root.level, deepspeed_logger.filters[:]
    monkeypatch.setattr(console, "_let_transformers_propagate", lambda: None)  # process-wide; tested end to end
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)  # restored after hold_third_party_output sets it
    with warnings.catch_warnings():  # restores warnings.showwarning too
        warnings.simplefilter("always")
        yield root
    for handler in root.handlers:
        handler.close()
    root.handlers[:], deepspeed_logger.filters[:] = saved[0], saved[2]
    console._held = None
    root.setLevel(saved[1])


def test_early_third_party_records_wait_for_the_log_file_and_stay_off_the_terminal(bare_logging, tmp_path,
                                                                                   capsys):
    bare_logging.handlers.clear()  # here, not in the fixture: pytest adds its own for the test's call
    bare_logging.setLevel(logging.WARNING)
    console.hold_third_party_output()
    deepspeed_logger = logging.getLogger(console.DEEPSPEED_LOGGER)
    deepspeed_logger.warning("You are using ZeRO with an untested optimizer, proceed with caution")
    logging.getLogger("trainer.launch.console").info("building the op")
    # What Hydra's job logging then sets up: a console handler and the run's log file.
    log_file = tmp_path / "__main__.log"
    terminal = logging.StreamHandler()  # sys.stderr as captured now
    bare_logging.handlers[:] = [terminal, logging.FileHandler(log_file)]
    console.send_third_party_output_to_log()
    for _ in range(3):
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning)
    logging.getLogger("trainer.train.job").info("student: 17408 trainable parameters")
    for handler in bare_logging.handlers:
        handler.flush()

    shown = capsys.readouterr().err
    assert "untested optimizer" not in shown and "all_gather_into_tensor" not in shown
    assert "building the op" in shown and "student: 17408" in shown
    kept = log_file.read_text()
    assert kept.count("untested optimizer") == 1 and kept.count("FutureWarning:") == 1
    assert "building the op" in kept and "student: 17408" in kept


def test_python_warnings_the_user_asked_for_are_left_to_python(bare_logging, monkeypatch):
    monkeypatch.setattr(console.sys, "warnoptions", ["default"])
    before = warnings.showwarning
    console.hold_third_party_output()
    assert warnings.showwarning is before


@pytest.mark.slow
def test_a_two_rank_zero3_run_shows_no_third_party_noise_and_logs_it_once(tiny, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", "deepspeed=zero3"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-6000:]
    terminal = proc.stdout + proc.stderr
    for what, text in KNOWN_NOISE.items():
        assert text not in terminal, f"{what} reached the terminal"
    assert "distill:" in proc.stderr, "the progress bar is gone"
    assert "student: " in terminal, "our own log lines are gone"
    assert proc.stdout.strip().splitlines()[-1].startswith("RESULT ")
    kept = (run_dir / "__main__.log").read_text()
    for what, text in KNOWN_NOISE.items():
        # Both ranks write this file (hydra.run.dir is given): each message once per rank.
        assert 1 <= kept.count(text) <= 2, f"{what}: {kept.count(text)} times in the log file"
