"""Small file-system helpers: atomic writes that respect the umask, and an advisory lock."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from .errors import CxrlabError


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (threads share it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from open(): 0666 less the umask (mkstemp would give 0600)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode a new folder gets from mkdir: 0777 less the umask (mkdtemp would give 0700)."""
    return 0o777 & ~current_umask()


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new hidden folder in ``parent`` with the umask's mode, to be renamed into place when complete."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=".tmp"))
    os.chmod(path, dir_mode())
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if exc.errno == errno.ENOSPC:
            raise CxrlabError(f"{path}: no space left on the device; nothing was written. Free some space and run again.") from None
        raise


@contextlib.contextmanager
def file_lock(path: str | os.PathLike):
    """An exclusive advisory lock (fcntl) held for the duration of the block."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
