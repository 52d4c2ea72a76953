"""Several rknn-toolkit2 versions in one manifest: each version's own environment, made once by uv."""

from __future__ import annotations

import json

import pytest

from conftest import make_pool_identity_model
from pipeline import identity, rknn_file, toolkit_envs
from pipeline.cache import cache_key
from pipeline.manifest import ManifestError, load_manifest


def test_an_environment_gets_the_versions_constraints_and_the_shared_torch():
    wanted = toolkit_envs.requirements("2.3.2")
    assert wanted[0] == "rknn-toolkit2==2.3.2"
    assert {"onnx<1.19", "setuptools<81", "pyyaml>=6"} <= set(wanted)
    assert any(item.startswith("torch==") for item in wanted)  # the project's torch: linked, not downloaded
    assert "onnx<1.19" not in toolkit_envs.requirements("2.2.0")


def test_the_installed_version_uses_the_project_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(toolkit_envs.ENV_VAR, str(tmp_path / "envs"))
    installed = toolkit_envs.installed_version()
    assert not toolkit_envs.uses_own_environment(None) and not toolkit_envs.uses_own_environment(installed)
    import sys

    assert toolkit_envs.python_for(installed) == sys.executable
    assert not (tmp_path / "envs").exists()


MANIFEST = """\
version: 1
models:
  - name: a
    source: m.onnx
    targets: [rk3588]
    toolkit: "2.4.0"
  - name: b
    source: m.onnx
    targets: [rk3588]
    toolkit: "2.3"
  - name: c
    source: m.onnx
    targets: [rk3588]
    toolkit: { rk3588: "2.3.2", rk3566: "2.3.2" }
"""


def test_bad_versions_are_one_line_each_at_load_before_any_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(toolkit_envs.ENV_VAR, str(tmp_path / "envs"))
    make_pool_identity_model(tmp_path / "m.onnx")
    (tmp_path / "models.yaml").write_text(MANIFEST)
    with pytest.raises(ManifestError) as caught:
        load_manifest(tmp_path / "models.yaml")
    found = {(p.line, p.col): p.message for p in caught.value.problems}
    assert found[(6, 14)].startswith("rknn-toolkit2 2.4.0 is not on PyPI for this Python and platform")
    assert "invalid toolkit '2.3'" in found[(10, 14)]
    assert "toolkit for 'rk3566', which model 'c' does not build" in found[(14, 33)]
    assert len(found) == 3
    assert not (tmp_path / "envs").exists()


def test_the_toolkit_version_is_part_of_the_identity_without_making_its_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(toolkit_envs.ENV_VAR, str(tmp_path / "envs"))
    make_pool_identity_model(tmp_path / "m.onnx")
    model = {"name": "m", "source": str(tmp_path / "m.onnx"), "targets": ["rk3588"]}
    key = lambda m: cache_key(identity.key_document(m, "rk3588", {}, base=tmp_path))  # noqa: E731
    assert key(model) != key(dict(model, toolkit="2.3.2")) != key(dict(model, toolkit={"rk3588": "2.2.0"}))
    assert key(model) == key(dict(model, toolkit=toolkit_envs.installed_version()))
    assert not (tmp_path / "envs").exists()


TWO_VERSIONS = """\
version: 1
defaults: { mean_values: [[0, 0, 0]], std_values: [[1, 1, 1]], verify: { samples: 2, min_cosine: 0.99 } }
models:
  - name: old
    source: m.onnx
    targets: [rk3588]
    toolkit: "2.3.2"
    runtime: "2.3.2"
  - name: new
    source: m.onnx
    targets: [rk3588]
"""


@pytest.fixture(scope="session")
def toolkits_dir(tmp_path_factory):
    """One directory of toolkit environments for the session: made once, reused by every test."""
    return tmp_path_factory.mktemp("toolkits")


@pytest.mark.toolkit
def test_one_manifest_builds_with_two_toolkits(project, toolkits_dir, tmp_path_factory):
    make_pool_identity_model(project.root / "m.onnx")
    project.write_manifest(TWO_VERSIONS)
    project.env[toolkit_envs.ENV_VAR] = str(toolkits_dir)

    first = project.doit()
    made = (first.stdout + first.stderr).count("creating rknn-toolkit2 2.3.2")
    assert made <= 1  # 0 when an earlier test of this session made it
    old, new = (rknn_file.read(project.root / "dist" / "rk3588" / f"{name}.rknn") for name in ("old", "new"))
    assert (old.toolkit, old.trailer_toolkit, old.target) == ("2.3.2", "2.3.2", "rk3588")
    assert new.toolkit == toolkit_envs.installed_version() != "2.3.2"
    assert "rknn-toolkit2 version: 2.3.2" in (project.root / "build" / "old" / "rk3588" / "convert.log").read_text()
    lock = json.loads((project.root / "dist" / "models.lock.json").read_text())["entries"]
    assert lock["rk3588/old"]["built_with"]["toolkit"] == "2.3.2"
    assert lock["rk3588/old"]["versions"]["rknn-toolkit2"] == "2.3.2"
    assert lock["rk3588/old"]["verify"]["passed"] and lock["rk3588/new"]["verify"]["passed"]

    again = project.doit()
    assert "convert " not in again.stdout and "creating rknn-toolkit2" not in again.stderr

    # Another project reuses the environment: it is made once per machine, not per build.
    other = type(project)(tmp_path_factory.mktemp("other"))
    make_pool_identity_model(other.root / "m.onnx", seed=3)
    other.write_manifest(TWO_VERSIONS)
    other.env[toolkit_envs.ENV_VAR] = str(toolkits_dir)
    reused = other.doit()
    assert "creating rknn-toolkit2" not in reused.stderr
    assert rknn_file.read(other.root / "dist" / "rk3588" / "old.rknn").toolkit == "2.3.2"


def test_torch_is_shared_only_where_the_toolkits_range_admits_the_projects():
    from importlib import metadata

    torch = metadata.version("torch")
    for version, row in toolkit_envs.table()["versions"].items():
        pinned = [item for item in toolkit_envs.requirements(version) if item.startswith("torch==")]
        assert pinned == ([f"torch=={torch}"] if toolkit_envs.within(torch, row["torch"]) else []), version
    assert toolkit_envs.within("2.2.0+cu121", ">=1.10.1,<=2.4.0") and toolkit_envs.within("2.1", "<=2.1.0")
    assert not toolkit_envs.within("2.2.0", ">=1.13.1,<=2.1.0") and not toolkit_envs.within("2.4.1", "<=2.4.0")
    assert toolkit_envs.within("2.2.0", "")


def test_every_version_pypi_has_resolves_with_its_requirements():
    """Each listed version's environment is installable: uv resolves its requirements from PyPI for
    this interpreter (no install). A torch pin outside a toolkit's range failed here for 2.2.0."""
    import shutil
    import subprocess
    import sys

    from pipeline import runtime_gate

    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    for version in runtime_gate.rules()["pypi_toolkits"]["versions"]:
        wanted = toolkit_envs.requirements(version)
        proc = subprocess.run([uv, "pip", "compile", "-", "--quiet", "--no-header", "--python", sys.executable],
                              input="\n".join(wanted) + "\n", capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{version}: {wanted}\n{proc.stderr[-2000:]}"
        assert f"rknn-toolkit2=={version}" in proc.stdout
