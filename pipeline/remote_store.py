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
import time
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
    publish,
)
from pipeline.files import PARTIAL_SUFFIX

# Bounded waits: a dead or slow endpoint costs at most a few of these, never a hang.
CONNECT_TIMEOUT = float(os.environ.get("RKNN_PIPELINE_CACHE_TIMEOUT", "10"))
READ_TIMEOUT = CONNECT_TIMEOUT * 3
ATTEMPTS = 3
# After a failure, the endpoint is skipped for this long by every store of this process (a build opens
# one per task): a dead endpoint costs one round of timeouts per interval, not one per conversion.
RETRY_AFTER = 60.0
_CHUNK = 1 << 20

# Per process, per URL and client configuration (see _context): the file system (an S3 client costs
# about 0.1 s to make), entries already read (an entry never changes once written, so a hit's
# lookup, restore and meta read it once), and when the endpoint last failed and why.
_FILE_SYSTEMS: dict[tuple, tuple] = {}
_ENTRIES: dict[tuple, dict] = {}
_FAILED: dict[tuple, tuple[float, str]] = {}


def _context(url: str) -> tuple:
    """What a client for ``url`` depends on: the URL, the process (no client crosses a fork), the
    AWS_* variables (endpoint, credentials) and the timeouts."""
    aws = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    return url, os.getpid(), aws, CONNECT_TIMEOUT


def _file_system(url: str):
    """(fsspec file system, root path without scheme) for ``url``, made once per :func:`_context`."""
    context = _context(url)
    if context not in _FILE_SYSTEMS:
        _FILE_SYSTEMS[context] = _new_file_system(url)
    return _FILE_SYSTEMS[context]


def _new_file_system(url: str):
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
        self._context = _context(self.url)

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
        answer = _server_answer(exc)
        if answer:
            text = f"{text} [{answer}]"
        if "bucket does not exist" in text or "NoSuchBucket" in text:
            bucket = self.url.partition("://")[2].split("/")[0]
            return (f"the bucket {bucket!r} does not exist ({self.url}); create it, or point "
                    f"RKNN_PIPELINE_CACHE / the manifest's cache.url at an existing one")
        return text

    @property
    def _broken(self) -> str | None:
        """Why the endpoint failed within the last RETRY_AFTER seconds (in any store of this process)."""
        failed = _FAILED.get(self._context)
        if failed is None or time.monotonic() - failed[0] > RETRY_AFTER:
            return None
        return failed[1]

    def _give_up(self, what: str, exc: BaseException) -> None:
        """Warn once for an unusable endpoint; operations skip it for RETRY_AFTER s (no repeated waits)."""
        reason = self._explain(exc)
        if self._broken is None:
            self._warn(f"cache {self.url}: {what} failed ({reason}); building without the remote cache")
        _FAILED[self._context] = (time.monotonic(), reason)

    # -- the store ---------------------------------------------------------------------------

    def _read_entry(self, key: str) -> dict | None:
        """The entry's JSON (one GET, remembered for this process), or None when there is none."""
        remembered = _ENTRIES.get((self._context, key))
        if remembered is not None:
            return remembered
        fs = self._open()
        try:
            data = fs.cat_file(self._entry(key), max_concurrency=1)  # one GET: no HEAD for its size first
        except FileNotFoundError as exc:
            if "bucket does not exist" in str(exc):
                raise
            return None
        try:
            entry = json.loads(data)
        except ValueError as exc:
            raise CorruptEntry(f"entry is not JSON ({exc})") from None
        if isinstance(entry, dict):
            _ENTRIES[(self._context, key)] = entry
        return entry

    def has(self, key: str) -> bool:
        """One GET of the entry (not a HEAD): a hit's restore then reads it from memory."""
        if self._broken:
            return False
        try:
            return self._read_entry(key) is not None
        except CorruptEntry:
            return True  # there is an entry; get() says what is wrong with it
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
            for name in records:
                temps[name] = dest_dir / f".{name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}"
            _each(lambda name: self._download(records[name], temps[name]), list(records))
            restored = publish(temps, dest_dir)
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
        # The recorded size saves a HEAD per file; a blob of another size fails the check below.
        with self._open().open(self._blob(record["sha256"]), "rb", size=record["size"]) as source, \
                open(temp, "xb") as out:
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

            def upload(name: str) -> None:
                blob = self._blob(records[name]["sha256"])
                if not fs.exists(blob):
                    fs.put_file(str(files[name]), blob)

            _each(upload, list(files))
            entry = entry_document(key, records, meta, self._signing)
            # Last: the entry vouches for blobs that are already there.
            fs.pipe_file(self._entry(key), json.dumps(entry, indent=2, sort_keys=True).encode())
        except Exception as exc:  # noqa: BLE001  (a denied or failed upload is a skipped upload)
            self._give_up(f"storing entry {key}", exc)


def _each(action: Callable[[str], None], names: list[str]) -> None:
    """``action`` for every name at once (an entry's few files cost one round trip, not one each);
    returns when all have finished, raising the first failure."""
    from concurrent.futures import ThreadPoolExecutor

    if len(names) <= 1:
        for name in names:
            action(name)
        return
    with ThreadPoolExecutor(max_workers=min(len(names), 8)) as pool:
        for _ in pool.map(action, names):
            pass


def _server_answer(exc: BaseException) -> str | None:
    """"HTTP 500 InternalError" from the client error behind ``exc`` (s3fs rewords it as an OSError)."""
    seen = 0
    while exc is not None and seen < 5:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            code = (response.get("Error") or {}).get("Code")
            return " ".join(str(part) for part in (status and f"HTTP {status}", code) if part) or None
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None
