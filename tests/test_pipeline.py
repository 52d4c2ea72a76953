"""End to end with the real toolkit: the example manifest through doit, into dist/.

One module-scoped build of the repository's own models.yaml in a throwaway copy
of the project; the tests then read what it produced. This is the proof of the
foundation and of the op_target issue on real conversions.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, Project

pytestmark = pytest.mark.toolkit


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    project = Project(tmp_path_factory.mktemp("example"))
    shutil.copy(REPO / "models.yaml", project.root / "models.yaml")
    first = project.doit()
    second = project.doit()
    return project, first, second


def _sidecar(project, target, name):
    return json.loads((project.root / "dist" / target / f"{name}.json").read_text())


def test_every_model_and_target_lands_in_dist(built):
    project, first, _ = built
    expected = [("rk3588", "inception_v2"), ("rv1106", "inception_v2_int8"), ("rk3588", "tiny_pool_identity"),
                ("rk3588", "densenet121"), ("rk3588", "shufflenet"), ("rk3588", "shufflenet_hybrid"),
                ("rk3588", "densenet121_stem"), ("rk3588", "detector"), ("rk3588", "outlier_repaired"),
                ("rk3588", "two_tower"),
                ("rk3588", "rec.1x3x48x160"), ("rk3588", "rec.1x3x48x320"), ("rk3588", "rec.1x3x48x640"),
                ("rk3588", "rec_dynamic")]
    for target, name in expected:
        rknn = project.root / "dist" / target / f"{name}.rknn"
        assert rknn.stat().st_size > 1_000, rknn
        sidecar = _sidecar(project, target, name)
        assert sidecar["model"] == name and sidecar["target"] == target
        assert sidecar["versions"]["rknn-toolkit2"] == "2.5.0"
        assert len(sidecar["inputs"]["source"]["sha256"]) == 64
        assert sidecar["arguments"]["config"]["target_platform"] == target
        assert f"convert {name}@{target}" in first.stdout
    assert (project.root / "dist" / "models.lock.json").is_file()
    assert (project.root / "build" / "report.html").is_file()
    assert not list(project.root.rglob("*.partial"))


def test_second_run_converts_nothing(built):
    _, _, second = built
    assert Project.ran(second) == set(), second.stdout


def test_override_npu_moves_the_seven_averagepools_to_the_npu(built):
    project, first, _ = built
    sidecar = _sidecar(project, "rk3588", "inception_v2")
    assert sidecar["placement"]["cpu"] == 0
    assert len(sidecar["op_target"]) == 8 and set(sidecar["op_target"].values()) == {"npu"}
    # the build says that forcing count_include_pad=0 pools onto the NPU may change values
    assert any("rewrite" in w for w in sidecar["warnings"])
    # the rules predicted those pools on the CPU; they moved because the override asked, which is
    # not a misprediction, so predicted and actual placement agree everywhere else
    assert sidecar["overrides"][0]["nodes"] == ["n65", "n116", "n204", "n255", "n306", "n357", "n445", "n505"]
    assert sidecar["predicted_vs_actual"] == []


def test_rewrite_runs_every_pool_on_the_npu_of_rv1106_with_empty_op_target(built):
    project, _, _ = built
    sidecar = _sidecar(project, "rv1106", "inception_v2_int8")
    assert sidecar["op_target"] == {}
    assert sidecar["placement"]["cpu"] == 0
    assert len(sidecar["rewrites"]) >= 7
    assert sidecar["inputs"]["converted_onnx"]["path"].endswith("rewritten.onnx")
    assert sidecar["arguments"]["build"]["do_quantization"] is True


def test_an_op_target_key_renamed_by_the_toolkit_is_remapped_and_recorded(built):
    project, first, _ = built
    sidecar = _sidecar(project, "rk3588", "tiny_pool_identity")
    assert sidecar["remaps"] == [{"from": "301", "to": "y", "node": "pool0",
                                  "reason": "renamed by the toolkit's graph optimisation"}]
    assert sidecar["op_target"] == {"y": "npu"}
    assert sidecar["placement"]["cpu"] == 0
    assert "op_target remap: '301' -> 'y'" in first.stdout
    resolved = json.loads((project.root / "build" / "tiny_pool_identity" / "rk3588" / "resolved.json").read_text())
    assert resolved["op_target"] == {"301": "npu"} and resolved["op_target_used"] == {"y": "npu"}
    assert resolved["remaps"] == sidecar["remaps"]
    assert sidecar["arguments"]["load_onnx"] == {"inputs": ["x"], "input_size_list": [[1, 3, 32, 32]]}


def test_hybrid_quantization_keeps_the_declared_range_in_float(built):
    project, _, _ = built
    # The toolkit's own layer table, not our log line: r2..r6 are written by Relu n2, MaxPool n3 and the
    # Conv n4 fused with its Relu; those run in float16 and the rest of the network in int8.
    layers = json.loads((project.root / "build" / "shufflenet_hybrid" / "rk3588" / "placement.json").read_text())
    dtypes = {layer["full_name"]: layer["dtype"] for layer in layers}
    assert dtypes["Relu:n2"] == dtypes["MaxPool:n3"] == dtypes["Conv:n4#1"] == "FLOAT16"
    assert sum(dtype == "INT8" for dtype in dtypes.values()) > 50
    sidecar = _sidecar(project, "rk3588", "shufflenet_hybrid")
    assert sidecar["arguments"]["build"]["do_quantization"] is True


def test_a_cut_subgraph_converts_only_up_to_the_declared_output(built):
    project, _, _ = built
    stem = _sidecar(project, "rk3588", "densenet121_stem")
    full = _sidecar(project, "rk3588", "densenet121")
    assert stem["arguments"]["load_onnx"]["outputs"] == ["r7"]
    assert stem["placement"]["layers"] < full["placement"]["layers"] / 10
    assert [o["name"] for o in stem["verify"]["outputs"]] == ["r7"]


def test_verify_records_accuracy_per_output(built):
    project, first, _ = built
    sidecar = _sidecar(project, "rk3588", "tiny_pool_identity")  # random weights: a real comparison
    outputs = sidecar["verify"]["outputs"]
    assert outputs and all(o["cosine"] >= 0.99 for o in outputs)
    assert "cos " in first.stdout


def test_rknn_status_reports_everything_up_to_date(built):
    project, _, _ = built
    proc = project.doit("rknn-status")
    assert "14 of 14 up to date" in proc.stdout


def test_lock_entries_are_reproducible_from_a_clean_tree(built, tmp_path):
    project, _, _ = built
    before = json.loads((project.root / "dist" / "models.lock.json").read_text())["entries"]
    import yaml

    clean = Project(tmp_path)
    manifest = yaml.safe_load((REPO / "models.yaml").read_text())
    # rebuild one model only, to keep the test short: its lock entry must be identical
    manifest["models"] = [m for m in manifest["models"] if m["name"] == "densenet121"]
    clean.write_manifest(yaml.safe_dump(manifest))
    clean.doit("lock")
    after = json.loads((clean.root / "dist" / "models.lock.json").read_text())["entries"]
    assert after["rk3588/densenet121"] == before["rk3588/densenet121"]


def test_a_copy_of_dodo_builds_in_an_empty_directory(tmp_path, pool_identity_model):
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    shutil.copy(REPO / "dodo.py", workdir / "dodo.py")
    shutil.copy(pool_identity_model, workdir / "tiny.onnx")
    (workdir / "models.yaml").write_text("version: 1\nmodels:\n  - name: tiny\n    source: tiny.onnx\n"
                                         "    targets: [rk3588]\n")
    proc = subprocess.run([sys.executable, "-m", "doit"], cwd=workdir, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (workdir / "dist" / "rk3588" / "tiny.rknn").is_file()


def test_rv1106_cpu_fallbacks_are_flagged_and_fail_under_cpu_fallback_error(tmp_path):
    project = Project(tmp_path)
    project.write_manifest("""\
version: 1
models:
  - name: inception_v2
    source: examples/models/light_inception_v2.onnx
    targets: [rv1106]
    inputs: {data_0: [1, 3, 224, 224]}
    quantization: {dataset: examples/calib/inception_v2.txt}
    cpu_fallback: error
""")
    proc = project.doit(check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "inception_v2@rv1106: 7 layer(s) run on the CPU that no override asked for" in out
    assert "(cpu_fallback: error)" in out
    # the board failure is predicted too, with the nodes named
    assert "the rv1106 CPU runtime cannot run them" in out and "AveragePool:n65" in out
    assert "rknn fallback cpu failed" in out
    assert not (project.root / "dist" / "rv1106" / "inception_v2.rknn").exists()
    # the report still tells the story of a failed build
    project.doit("rknn-report")
    row = next(line for line in (project.root / "build" / "report.md").read_text().splitlines()
               if line.startswith("| inception_v2 | rv1106 |"))
    assert "| failed |" in row
