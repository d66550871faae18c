"""Content-addressed blob store (``blobs/sha256/<2 hex>/<hash>``) and hashing.

A user's file is copied into the store (verified against the hash while copying), never
hard-linked: a blob is read-only, and sharing its inode would silently make the user's own file
read-only too (and let an edit in place corrupt the registered bytes). Files the tool itself just
wrote into a temporary place (``link=True``: a converted import, a staging file) are linked, so
they cost nothing more than the hash. Blobs lose their write bits and are written via temp file
+ fsync + rename, so a crash never leaves a half blob under a final name. MLflow artifact
folders hold hard links to blobs (our own files).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import stat
import struct
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from lbm_registry.errors import RegistryError
from lbm_registry.lbm.header import parse_header_json

CHUNK = 8 * 1024 * 1024
TMP_PREFIX = ".tmp-"


def sha256_file(path: str | Path, *, offset: int = 0, cancel: threading.Event | None = None) -> str:
    """Hex sha256 of a file from ``offset`` on, read in 8 MB chunks (``cancel`` set: stop early,
    raising :class:`DigestCancelled`)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if offset:
            fh.seek(offset)
        while chunk := fh.read(CHUNK):
            if cancel is not None and cancel.is_set():
                raise DigestCancelled(str(path))
            h.update(chunk)
    return h.hexdigest()


class DigestCancelled(Exception):
    """A :class:`BackgroundDigest` was cancelled before it finished."""


class BackgroundDigest:
    """A file's sha256 (from ``offset`` on) computed on a thread at the lowest CPU priority.

    Why: resolving a plain 5 GB file hashes it (~4 s a file on one core), and an extraction
    needs three such hashes of its inputs (both files, and the base's tensor bytes) before it
    can record what it was made from: 8 s on two cores, a quarter of its time. The extraction
    itself keeps the cores only partly busy (reads, small layers, OpenMP waits), so the hashes
    run beside it at nice 19 (Linux sets it per thread) and take only the idle time: measured on
    2 cores, extraction 17.1 s alone and 16.4-17.9 s with the three hashes running, end to end
    28 s -> 22 s. The hash is needed only when the result is recorded: :meth:`result` waits.

    ``stat`` is the file's (size, mtime_ns) when hashing started, for a hash cache: a file
    changed meanwhile must not be remembered under its new stamp.
    """

    def __init__(self, path: str | Path, *, offset: int = 0, name: str = "lbm-hash") -> None:
        self.path = Path(path)
        st = self.path.stat()
        self.stat = (st.st_size, st.st_mtime_ns)
        self._offset = offset
        self._cancel = threading.Event()
        self._sha: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        _lowest_priority()
        try:
            self._sha = sha256_file(self.path, offset=self._offset, cancel=self._cancel)
        except BaseException as exc:  # handed to result()
            self._error = exc

    def result(self) -> str:
        """The hex digest, once the thread is done; its OSError (or cancellation) is raised here."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._sha is not None
        return self._sha

    def cancel(self) -> None:
        """Stop hashing at the next chunk (the thread ends on its own; nothing waits for it)."""
        self._cancel.set()


def _lowest_priority() -> None:
    """Nice the calling thread to 19 where the OS sets niceness per thread (Linux); else nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (OSError, AttributeError):  # a sandbox may refuse; the hash still runs, only sooner
        pass


def blob_relpath(sha256: str) -> str:
    """Where a hash lives, relative to the workspace home (stored in the catalog)."""
    return f"blobs/sha256/{sha256[:2]}/{sha256}"


def blob_path(blobs_dir: Path, sha256: str) -> Path:
    return blobs_dir / sha256[:2] / sha256


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _copy_hashing(src: Path, dst: Path) -> str:
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(CHUNK):
            h.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest()


def store_blob(src: Path, sha256: str, size: int, blobs_dir: Path, *, replace: bool = False,
               link: bool = False) -> tuple[Path, str]:
    """Put ``src`` (whose hash is ``sha256``) into the store; returns (blob path, how).

    ``how`` is ``"existing"`` (same bytes already stored: nothing written), ``"link"`` or
    ``"copy"``. ``replace`` overwrites a blob known to be damaged. ``link``: ``src`` is a file of
    ours that nobody else will edit, so it may become the blob itself (hard link) instead of
    being copied.
    """
    dest = blob_path(blobs_dir, sha256)
    if not replace and dest.is_file() and dest.stat().st_size == size:
        make_read_only(dest)
        return dest, "existing"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        try:
            if not link:
                raise OSError("copy requested")
            os.link(src, tmp)
            how = "link"
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        except OSError:
            how = "copy"
            got = _copy_hashing(src, tmp)
            if got != sha256:
                raise RegistryError(f"{src} changed while it was being registered (sha256 {got[:12]}, "
                                    f"expected {sha256[:12]})") from None
        if tmp.stat().st_size != size:
            raise RegistryError(f"{src} changed while it was being registered (size)")
        make_read_only(tmp)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest, how


def make_read_only(path: Path) -> None:
    """Drop the write bits only: who may read a blob stays what the umask (or the source) said."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o222:
        os.chmod(path, mode & ~0o222)


def link_or_copy(src: Path, dst: Path) -> str:
    """Hard link ``src`` at ``dst`` (copy only where linking fails; never a symlink)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
        return "link"
    except OSError:
        shutil.copyfile(src, dst)
        return "copy"


def iter_blob_files(blobs_dir: Path) -> Iterator[Path]:
    """Every file in the store, including temp files left by crashed writers."""
    if not blobs_dir.is_dir():
        return
    for sub in sorted(blobs_dir.iterdir()):
        if sub.is_dir():
            yield from sorted(p for p in sub.iterdir() if p.is_file())


def tmp_owner_pid(path: Path) -> int | None:
    """PID encoded in a temp blob's name (``.tmp-<pid>-<token>``)."""
    if not path.name.startswith(TMP_PREFIX):
        return None
    try:
        return int(path.name[len(TMP_PREFIX):].split("-", 1)[0])
    except ValueError:
        return None


_ST_DTYPES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp64", "F8_E4M3": "fp8_e4m3",
              "F8_E5M2": "fp8_e5m2", "I64": "int64", "I32": "int32", "I8": "int8", "U8": "uint8"}


def sniff_dtype(path: Path) -> str | None:
    """The dominant floating dtype of a safetensors file, read from its JSON header only."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or n > 100 * 1024 * 1024:
                return None
            header = parse_header_json(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    weight: dict[str, int] = {}
    for key, info in header.items():
        if key == "__metadata__" or not isinstance(info, dict):
            continue
        dt = str(info.get("dtype", ""))
        if not dt.startswith(("F", "BF")):
            continue
        try:
            start, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            continue
        weight[dt] = weight.get(dt, 0) + int(end) - int(start)
    if not weight:
        return None
    best = max(weight, key=lambda k: weight[k])
    return _ST_DTYPES.get(best, best.lower())
