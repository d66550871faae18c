"""Torch-free file writing helpers: atomic replace that keeps the umask's permissions.

``tempfile.mkstemp`` creates files ``0600`` (and ``mkdtemp`` folders ``0700``) whatever the
umask, so a temp-file-and-rename write would leave every output private to its owner. Every
atomic write here gives the final file the mode a plain ``open(path, "w")`` would have.
"""

from __future__ import annotations

import errno
import os
import stat
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


#: What a registry home holds that no output may replace or write into (see registry/workspace.py):
#: first path component inside the home -> what it is.
WORKSPACE_MANAGED = {"catalog.db": "catalog", "mlflow.db": "MLflow store", "blobs": "blob store",
                     ".locks": "locks", "artifacts": "MLflow artifacts"}
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
#: errno values that mean the machine refused a write (full disk, read-only, permissions, size limit).
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
REFUSAL_ERRNOS = SPACE_ERRNOS | {errno.EROFS, errno.EACCES, errno.EPERM}


def _is_workspace(folder: Path) -> bool:
    """Does ``folder`` hold a registry (its catalog, its MLflow store or its blob store)?"""
    try:
        return ((folder / "catalog.db").is_file() or (folder / "mlflow.db").is_file()
                or (folder / "blobs" / "sha256").is_dir())
    except OSError:
        return False


def managed_path_problem(path: str | Path, what: str = "--output") -> str | None:
    """Why ``path`` must not be written: it is (or lies inside) a file or folder a registry manages
    (catalog, MLflow store and their SQLite side files, blobs, locks, MLflow artifacts), in any
    registry home found above it, symlinks resolved. None when it is outside all of them."""
    real = Path(os.path.realpath(path))
    for home in real.parents:
        if not _is_workspace(home):
            continue
        first = real.relative_to(home).parts[0]
        entry = next((first[:-len(s)] for s in SQLITE_SIDE_FILES
                      if first.endswith(s) and first[:-len(s)] in WORKSPACE_MANAGED), first)
        if entry in WORKSPACE_MANAGED:
            return (f"{what} {path} is inside the registry at {home} (its {WORKSPACE_MANAGED[entry]}, "
                    f"{home / first}): writing there would damage it; choose a path outside")
    return None


def _special_kind(mode: int) -> str | None:
    """What a non-regular, non-folder file is (outputs are regular files), or None."""
    for test, kind in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else "special file"


def _existing_output(p: Path, what: str) -> tuple[os.stat_result | None, str | None]:
    """(stat of what ``p`` names, symlinks followed, or None when nothing is there; a refusal):
    the checks every output path gets first, a registry's own files and dangling symlinks."""
    if (problem := managed_path_problem(p, what)) is not None:
        return None, problem
    if p.is_symlink() and not p.exists():
        try:
            target = os.readlink(p)
        except OSError:
            target = "?"
        return None, (f"{what} {p} is a symlink to {target}, which does not exist "
                      "(a symlink is written through, as cp does: its target must exist)")
    try:
        return p.stat(), None
    except (FileNotFoundError, NotADirectoryError):  # nothing there (a file where a folder would be:
        return None, None                            # folder_problem says so next)
    except OSError as exc:
        return None, f"cannot write {what} {p}: {exc.strerror or exc}"


def output_file_problem(path: str | Path, what: str = "--output") -> str | None:
    """Why ``path`` cannot be written as a file, as a message naming ``what``; None when it can.

    Refused: a folder; a device, FIFO or socket (outputs are regular files: writing one would
    replace the node, or block on it); a dangling symlink; a path inside a registry's own files
    (:func:`managed_path_problem`); a path whose folder cannot exist. A symlink to a file is
    written through, as ``cp`` does. Checked before any work (cheap: no writes)."""
    p = Path(path)
    st, problem = _existing_output(p, what)
    if problem is not None:
        return problem
    if st is not None and stat.S_ISDIR(st.st_mode):
        return f"{what} {p} is a folder, expected a .safetensors file name" if p.suffix in ("", ".safetensors") \
            else f"{what} {p} is a folder, expected a file name"
    if st is not None and (kind := _special_kind(st.st_mode)) is not None:
        return f"{what} {p} is a {kind}, not a regular file: give a file name"
    problem = folder_problem(p.parent)
    return None if problem is None else f"cannot write {what} {p}: {problem}"


