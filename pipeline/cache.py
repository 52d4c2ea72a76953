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
import errno
import hashlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Callable

from pipeline.files import PARTIAL_SUFFIX

from pipeline.cache_entry import (  # the entry format, shared with pipeline.remote_store
    CACHE_FORMAT,  # noqa: F401  (read as pipeline.cache.* by callers)
    ENV_VAR,
    MODE_VAR,  # noqa: F401
    ENTRY_FILE,
    CacheError,
    CorruptEntry,
    canonical_json,
    cache_key,
    file_sha256,
    check_key,
    check_name,
    ArtifactStore,
    entry_document,
    checked_records,
    read_only,
    _warn_stderr,
    _CHUNK,
    publish,
)


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
        return publish(temps, dest_dir)
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
