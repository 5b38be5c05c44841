"""Writing files so that a reader, or a restarted job, never sees half of one, and colleagues
sharing the filesystem can read them as the user's umask allows; a failed write told in the OS's
words, with the disk to clear named."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from trainer.errors import first_line


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


def write_failure_reason(error: BaseException, folder: Path) -> str:
    """The OS's words for a failed write into `folder`: `No space left on device` for a full disk,
    however the writer put it (torch: `unexpected pos N vs M`; safetensors: `(os error 28)`)."""
    code = getattr(error, "errno", None)
    if code is None and (match := re.search(r"\(os error (\d+)\)", str(error))):
        code = int(match.group(1))
    if code not in (errno.ENOSPC, errno.EDQUOT):
        code = _disk_full_errno(folder) or code
    return os.strerror(code) if code else first_line(error)


def _disk_full_errno(folder: Path) -> int | None:
    """ENOSPC or EDQUOT when `folder` cannot take one more block of data now, else None.

    torch.save reports a short write as `unexpected pos N vs M`, dropping the OS's error: ask the
    disk again, with a write of our own (synced: a network filesystem reports a full disk then)."""
    try:
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(b"\0" * 65536)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        return error.errno if error.errno in (errno.ENOSPC, errno.EDQUOT) else None
    return None


def free_space(folder: Path) -> str:
    """`N MiB free on the filesystem at <mount point>`: the disk to clear, named."""
    if not folder.exists():
        return "the folder could not be created"
    mount = folder.resolve()
    while not os.path.ismount(mount):
        mount = mount.parent
    return f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free on the filesystem at {mount}"


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
