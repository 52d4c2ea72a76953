"""The plan cache's keys (analysis and resolution results in the artifact store): wider than a
conversion's identity on purpose, yet equal for another checkout, another name and another comment."""

from __future__ import annotations

import shutil

import pytest

from pipeline import plan_cache
from pipeline.layout import Layout
from pipeline.manifest import load_manifest
from test_identity import OTHER, make_project


def analysis_key(root, name=None, target="rk3588"):
    manifest = load_manifest(root / "models.yaml")
    return plan_cache.analysis_key(manifest, manifest.model(name or manifest.models[0]["name"]), target)


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path / "one")


def test_another_checkout_name_and_comment_give_the_same_key(project, tmp_path):
    elsewhere = make_project(tmp_path / "a checkout" / "elsewhere", name="renamed", extra=OTHER)
    shutil.copy(project / "m" / "model.onnx", elsewhere / "m" / "model.onnx")
    shutil.copytree(project / "calib", elsewhere / "calib", dirs_exist_ok=True)
    text = (elsewhere / "models.yaml").read_text().replace("# a comment", "# another comment\n# and more")
    (elsewhere / "models.yaml").write_text(text)
    assert analysis_key(elsewhere, name="renamed") == analysis_key(project)


def test_source_bytes_target_manifest_fields_code_and_versions_change_it(project, monkeypatch):
    before = analysis_key(project)
    assert analysis_key(project, target="rk3576") != before
    import onnx

    data = (project / "m" / "model.onnx").read_bytes()
    graph = onnx.load_from_string(data)
    graph.doc_string = "re-saved"  # same graph, other bytes
    (project / "m" / "model.onnx").write_bytes(graph.SerializeToString())
    assert analysis_key(project) != before
    (project / "m" / "model.onnx").write_bytes(data)
    assert analysis_key(project) == before
    text = (project / "models.yaml").read_text()
    (project / "models.yaml").write_text(text.replace("std_values: [[1, 1, 1]]", "std_values: [[2, 2, 2]]"))
    assert analysis_key(project) != before
    (project / "models.yaml").write_text(text)
    monkeypatch.setattr(plan_cache, "package_digest", lambda: "another version of this package")
    assert analysis_key(project) != before
    monkeypatch.undo()
    from pipeline import identity

    monkeypatch.setattr(identity, "versions", lambda: {"onnx": "0.0"})
    assert analysis_key(project) != before


def test_the_package_digest_covers_every_source_and_data_file():
    digest = plan_cache.package_digest()
    assert len(digest) == 64
    sources = {p.name for p in plan_cache.PACKAGE.glob("*.py")}
    assert {"analysis.py", "resolution.py", "rewrite.py", "placement_rules.py"} <= sources


def test_the_resolution_key_follows_the_analysis_but_not_its_model_name(project):
    manifest = load_manifest(project / "models.yaml")
    model = manifest.models[0]
    layout = Layout(manifest.directory)
    path = layout.analysis(model["name"], "rk3588")
    path.parent.mkdir(parents=True)
    path.write_text('{"model": "seed", "external_data": [], "nodes": []}')
    before = plan_cache.resolution_key(manifest, layout, model, "rk3588")
    path.write_text('{"model": "someone else", "external_data": [], "nodes": []}')
    assert plan_cache.resolution_key(manifest, layout, model, "rk3588") == before
    path.write_text('{"model": "seed", "external_data": [], "nodes": [{"name": "n1"}]}')
    assert plan_cache.resolution_key(manifest, layout, model, "rk3588") != before
