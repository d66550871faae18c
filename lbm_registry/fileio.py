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


def folder_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be (made) a folder, or None: it is a file, or a file stands where
    one of its parent folders would go. Cheap (no writes): for checks before long work."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists() or q.is_symlink():
            if q.is_dir():
                return None
            return f"{p} is a file, not a folder" if q == p else f"{q} is a file, so {p} cannot be a folder in it"
    return None


def output_file_problem(path: str | Path, what: str = "--output") -> str | None:
    """Why ``path`` cannot be written as a file (it is a folder, or a file stands where its
    folder would go), as a message naming ``what``; None when it can. Checked before any work."""
    p = Path(path)
    if p.is_dir():
        return f"{what} {p} is a folder, expected a .safetensors file name" if p.suffix in ("", ".safetensors") \
            else f"{what} {p} is a folder, expected a file name"
    problem = folder_problem(p.parent)
    return None if problem is None else f"cannot write {what} {p}: {problem}"


def check_output_file(path: str | Path | None, error: type[Exception], what: str = "--output") -> None:
    """Raise ``error`` (the caller's one-line error type) when ``path`` is given and
    :func:`output_file_problem` finds a reason it cannot be written."""
    if path is not None and (problem := output_file_problem(path, what)) is not None:
        raise error(problem)


def make_folder(path: str | Path, what: str = "output folder") -> Path:
    """``mkdir -p`` with a one-line :class:`ConfigError` instead of an OSError traceback."""
    from lbm_registry.errors import ConfigError

    p = Path(path)
    problem = folder_problem(p)
    if problem is not None:
        raise ConfigError(f"{what}: {problem}")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot create {p}: {exc.strerror or exc}") from None
    return p


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
    if dest.is_dir():
        from lbm_registry.errors import ConfigError

        raise ConfigError(f"cannot write {dest}: it is a folder")
    make_folder(dest.parent, f"cannot write {dest}")
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
