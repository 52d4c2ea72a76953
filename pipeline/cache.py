"""Content-addressed artifact cache: reuse a conversion that a teammate or an earlier CI run already did.

A cache key is the sha256 of a canonical JSON document describing everything
that influences an artifact (toolkit version, arguments, input hashes, ...).
Equal documents give equal keys on every machine, so any store holding the key
holds the right artifacts.

The store is untrusted on read: :meth:`LocalStore.get` re-hashes every file
against the entry's ``entry.json`` before restoring anything, and discards an
entry that does not match, so a corrupted cache costs a rebuild, never a wrong
model. Writes are atomic: an entry directory appears complete or not at all.

Stores are chosen by URL scheme in :func:`open_store` (a plain path is a
:class:`LocalStore`; ``s3://``, ``gs://`` and ``az://`` are object stores in
:mod:`pipeline.remote_store`). ``RKNN_PIPELINE_CACHE_MODE=read`` makes any store
read-only (laptops read what CI writes). With signing keys configured
(:mod:`pipeline.signing`), entries are signed on write and checked on read.

Layout of a :class:`LocalStore`::

    <root>/<key[:2]>/<key>/entry.json   the record: file names, sizes, sha256s
    <root>/<key[:2]>/<key>/<name>       the artifacts themselves
    <root>/.put-*  <root>/.discard-*    leftovers of interrupted writers; safe
                                        to delete when no build is running
"""

from __future__ import annotations

import argparse
import datetime
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Callable, Protocol

from pipeline.files import PARTIAL_SUFFIX

CACHE_FORMAT = 1
ENV_VAR = "RKNN_PIPELINE_CACHE"
MODE_VAR = "RKNN_PIPELINE_CACHE_MODE"
ENTRY_FILE = "entry.json"

_CHUNK = 1 << 20
_KEY = re.compile(r"[0-9a-f]{64}")


class CacheError(OSError):
    """The cache could not be written or read back; the message says what to do about it."""


class CorruptEntry(Exception):
    """An entry failed verification; the message is the reason shown to the user."""


def canonical_json(doc) -> bytes:
    """The one byte string for a JSON document: sorted keys, no whitespace, UTF-8.

    Floats use Python's shortest round-trip repr. NaN and infinity are refused:
    they are not JSON, and NaN != NaN would make a key unreproducible.
    """
    try:
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        raise ValueError(f"{exc}; a cache key document must be plain JSON (replace NaN/infinity by null)") from exc
    return text.encode("utf-8")


def cache_key(document: dict) -> str:
    """sha256 hex of the document; bumping CACHE_FORMAT invalidates every older key."""
    if not isinstance(document, dict):
        raise TypeError(f"a cache key document must be a JSON object, got {type(document).__name__}")
    if "cache_format" in document:
        raise ValueError("'cache_format' is reserved in cache key documents; rename that field")
    return hashlib.sha256(canonical_json({"cache_format": CACHE_FORMAT, **document})).hexdigest()


def file_sha256(path) -> str:
    """sha256 hex of a file's bytes, remembered per file version within a process (keys, sidecars and
    provenance hash the same sources many times in one build)."""
    info = os.stat(path)
    return _sha256_of(os.path.abspath(path), info.st_ino, info.st_mtime_ns, info.st_size)


@functools.lru_cache(maxsize=4096)
def _sha256_of(path: str, inode: int, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_key(key) -> str:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"cache key must be 64 lowercase hex digits as made by cache_key(), got {key!r}")
    return key


def check_name(name) -> str:
    """Refuse anything but a plain file name, so a restore can never write outside its directory."""
    if not isinstance(name, str) or not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise ValueError(
            f"cache file name {name!r} must be a plain file name (not empty, no '/' or '\\', "
            "not starting with '.'); store the artifact under such a name"
        )
    if name == ENTRY_FILE:
        raise ValueError(f"{ENTRY_FILE!r} is reserved for the cache's own record; store the artifact as another name")
    return name


class ArtifactStore(Protocol):
    """What the pipeline needs from a cache, kept small so any object store can implement it.

    Contract: ``get`` returns only files whose contents match what ``put``
    stored (else None, and the caller rebuilds); ``put`` of an existing key is
    a no-op, since equal keys mean equal artifacts; ``meta`` returns the meta
    document ``put`` stored (durations for planning, the model that stored it)
    without fetching the artifacts. A read-only store's ``put`` does nothing.
    """

    url: str
    writable: bool

    def has(self, key: str) -> bool: ...

    def get(self, key: str, dest_dir: Path) -> dict[str, Path] | None: ...

    def put(self, key: str, files: dict[str, Path], meta: dict | None = None) -> None: ...

    def meta(self, key: str) -> dict | None: ...


