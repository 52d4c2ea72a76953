"""A conversion's identity (the cache key): every input that can change the outputs changes it, one at a
time; nothing else does (the model's name, the checkout's path, comments, other models)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import make_npy_dataset, make_pool_identity_model
from pipeline import identity
from pipeline.cache import cache_key
from pipeline.manifest import load_manifest

MANIFEST = """\
version: 1
# a comment
models:
  - name: {name}
    source: m/model.onnx
    targets: [rk3588, rk3576]
    mean_values: [[0, 0, 0]]
    std_values: [[1, 1, 1]]
    quantization: {{ dataset: calib/dataset.txt, dtype: w8a8 }}
{extra}"""

OTHER = """\
  - name: other
    source: m/model.onnx
    targets: [rk3588]
"""


def make_project(root: Path, name: str = "seed", extra: str = "") -> Path:
    (root / "m").mkdir(parents=True, exist_ok=True)
    if not (root / "m" / "model.onnx").exists():
        make_pool_identity_model(root / "m" / "model.onnx")
        make_npy_dataset(root / "calib")
    (root / "models.yaml").write_text(MANIFEST.format(name=name, extra=extra))
    return root


def key_of(root: Path, target: str = "rk3588", resolved: dict | None = None, external=(), name=None) -> str:
    manifest = load_manifest(root / "models.yaml")
    model = manifest.model(name or manifest.models[0]["name"])
    return cache_key(identity.key_document(model, target, resolved or {}, base=manifest.directory,
                                           external_data=list(external)))


@pytest.fixture
def project(tmp_path) -> Path:
    return make_project(tmp_path / "one")


def test_the_same_inputs_give_the_same_key(project):
    assert key_of(project) == key_of(project)


def test_the_source_bytes_change_it(project):
    before = key_of(project)
    make_pool_identity_model(project / "m" / "model.onnx", seed=1)
    assert key_of(project) != before


def test_external_weight_bytes_change_it(project):
    (project / "m" / "w.bin").write_bytes(b"\0" * 64)
    before = key_of(project, external=["w.bin"])
    (project / "m" / "w.bin").write_bytes(b"\1" * 64)
    assert key_of(project, external=["w.bin"]) != before


def test_the_rewritten_onnx_changes_it(project, tmp_path):
    rewritten = tmp_path / "rewritten.onnx"
    make_pool_identity_model(rewritten, seed=2)
    before = key_of(project, resolved={"converted_onnx": str(rewritten)})
    make_pool_identity_model(rewritten, seed=3)
    assert key_of(project, resolved={"converted_onnx": str(rewritten)}) != before


def test_a_calibration_sample_changes_it(project):
    before = key_of(project)
    make_npy_dataset(project / "calib", seed=5)
    assert key_of(project) != before


def test_a_toolkit_argument_changes_it(project):
    before = key_of(project)
    text = (project / "models.yaml").read_text().replace("std_values: [[1, 1, 1]]", "std_values: [[2, 2, 2]]")
    (project / "models.yaml").write_text(text)
    assert key_of(project) != before


def test_the_target_changes_it(project):
    assert key_of(project, "rk3588") != key_of(project, "rk3576")


def test_the_op_target_changes_it(project):
    assert key_of(project, resolved={"op_target": {"301": "npu"}}) != key_of(project)


@pytest.mark.parametrize("library", [*identity.VERSIONED, "python"])
def test_each_library_version_changes_it(project, monkeypatch, library):
    before = key_of(project)
    changed = dict(identity.versions(), **{library: "0.0.0-other"})
    monkeypatch.setattr(identity, "versions", lambda: changed)
    assert key_of(project) != before


@pytest.mark.parametrize("relative", identity.CONVERSION_CODE)
def test_each_file_of_the_conversion_code_changes_it(project, monkeypatch, tmp_path, relative):
    package = tmp_path / "package"
    shutil.copytree(identity.PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(identity, "PACKAGE", package)
    identity.code_digest.cache_clear()
    before = key_of(project)
    with open(package / relative, "a") as handle:
        handle.write("\n# changed\n")
    identity.code_digest.cache_clear()
    try:
        assert key_of(project) != before
    finally:
        identity.code_digest.cache_clear()


def test_every_listed_code_file_exists():
    missing = [relative for relative in identity.CONVERSION_CODE if not (identity.PACKAGE / relative).is_file()]
    assert missing == []


def test_name_path_comments_and_other_models_do_not_change_it(project, tmp_path):
    before = key_of(project)
    elsewhere = make_project(tmp_path / "a checkout" / "elsewhere", name="renamed", extra=OTHER)
    shutil.copy(project / "m" / "model.onnx", elsewhere / "m" / "model.onnx")
    shutil.copytree(project / "calib", elsewhere / "calib", dirs_exist_ok=True)
    text = (elsewhere / "models.yaml").read_text().replace("# a comment", "# another comment\n# and more")
    (elsewhere / "models.yaml").write_text(text)
    assert key_of(elsewhere, name="renamed") == before


def test_no_path_reaches_the_document(project):
    manifest = load_manifest(project / "models.yaml")
    document = identity.key_document(manifest.models[0], "rk3588", {}, base=manifest.directory)
    from pipeline.cache import canonical_json

    assert str(project) not in canonical_json(document).decode()
