"""Bad model files are refused with the file and the reason before the toolkit starts.

A toolkit run costs seconds of start-up and reports a bad model late, inside a
traceback; these cases must instead stop at one of two earlier gates:

* the manifest (``load_manifest``): files that are missing, empty, not ONNX
  (text, garbage, truncated), graphs without nodes, and ``inputs``/``outputs``
  that name tensors the model lacks, each as ``PATH:LINE:COL: message``;
* the ``analyze`` task: models that parse but that the toolkit would fail on
  (missing or escaping external data, broken wiring, opset > 19, a known
  unloadable operator, custom-domain ops, inputs left dynamic). One doit run
  over a project holding all of them checks that each fails its own analyze
  task with its message and that no conversion starts.

No test here runs the toolkit.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import EXAMPLES, Project, make_pool_identity_model
from pipeline.analysis import UNLOADABLE_OPS, AnalysisError, analyze, fix_input_shapes, load_graph
from pipeline.manifest import ManifestError, load_manifest
from pipeline.placement_rules import Rules

INCEPTION = EXAMPLES / "models" / "light_inception_v2.onnx"
SQUEEZENET = EXAMPLES / "models" / "light_squeezenet.onnx"


# -- model makers ------------------------------------------------------------------------


def _relu_model(path: Path, *, opset: int = 13, shape=(1, 3, 8, 8), domain: str = "", op: str = "Relu",
                nodes: int = 1) -> Path:
    """x -> op -> ... -> y; ``domain`` other than "" gets its own opset import."""
    names = ["x", *[f"t{i}" for i in range(1, nodes)], "y"]
    graph_nodes = [helper.make_node(op, [names[i]], [names[i + 1]], name=f"n{i}", domain=domain)
                   for i in range(nodes)]
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    graph = helper.make_graph(graph_nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))])
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _external_weights_model(path: Path, location: str = "w.bin") -> Path:
    """A Conv whose 8x3x3x3 weight lives in ``location`` beside the model."""
    weights = numpy_helper.from_array(np.arange(216, dtype=np.float32).reshape(8, 3, 3, 3), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0)
    return path


def _point_external_data_at(path: Path, location: str) -> None:
    """Rewrite every external-data location in the model at ``path`` (a hand-edited file)."""
    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())


def _empty_graph_model(path: Path) -> Path:
    graph = helper.make_graph([], "empty", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])])
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString())
    return path


def _flip_a_name_byte(path: Path) -> Path:
    """Corrupt one byte so that the file still parses but the Identity reads a tensor nobody makes.

    ``make_pool_identity_model`` names the pool's output '301' and the Identity
    reads it; only the second occurrence (the Identity's input) is changed.
    """
    data = path.read_bytes()
    first = data.index(b"301")
    second = data.index(b"301", first + 1)
    path.write_bytes(data[:second] + b"3X1" + data[second + 3:])
    return path


# -- manifest-time refusals --------------------------------------------------------------


def _manifest(directory: Path, source: str, extra: str = "") -> Path:
    path = directory / "models.yaml"
    path.write_text(f"version: 1\nmodels:\n  - name: m\n    source: {source}\n    targets: [rk3588]\n{extra}")
    return path


def _refusal(path: Path) -> str:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    return str(caught.value)


def _prepare_truncated(directory: Path) -> str:
    data = INCEPTION.read_bytes()
    (directory / "truncated.onnx").write_bytes(data[: len(data) // 2])
    return "truncated.onnx"


def _prepare_garbage(directory: Path) -> str:
    (directory / "garbage.onnx").write_bytes(random.Random(0).randbytes(4096))
    return "garbage.onnx"


def _prepare_scrambled(directory: Path) -> str:
    data = bytearray(INCEPTION.read_bytes())
    rng = random.Random(1)
    for index in range(0, len(data), 97):
        data[index] = rng.randrange(256)
    (directory / "scrambled.onnx").write_bytes(bytes(data))
    return "scrambled.onnx"


def _prepare_text(directory: Path) -> str:
    (directory / "notes.onnx").write_text("This is a text file that someone named .onnx\n")
    return "notes.onnx"


def _prepare_empty(directory: Path) -> str:
    (directory / "empty.onnx").write_bytes(b"")
    return "empty.onnx"


def _prepare_no_nodes(directory: Path) -> str:
    _empty_graph_model(directory / "no_nodes.onnx")
    return "no_nodes.onnx"


# (id, makes the source and returns its name, expected message after "source '<name>' ")
MANIFEST_TIME = [
    ("truncated", _prepare_truncated, "is not a valid ONNX model (DecodeError"),
    ("garbage-bytes", _prepare_garbage, "is not a valid ONNX model"),
    ("scrambled-bytes", _prepare_scrambled, "is not a valid ONNX model"),
    ("text-file", _prepare_text, "is not a valid ONNX model"),
    ("empty-file", _prepare_empty, "is empty, not an ONNX model"),
    ("no-nodes", _prepare_no_nodes, "is not a valid ONNX model (no graph found)"),
    ("missing-file", lambda directory: "absent.onnx", "does not exist"),
]


@pytest.mark.parametrize(("prepare", "message"), [case[1:] for case in MANIFEST_TIME],
                         ids=[case[0] for case in MANIFEST_TIME])
def test_unreadable_sources_are_refused_by_the_manifest(tmp_path, monkeypatch, prepare, message):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the graph-facts memo stays private
    source = prepare(tmp_path)
    text = _refusal(_manifest(tmp_path, source))
    assert re.match(rf"^{re.escape(str(tmp_path / 'models.yaml'))}:4:13: source '{re.escape(source)}' "
                    rf"{re.escape(message)}", text), text


def test_inputs_naming_a_missing_input_are_refused_by_the_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    make_pool_identity_model(tmp_path / "m.onnx")
    text = _refusal(_manifest(tmp_path, "m.onnx", "    inputs: { image: [1, 3, 16, 16] }\n"))
    assert text == (f"{tmp_path / 'models.yaml'}:6:15: input 'image' is not a tensor of the model "
                    f"(model inputs: x)")


def test_outputs_naming_a_missing_tensor_are_refused_by_the_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    make_pool_identity_model(tmp_path / "m.onnx")
    text = _refusal(_manifest(tmp_path, "m.onnx", "    outputs: [pool0_out]\n"))
    assert text.startswith(f"{tmp_path / 'models.yaml'}:6:15: output 'pool0_out' is not a tensor of the model"), text


# -- analyze-time refusals: one doit run over a project of bad models ----------------------

# (model name, expected text in its analyze failure). Every source passes the manifest.
ANALYSIS_TIME = [
    ("missing-weights", "external data file 'w.bin' (tensor 'w') does not exist next to the model"),
    ("escaping-weights", "external data file '../w.bin' (tensor 'w') lies outside the model's directory"),
    ("flipped-byte", "node 'ident0' (Identity) reads tensor '3X1': no node, graph input or initializer provides it"),
    ("opset20", "the model uses ONNX opset 20, but rknn-toolkit2 loads opsets up to 19"),
    ("squeezenet-dropout", "Dropout node(s) 'n61' at opset 9: rknn-toolkit2 refuses them "
                           "(\"Not support 'Dropout' of opset-9!\")"),
    ("custom-domain", "1 MyOp node(s) from the custom domain 'com.example'"),
    ("dynamic-input", "input 'x' has the dynamic shape ['N', 3, 8, 8]: the toolkit needs fixed sizes; "
                      "set them in the manifest, e.g. `inputs: {x: [1, 3, 8, 8]}`"),
]
SOURCES = {name: f"models/{name}.onnx" for name, _ in ANALYSIS_TIME}


def _make_bad_models(models: Path) -> None:
    models.mkdir()
    _external_weights_model(models / "missing-weights.onnx")
    (models / "w.bin").unlink()
    # The weights exist, one directory up: readable, but not the model's to read.
    _external_weights_model(models / "escaping-weights.onnx", location="escaping.bin")
    os.replace(models / "escaping.bin", models.parent / "w.bin")
    _point_external_data_at(models / "escaping-weights.onnx", "../w.bin")
    _flip_a_name_byte(make_pool_identity_model(models / "flipped-byte.onnx"))
    _relu_model(models / "opset20.onnx", opset=20)
    shutil.copy(SQUEEZENET, models / "squeezenet-dropout.onnx")
    _relu_model(models / "custom-domain.onnx", domain="com.example", op="MyOp")
    _relu_model(models / "dynamic-input.onnx", shape=("N", 3, 8, 8))


@pytest.fixture(scope="module")
def bad_build(tmp_path_factory):
    project = Project(tmp_path_factory.mktemp("bad_models"))
    project.env["XDG_CACHE_HOME"] = str(project.root / ".cache")
    _make_bad_models(project.root / "models")
    entries = "".join(f"  - name: {name}\n    source: {SOURCES[name]}\n    targets: [rk3588]\n"
                      for name, _ in ANALYSIS_TIME)
    project.write_manifest(f"version: 1\nmodels:\n{entries}")
    proc = project.doit("--continue", check=False, timeout=600)
    return project, proc


def _failures(proc) -> dict[str, str]:
    """Task id -> the message doit printed for its failure (tasks that ran and failed only)."""
    found = re.findall(r"^TaskFailed - taskid:(\S+)\n(.*?)\n\n", proc.stdout + proc.stderr, flags=re.M | re.S)
    return dict(found)


def test_the_bad_build_fails_before_any_conversion(bad_build):
    _, proc = bad_build
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    ran = Project.ran(proc)
    assert {task for task in ran if task.startswith("analyze:")} == {f"analyze:{n}@rk3588" for n, _ in ANALYSIS_TIME}
    assert not [task for task in ran if not task.startswith("analyze:")], ran
    assert set(_failures(proc)) == {f"analyze:{name}@rk3588" for name, _ in ANALYSIS_TIME}


@pytest.mark.parametrize(("name", "message"), ANALYSIS_TIME, ids=[name for name, _ in ANALYSIS_TIME])
def test_each_bad_model_fails_its_analyze_task_with_file_and_reason(bad_build, name, message):
    project, proc = bad_build
    failure = _failures(proc).get(f"analyze:{name}@rk3588", "")
    line = 4 + 3 * [n for n, _ in ANALYSIS_TIME].index(name)
    source = project.root / SOURCES[name]
    assert failure.startswith(f"models.yaml:{line}:13: {name}@rk3588: {source}: "), failure
    assert message in failure, failure
    assert f"convert:{name}@rk3588" not in Project.ran(proc)
    assert not (project.root / "build" / name / "rk3588" / "model.rknn").exists()
    assert not (project.root / "build" / name / "rk3588" / "analysis.json").exists()
    assert not (project.root / "dist" / "rk3588" / f"{name}.rknn").exists()


# -- the same checks, called directly ------------------------------------------------------


@pytest.fixture(scope="module")
def rules():
    return Rules.load()


def _analyze(source: Path, rules, **record):
    return analyze({"name": "m", "source": str(source), **record}, "rk3588", rules)


def test_a_graph_without_nodes_is_an_analysis_error_too(tmp_path):
    with pytest.raises(AnalysisError, match="the ONNX graph has no nodes"):
        load_graph(_empty_graph_model(tmp_path / "empty.onnx"))


def test_truncated_and_text_files_are_analysis_errors_too(tmp_path):
    _prepare_truncated(tmp_path)
    _prepare_text(tmp_path)
    for name in ("truncated.onnx", "notes.onnx"):
        with pytest.raises(AnalysisError, match=rf"{name}: not a readable ONNX model \(DecodeError"):
            load_graph(tmp_path / name)


def test_inputs_and_outputs_the_model_lacks_are_analysis_errors_too(tmp_path, rules):
    source = make_pool_identity_model(tmp_path / "m.onnx")
    with pytest.raises(AnalysisError, match=r"inputs: 'image' is not an input of the model \(inputs: x\)"):
        fix_input_shapes(onnx.load(str(source)), {"image": [1, 3, 16, 16]})
    with pytest.raises(AnalysisError, match="outputs: '302' is not a tensor of the model"):
        _analyze(source, rules, outputs=["302"])


def test_external_weights_that_are_present_are_fine(tmp_path, rules):
    source = _external_weights_model(tmp_path / "m.onnx")
    assert _analyze(source, rules)["op_histogram"] == {"Conv": 1}


def test_truncated_external_weights_are_refused(tmp_path, rules):
    source = _external_weights_model(tmp_path / "m.onnx")
    with open(tmp_path / "w.bin", "r+b") as stream:
        stream.truncate(100)
    with pytest.raises(AnalysisError, match="external data file 'w.bin' is 100 bytes, but tensor 'w' needs 864"):
        _analyze(source, rules)


@pytest.mark.parametrize("location", ["/etc/hostname", "sub/../../w.bin", "link.bin"])
def test_external_weights_outside_the_model_directory_are_refused(tmp_path, rules, location):
    (tmp_path / "model").mkdir()
    source = _external_weights_model(tmp_path / "model" / "m.onnx")
    os.replace(tmp_path / "model" / "w.bin", tmp_path / "w.bin")
    os.symlink(tmp_path / "w.bin", tmp_path / "model" / "link.bin")  # a symlink that leaves the directory
    _point_external_data_at(source, location)
    with pytest.raises(AnalysisError, match=f"external data file '{re.escape(location)}' .* lies outside"):
        _analyze(source, rules)


def test_a_dynamic_input_fixed_by_the_manifest_is_fine(tmp_path, rules):
    source = _relu_model(tmp_path / "m.onnx", shape=("N", 3, 8, 8))
    doc = _analyze(source, rules, inputs={"x": [2, 3, 8, 8]})
    assert doc["graph_inputs"][0]["shape"] == [2, 3, 8, 8] and doc["dynamic_inputs"] == []


def test_options_dynamic_input_accepts_a_dynamic_input(tmp_path, rules):
    source = _relu_model(tmp_path / "m.onnx", shape=("N", 3, 8, 8))
    doc = _analyze(source, rules, options={"dynamic_input": [[[1, 3, 8, 8]], [[4, 3, 8, 8]]]})
    assert doc["dynamic_inputs"] == ["x"]


def test_options_dynamic_input_of_the_wrong_rank_is_refused(tmp_path, rules):
    source = _relu_model(tmp_path / "m.onnx", shape=("N", 3, 8, 8))
    with pytest.raises(AnalysisError, match=r"options.dynamic_input\[1\] gives \[1, 3, 8\] for input 'x', "
                                            r"which has 4 dimensions"):
        _analyze(source, rules, options={"dynamic_input": [[[1, 3, 8, 8]], [[1, 3, 8]]]})


def test_an_input_without_any_shape_is_refused(tmp_path, rules):
    source = _relu_model(tmp_path / "m.onnx")
    model = onnx.load(str(source))
    model.graph.input[0].type.tensor_type.ClearField("shape")
    source.write_bytes(model.SerializeToString())
    with pytest.raises(AnalysisError, match=r"input 'x' has no shape in the model: fix it in the manifest with "
                                            r"`inputs: \{x: \[\.\.\.\]\}`"):
        _analyze(source, rules)


def test_opset_19_and_dropout_without_its_mask_are_fine(tmp_path, rules):
    """The boundaries of the refusals, as measured: opset 19 loads, and Dropout at opset 9 only
    fails with its mask output."""
    assert _analyze(_relu_model(tmp_path / "opset19.onnx", opset=19), rules)["opsets"] == {"ai.onnx": 19}
    single = _relu_model(tmp_path / "dropout.onnx", opset=9, op="Dropout")
    assert _analyze(single, rules)["op_histogram"] == {"Dropout": 1}


def test_every_unloadable_entry_names_the_toolkit_message_and_a_fix():
    for rule in UNLOADABLE_OPS:
        assert rule.first_opset <= rule.last_opset and rule.min_outputs >= 1
        assert rule.toolkit_says and rule.fix


def test_all_problems_of_one_model_are_reported_together(tmp_path, rules):
    source = _relu_model(tmp_path / "m.onnx", opset=20, domain="com.example", op="MyOp")
    with pytest.raises(AnalysisError) as caught:
        _analyze(source, rules)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{source}: 2 problems:"
    assert "opset 20" in lines[1] and "custom domain 'com.example'" in lines[2]
