"""A cache entry's format and the checks on it, shared by every store backend.

:mod:`pipeline.cache` (the local store and the choice of store by URL) and
:mod:`pipeline.remote_store` (object stores) both build on this module, which
imports neither: the backends depend on the format, never on each other.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Protocol

from pipeline.errors import PipelineError

CACHE_FORMAT = 1
ENV_VAR = "RKNN_PIPELINE_CACHE"
MODE_VAR = "RKNN_PIPELINE_CACHE_MODE"
ENTRY_FILE = "entry.json"

_CHUNK = 1 << 20
_KEY = re.compile(r"[0-9a-f]{64}")


class CacheError(PipelineError, OSError):
    """The cache could not be written or read back; the message says what to do about it."""


class CorruptEntry(PipelineError):
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


def _is_record(record) -> bool:
    return isinstance(record, dict) and isinstance(record.get("sha256"), str) and type(record.get("size")) is int


def publish(temps: dict[str, Path], dest_dir: Path) -> dict[str, Path]:
    """Rename each verified temporary into place as ``dest_dir/<name>``; return name -> path.

    Only after every file of an entry is fetched and checked, so a restore is all or nothing.
    """
    restored = {}
    for name, temp in temps.items():
        os.replace(temp, dest_dir / name)
        restored[name] = dest_dir / name
    return restored
