"""The artifact cache through doit: a fresh clone with a warm cache never starts the toolkit.

"Never starts the toolkit" is checked, not assumed: the second project's
conversion workers are pointed (RKNN_PIPELINE_WORKER_PYTHON) at a script that
records that it was started and fails, so any conversion would fail the build.
"""

from __future__ import annotations

import json
import os
import stat

import pytest

from conftest import Project, make_pool_identity_model

pytestmark = pytest.mark.toolkit

MANIFEST = """\
version: 1
models:
  - name: alpha
    source: alpha.onnx
    targets: [rk3588, rk3566]
"""


def _project(root, cache):
    project = Project(root)
    make_pool_identity_model(project.root / "alpha.onnx", seed=1)
    project.write_manifest(MANIFEST)
    project.env["RKNN_PIPELINE_CACHE"] = str(cache)
    return project


# Installed through PYTHONPATH in every process of a build: importing onnx fails loudly and leaves a mark.
NO_ONNX = """\
import sys

class _NoOnnx:
    def find_spec(self, name, path=None, target=None):
        if name == "onnx" or name.startswith("onnx."):
            with open({marker!r}, "a") as mark:
                mark.write(name + "\\n")
            raise ImportError("onnx must not be imported in this build")
        return None

sys.meta_path.insert(0, _NoOnnx())
"""


def _forbid_toolkit(project, marker):
    script = project.root / "no-toolkit.sh"
    script.write_text(f"#!/bin/sh\necho started >> '{marker}'\nexit 97\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    project.env["RKNN_PIPELINE_WORKER_PYTHON"] = str(script)


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    first = _project(tmp_path_factory.mktemp("first"), cache)
    first.doit()
    return first, cache


def test_a_fresh_clone_with_a_warm_cache_runs_the_toolkit_zero_times(warm, tmp_path):
    first, cache = warm
    (tmp_path / "clone").mkdir()
    clone = _project(tmp_path / "clone", cache)
    marker = tmp_path / "toolkit-started"
    _forbid_toolkit(clone, marker)
    proc = clone.doit()
    assert not marker.exists(), "a conversion worker was started despite a warm cache"
    assert proc.stdout.count("(cache hit)") == 2
    for target in ("rk3588", "rk3566"):
        restored = clone.root / "dist" / target / "alpha.rknn"
        assert restored.read_bytes() == (first.root / "dist" / target / "alpha.rknn").read_bytes()
        sidecar = json.loads((clone.root / "dist" / target / "alpha.json").read_text())
        assert sidecar["cache"]["hit"] is True
    clone_lock = json.loads((clone.root / "dist" / "models.lock.json").read_text())["entries"]
    first_lock = json.loads((first.root / "dist" / "models.lock.json").read_text())["entries"]
    assert clone_lock == first_lock


def test_a_byte_flipped_entry_is_discarded_and_rebuilt(warm, tmp_path):
    _, cache = warm
    entries = sorted(cache.glob("*/*/model.rknn"))
    assert len(entries) == 2
    victim = entries[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    (tmp_path / "clone").mkdir()
    clone = _project(tmp_path / "clone", cache)
    proc = clone.doit()
    output = proc.stdout + proc.stderr
    assert "discard" in output.lower()
    assert proc.stdout.count("(cache hit)") == 1  # the intact entry still restores
    assert len(list(cache.glob("*/*/model.rknn"))) == 2  # the rebuilt entry is stored again
    for target in ("rk3588", "rk3566"):
        assert (clone.root / "dist" / target / "alpha.rknn").is_file()


def test_a_fresh_clone_with_a_warm_cache_never_reads_a_graph(warm, tmp_path):
    """Analysis and resolution come from the cache too, so a warm build never imports onnx. (The
    manifest's graph facts come from this machine's memo, found by content in a fresh clone.)"""
    first, cache = warm
    (tmp_path / "clone").mkdir()
    clone = _project(tmp_path / "clone", cache)
    _forbid_toolkit(clone, tmp_path / "toolkit-started")
    marker = tmp_path / "onnx-imported"
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(NO_ONNX.format(marker=str(marker)))
    clone.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "blocker"), clone.env.get("PYTHONPATH")]))
    proc = clone.doit()
    assert not marker.exists(), f"onnx was imported: {marker.read_text()}\n{proc.stdout}"
    assert proc.stdout.count("(from cache)") == 4  # analyze and resolve, for both targets
    for target in ("rk3588", "rk3566"):
        for name in ("analysis.json", "resolved.json"):
            restored = json.loads((clone.root / "build" / "alpha" / target / name).read_text())
            assert restored == json.loads((first.root / "build" / "alpha" / target / name).read_text())
    assert json.loads((clone.root / "dist" / "models.lock.json").read_text())["entries"] == \
        json.loads((first.root / "dist" / "models.lock.json").read_text())["entries"]
