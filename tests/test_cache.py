"""The artifact cache: round trips, refusal of corrupt or hostile entries, atomic and concurrent writes."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest

from pipeline import cache
from pipeline.cache import CacheError, LocalStore, cache_key, canonical_json, file_sha256, store_from

KEY = cache_key({"model": "yolo", "target": "rk3588"})


@pytest.fixture
def sources(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.rknn").write_bytes(bytes(range(256)) * 4096)  # 1 MiB: more than one hash chunk
    (src / "convert.log").write_text("I rknn building done\n")
    return {"model.rknn": src / "model.rknn", "convert.log": src / "convert.log"}


@pytest.fixture
def warnings():
    return []


@pytest.fixture
def store(tmp_path, warnings):
    return LocalStore(tmp_path / "cache", warn=warnings.append)


def stored(store, name):
    return store.entry_dir(KEY) / name


def rewrite_entry(store, change):
    path = stored(store, "entry.json")
    entry = json.loads(path.read_text())
    change(entry)
    path.write_text(json.dumps(entry))


def leftovers(root: Path) -> list[Path]:
    """Temporaries of puts, discards or restores that were not cleaned up."""
    return [p for p in root.rglob("*") if p.name.startswith(".")] if root.exists() else []


def test_round_trip(store, sources, tmp_path, warnings):
    assert not store.has(KEY)
    store.put(KEY, sources, meta={"toolkit": "2.5.0"})
    assert store.has(KEY)

    dest = tmp_path / "build" / "yolo" / "rk3588"
    restored = store.get(KEY, dest)

    assert restored == {name: dest / name for name in sources}
    for name, source in sources.items():
        assert restored[name].read_bytes() == source.read_bytes()
    entry = json.loads(stored(store, "entry.json").read_text())
    assert entry["key"] == KEY
    assert entry["cache_format"] == cache.CACHE_FORMAT
    assert entry["meta"] == {"toolkit": "2.5.0"}
    assert entry["files"]["model.rknn"] == {"sha256": file_sha256(sources["model.rknn"]), "size": 1 << 20}
    assert entry["created"]
    assert leftovers(store.root) == [] and leftovers(dest) == []
    assert warnings == []


def test_miss(store, tmp_path):
    dest = tmp_path / "out"
    assert not store.has(KEY)
    assert store.get(KEY, dest) is None
    assert not dest.exists()


def test_put_of_existing_key_keeps_the_first_entry(store, sources, tmp_path):
    store.put(KEY, sources)
    other = tmp_path / "other.rknn"
    other.write_bytes(b"different")
    store.put(KEY, {"model.rknn": other})

    restored = store.get(KEY, tmp_path / "out")
    assert set(restored) == set(sources)
    assert restored["model.rknn"].read_bytes() == sources["model.rknn"].read_bytes()
    assert leftovers(store.root) == []


@pytest.mark.parametrize("key", ["abc", KEY.upper(), KEY[:-1], KEY + "0", KEY + "\n", "../" + KEY[3:], None])
def test_key_validation(store, sources, tmp_path, key):
    with pytest.raises(ValueError, match="64 lowercase hex"):
        store.has(key)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        store.get(key, tmp_path / "out")
    with pytest.raises(ValueError, match="64 lowercase hex"):
        store.put(key, sources)
    assert not store.root.exists()


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", ".hidden", "..", "", "entry.json"])
def test_name_validation(store, sources, name):
    with pytest.raises(ValueError, match=r"plain file name|reserved"):
        store.put(KEY, {name: sources["model.rknn"]})
    assert not store.root.exists()


def test_byte_flipped_file_is_discarded_and_can_be_stored_again(store, sources, tmp_path, warnings):
    store.put(KEY, sources)
    data = bytearray(stored(store, "model.rknn").read_bytes())
    data[1000] ^= 0xFF
    stored(store, "model.rknn").write_bytes(bytes(data))

    dest = tmp_path / "out"
    assert store.get(KEY, dest) is None
    assert not store.has(KEY) and not store.entry_dir(KEY).exists()
    assert len(warnings) == 1 and KEY in warnings[0] and "model.rknn does not match its sha256" in warnings[0]
    assert not dest.exists() or list(dest.iterdir()) == []

    store.put(KEY, sources)  # the caller rebuilt and stores again
    assert store.get(KEY, dest)["model.rknn"].read_bytes() == sources["model.rknn"].read_bytes()
    assert leftovers(store.root) == []


def test_truncated_file_is_discarded(store, sources, tmp_path, warnings):
    store.put(KEY, sources)
    with open(stored(store, "model.rknn"), "r+b") as handle:
        handle.truncate(100)

    assert store.get(KEY, tmp_path / "out") is None
    assert len(warnings) == 1 and KEY in warnings[0] and "model.rknn is 100 bytes, expected 1048576" in warnings[0]
    assert not store.has(KEY)


def test_missing_file_is_discarded(store, sources, tmp_path, warnings):
    store.put(KEY, sources)
    stored(store, "convert.log").unlink()

    assert store.get(KEY, tmp_path / "out") is None
    assert "convert.log is missing" in warnings[0]


def test_unparsable_entry_json_is_discarded(store, sources, tmp_path, warnings):
    store.put(KEY, sources)
    stored(store, "entry.json").write_text("{not json")

    assert store.get(KEY, tmp_path / "out") is None
    assert KEY in warnings[0] and "entry.json is unreadable" in warnings[0]
    assert not store.entry_dir(KEY).exists()


def test_extra_files_in_entry_are_ignored(store, sources, tmp_path, warnings):
    store.put(KEY, sources)
    stored(store, "notes.txt").write_text("left by a curious colleague")

    assert set(store.get(KEY, tmp_path / "out")) == set(sources)
    assert warnings == []


def test_entry_naming_a_path_outside_dest_is_refused(store, sources, tmp_path, warnings):
    store.put(KEY, sources)
    # A hostile file beside the entry, listed with its true hash and size as "../evil".
    payload = b"#!/bin/sh\necho owned\n"
    (store.entry_dir(KEY).parent / "evil").write_bytes(payload)
    record = {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    rewrite_entry(store, lambda entry: entry["files"].update({"../evil": record}))

    dest = tmp_path / "out" / "target"
    assert store.get(KEY, dest) is None
    assert "'../evil'" in warnings[0] and KEY in warnings[0]
    assert not (dest.parent / "evil").exists()
    assert not dest.exists() or list(dest.iterdir()) == []


def test_entry_with_matching_hash_but_wrong_size_is_refused(store, sources, tmp_path, warnings):
    store.put(KEY, sources)
    tampered = sources["convert.log"].read_bytes() + b"E injected line\n"
    stored(store, "convert.log").write_bytes(tampered)
    rewrite_entry(store, lambda entry: entry["files"]["convert.log"].update(sha256=hashlib.sha256(tampered).hexdigest()))

    dest = tmp_path / "out"
    assert store.get(KEY, dest) is None
    assert "convert.log is" in warnings[0] and "bytes, expected" in warnings[0]
    assert not dest.exists() or list(dest.iterdir()) == []


def _put_worker(root: str, sources: dict, barrier) -> None:
    barrier.wait()  # start together so the renames really race
    LocalStore(Path(root)).put(KEY, {name: Path(path) for name, path in sources.items()})


def test_concurrent_puts_of_one_key_leave_one_valid_entry(store, sources, tmp_path, warnings):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(4)
    paths = {name: str(path) for name, path in sources.items()}
    workers = [context.Process(target=_put_worker, args=(str(store.root), paths, barrier)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]

    assert [p.name for p in store.entry_dir(KEY).parent.iterdir()] == [KEY]
    assert leftovers(store.root) == []
    restored = store.get(KEY, tmp_path / "out")
    assert restored["model.rknn"].read_bytes() == sources["model.rknn"].read_bytes()
    assert warnings == []


@pytest.mark.parametrize("target", ["copyfile", "rename"])
def test_failure_mid_put_leaves_nothing(store, sources, monkeypatch, target):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil if target == "copyfile" else os, target, disk_full)
    with pytest.raises(CacheError, match="Nothing was stored") as raised:
        store.put(KEY, sources)
    monkeypatch.undo()

    assert isinstance(raised.value, OSError) and KEY in str(raised.value)
    assert not store.has(KEY) and not store.entry_dir(KEY).exists()
    assert leftovers(store.root) == []
    assert [p for p in store.root.rglob("*") if p.is_file()] == []


def test_put_of_missing_source_is_a_clear_error(store, tmp_path):
    with pytest.raises(CacheError, match=KEY):
        store.put(KEY, {"model.rknn": tmp_path / "never-built.rknn"})
    assert not store.has(KEY) and leftovers(store.root) == []


def test_store_from_prefers_the_environment(tmp_path, monkeypatch):
    manifest_dir = tmp_path / "from-manifest"
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "from-env"))
    assert store_from(manifest_dir).root == tmp_path / "from-env"
    assert store_from(None).root == tmp_path / "from-env"

    monkeypatch.setenv(cache.ENV_VAR, "")
    assert store_from(manifest_dir).root == manifest_dir

    monkeypatch.delenv(cache.ENV_VAR)
    assert store_from(manifest_dir).root == manifest_dir
    assert store_from(None) is None


def test_canonical_json_ignores_key_order():
    one = {"b": 1, "a": {"y": [1.5, "é"], "x": None}}
    two = {"a": {"x": None, "y": [1.5, "é"]}, "b": 1}
    assert canonical_json(one) == canonical_json(two) == '{"a":{"x":null,"y":[1.5,"é"]},"b":1}'.encode()
    assert cache_key(one) == cache_key(two)
    assert cache_key(one) == hashlib.sha256(canonical_json({"cache_format": cache.CACHE_FORMAT, **one})).hexdigest()
    assert cache_key(one) != cache_key({**one, "b": 2})
    assert canonical_json(0.1) == b"0.1"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {"nested": [float("-inf")]}])
def test_canonical_json_refuses_nan_and_infinity(value):
    with pytest.raises(ValueError, match="plain JSON"):
        canonical_json({"threshold": value})


def test_cache_key_refuses_to_override_the_format():
    with pytest.raises(ValueError, match="reserved"):
        cache_key({"cache_format": 0})


def test_command_line_prints_the_key(tmp_path, capsys):
    document = tmp_path / "doc.json"
    document.write_text(json.dumps({"target": "rk3588", "model": "yolo"}))
    assert cache.main(["key", str(document)]) == 0
    assert capsys.readouterr().out == KEY + "\n"
