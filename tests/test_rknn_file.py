"""Reading what an .rknn file says about itself, and the runtime gate that uses it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import rknn_file, runtime_gate

FIXTURES = Path(__file__).parent / "fixtures" / "rknn"


def test_a_format_6_file():
    info = rknn_file.read(FIXTURES / "rk3588.rknn")
    assert (info.file_format, info.toolkit, info.target) == (6, "2.5.0", "rk3588")
    assert info.compiler.startswith("2.5.0") and info.trailer_toolkit == "2.5.0"
    assert info.trailer_targets == ("rk3588",) and info.disagreements() == []


def test_a_format_0x1004_file():
    info = rknn_file.read(FIXTURES / "rv1106.rknn")
    assert (info.file_format, info.toolkit, info.target) == (0x1004, "2.5.0", "rv1106")
    assert info.disagreements() == []


def _tampered(tmp_path: Path) -> Path:
    data = (FIXTURES / "rk3588.rknn").read_bytes()
    trailer = data.rindex(b'"target_platform":["rk3588"]')
    path = tmp_path / "tampered.rknn"
    path.write_bytes(data[:trailer] + b'"target_platform":["rk3576"]' + data[trailer + 28:])
    return path


def test_header_and_trailer_disagreeing_is_reported(tmp_path):
    info = rknn_file.read(_tampered(tmp_path))
    assert info.disagreements() == ["header says target rk3588, trailer says rk3576"]


def test_a_truncated_file_and_a_non_model_are_refused(tmp_path):
    truncated = tmp_path / "cut.rknn"
    truncated.write_bytes((FIXTURES / "rk3588.rknn").read_bytes()[:1000])
    with pytest.raises(rknn_file.RknnFileError, match="truncated"):
        rknn_file.read(truncated)
    other = tmp_path / "model.onnx"
    other.write_bytes(b"\x08\x08:\xfc" + b"\0" * 100)
    with pytest.raises(rknn_file.RknnFileError, match="not an .rknn file"):
        rknn_file.read(other)


def test_the_command_line(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "pipeline.rknn_file", *map(str, args)],  # noqa: E731
                                       capture_output=True, text=True)
    good = run("--json", FIXTURES / "rk3588.rknn", FIXTURES / "rv1106.rknn")
    assert good.returncode == 0
    docs = [json.loads(line) for line in good.stdout.splitlines()]
    assert [(d["target"], d["toolkit"], d["file_format"]) for d in docs] == [("rk3588", "2.5.0", 6),
                                                                             ("rv1106", "2.5.0", 4100)]
    bad = run(_tampered(tmp_path))
    assert bad.returncode == 1 and "problem: header says target rk3588" in bad.stdout


# -- the runtime gate ---------------------------------------------------------------------


def test_format_6_needs_runtime_1_5_2():
    verdict = runtime_gate.check("rk3588", "2.5.0", "1.4.0")
    assert verdict.errors and "cannot load" in verdict.errors[0] and "1.5.2" in verdict.errors[0]
    # rv1106 models are not format 6: only the version rule applies there.
    assert not any("cannot load" in e for e in runtime_gate.check("rv1106", "2.5.0", "1.4.0").errors)


def test_a_newer_toolkit_is_refused_naming_the_newest_accepted():
    verdict = runtime_gate.check("rk3588", "2.5.0", "2.3.1")
    assert len(verdict.errors) == 1 and "rknn-toolkit2 2.3.0" in verdict.errors[0]
    assert "allow_newer_toolkit" in verdict.errors[0]
    assert runtime_gate.newest_accepted("2.1.0") is None


def test_allowing_a_newer_toolkit_and_an_older_one_are_warnings():
    allowed = runtime_gate.check("rk3588", "2.5.0", "2.3.0", allow_newer=True)
    assert allowed.errors == () and "allowed by allow_newer_toolkit" in allowed.warnings[0]
    older = runtime_gate.check("rk3588", "2.3.2", "2.5.0")
    assert older.errors == () and "older than the boards' runtime" in older.warnings[0]
    assert runtime_gate.check("rk3588", "2.5.0", "2.5.0") == runtime_gate.Verdict((), ())


def test_every_rule_row_names_its_source():
    rules = runtime_gate.rules()
    rows = [*rules["file_formats"], *rules["format_minimum_runtime"], rules["newer_toolkit"], rules["pypi_toolkits"]]
    assert all(row.get("source") for row in rows)


MANIFEST = """\
version: 1
defaults: {{ runtime: "2.3.0" }}
models:
  - name: a
    source: {model}
    targets: [rk3588]
  - name: b
    source: {model}
    targets: [rk3588, rk3566]
    runtime: {{ rk3588: "1.4.0", rk3566: "2.5.0", rv1106: "2.0.0" }}
  - name: c
    source: {model}
    targets: [rk3588]
    runtime: "2.1"
  - name: d
    source: {model}
    targets: [rk3588]
    runtime: "2.4.0"
    allow_newer_toolkit: true
