"""Analysis and resolution results in the artifact store, so a warm build never reads an ONNX graph.

A build that restores every conversion from the cache still had to analyse and
resolve every model first, because the conversion key holds what resolution
decides (op_target, the rewritten ONNX). That meant importing onnx, parsing
each graph and, for a ``rewrite`` override, writing the rewritten model again:
most of a warm build's time. Those results are a function of the model's bytes,
its manifest entry, the target and this package's code, so they are cached too,
in the same store and with the same checks as conversions (hashes, signatures).

The keys are deliberately wider than the conversion key: the model's whole
manifest entry but its name (paths replaced by content hashes, so another
checkout hits), a digest of every file of this package rather than a chosen
list, and the library versions. Anything that might change a result misses
and re-analyses, which costs about a second, never a wrong plan. The name
appears only in the documents' ``model`` field, rewritten on restore (a
resolution that fails, whose message quotes manifest positions, is never
stored). A miss or a broken store is no different from having no cache.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from pipeline import files
from pipeline.records import ANALYSIS, RESOLUTION

PLAN_FORMAT = 1
PACKAGE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def package_digest() -> str:
    """sha256 over the names and bytes of every source and data file of this package."""
    from pipeline.identity import source_digest

    return source_digest(sorted(path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*")
                                if path.is_file() and path.suffix in (".py", ".yaml", ".yml", ".json")
                                and "__pycache__" not in path.parts))


def _common(manifest, model: dict, target: str) -> dict:
    from pipeline.identity import _hashed_files, versions

    entry = {key: value for key, value in model.items() if key not in ("index", "name")}
    return {"format": PLAN_FORMAT, "target": target, "model": _hashed_files(entry, Path(manifest.directory).resolve()),
            "versions": versions(), "package": package_digest()}


def analysis_key(manifest, model: dict, target: str) -> str:
    from pipeline.cache import cache_key

    return cache_key({"stage": "analysis", **_common(manifest, model, target)})


def resolution_key(manifest, layout, model: dict, target: str) -> str:
    """Also the analysis it starts from (without its name) and the source's external weights (a rewrite
    copies them)."""
    from pipeline.cache import cache_key, canonical_json
    from pipeline.identity import external_data_hashes

    analysis_path = layout.analysis(model["name"], target)
    doc = files.read_json(analysis_path) or {}
    return cache_key({"stage": "resolution", **_common(manifest, model, target),
                      "analysis": hashlib.sha256(canonical_json(dict(doc, model=None))).hexdigest(),
                      "external_data": external_data_hashes(model["source"], list(doc.get("external_data") or []))})


def _restored_record(store, key: str, pair, path: Path, name: str):
    """(names restored, the record at ``path`` renamed for this pair's model), or None on a miss: an entry
    may have been stored by any model with these settings."""
    if store is None:
        return None
    restored = store.get(key, pair.dir)
    if not restored or path.name not in restored:
        return None
    return restored, dict(files.read_json(path), model=name)


def restore_analysis(store, key: str, layout, name: str, target: str) -> dict | None:
    """The cached ``analysis.json``, now in place for this pair, or None on a miss."""
    pair = layout.pair(name, target)
    found = _restored_record(store, key, pair, pair.analysis, name)
    return found and ANALYSIS.write(pair.analysis, found[1])


def store_analysis(store, key: str, layout, name: str, target: str) -> None:
    if store is not None:
        analysis = layout.pair(name, target).analysis
        _put(store, key, {analysis.name: analysis}, name, target)


def restore_resolution(store, key: str, layout, name: str, target: str) -> dict | None:
    """The cached ``resolved.json`` (and rewritten ONNX), now in place for this pair, or None on a miss."""
    pair = layout.pair(name, target)
    found = _restored_record(store, key, pair, pair.resolved, name)
    if found is None:
        return None
    restored, resolved = found
    if resolved.get("converted_onnx") is not None:
        if pair.rewritten_onnx.name not in restored:
            return None
        resolved["converted_onnx"] = str(pair.rewritten_onnx)  # stored without a checkout path
    return RESOLUTION.write(pair.resolved, resolved)


def store_resolution(store, key: str, layout, name: str, target: str, resolved: dict) -> None:
    """Store ``resolved.json`` without the checkout's path, with the rewritten ONNX it names."""
    if store is None:
        return
    import tempfile

    pair = layout.pair(name, target)
    portable = dict(resolved)
    stored = {}
    converted = resolved.get("converted_onnx")
    if converted is not None:
        if Path(converted).resolve() != pair.rewritten_onnx.resolve():
            return  # a model elsewhere is not ours to carry
        portable["converted_onnx"] = pair.rewritten_onnx.name
        stored[pair.rewritten_onnx.name] = pair.rewritten_onnx
    with tempfile.TemporaryDirectory(prefix="rknn-plan-") as temp:
        stored[pair.resolved.name] = Path(temp) / pair.resolved.name
        files.atomic_write_json(stored[pair.resolved.name], portable)
        _put(store, key, stored, name, target)


def _put(store, key: str, stored: dict, name: str, target: str) -> None:
    try:
        store.put(key, stored, meta={"model": name, "target": target})
    except OSError as exc:  # a full or read-only cache must not fail a good build
        print(f"  warning: could not store {name}@{target}'s plan in the cache: {exc}")
