"""The change matrix: each kind of edit reruns exactly the tasks it must, with the real toolkit.

One small project (two tiny models, four model x target pairs) is built once;
each test makes one kind of change, runs doit and inspects which tasks ran.
Tests run in file order and each leaves the tree fully built for the next.
"""

from __future__ import annotations

import os
import re

import pytest

from conftest import Project, make_npy_dataset, make_pool_identity_model

pytestmark = pytest.mark.toolkit

MANIFEST = """\
version: 1
models:
  - name: alpha
    source: alpha.onnx
    targets: [rk3588, rk3566]
    overrides:
      - match: {op_type: AveragePool}
        action: npu
        targets: [rk3588]
  - name: beta
    source: beta.onnx
    targets: [rk3588]
    quantization:
      dataset: calib/dataset.txt
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    project = Project(tmp_path_factory.mktemp("incremental"))
    make_pool_identity_model(project.root / "alpha.onnx", seed=1)
    make_pool_identity_model(project.root / "beta.onnx", seed=2)
    make_npy_dataset(project.root / "calib")
    project.write_manifest(MANIFEST)
    project.doit()
    return project


def _of(ran: set[str], model: str) -> set[str]:
    return {task for task in ran if re.search(rf":{model}@", task)}


def test_nothing_changed_nothing_runs(tree):
    assert Project.ran(tree.doit()) == set()


def test_comments_whitespace_and_key_order_change_nothing(tree):
    shuffled = """\
# a comment
version: 1

models:
  - source: alpha.onnx      # same model, keys reordered
    name: alpha
    overrides:
      - {targets: [rk3588], action: npu, match: {op_type: AveragePool}}
    targets: [rk3588,   rk3566]
  - name: beta
    quantization: {dataset: calib/dataset.txt}
    source: beta.onnx
    targets: [rk3588]
"""
    tree.write_manifest(shuffled)
    assert Project.ran(tree.doit()) == set()


def test_an_unrelated_model_change_leaves_this_model_alone(tree):
    tree.write_manifest(MANIFEST.replace("      dataset: calib/dataset.txt",
                                         "      dataset: calib/dataset.txt\n      algorithm: mmse"))
    ran = Project.ran(tree.doit())
    assert _of(ran, "alpha") == set()
    assert "convert:beta@rk3588" in ran
    tree.write_manifest(MANIFEST)
    tree.doit()


def test_an_override_edit_reruns_only_its_targets(tree):
    tree.write_manifest(MANIFEST.replace("        action: npu", "        action: rewrite"))
    ran = Project.ran(tree.doit())
    assert _of(ran, "alpha") == {"resolve:alpha@rk3588", "convert:alpha@rk3588", "export:alpha@rk3588"}
    assert _of(ran, "beta") == set()


def test_touching_a_source_converts_nothing_changing_it_reruns_that_model(tree):
    source = tree.root / "alpha.onnx"
    stat = source.stat()
    os.utime(source, (stat.st_atime + 10, stat.st_mtime + 10))
    assert _of(Project.ran(tree.doit()), "alpha") == set()
    make_pool_identity_model(source, seed=3)
    ran = Project.ran(tree.doit())
    assert {"convert:alpha@rk3588", "convert:alpha@rk3566"} <= ran
    assert _of(ran, "beta") == set()


def test_a_calibration_sample_change_reruns_the_quantized_model_only(tree):
    make_npy_dataset(tree.root / "calib", seed=7)
    ran = Project.ran(tree.doit())
    assert "convert:beta@rk3588" in ran
    assert _of(ran, "alpha") == set()


def test_an_added_target_runs_only_the_new_target(tree):
    text = (tree.root / "models.yaml").read_text().replace("    targets: [rk3588]\n    quantization",
                                                           "    targets: [rk3588, rk3576]\n    quantization")
    tree.write_manifest(text)
    ran = Project.ran(tree.doit())
    assert {t for t in ran if "@" in t} == {"analyze:beta@rk3576", "resolve:beta@rk3576", "convert:beta@rk3576",
                                            "export:beta@rk3576"}


def test_a_toolkit_version_change_reruns_every_convert(tree, tmp_path):
    # Make importlib.metadata see another rknn-toolkit2 version first on the path (the real one still runs).
    fake = tmp_path / "site"
    info = fake / "rknn_toolkit2-9.9.9.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rknn-toolkit2\nVersion: 9.9.9\n")
    tree.env["PYTHONPATH"] = str(fake)
    try:
        # Convert only: export would rightly refuse these files, whose header says the real toolkit built
        # them while the trailer repeats the faked metadata.
        ran = Project.ran(tree.doit("convert"))
    finally:
        del tree.env["PYTHONPATH"]
    converts = {t for t in ran if t.startswith("convert:")}
    assert converts == {"convert:alpha@rk3588", "convert:alpha@rk3566", "convert:beta@rk3588", "convert:beta@rk3576"}
    assert not {t for t in ran if t.startswith(("analyze:", "resolve:"))}
