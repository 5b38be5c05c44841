"""One base for the errors a user can fix, and the command line that reports any of them in one line."""

from __future__ import annotations

import ast
import contextlib
import importlib
import types
from pathlib import Path

import pytest

from trainer.errors import UserError

TRAINER = Path(__file__).resolve().parents[1] / "trainer"

# Exception classes whose message is not a user's to act on, and why.
NOT_USER_ERRORS = {
    # Control flow: the job saved its checkpoint and exits 75 for a requeue (trainer/launch/preemption.py).
    "trainer.launch.preemption.Preempted",
    # A fragment naming a file; trainer/models/checks.py wraps it into a ModelError naming the setting.
    "trainer.models.files.WeightsFileError",
}


def defined_exception_classes() -> list[str]:
    """`module.Class` of every class in trainer/ deriving from an exception, read from the source."""
    found = []
    for path in sorted(TRAINER.rglob("*.py")):
        module = ".".join(path.relative_to(TRAINER.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(_looks_like_an_exception(base) for base in node.bases):
                found.append(f"{module}.{node.name}")
    return found


def _looks_like_an_exception(base: ast.expr) -> bool:
    name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
    return name.endswith(("Error", "Exception"))  # ValueError, UserError, DataError, Exception, ...


def _load(qualified: str) -> type:
    module, _, name = qualified.rpartition(".")
    return getattr(importlib.import_module(module), name)


USER_ERRORS = [name for name in defined_exception_classes() if name not in NOT_USER_ERRORS]


def test_the_errors_the_brief_names_are_all_found():
    # Guards the search itself: were it to miss classes, the test below would pass on nothing.
    for name in ("trainer.config.ConfigError", "trainer.data.sources.DataError", "trainer.models.loading.ModelError",
                 "trainer.train.checkpoints.CheckpointError", "trainer.cache.store.CacheError",
                 "trainer.preflight.licences.LicenceError", "trainer.launch.rundir.RunDirError",
                 "trainer.train.nonfinite.TrainingDiverged", "trainer.report.runs.NotARunDirectory"):
        assert name in USER_ERRORS


@pytest.mark.parametrize("name", USER_ERRORS)
def test_every_error_a_user_acts_on_is_a_user_error(name):
    assert issubclass(_load(name), UserError), f"{name} should derive from trainer.errors.UserError"


@pytest.mark.parametrize("name, other_base", [
    ("trainer.config.ConfigError", ValueError), ("trainer.data.sources.DataError", ValueError),
    ("trainer.models.loading.ModelError", ValueError), ("trainer.cache.store.CacheError", ValueError),
    ("trainer.preflight.licences.LicenceError", ValueError), ("trainer.report.runs.NotARunDirectory", ValueError),
    ("trainer.train.checkpoints.CheckpointError", RuntimeError), ("trainer.launch.rundir.RunDirError", RuntimeError),
    ("trainer.train.nonfinite.TrainingDiverged", RuntimeError),
])
def test_each_keeps_its_other_base_so_existing_excepts_still_catch_it(name, other_base):
    assert issubclass(_load(name), other_base)


class _NewUserError(UserError):
    """One no list in the command line names: the CLI must report it by its base alone."""


@pytest.fixture
def bare_run_entry(monkeypatch, tmp_path):
    """`run_entry` with its process group, run directory and logging set-up stubbed out: what is left
    is how it reports what the task raised."""
    from hydra.core.hydra_config import HydraConfig

    from trainer.launch import cli, distributed, rundir, secrets

    runtime = types.SimpleNamespace(runtime=types.SimpleNamespace(output_dir=str(tmp_path)))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: runtime))
    monkeypatch.setattr(distributed, "init_distributed", lambda: types.SimpleNamespace(is_main=True))
    monkeypatch.setattr(rundir, "claim_run_dir", lambda *args: contextlib.nullcontext(None))
    monkeypatch.setattr(secrets, "redact_secrets_in_logs", lambda: None)
    monkeypatch.setattr(cli, "send_third_party_output_to_log", lambda: None)
    monkeypatch.setattr(cli, "_quiet_other_ranks", lambda is_main: None)
    return cli.run_entry


def _raising(error: BaseException):
    def task(cfg, rank, run_dir):
        raise error
    return task


def test_the_cli_reports_any_user_error_in_one_line_with_exit_status_2(bare_run_entry, capsys):
    with pytest.raises(SystemExit) as stopped:
        bare_run_entry(_raising(_NewUserError("train.lr=9 is too large; use train.lr=2e-4.")), cfg=None)
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "distill: error: train.lr=9 is too large; use train.lr=2e-4.\n"


def test_any_other_error_is_a_bug_and_keeps_its_traceback(bare_run_entry):
    with pytest.raises(ZeroDivisionError):
        bare_run_entry(_raising(ZeroDivisionError("a bug")), cfg=None)
