"""Analysis and resolution results in the artifact store, so a warm build never reads an ONNX graph.

A build that restores every conversion from the cache still had to analyse and
resolve every model first, because the conversion key holds what resolution
decides (op_target, the rewritten ONNX). That meant importing onnx, parsing
each graph and, for a ``rewrite`` override, writing the rewritten model again:
most of a warm build's time. Those results are a function of the model's bytes,
its manifest entry, the target and this package's code, so they are cached too,
in the same store and with the same checks as conversions (hashes, signatures).

The keys are deliberately wider than the conversion key: the model's whole
manifest entry including its name and the manifest positions that messages
quote (paths replaced by content hashes), a digest of every file of this
package, and the library versions. Anything that might change a result or a
message misses and re-analyses, which costs about a second, never a wrong plan.
A miss or a broken store is no different from having no cache.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from pipeline import files

PLAN_FORMAT = 1
ANALYSIS_FILE = "analysis.json"
RESOLVED_FILE = "resolved.json"
REWRITTEN_FILE = "rewritten.onnx"
PACKAGE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def package_digest() -> str:
    """sha256 over the names and bytes of every source and data file of this package."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".yaml", ".yml", ".json") and "__pycache__" not in path.parts:
            digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _common(manifest, model: dict, target: str) -> dict:
    from pipeline.identity import _hashed_files, versions

    entry = {key: value for key, value in model.items() if key != "index"}
    return {"format": PLAN_FORMAT, "target": target, "model": _hashed_files(entry, Path(manifest.directory).resolve()),
            "versions": versions(), "package": package_digest()}


def analysis_key(manifest, model: dict, target: str) -> str:
    from pipeline.cache import cache_key

    return cache_key({"stage": "analysis", **_common(manifest, model, target)})


def resolution_key(manifest, layout, model: dict, target: str, locations: dict) -> str:
    """Also the analysis it starts from, the source's external weights (a rewrite copies them) and the
    manifest positions its messages quote."""
    from pipeline.cache import cache_key, file_sha256
    from pipeline.identity import external_data_hashes

    analysis_path = layout.analysis(model["name"], target)
    doc = files.read_json(analysis_path) or {}
    return cache_key({"stage": "resolution", **_common(manifest, model, target),
                      "analysis": file_sha256(analysis_path),
                      "external_data": external_data_hashes(model["source"], list(doc.get("external_data") or [])),
                      "locations": {str(index): where for index, where in sorted(locations.items())}})


def restore_analysis(store, key: str, layout, name: str, target: str) -> dict | None:
    """The cached ``analysis.json``, now in place for this pair, or None on a miss."""
    if store is None:
        return None
    restored = store.get(key, layout.workdir(name, target))
    if not restored or ANALYSIS_FILE not in restored:
        return None
    return files.read_json(layout.analysis(name, target))


def store_analysis(store, key: str, layout, name: str, target: str) -> None:
    if store is not None:
        _put(store, key, {ANALYSIS_FILE: layout.analysis(name, target)}, name, target)


def restore_resolution(store, key: str, layout, name: str, target: str) -> dict | None:
    """The cached ``resolved.json`` (and rewritten ONNX), now in place for this pair, or None on a miss."""
    if store is None:
        return None
    pair = layout.pair(name, target)
    restored = store.get(key, pair.dir)
    if not restored or RESOLVED_FILE not in restored:
        return None
    resolved = files.read_json(pair.dir / RESOLVED_FILE)
    converted = resolved.get("converted_onnx")
    if converted is not None:
        if REWRITTEN_FILE not in restored:
            return None
        resolved["converted_onnx"] = str(pair.dir / converted)  # stored relative to the pair's directory
    files.atomic_write_json(pair.dir / RESOLVED_FILE, resolved)
    return resolved


def store_resolution(store, key: str, layout, name: str, target: str, resolved: dict) -> None:
    """Store ``resolved.json`` with its rewritten ONNX path relative to the pair (no checkout path)."""
    if store is None:
        return
    import tempfile

    pair = layout.pair(name, target)
    portable = dict(resolved)
    stored = {}
    converted = resolved.get("converted_onnx")
    if converted is not None:
        try:
            portable["converted_onnx"] = Path(converted).resolve().relative_to(pair.dir.resolve()).as_posix()
        except ValueError:
            return  # a model outside the pair's directory is not ours to carry
        stored[REWRITTEN_FILE] = Path(converted)
    with tempfile.TemporaryDirectory(prefix="rknn-plan-") as temp:
        stored[RESOLVED_FILE] = Path(temp) / RESOLVED_FILE
        files.atomic_write_json(stored[RESOLVED_FILE], portable)
        _put(store, key, stored, name, target)


def _put(store, key: str, stored: dict, name: str, target: str) -> None:
    try:
        store.put(key, stored, meta={"model": name, "target": target})
    except OSError as exc:  # a full or read-only cache must not fail a good build
        print(f"  warning: could not store {name}@{target}'s plan in the cache: {exc}")