def entry_document(key: str, records: dict, meta: dict, signing=None) -> dict:
    """The record that vouches for an entry's files (``records``: name -> size and sha256), signed if we can."""
    entry = {
        "key": key,
        "cache_format": CACHE_FORMAT,
        "files": records,
        "meta": meta,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if signing is not None and signing.can_sign:
        entry["signature"] = signing.sign(canonical_json(entry))
    return entry


def checked_records(key: str, entry, signing=None) -> dict:
    """The ``files`` of a parsed entry document, after every check that needs no file contents.

    Raises :class:`CorruptEntry` for a malformed entry and
    :class:`pipeline.signing.SignatureError` for a missing or wrong signature.
    """
    records = entry.get("files") if isinstance(entry, dict) else None
    if not isinstance(records, dict) or entry.get("key") != key or entry.get("cache_format") != CACHE_FORMAT:
        raise CorruptEntry(f"{ENTRY_FILE} does not describe key {key} in cache format {CACHE_FORMAT}")
    for name, record in records.items():
        try:
            check_name(name)
        except ValueError:
            raise CorruptEntry(f"{ENTRY_FILE} names {name!r}, which is not a plain file name") from None
        if not _is_record(record):
            raise CorruptEntry(f"{ENTRY_FILE} has no valid size and sha256 for {name}")
    if signing is not None:
        signing.check(canonical_json({k: v for k, v in entry.items() if k != "signature"}), entry.get("signature"))
    return records


def read_only() -> bool:
    return os.environ.get(MODE_VAR, "").strip().lower() in ("read", "ro", "read-only", "readonly")


def _warn_stderr(message: str) -> None:
    print(f"rknn-pipeline: {message}", file=sys.stderr)


class LocalStore(ArtifactStore):
    """An ArtifactStore in a directory, safe to share between concurrent builds (a CI volume, an NFS share).

    Atomicity comes from renaming whole directories within one filesystem, so
    ``root`` holds the temporaries as well as the entries.
    """

    def __init__(self, root: Path, warn: Callable[[str], None] | None = None, *, writable: bool = True,
                 signing=None):
        self.root = Path(root)
        self.url = str(self.root)
        self.writable = writable
        self._warn = warn or _warn_stderr
        self._signing = signing

    def entry_dir(self, key: str) -> Path:
        check_key(key)
        return self.root / key[:2] / key

    def has(self, key: str) -> bool:
        return (self.entry_dir(key) / ENTRY_FILE).is_file()

    def get(self, key: str, dest_dir: Path) -> dict[str, Path] | None:
        entry_dir = self.entry_dir(key)
        if not entry_dir.exists():
            return None
        from pipeline.signing import SignatureError

        try:
            names = self._verified_names(key, entry_dir)
        except CorruptEntry as exc:
            self._discard(key, entry_dir, str(exc))
            return None
        except SignatureError as exc:  # not ours to delete: the reader may hold the wrong key
            self._warn(f"cache entry {key} in {self.root} was not restored: {exc}; it will be rebuilt")
            return None
        try:
            return _restore(entry_dir, names, Path(dest_dir))
        except OSError as exc:
            raise CacheError(
                f"could not restore cache entry {key} into {dest_dir}: {exc}. "
                "The entry is intact; free space or fix permissions there and run again"
            ) from exc

    def put(self, key: str, files: dict[str, Path], meta: dict | None = None) -> None:
        entry_dir = self.entry_dir(key)
        for name in files:
            check_name(name)
        meta = meta or {}
        canonical_json(meta)  # refuse unserialisable meta before touching the disk
        if not self.writable or self.has(key):
            return
        temp = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # os.mkdir, unlike mkdtemp, honours the umask: a shared cache stays readable.
            temp = self.root / f".put-{uuid.uuid4().hex}"
            os.mkdir(temp)
            records = {}
            for name, source in files.items():
                shutil.copyfile(source, temp / name)
                records[name] = _sync_and_describe(temp / name)
            entry = entry_document(key, records, meta, self._signing)
            # Written last: an entry.json vouches for files already on disk.
            _write_synced(temp / ENTRY_FILE, json.dumps(entry, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
            self._install(key, temp, entry_dir)
        except OSError as exc:
            raise CacheError(
                f"could not store cache entry {key} in {self.root}: {exc}. Nothing was stored; "
                f"free space or fix permissions there, or unset {ENV_VAR} and the manifest's "
                "cache directory to build without the cache"
            ) from exc
        finally:
            if temp is not None and temp.exists():
                shutil.rmtree(temp, ignore_errors=True)

    def meta(self, key: str) -> dict | None:
        try:
            entry = json.loads((self.entry_dir(key) / ENTRY_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return entry.get("meta") if isinstance(entry, dict) else None

    def _install(self, key: str, temp: Path, entry_dir: Path) -> None:
        """Rename the finished temp dir into place; an entry already there wins."""
        entry_dir.parent.mkdir(exist_ok=True)
        for attempt in range(2):
            try:
                os.rename(temp, entry_dir)
                return
            except OSError as exc:
                if not isinstance(exc, FileExistsError) and exc.errno != errno.ENOTEMPTY:
                    raise
            if self.has(key):
                return  # a concurrent writer won; its files equal ours
            if attempt == 0:
                self._discard(key, entry_dir, f"it has no {ENTRY_FILE}")
        raise FileExistsError(f"{entry_dir} keeps reappearing without {ENTRY_FILE}; remove it by hand")

    def _verified_names(self, key: str, entry_dir: Path) -> list[str]:
        """Check entry.json and every file it lists; raise CorruptEntry on the first mismatch."""
        try:
            entry = json.loads((entry_dir / ENTRY_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CorruptEntry(f"{ENTRY_FILE} is missing") from None
        except (OSError, ValueError) as exc:
            raise CorruptEntry(f"{ENTRY_FILE} is unreadable: {exc}") from None
        records = checked_records(key, entry, self._signing)
        # Sizes first: a truncated file is caught without reading anything.
        for name, record in records.items():
            path = entry_dir / name
            if path.is_symlink() or not path.is_file():
                raise CorruptEntry(f"{name} is missing")
            size = path.stat().st_size
            if size != record["size"]:
                raise CorruptEntry(f"{name} is {size} bytes, expected {record['size']}")
        for name, record in records.items():
            try:
                if file_sha256(entry_dir / name) != record["sha256"]:
                    raise CorruptEntry(f"{name} does not match its sha256")
            except OSError as exc:
                raise CorruptEntry(f"{name} is unreadable: {exc}") from None
        return list(records)

    def _discard(self, key: str, entry_dir: Path, reason: str) -> None:
        """Move the entry aside in one rename (readers never see it half-deleted), then delete it."""
        trash = self.root / f".discard-{uuid.uuid4().hex}"
        try:
            os.rename(entry_dir, trash)
        except FileNotFoundError:
            pass  # another process discarded it first
        except OSError as exc:
            self._warn(f"cache entry {key} is corrupt ({reason}) and could not be removed ({exc}); "
                       f"delete {entry_dir} by hand")
            return
        self._warn(f"cache entry {key} is corrupt ({reason}); discarded it, the artifacts will be rebuilt")
        shutil.rmtree(trash, ignore_errors=True)


def _is_record(record) -> bool:
    return isinstance(record, dict) and isinstance(record.get("sha256"), str) and type(record.get("size")) is int


def _sync_and_describe(path: Path) -> dict:
    """fsync a freshly copied file and record what was actually stored."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "r+b") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(handle.fileno())
    return {"sha256": digest.hexdigest(), "size": size}


def _write_synced(path: Path, text: str) -> None:
    with open(path, "x", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _restore(entry_dir: Path, names: list[str], dest_dir: Path) -> dict[str, Path]:
    """Copy every file to a temp name first, then rename all: dest_dir never holds half a file."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    temps: dict[str, Path] = {}
    try:
        for name in names:
            temps[name] = dest_dir / f".{name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}"
            with open(entry_dir / name, "rb") as source, open(temps[name], "xb") as out:
                shutil.copyfileobj(source, out, _CHUNK)
                out.flush()
                os.fsync(out.fileno())
        restored = {}
        for name, temp in temps.items():
            os.replace(temp, dest_dir / name)
            restored[name] = dest_dir / name
        return restored
    except BaseException:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
        raise


# Object-store URL schemes, each served by pipeline.remote_store through fsspec: adding a
# backend that fsspec knows is one line here (plus its fsspec package in pyproject.toml).
REMOTE_SCHEMES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


def open_store(url: str, *, warn: Callable[[str], None] | None = None) -> ArtifactStore:
    """The store for ``url``: a local directory (a path or ``file://``) or an object-store URL.

    The one place that chooses a backend. ``RKNN_PIPELINE_CACHE_MODE=read``
    makes it read-only; signing keys from the environment sign and check entries.
    """
    from pipeline.signing import Signing

    signing = Signing.from_environment()
    scheme, sep, rest = str(url).partition("://")
    if not sep or scheme == "file":
        return LocalStore(Path(rest if sep else url).expanduser(), warn, writable=not read_only(), signing=signing)
    if scheme not in REMOTE_SCHEMES:
        raise CacheError(f"cache URL {url!r}: unknown scheme {scheme!r}; use a directory or one of "
                         + ", ".join(f"{name}://" for name in REMOTE_SCHEMES))
    from pipeline.remote_store import ObjectStore

    return ObjectStore(str(url), warn, writable=not read_only(), signing=signing)


def store_from(manifest_cache_url: str | Path | None) -> ArtifactStore | None:
    """The cache to use: $RKNN_PIPELINE_CACHE (so CI can redirect it) over the manifest's ``cache``."""
    url = os.environ.get(ENV_VAR) or manifest_cache_url
    return open_store(str(url)) if url else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.cache")
    commands = parser.add_subparsers(dest="command", required=True)
    key = commands.add_parser("key", help="print the cache key of a JSON document")
    key.add_argument("document", type=Path, help="a JSON file holding one object")
    args = parser.parse_args(argv)
    print(cache_key(json.loads(args.document.read_text(encoding="utf-8"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
