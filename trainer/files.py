"""Writing files so that a reader, or a restarted job, never sees half of one, and colleagues
sharing the filesystem can read them as the user's umask allows."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, write) -> None:
    """`write(temporary_path)`, then rename over `path`: the rename is atomic within a folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        # mkstemp makes the file owner-only (and some writers, safetensors among them, replace it
        # with an owner-only file of their own): give it the mode `open()` would have.
        os.chmod(temporary, default_file_mode())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda temporary: Path(temporary).write_text(text))


def default_file_mode() -> int:
    """The mode `open()` gives a new file: rw for everyone, less the process's umask."""
    return 0o666 & ~_umask()


def honour_umask(folder: Path) -> None:
    """Give every file under `folder` the mode `open()` would: for folders written by libraries that
    make some files owner-only (safetensors' `save_file`, used by `save_pretrained`, does)."""
    mode = default_file_mode()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def _umask() -> int:
    """Read without changing it where Linux shows it: setting it, even back at once, races with
    other threads creating files."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask
