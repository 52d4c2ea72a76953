"""The artifact cache in an object store (S3 and S3-compatible servers, Google Cloud Storage, Azure).

Built on fsspec, whose s3fs, gcsfs and adlfs backends share one file-system
API, so one class serves every scheme :data:`pipeline.cache.REMOTE_SCHEMES`
lists. s3fs reads the standard ``AWS_*`` variables (``AWS_ENDPOINT_URL``
included), so MinIO, Ceph or any S3-compatible server needs no setting of ours.

Layout under the URL's prefix::

    blobs/<sha256>        every artifact, named by its content hash
    entries/<key>.json    the entry: file names -> size and sha256, meta, signature

Blobs are written first and the entry last, so a reader sees a whole entry or
none; a blob shared by two entries is stored once. Every download is hashed and
checked before anything is moved into place. The store is a cache, not a
dependency: a network error, a timeout, a 5xx answer or a denied write is a
warning and a miss (or a skipped upload), after bounded retries, never a failed
build and never a partial file where the build reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Callable

from pipeline.cache_entry import (
    CacheError,
    CorruptEntry,
    canonical_json,
    check_key,
    checked_records,
    entry_document,
    file_sha256,
    _warn_stderr,
)
from pipeline.files import PARTIAL_SUFFIX

# Bounded waits: a dead or slow endpoint costs at most a few of these, never a hang.
CONNECT_TIMEOUT = float(os.environ.get("RKNN_PIPELINE_CACHE_TIMEOUT", "10"))
READ_TIMEOUT = CONNECT_TIMEOUT * 3
ATTEMPTS = 3
_CHUNK = 1 << 20


def _file_system(url: str):
    """(fsspec file system, root path without scheme) for ``url``, with timeouts and retries bounded."""
    import fsspec

    scheme = url.partition("://")[0]
    options: dict = {}
    if scheme == "s3":
        options = {"config_kwargs": {"connect_timeout": CONNECT_TIMEOUT, "read_timeout": READ_TIMEOUT,
                                     "retries": {"max_attempts": ATTEMPTS, "mode": "standard"}},
                   "skip_instance_cache": True}
    fs, root = fsspec.core.url_to_fs(url, **options)
    if hasattr(fs, "retries"):  # s3fs's own retry loop, on top of botocore's
        fs.retries = 1
    return fs, root.rstrip("/")


class ObjectStore:
    """An :class:`pipeline.cache.ArtifactStore` under an object-store URL such as ``s3://bucket/prefix``."""

    def __init__(self, url: str, warn: Callable[[str], None] | None = None, *, writable: bool = True,
                 signing=None):
        self.url = url.rstrip("/")
        self.writable = writable
        self._warn = warn or _warn_stderr
        self._signing = signing
        self._fs = None
        self._root = ""
        self._broken: str | None = None  # set once the endpoint proved unusable: later calls skip it

    # -- paths -------------------------------------------------------------------------------

    def _open(self):
        if self._fs is None:
            self._fs, self._root = _file_system(self.url)
        return self._fs

    def _blob(self, sha256: str) -> str:
        return f"{self._root}/blobs/{sha256}"

    def _entry(self, key: str) -> str:
        return f"{self._root}/entries/{check_key(key)}.json"

    # -- failures ----------------------------------------------------------------------------

    def _explain(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}".strip()
        if "bucket does not exist" in text or "NoSuchBucket" in text:
            bucket = self.url.partition("://")[2].split("/")[0]
            return (f"the bucket {bucket!r} does not exist ({self.url}); create it, or point "
                    f"RKNN_PIPELINE_CACHE / the manifest's cache.url at an existing one")
        return text

    def _give_up(self, what: str, exc: BaseException) -> None:
        """Warn once per store for an unusable endpoint; later operations skip it (no repeated waits)."""
        reason = self._explain(exc)
        if self._broken is None:
            self._warn(f"cache {self.url}: {what} failed ({reason}); building without the remote cache")
        self._broken = reason

    # -- the store ---------------------------------------------------------------------------

    def _read_entry(self, key: str) -> dict | None:
        fs = self._open()
        try:
            data = fs.cat_file(self._entry(key))
        except FileNotFoundError as exc:
            if "bucket does not exist" in str(exc):
                raise
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            raise CorruptEntry(f"entry is not JSON ({exc})") from None

    def has(self, key: str) -> bool:
        if self._broken:
            return False
        try:
            return self._open().exists(self._entry(key))
        except Exception as exc:  # noqa: BLE001  (any client or network failure is a miss)
            self._give_up("a lookup", exc)
            return False

    def meta(self, key: str) -> dict | None:
        if self._broken:
            return None
        try:
            entry = self._read_entry(key)
        except Exception as exc:  # noqa: BLE001
            self._give_up("a lookup", exc)
            return None
        return entry.get("meta") if isinstance(entry, dict) else None

    def get(self, key: str, dest_dir: Path) -> dict[str, Path] | None:
        from pipeline.signing import SignatureError

        if self._broken:
            return None
        dest_dir = Path(dest_dir)
        temps: dict[str, Path] = {}
        try:
            entry = self._read_entry(key)
            if entry is None:
                return None
            records = checked_records(key, entry, self._signing)
            dest_dir.mkdir(parents=True, exist_ok=True)
            for name, record in records.items():
                temps[name] = dest_dir / f".{name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}"
                self._download(record, temps[name])
            restored = {}
            for name, temp in temps.items():
                os.replace(temp, dest_dir / name)
                restored[name] = dest_dir / name
            temps.clear()
            return restored
        except (CorruptEntry, SignatureError) as exc:
            self._warn(f"cache entry {key} in {self.url} was not restored: {exc}; it will be rebuilt")
            return None
        except Exception as exc:  # noqa: BLE001
            self._give_up(f"restoring entry {key}", exc)
            return None
        finally:
            for temp in temps.values():
                temp.unlink(missing_ok=True)

    def _download(self, record: dict, temp: Path) -> None:
        """Fetch one blob into ``temp``, checking its size and sha256 on the way."""
        digest = hashlib.sha256()
        size = 0
        with self._open().open(self._blob(record["sha256"]), "rb") as source, open(temp, "xb") as out:
            while chunk := source.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        if size != record["size"] or digest.hexdigest() != record["sha256"]:
            raise CorruptEntry(f"a file is {size} bytes with sha256 {digest.hexdigest()[:12]}..., "
                               f"expected {record['size']} bytes with {record['sha256'][:12]}...")

    def put(self, key: str, files: dict[str, Path], meta: dict | None = None) -> None:
        meta = meta or {}
        canonical_json(meta)
        if not self.writable or self._broken:
            return
        try:  # local problems first: they are ours to report, not the network's
            records = {name: {"sha256": file_sha256(source), "size": Path(source).stat().st_size}
                       for name, source in files.items()}
        except OSError as exc:
            raise CacheError(f"could not store cache entry {key}: {exc}") from exc
        try:
            fs = self._open()
            if fs.exists(self._entry(key)):
                return
            for name, source in files.items():
                blob = self._blob(records[name]["sha256"])
                if not fs.exists(blob):
                    fs.put_file(str(source), blob)
            entry = entry_document(key, records, meta, self._signing)
            # Last: the entry vouches for blobs that are already there.
            fs.pipe_file(self._entry(key), json.dumps(entry, indent=2, sort_keys=True).encode())
        except Exception as exc:  # noqa: BLE001  (a denied or failed upload is a skipped upload)
            self._give_up(f"storing entry {key}", exc)
