"""Torch-free file writing helpers: atomic replace that keeps the umask's permissions.

``tempfile.mkstemp`` creates files ``0600`` (and ``mkdtemp`` folders ``0700``) whatever the
umask, so a temp-file-and-rename write would leave every output private to its owner. Every
atomic write here gives the final file the mode a plain ``open(path, "w")`` would have.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # the portable way: set and restore
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new regular file gets from ``open(..., "w")``: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode a new folder gets from ``mkdir``: ``0o777 & ~umask``."""
    return 0o777 & ~current_umask()


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """``mkdtemp`` next to its final place, with the umask's folder mode (not 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, dir_mode())
    return path


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``dest``; rename onto ``dest`` only if the block succeeds.

    The renamed file has the umask's permissions (``0o666 & ~umask``), like any tool's output.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # the block may have replaced the file: set the mode last
            os.chmod(tmp_path, file_mode())
        os.replace(tmp_path, dest)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