def output_folder_problem(path: str | Path, what: str = "--output") -> str | None:
    """Why ``path`` cannot be an output folder (a file or a device is there, a file stands where a
    parent folder would go, or it lies inside a registry's own files); None when it can."""
    p = Path(path)
    st, problem = _existing_output(p, what)
    if problem is not None:
        return problem
    if st is not None and (kind := _special_kind(st.st_mode)) is not None:
        return f"{what} {p} is a {kind}, not a folder"
    if (problem := folder_problem(p)) is not None:
        return f"{what}: {problem}"
    return None


def check_output_file(path: str | Path | None, error: type[Exception], what: str = "--output") -> None:
    """Raise ``error`` (the caller's one-line error type) when ``path`` is given and
    :func:`output_file_problem` finds a reason it cannot be written."""
    if path is not None and (problem := output_file_problem(path, what)) is not None:
        raise error(problem)


def check_output_folder(path: str | Path | None, error: type[Exception], what: str = "--output") -> None:
    """:func:`check_output_file` for an output that is a folder (:func:`output_folder_problem`)."""
    if path is not None and (problem := output_folder_problem(path, what)) is not None:
        raise error(problem)


def write_target(path: str | Path) -> Path:
    """Where writing ``path`` puts the bytes: the file a symlink points to (written through, as
    ``cp`` does, so the link stays a link), else ``path`` itself."""
    p = Path(path)
    return Path(os.path.realpath(p)) if p.is_symlink() else p


def storage_error(exc: OSError, path: str | Path) -> Exception | None:
    """The one-line :class:`~lbm_registry.errors.StorageError` (exit 1) for an OSError that is the
    machine refusing (disk full, read-only, permissions, file too large), naming the file: for a
    lack of space the one being written, ``path`` (the OS names none, or a copy's source); for a
    refusal the one the OS named, else ``path``. None for any other OSError."""
    if exc.errno not in REFUSAL_ERRNOS:
        return None
    from lbm_registry.errors import StorageError

    reason = exc.strerror or str(exc)
    if exc.errno in SPACE_ERRNOS or not exc.filename:
        return StorageError(f"cannot write {path}: {reason}")
    return StorageError(f"{exc.filename}: {reason}")


@contextmanager
def refusals_named(path: str | Path) -> Iterator[None]:
    """Turn a refused write inside the block (ENOSPC, EROFS...) into one StorageError naming ``path``:
    a full disk says "No space left on device" with no file name of its own."""
    try:
        yield
    except OSError as exc:
        if (err := storage_error(exc, path)) is not None:
            raise err from None
        raise


def make_folder(path: str | Path, what: str = "output folder") -> Path:
    """``mkdir -p`` with a one-line error instead of an OSError traceback: :class:`ConfigError`
    when a file is in the way, :class:`StorageError` when the machine refuses (read-only, full)."""
    from lbm_registry.errors import ConfigError

    p = Path(path)
    problem = folder_problem(p)
    if problem is not None:
        raise ConfigError(f"{what}: {problem}")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if (err := storage_error(exc, p)) is not None:
            raise err from None
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
    Every output goes through here, so here is the last check (:func:`output_file_problem`): a
    device, FIFO or socket is never replaced, a registry's own files are never written, a symlink
    is written through (its target gets the bytes, the link stays). A write the machine refuses
    (full disk, read-only folder) is one :class:`~lbm_registry.errors.StorageError` naming the file.
    """
    from lbm_registry.errors import ConfigError

    dest = Path(dest)
    if dest.is_dir():
        raise ConfigError(f"cannot write {dest}: it is a folder")
    if (problem := output_file_problem(dest, "output")) is not None:
        raise ConfigError(problem)
    target = write_target(dest)
    make_folder(target.parent, f"cannot write {dest}")
    with refusals_named(target):
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with refusals_named(target):
            yield tmp_path
            if tmp_path.exists():  # the block may have replaced the file: set the mode last
                os.chmod(tmp_path, file_mode())
            os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
