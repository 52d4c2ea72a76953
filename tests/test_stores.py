"""Every artifact store, one test body each: a local directory and S3 (a real server on 127.0.0.1).

Then the faults only a network store has, injected by a proxy in front of the
real server: 500s, slow answers, a read-only bucket, a transfer cut in the
middle, a bucket that does not exist.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from pipeline import cache
from pipeline.cache import open_store
from pipeline.signing import PRIVATE_ENV, PUBLIC_ENV, keygen

KEY = hashlib.sha256(b"one conversion").hexdigest()
OTHER = hashlib.sha256(b"another conversion").hexdigest()


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path):
    """The URL of an empty store of each kind (S3: a fresh bucket and prefix on the test server)."""
    if request.param == "local":
        return str(tmp_path / "cache")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/team/cache"


@pytest.fixture
def warnings():
    return []


def opened(url: str, warnings: list):
    return open_store(url, warn=warnings.append)


@pytest.fixture
def artifacts(tmp_path) -> dict[str, Path]:
    folder = tmp_path / "artifacts"
    folder.mkdir()
    files = {"model.rknn": os.urandom(300_000), "convert.json": b'{"ok": true}\n', "convert.log": b"log\n"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


def same_bytes(restored: dict[str, Path], artifacts: dict[str, Path]) -> bool:
    return set(restored) == set(artifacts) and all(
        restored[name].read_bytes() == artifacts[name].read_bytes() for name in artifacts)


def no_partials(folder: Path) -> bool:
    return not folder.exists() or not any(".partial" in p.name or p.name.startswith(".") for p in folder.iterdir())


def test_round_trip_and_meta(store_url, artifacts, tmp_path, warnings):
    store = opened(store_url, warnings)
    assert not store.has(KEY) and store.get(KEY, tmp_path / "out") is None and store.meta(KEY) is None
    store.put(KEY, artifacts, meta={"model": "seed", "seconds": 12.5})
    assert store.has(KEY) and not store.has(OTHER)
    assert store.meta(KEY) == {"model": "seed", "seconds": 12.5}
    restored = opened(store_url, warnings).get(KEY, tmp_path / "out")
    assert same_bytes(restored, artifacts)
    assert warnings == []


def test_put_of_an_existing_key_keeps_the_first(store_url, artifacts, tmp_path, warnings):
    store = opened(store_url, warnings)
    store.put(KEY, artifacts, meta={"model": "first"})
    store.put(KEY, {"model.rknn": artifacts["convert.log"]}, meta={"model": "second"})
    assert store.meta(KEY) == {"model": "first"}
    assert same_bytes(store.get(KEY, tmp_path / "out"), artifacts)


def test_read_only_mode_never_writes(store_url, artifacts, monkeypatch, warnings):
    monkeypatch.setenv(cache.MODE_VAR, "read")
    store = opened(store_url, warnings)
    assert not store.writable
    store.put(KEY, artifacts)
    monkeypatch.delenv(cache.MODE_VAR)
    assert not opened(store_url, warnings).has(KEY)


def _forge(store_url: str, key: str, name: str, data: bytes) -> None:
    """Replace one file of an entry and its recorded sha256 together, as anyone with write access can."""
    sha = hashlib.sha256(data).hexdigest()
    if "://" not in store_url:
        entry_dir = Path(store_url) / key[:2] / key
        (entry_dir / name).write_bytes(data)
        path = entry_dir / cache.ENTRY_FILE
        entry = json.loads(path.read_text())
        entry["files"][name] = {"sha256": sha, "size": len(data)}
        path.write_text(json.dumps(entry))
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(store_url, skip_instance_cache=True)
    fs.pipe_file(f"{root}/blobs/{sha}", data)
    entry = json.loads(fs.cat_file(f"{root}/entries/{key}.json"))
    entry["files"][name] = {"sha256": sha, "size": len(data)}
    fs.pipe_file(f"{root}/entries/{key}.json", json.dumps(entry).encode())


def test_a_forged_entry_is_served_without_signing_and_refused_with_it(store_url, artifacts, tmp_path,
                                                                       monkeypatch, warnings):
    keys = keygen(tmp_path / "keys")
    monkeypatch.setenv(PRIVATE_ENV, str(keys[0]))  # CI: signs what it stores
    opened(store_url, warnings).put(KEY, artifacts)
    _forge(store_url, KEY, "model.rknn", b"a model that was never built by CI")

    monkeypatch.delenv(PRIVATE_ENV)
    # Without a key, the hashes alone cannot tell: the forged bytes match their forged sha256.
    served = opened(store_url, warnings).get(KEY, tmp_path / "unsigned")
    assert served["model.rknn"].read_bytes() == b"a model that was never built by CI"

    monkeypatch.setenv(PUBLIC_ENV, str(keys[1]))  # a reader with the public key
    assert opened(store_url, warnings).get(KEY, tmp_path / "signed") is None
    assert not (tmp_path / "signed" / "model.rknn").exists()
    assert any("signature does not verify" in w for w in warnings)


def test_an_unsigned_entry_is_a_miss_for_a_reader_with_a_key(store_url, artifacts, tmp_path, monkeypatch,
                                                             warnings):
    opened(store_url, warnings).put(KEY, artifacts)
    monkeypatch.setenv(PUBLIC_ENV, keygen(tmp_path / "keys")[1].read_text())  # the PEM text, as a CI secret
    assert opened(store_url, warnings).get(KEY, tmp_path / "out") is None
    assert any("not signed" in w for w in warnings)


def test_a_signed_entry_restores_for_the_public_key(store_url, artifacts, tmp_path, monkeypatch, warnings):
    private, public = keygen(tmp_path / "keys")
    monkeypatch.setenv(PRIVATE_ENV, str(private))
    opened(store_url, warnings).put(KEY, artifacts)
    monkeypatch.delenv(PRIVATE_ENV)
    monkeypatch.setenv(PUBLIC_ENV, str(public))
    assert same_bytes(opened(store_url, warnings).get(KEY, tmp_path / "out"), artifacts)
    assert warnings == []


def test_unknown_scheme_is_one_clear_error():
    with pytest.raises(cache.CacheError, match="unknown scheme 'ftp'"):
        open_store("ftp://host/cache")


# -- faults of a network store, injected between the client and a real server ------------------


@pytest.fixture
def proxied(s3_server, s3_bucket, monkeypatch):
    """(store URL, proxy): the store talks to the S3 server through a fault-injecting proxy."""
    from s3_server import FaultProxy

    proxy = FaultProxy(s3_server.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("RKNN_PIPELINE_CACHE_TIMEOUT", "1")
    import importlib

    from pipeline import remote_store

    importlib.reload(remote_store)  # the timeouts are read at import
    yield f"s3://{s3_bucket}/cache", proxy
    proxy.stop()
    monkeypatch.delenv("RKNN_PIPELINE_CACHE_TIMEOUT")
    importlib.reload(remote_store)


def test_server_errors_are_a_warning_and_a_miss(proxied, artifacts, tmp_path, warnings):
    url, proxy = proxied
    opened(url, warnings).put(KEY, artifacts)
    proxy.mode = "error500"
    store = opened(url, warnings)
    assert store.get(KEY, tmp_path / "out") is None
    assert not store.has(KEY)
    store.put(OTHER, artifacts)  # skipped, not raised
    # s3fs words a 500 as botocore's code or as its own errno text, depending on the call that met it
    assert len(warnings) == 1 and any(text in warnings[0] for text in ("InternalError", "500",
                                                                       "Internal Server Error")), warnings
    assert no_partials(tmp_path / "out")
    proxy.mode = "pass"
    assert not opened(url, warnings).has(OTHER)


def test_a_slow_server_times_out_into_a_miss(proxied, artifacts, tmp_path, warnings):
    url, proxy = proxied
    opened(url, warnings).put(KEY, artifacts)
    proxy.mode, proxy.delay = "slow", 8
    assert opened(url, warnings).get(KEY, tmp_path / "out") is None
    assert warnings and "timeout" in warnings[0].lower()
    assert no_partials(tmp_path / "out")


def test_a_read_only_bucket_skips_the_upload(proxied, artifacts, warnings):
    url, proxy = proxied
    proxy.mode = "readonly"
    opened(url, warnings).put(KEY, artifacts)
    assert warnings and ("AccessDenied" in warnings[0] or "Access Denied" in warnings[0]), warnings
    proxy.mode = "pass"
    assert not opened(url, warnings).has(KEY)  # no entry for a half-written upload


def test_server_stopping_mid_upload_leaves_no_entry(proxied, artifacts, warnings):
    url, proxy = proxied
    proxy.mode, proxy.only = "cut", "/blobs/"
    opened(url, warnings).put(KEY, artifacts)
    assert any(method == "PUT" and "/blobs/" in path for method, path in proxy.requests)
    assert warnings
    proxy.mode = "pass"
    assert not opened(url, warnings).has(KEY)


def test_server_stopping_mid_download_restores_nothing(proxied, artifacts, tmp_path, warnings):
    url, proxy = proxied
    opened(url, warnings).put(KEY, artifacts)
    proxy.mode, proxy.only = "cut", "/blobs/"
    out = tmp_path / "out"
    assert opened(url, warnings).get(KEY, out) is None
    # Cut short, a blob either fails in the client or arrives short and fails its size and sha256 check.
    assert len(warnings) == 1 and ("expected" in warnings[0] or "payload" in warnings[0].lower()), warnings
    assert not (out / "model.rknn").exists() and no_partials(out)


def test_a_missing_bucket_names_the_url(s3_server, monkeypatch, artifacts, tmp_path, warnings):
    for key, value in s3_server.environment().items():
        monkeypatch.setenv(key, value)
    url = "s3://no-such-bucket-here/cache"
    store = opened(url, warnings)
    store.put(KEY, artifacts)
    assert store.get(KEY, tmp_path / "out") is None
    assert len(warnings) == 1, warnings  # one clear line, not one per operation
    assert "no-such-bucket-here" in warnings[0] and "does not exist" in warnings[0] and url in warnings[0]


def test_a_hit_reads_its_entry_once_and_each_file_once(proxied, artifacts, tmp_path, warnings):
    url, proxy = proxied
    opened(url, warnings).put(KEY, artifacts, meta={"model": "seed"})
    proxy.requests.clear()
    # What a build does for a hit, each step through a store of its own (one per task).
    assert opened(url, warnings).has(KEY)
    restored = opened(url, warnings).get(KEY, tmp_path / "out")
    assert restored is not None, (warnings, proxy.requests)
    assert same_bytes(restored, artifacts)
    assert opened(url, warnings).meta(KEY) == {"model": "seed"}
    entry_reads = [path for method, path in proxy.requests if "/entries/" in path]
    blob_reads = [path for method, path in proxy.requests if method == "GET" and "/blobs/" in path]
    assert len(entry_reads) == 1, "\n".join(map(str, proxy.requests))
    assert len(blob_reads) == len(set(blob_reads)) == len(artifacts), proxy.requests
    assert warnings == []


def test_a_failed_endpoint_is_skipped_by_the_next_stores_of_the_process(proxied, artifacts, tmp_path, warnings):
    url, proxy = proxied
    proxy.mode = "error500"
    assert opened(url, warnings).get(KEY, tmp_path / "out") is None
    proxy.requests.clear()
    for name in ("a", "b", "c"):  # the next tasks of the same build
        store = opened(url, warnings)
        assert not store.has(KEY) and store.get(KEY, tmp_path / name) is None
        store.put(OTHER, artifacts)
    assert proxy.requests == [] and len(warnings) == 1, (proxy.requests, warnings)
