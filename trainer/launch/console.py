"""What a run shows on the terminal, and what only its log file keeps.

The terminal shows our own lines (loggers `trainer`, `hydra`, `__main__`), the progress bar, every
error, and third-party warnings that may need the user's attention, each once. The log file keeps
all of that plus what third-party libraries say for their own developers, each message once:
their INFO lines (the compiler commands of DeepSpeed's op probes), Python's deprecation warnings
(addressed to the code that calls the library, i.e. ours; a loop repeats them every step because
libraries reset the warnings registry) and DeepSpeed notes that are expected in normal use here.

Two calls from `trainer.launch.cli`: :func:`hold_third_party_output` first thing (before DeepSpeed may be
imported; records made before Hydra opens the log file wait for it), then
:func:`send_third_party_output_to_log` once Hydra has set up the job's logging. A user who asks for
Python's warnings (`-W`, `PYTHONWARNINGS`) gets them on the terminal as usual.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import sys
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

OWN_LOGGERS = ("trainer", "hydra", "__main__")
# Addressed to the developers of the code that calls the library, not to the person running it.
DEVELOPER_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
# DeepSpeed's own logger does not propagate and prints to stdout; it is redirected by name.
DEEPSPEED_LOGGER = "DeepSpeed"
# DeepSpeed warnings that every run of this trainer triggers and that ask nothing of the user:
# the client optimizer is torch's AdamW on purpose (no C++ op to build).
EXPECTED_DEEPSPEED_NOTES = ("You are using ZeRO with an untested optimizer",)
# Expected only where torch has no GPU support at all; with a CUDA build it means a GPU was not found.
CPU_FALLBACK_NOTE = "Setting accelerator to CPU"
COMM_OP_NAME = "deepspeed_shm_comm"  # DeepSpeed's ShareMemCommBuilder.NAME
_HELD_LIMIT = 10_000
_held: _HeldRecords | None = None  # records made before the log file exists


def hold_third_party_output() -> None:
    """Before anything imports DeepSpeed: give this environment its own op build folder, turn
    Python's warnings into log records, and keep third-party records until the log file exists.
    Idempotent."""
    use_own_extensions_dir()
    if not sys.warnoptions:
        warnings.showwarning = _log_warning
    deepspeed_logger = logging.getLogger(DEEPSPEED_LOGGER)
    if not any(isinstance(f, _ThroughRoot) for f in deepspeed_logger.filters):
        deepspeed_logger.addFilter(_ThroughRoot())
    global _held
    root = logging.getLogger()
    if not root.handlers and _held is None:  # nothing configured yet: hold records for the log file
        _held = _HeldRecords()
        root.addHandler(_held)
        root.setLevel(min(root.level, logging.INFO))


def send_third_party_output_to_log() -> None:
    """Once Hydra has configured the job's logging: its console handlers show only what belongs
    on the terminal, its log file gets each third-party message once, and records held since
    start-up are written to the file. Called again for each job of a sweep (Hydra's new handlers)."""
    global _held
    hold_third_party_output()
    _let_transformers_propagate()
    root = logging.getLogger()
    held, _held = _held, None
    if held is not None:
        root.removeHandler(held)  # Hydra's logging setup has usually removed it already
    if not root.handlers:  # a rank without Hydra's job logging: errors and real warnings still show
        root.addHandler(logging.StreamHandler(sys.stderr))
    for handler in root.handlers:
        _filter_once(handler, OncePerMessage if _writes_a_file(handler) else TerminalFilter)
    if held is not None:
        _write_to_log_files(held.records, root)


def belongs_on_terminal(record: logging.LogRecord) -> bool:
    """Ours, an error, or a third-party warning that may ask something of the user: not a
    deprecation addressed to our developers, not a DeepSpeed note every run here triggers. An
    unknown third-party warning shows (once): hiding it could hide a real problem."""
    if _is_ours(record) or record.levelno >= logging.ERROR:
        return True
    if record.levelno < logging.WARNING:
        return False
    category = getattr(record, "warning_category", None)
    if category is not None:
        return not issubclass(category, DEVELOPER_WARNINGS)
    if record.name != DEEPSPEED_LOGGER:
        return True
    message = record.getMessage()
    if message.startswith(CPU_FALLBACK_NOTE):
        return _torch_has_gpu_support()
    return not any(note in message for note in EXPECTED_DEEPSPEED_NOTES)


class OncePerMessage(logging.Filter):
    """Each third-party message passes once per handler; our own lines always pass."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if _is_ours(record):
            return True
        key = (record.name, record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


class TerminalFilter(OncePerMessage):
    def filter(self, record: logging.LogRecord) -> bool:
        return belongs_on_terminal(record) and super().filter(record)


def use_own_extensions_dir() -> None:
    """DeepSpeed builds its ops with torch into `TORCH_EXTENSIONS_DIR`. torch's default folder is
    shared by every environment of the user, and another environment's build (other source paths)
    makes ninja rebuild the op (a minute or more) on the next run here. One folder per environment
    makes it one build per environment. A folder the user chose is kept."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(own_extensions_dir()))


def own_extensions_dir(prefix: str | None = None) -> Path:
    """`~/.cache/torch_extensions/<environment>-<hash of its path>`: per user (like torch's own
    default) and per environment; outside the environment, which may be read-only."""
    prefix = os.path.realpath(prefix or sys.prefix)
    digest = hashlib.sha256(prefix.encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "torch_extensions" / f"{Path(prefix).name.lstrip('.') or 'python'}-{digest}"


def announce_comm_op_build(device_type: str) -> None:
    """DeepSpeed compiles its shared-memory communication op for CPU ranks the first time, silently
    (50-90 s on an idle machine, minutes on a busy one): say so beforehand, on the first rank. A GPU
    run does not build it."""
    if device_type != "cpu" or os.environ.get("RANK", "0") != "0" or comm_op_is_built():
        return
    if not _deepspeed_can_build(COMM_OP_NAME):  # no compiler: DeepSpeed goes without the op
        return
    log.info("building DeepSpeed's CPU communication op once for this environment (a minute or more; "
             "later runs reuse it from %s)...", os.environ["TORCH_EXTENSIONS_DIR"])


def comm_op_is_built() -> bool:
    folder = os.environ.get("TORCH_EXTENSIONS_DIR")
    if folder is None:  # not ours to judge: torch's default folder
        return True
    # With TORCH_EXTENSIONS_DIR set, torch builds an op in <dir>/<name>/<name>.so.
    return (Path(folder) / COMM_OP_NAME / f"{COMM_OP_NAME}.so").exists()


@contextlib.contextmanager
def prints_to_log(logger_name: str):
    """What the code inside prints to stdout (DeepSpeed's "... built successfully") becomes INFO
    records of `logger_name`: in the log file, not on the terminal."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        printed = logging.getLogger(logger_name)
        for line in captured.getvalue().splitlines():
            if line.strip():
                printed.info(line)


def _deepspeed_can_build(op_name: str) -> bool:
    import deepspeed.ops

    # DeepSpeed's own probe (run once per process, and by DeepSpeed itself right after this).
    return bool(getattr(deepspeed.ops, "__compatible_ops__", {}).get(op_name, False))


def _is_ours(record: logging.LogRecord) -> bool:
    return any(record.name == name or record.name.startswith(name + ".") for name in OWN_LOGGERS)


def _torch_has_gpu_support() -> bool:
    import torch

    return torch.version.cuda is not None or torch.version.hip is not None


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning`: a py.warnings record that remembers the warning's category."""
    text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
    logging.getLogger("py.warnings").warning(text, extra={"warning_category": category})


class _ThroughRoot(logging.Filter):
    """On DeepSpeed's logger, which prints to stdout and does not propagate: hand each record to
    the root logger's handlers (terminal and log file, filtered) instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        logging.getLogger().handle(record)
        return False


class _HeldRecords(logging.Handler):
    """Before Hydra opens the log file: keep third-party records for it; show ours and errors now."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.terminal = logging.StreamHandler(sys.stderr)
        self.terminal.addFilter(TerminalFilter())

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < _HELD_LIMIT:
            self.records.append(record)
        self.terminal.handle(record)


def _let_transformers_propagate() -> None:
    """transformers prints through its own stderr handler and does not propagate; send its
    records through the root logger's filtered handlers instead."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()


def _write_to_log_files(records: list[logging.LogRecord], root: logging.Logger) -> None:
    """Records held since start-up, into the log file only: the terminal has shown its share."""
    for record in records:
        for handler in root.handlers:
            if _writes_a_file(handler) and record.levelno >= handler.level:
                handler.handle(record)


def _writes_a_file(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.FileHandler)


def _filter_once(handler: logging.Handler, kind: type) -> None:
    if not any(isinstance(f, OncePerMessage) for f in handler.filters):
        handler.addFilter(kind())
