"""Two checkouts at different paths share one S3 cache: the second restores, never imports the toolkit,
and writes the same lock entry as the first, under its own model name and its own paths."""

from __future__ import annotations

import json
import os
import re

import pytest

from conftest import Project, make_npy_dataset, make_pool_identity_model

pytestmark = pytest.mark.toolkit

MANIFEST = """\
version: 1
models:
  - name: {name}
    source: m/pool.onnx
    targets: [rk3588]
    mean_values: [[0, 0, 0]]
    std_values: [[1, 1, 1]]
    quantization: {{ dataset: calib/dataset.txt, dtype: w8a8 }}
    verify: {{ samples: 2, min_cosine: 0.9 }}
    overrides:
      - match: {{ op_type: AveragePool, attrs: {{ count_include_pad: 0 }} }}
        action: rewrite
"""

# Installed through PYTHONPATH in every process of the second checkout's build (doit, its task
# processes, any worker): importing the toolkit fails loudly and leaves a mark.
BLOCKER = """\
import sys

class _NoToolkit:
    def find_spec(self, name, path=None, target=None):
        if name == "rknn" or name.startswith("rknn."):
            with open({marker!r}, "a") as mark:
                mark.write(name + "\\n")
            raise ImportError("the toolkit must not be imported in this build")
        return None

sys.meta_path.insert(0, _NoToolkit())
"""


def checkout(root, name: str, cache_url: str, env: dict) -> Project:
    root.mkdir(parents=True)
    project = Project(root)
    (root / "m").mkdir()
    make_pool_identity_model(root / "m" / "pool.onnx")
    make_npy_dataset(root / "calib")
    project.write_manifest(MANIFEST.format(name=name))
    project.env.update(env, RKNN_PIPELINE_CACHE=cache_url)
    return project


def block_toolkit(project: Project, marker) -> None:
    folder = project.root.parent / "blocker"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(BLOCKER.format(marker=str(marker)))
    project.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), project.env.get("PYTHONPATH")]))


def test_a_second_checkout_restores_from_s3_without_the_toolkit(s3_server, s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/shared"
    first = checkout(tmp_path / "first checkout", "seed", url, s3_server.environment())
    built = first.doit()
    assert "convert seed@rk3588" in built.stdout and "(cache hit)" not in built.stdout
    second = checkout(tmp_path / "elsewhere" / "second", "other", url, s3_server.environment())
    marker = tmp_path / "toolkit-imported"
    block_toolkit(second, marker)

    proc = second.doit()
    print(built.stdout, proc.stdout, proc.stderr)

    assert not marker.exists(), f"the toolkit was imported: {marker.read_text()}"
    assert "convert other@rk3588" in proc.stdout and "(cache hit)" in proc.stdout
    assert "seed" not in proc.stdout
    # The plan too: analysis, resolution and the rewritten ONNX that seed stored serve other.
    assert "analyze other@rk3588" in proc.stdout and "resolve other@rk3588" in proc.stdout
    assert proc.stdout.count("(from cache)") == 2, proc.stdout
    rewritten = "build/{}/rk3588/rewritten.onnx"
    assert (second.root / rewritten.format("other")).read_bytes() == (first.root / rewritten.format("seed")).read_bytes()
    record = json.loads((second.root / "build" / "other" / "rk3588" / "convert.json").read_text())
    assert record["model"] == "other" and record["cache"]["hit"] is True
    first_lock = json.loads((first.root / "dist" / "models.lock.json").read_text())["entries"]
    second_lock = json.loads((second.root / "dist" / "models.lock.json").read_text())["entries"]
    assert json.loads(json.dumps(first_lock["rk3588/seed"]).replace("/seed/", "/other/")) == \
        second_lock["rk3588/other"]
    # No file of the second tree names the first tree's path.
    leaks = [path for path in second.root.rglob("*") if path.is_file() and
             str(first.root).encode() in path.read_bytes()]
    assert leaks == []
    assert re.search(r"rewritten\.onnx", json.dumps(second_lock))  # the rewrite is in both entries