"""


def test_the_manifest_refuses_at_load_with_line_and_column(tmp_path):
    from conftest import make_pool_identity_model
    from pipeline.manifest import ManifestError, load_manifest

    make_pool_identity_model(tmp_path / "m.onnx")
    (tmp_path / "models.yaml").write_text(MANIFEST.format(model="m.onnx"))
    with pytest.raises(ManifestError) as caught:
        load_manifest(tmp_path / "models.yaml")
    found = {(p.line, p.col): p.message for p in caught.value.problems}
    assert "newer than the boards' runtime 2.3.0" in found[(2, 22)] and "set in defaults" in found[(2, 22)]
    assert "librknnrt 1.4.0 cannot load" in found[(10, 24)]
    assert "'rv1106', which model 'b' does not build" in found[(10, 50)]
    assert "invalid runtime '2.1'" in found[(14, 14)]
    assert len(found) == 4  # model d builds: newer toolkit allowed


def test_export_checks_the_file_against_what_was_asked():
    from pipeline.stages import built_with

    model = {"name": "m", "runtime": "2.5.0"}
    built, runtime, problems = built_with(model, "rk3588", FIXTURES / "rk3588.rknn")
    assert built == {"toolkit": "2.5.0", "file_format": 6, "target": "rk3588", "compiler": built["compiler"]}
    assert runtime == {"declared": "2.5.0", "allow_newer_toolkit": False, "warnings": []} and problems == []
    _, _, problems = built_with(model, "rk3576", FIXTURES / "rk3588.rknn")
    assert problems == ["m@rk3576: the built file is for rk3588, not rk3576; remove build/m/rk3576 and build again"]
    _, _, problems = built_with(dict(model, toolkit="2.3.2"), "rk3588", FIXTURES / "rk3588.rknn")
    assert "made by rknn-toolkit2 2.5.0, but 2.3.2 was asked for" in problems[0]


@pytest.mark.toolkit
def test_fresh_builds_read_back_for_both_formats(project):
    """Real builds, read back by export: the sidecar and the lock record what built each file."""
    from conftest import make_npy_dataset, make_pool_identity_model

    make_pool_identity_model(project.root / "m.onnx")
    make_npy_dataset(project.root / "calib")
    project.write_manifest("""\
version: 1
models:
  - name: m
    source: m.onnx
    targets: [rk3588, rv1106]
    mean_values: [[0, 0, 0]]
    std_values: [[1, 1, 1]]
    quantization: { dataset: calib/dataset.txt }
    overrides: [{ match: { op_type: AveragePool }, action: rewrite }]
    runtime: { rk3588: "2.5.0", rv1106: "2.3.0" }
    allow_newer_toolkit: true
""")
    proc = project.doit()
    assert "rv1106: rknn-toolkit2 2.5.0 is newer than the boards' runtime 2.3.0; allowed" in proc.stdout
    lock = json.loads((project.root / "dist" / "models.lock.json").read_text())["entries"]
    assert lock["rk3588/m"]["built_with"]["file_format"] == 6
    assert lock["rv1106/m"]["built_with"]["file_format"] == 0x1004
    assert {entry["built_with"]["toolkit"] for entry in lock.values()} == {"2.5.0"}
    assert lock["rv1106/m"]["runtime"]["allow_newer_toolkit"] is True
    for target in ("rk3588", "rv1106"):
        info = rknn_file.read(project.root / "dist" / target / "m.rknn")
        assert info.target == target and info.disagreements() == []


def test_the_readme_shows_the_gate_facts_from_their_data():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    shown = readme.split("<!--runtime-facts-->\n", 1)[1].split("\n<!--/runtime-facts-->", 1)[0]
    assert shown == runtime_gate.facts_markdown()
