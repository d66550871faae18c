"""References (DESIGN.md contract): ``NAME``, ``NAME@latest``, ``NAME@N``, ``NAME@vN``,
``NAME@ALIAS``, ``sha256:PREFIX`` (8+ hex), or a path to an unregistered file.

Also bare ``vN``/``N`` relative to another version (``compare relight@3 v2``), or to the only
LoRA asset when there is exactly one. Unknown names, versions and aliases raise a one-line
:class:`RefError` naming the closest matches.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lbm_registry.errors import RefError, RegistryError, abbreviate
from lbm_registry.registry import catalog
from lbm_registry.registry.blobs import sha256_file
from lbm_registry.registry.catalog import VersionRecord
from lbm_registry.registry.workspace import Workspace

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
VERSION_RE = re.compile(r"[vV]?([0-9]+)")  # ASCII digits only (\d would take '١' as 1)
#: The largest version number a catalog can hold (a signed 64-bit integer column): a larger
#: one names no version, whatever the catalog (never an overflow in the database driver).
MAX_VERSION = 2**63 - 1
HASH_RE = re.compile(r"[0-9a-f]{8,64}")
RESERVED_ALIAS_RE = re.compile(r"latest|[vV]?\d+")


RESERVED_WORDS = ("latest", "sha256")


def name_problem(name: str, what: str = "name") -> str | None:
    """Why ``name`` is not a valid asset name or alias, in words, or None when it is.

    Names are path- and URL-safe: letters, digits, '.', '_' and '-', starting with a letter or
    digit, at most 128 characters; never ``latest``/``sha256`` (they mean something in a
    reference) nor a version number (``v2``, ``12``: ambiguous in ``compare A v2``)."""
    if not name:
        return f"invalid {what}: it is empty"
    bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "._-"))})
    if bad:
        listed = ", ".join(map(repr, bad[:8])) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        return (f"invalid {what} {shown(name)}: {listed} not allowed "
                "(use letters, digits, '.', '_' and '-')")
    if not name[0].isalnum():
        return f"invalid {what} {shown(name)}: it must start with a letter or a digit"
    if len(name) > 128:
        return f"invalid {what} {name[:20]!r}...: longer than 128 characters ({len(name)})"
    if name.lower() in RESERVED_WORDS:
        return f"invalid {what} {name!r}: it is reserved (NAME@latest and sha256:HASH are references)"
    if VERSION_RE.fullmatch(name):
        return f"invalid {what} {name!r}: it looks like a version number"
    return None


def is_reserved_alias(alias: str) -> bool:
    """``latest``, ``vN`` and plain numbers already mean something after ``@``."""
    return bool(RESERVED_ALIAS_RE.fullmatch(alias))


def parse_version(text: str) -> int | None:
    """``N`` or ``vN`` -> N (any size: :data:`MAX_VERSION` bounds what can exist), else None."""
    m = VERSION_RE.fullmatch(text)
    return int(m.group(1)) if m else None


def shown(ref: str) -> str:
    """A reference as messages quote it: overlong input abbreviated, never echoed whole."""
    return repr(abbreviate(ref, 80))


def _path(ref: str) -> Path | None:
    """``ref`` as a path (``~`` expanded), or None when it cannot be one (an unknown ``~user``)."""
    try:
        return Path(ref).expanduser()
    except (RuntimeError, ValueError):
        return None


def is_file(ref: str | Path) -> bool:
    """Does ``ref`` name an existing file? False, not an error, for what cannot be a path at
    all: a name too long for the file system, an unknown ``~user``, a NUL byte."""
    path = _path(str(ref))
    try:
        return path is not None and path.is_file()
    except (OSError, ValueError):
        return False


def is_dir(ref: str | Path) -> bool:
    """Like :func:`is_file`, for a folder."""
    path = _path(str(ref))
    try:
        return path is not None and path.is_dir()
    except (OSError, ValueError):
        return False


@dataclass
class Resolution:
    """A registered version, or an unregistered file (``record`` None)."""

    ref: str
    record: VersionRecord | None = None
    path: Path | None = None
    sha256: str | None = None


def _suggest(word: str, candidates: list[str], n: int = 3) -> str:
    close = difflib.get_close_matches(word, candidates, n=n, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""


def nothing_after_at(ref: str, name: str) -> RefError:
    """The refusal of ``NAME@`` (never read as latest), worded the same wherever it is met."""
    return RefError(f"nothing after '@' in {shown(ref)}: write {name} or {name}@latest, {name}@N, {name}@ALIAS")


def _looks_like_path(ref: str) -> bool:
    return os.sep in ref or "/" in ref or ref.startswith(("~", ".")) or Path(ref).suffix != ""


def resolve(ws: Workspace | None, ref: str, *, relative_to: str | None = None,
            home: Path | None = None, hash_files: bool = True) -> Resolution:
    """Turn a reference into a ready catalog version or a file. ``ws`` None = no registry yet
    (at ``home``, named in the error when the reference needs one).

    ``relative_to`` is the asset name a bare ``vN``/``N`` refers to (compare's other argument).
    ``hash_files=False``: a file's ``sha256`` is its cached hash or None (the caller hashes it,
    e.g. in the background with :class:`~lbm_registry.registry.blobs.BackgroundDigest`).
    """
    ref = ref.strip()
    if not ref:
        raise RefError("empty reference")
    empty = f"there is no registry at {home}" if ws is None and home is not None else "the registry is empty"
    if ref.lower().startswith("sha256:"):
        return Resolution(ref, record=_by_hash(ws, ref, empty))

    name, sep, selector = ref.partition("@")
    if sep and not selector and NAME_RE.fullmatch(name) and not is_file(ref):
        raise nothing_after_at(ref, name)
    if ws is not None and not sep and parse_version(ref) is not None:  # a bare vN / N (names never look so)
        if relative_to:
            return Resolution(ref, record=_by_name(ws, relative_to, ref))
        if not is_file(ref):
            loras = [r["name"] for r in catalog.list_latest(ws.db, "lora")]
            if len(loras) == 1:
                return Resolution(ref, record=_by_name(ws, loras[0], ref))
            raise RefError(f"bare version {shown(ref)} is ambiguous: write NAME@{abbreviate(ref, 40)}"
                           + (f" (LoRAs: {', '.join(loras[:5])})" if loras else " (no LoRA is registered)"))
    if NAME_RE.fullmatch(name) and ws is not None:
        if sep:
            return Resolution(ref, record=_by_name(ws, name, selector))
        if catalog.asset(ws.db, name) is not None:
            return Resolution(ref, record=_by_name(ws, name, "latest"))

    if is_file(ref):
        path = Path(ref).expanduser()
        sha = file_sha256(ws, path) if hash_files else cached_file_sha256(ws, path)
        return Resolution(ref, path=path.absolute(), sha256=sha)
    if is_dir(ref):
        raise RefError(f"{abbreviate(ref, 80)} is a directory, expected a weight file or a registered name")
    if sep and NAME_RE.fullmatch(name):  # NAME@... with no registry at all
        raise RefError(f"unknown asset {name!r} ({empty if ws is None else f'the registry at {ws.home} is empty'})")
    names = catalog.asset_names(ws.db) if ws is not None else []
    hint = _suggest(name, names) if NAME_RE.fullmatch(name) else ""
    if not hint and (_looks_like_path(ref) or not NAME_RE.fullmatch(name)):
        raise RefError(f"file not found: {abbreviate(ref, 80)}")
    if not names:
        raise RefError(f"unknown reference {shown(ref)}: no such file, and no asset of that name ({empty})")
    raise RefError(f"unknown reference {shown(ref)}: no such asset or file{hint}")


def _by_name(ws: Workspace, name: str, selector: str) -> VersionRecord:
    a = catalog.asset(ws.db, name)
    if a is None:
        raise RefError(f"unknown asset {name!r}{_suggest(name, catalog.asset_names(ws.db))}")
    numbers = catalog.ready_numbers(ws.db, name)
    if not numbers:
        raise RefError(f"{name!r} has no usable version yet")
    if selector.lower() == "latest":
        rec = catalog.version(ws.db, name, numbers[-1])
    elif (n := parse_version(selector)) is not None:
        rec = catalog.version(ws.db, name, n) if n <= MAX_VERSION else None
        if rec is None:
            listed = ", ".join(str(x) for x in numbers[-8:])
            raise RefError(f"{name} has no version {abbreviate(str(n), 40)} (versions: {listed})")
    else:
        target = catalog.alias_target(ws.db, name, selector)
        if target is None:
            aliases = list(catalog.aliases_of_asset(ws.db, name))
            hint = _suggest(selector, aliases) or (f" (aliases: {', '.join(aliases)})" if aliases else
                                                   " (it has no aliases)")
            raise RefError(f"{name} has no alias {shown(selector)}{hint}")
        rec = catalog.version(ws.db, name, target)
    if rec is None:  # raced with doctor/gc
        raise RefError(f"{name}@{abbreviate(selector, 40)} is not available")
    return rec


def _by_hash(ws: Workspace | None, ref: str, empty: str = "the registry is empty") -> VersionRecord:
    prefix = ref.split(":", 1)[1].strip().lower()
    if not HASH_RE.fullmatch(prefix):
        raise RefError(f"bad hash reference {shown(ref)}: give sha256: and at least 8 hex digits")
    if ws is None:
        raise RefError(f"no registered version has sha256 {prefix} ({empty})")
    recs = catalog.versions_by_sha_prefix(ws.db, prefix)
    shas = sorted({r.sha256 for r in recs})
    if not shas:
        raise RefError(f"no registered version has sha256 {prefix}...")
    if len(shas) > 1:
        examples = ", ".join(s[:16] for s in shas[:4])
        raise RefError(f"sha256:{prefix} is ambiguous ({len(shas)} hashes: {examples}): give more digits")
    return recs[0]  # the same bytes under several names: the first registration


def file_sha256(ws: Workspace | None, path: Path, *, fresh: bool = False) -> str:
    """Hash of a file, cached by (absolute path, size, mtime_ns) in the catalog (``fresh``: re-read)."""
    path = path.absolute()
    st = path.stat()
    if not fresh and (hit := cached_file_sha256(ws, path)):
        return hit
    try:
        sha = sha256_file(path)
    except OSError as exc:
        raise RefError(f"cannot read {path}: {exc.strerror or exc}") from None
    remember_file_sha256(ws, path, (st.st_size, st.st_mtime_ns), sha)
    return sha


TENSORS_KEY = "tensors:"
"""Hash-cache rows keyed ``tensors:<absolute path>`` hold a safetensors file's tensor-bytes hash
(never a path: an absolute path starts with ``/`` or a drive letter), next to its file hash."""


def _cache_key(path: Path, tensors: bool) -> str:
    return (TENSORS_KEY if tensors else "") + str(path.absolute())


def cached_file_sha256(ws: Workspace | None, path: Path, *, tensors: bool = False) -> str | None:
    """The catalog's cached hash of ``path`` (``tensors``: of its tensor bytes) if its size and
    mtime still match, else None."""
    if ws is None:
        return None
    st = path.stat()
    return catalog.cached_hash(ws.db, _cache_key(path, tensors), st.st_size, st.st_mtime_ns) or None


def remember_file_sha256(ws: Workspace | None, path: Path, stamp: tuple[int, int], sha: str, *,
                         tensors: bool = False) -> None:
    """Cache ``sha`` for ``path`` as it was at ``stamp`` (size, mtime_ns, taken before hashing):
    nothing is remembered when the file changed since. A cache: never fails."""
    if ws is None:
        return
    try:
        st = path.stat()
        if (st.st_size, st.st_mtime_ns) != tuple(stamp):
            return
        with ws.db.transaction() as tx:
            catalog.remember_hash(tx, _cache_key(path, tensors), st.st_size, st.st_mtime_ns, sha)
    except Exception:  # a cache: never fail a resolve because it could not be written
        pass


def check_blob(ws: Workspace, rec: VersionRecord) -> Path:
    """The blob of a version as a readable local file: the one place every command (infer,
    validate, extract, train, compare, export, serve, the pyfunc model) turns a version into bytes.

    In a home that caches a tracking server's artifact store (see :mod:`.fetch`) a missing or
    wrong-sized blob is fetched (sha-verified) first. Otherwise the blob is the registry's own
    copy: refused when it is known to be damaged (cheap size check here; ``doctor`` verifies full
    hashes and records what it finds). A fetch shows a Rich progress bar on stderr."""
    from lbm_registry.registry import fetch

    path = fetch.local_blob(ws, rec)
    if rec.integrity != "ok":
        raise RegistryError(f"{rec.ref}: its blob {rec.sha256[:12]} is {rec.integrity} "
                            f"(found by 'lbm-reg doctor'); re-register the original file to restore it")
    if fetch.is_cache_home(ws):
        return fetch.ensure_local(ws, rec).path
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise RegistryError(f"{rec.ref}: blob {rec.sha256[:12]} is missing from {ws.blobs_dir} "
                            f"(run 'lbm-reg doctor')") from None
    if size != rec.size:
        raise RegistryError(f"{rec.ref}: blob {rec.sha256[:12]} is corrupt ({size} bytes, expected {rec.size}); "
                            f"run 'lbm-reg doctor'")
    return path
