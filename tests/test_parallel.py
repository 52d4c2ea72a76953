"""doit -n N (process mode) and concurrent runs in one tree, with the real toolkit."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO, Project

pytestmark = pytest.mark.toolkit

MANIFEST = """\
version: 1
defaults: {inputs: {x: [1, 3, 32, 32]}}
models:
  - {name: a, source: tiny.onnx, targets: [rk3588, rk3566]}
  - {name: b, source: tiny.onnx, targets: [rk3588]}
"""


def _project(root):
    project = Project(root)
    (project.root / "tiny.onnx").write_bytes((REPO / "examples" / "models" / "tiny_pool_identity.onnx").read_bytes())
    project.write_manifest(MANIFEST)
    return project


def _lock(project):
    return json.loads((project.root / "dist" / "models.lock.json").read_text())["entries"]


def test_parallel_and_serial_builds_agree(tmp_path):
    (tmp_path / "serial").mkdir()
    (tmp_path / "parallel").mkdir()
    serial = _project(tmp_path / "serial")
    parallel = _project(tmp_path / "parallel")
    serial.doit("-n", "1")
    parallel.doit("-n", "2", "-P", "process")
    assert set(_lock(parallel)) == {"rk3588/a", "rk3566/a", "rk3588/b"}
    assert _lock(parallel) == _lock(serial)
    assert Project.ran(parallel.doit("-n", "2", "-P", "process")) == set()


def test_two_runs_started_at_once_do_not_corrupt_the_tree(tmp_path):
    project = _project(tmp_path)
    runs = [subprocess.Popen([sys.executable, "-m", "doit"], cwd=project.root, env=project.env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [run.communicate(timeout=900) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], results
    assert any("another doit run is building" in err for _, err in results)
    # the second run found the first one's work done: together they converted each pair once
    converts = sum(len(re.findall(r"^convert [ab]@\S+  ", out, flags=re.M)) for out, _ in results)  # verdicts
    assert converts == 3
    assert Project.ran(project.doit()) == set()
    assert "3 of 3 up to date" in project.doit("rknn-status").stdout
