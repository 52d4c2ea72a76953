"""Atomic file writes: a reader (or the next doit run) sees the old file or the new one, never half of one.

Every artifact goes to a temporary name in the destination directory (same
filesystem, so the final ``os.replace`` is atomic), is flushed and fsynced, and
only then renamed. A build killed at any instant therefore leaves no file under
``build/`` or ``dist/`` that looks finished; stray ``*.partial`` temporaries
carry a recognisable suffix and are swept by :func:`remove_partials`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

PARTIAL_SUFFIX = ".partial"
_UMASK = os.umask(0)
os.umask(_UMASK)


def _temp_beside(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would make artifacts private to one user
    return fd, Path(tmp)


@contextmanager
def _atomic(path: Path):
    """Yield a binary handle on a temporary beside ``path``; on success fsync and rename it into place."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _atomic(path) as handle:
        handle.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data, *, compact: bool = False) -> None:
    """Key-sorted JSON with a trailing newline (stable bytes for the same data): pretty, or ``compact``
    for large machine records (Python's C encoder is used only without indentation: 5x faster)."""
    if compact:
        text = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    else:
        text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False)
    atomic_write_text(path, text + "\n")


def atomic_copy(source: Path, destination: Path) -> None:
    with _atomic(destination) as out, open(source, "rb") as src:
        shutil.copyfileobj(src, out, 1 << 20)


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default


def remove_partials(directory: Path) -> int:
    """Delete leftover temporaries of killed writes below ``directory``; returns how many."""
    count = 0
    if Path(directory).is_dir():
        for leftover in Path(directory).rglob(f"*{PARTIAL_SUFFIX}"):
            leftover.unlink(missing_ok=True)
            count += 1
    return count


def map_strings(value, change):
    """A JSON value with every string replaced by ``change(string)``: how records, keys and plans make
    the file paths they hold portable (relative, or content hashes) without one walker each."""
    if isinstance(value, dict):
        return {key: map_strings(item, change) for key, item in value.items()}
    if isinstance(value, list):
        return [map_strings(item, change) for item in value]
    if isinstance(value, str):
        return change(value)
    return value
