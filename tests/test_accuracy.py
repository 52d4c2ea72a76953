"""Per-layer quantization analysis (pipeline.accuracy): the toolkit's table parsed and named, then real builds.

The fixture ``error_analysis_outlier.txt`` is the table rknn-toolkit2 2.5.0
wrote for ``examples/models/tiny_outlier.onnx`` (int8, rk3588); the toolkit
tests build that model for real and check that the analysis names the layer
the outlier channel breaks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import accuracy

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "error_analysis_outlier.txt"

PRODUCERS = {  # the optimised graph of tiny_outlier as the toolkit reports it
    "x_int8": {"node": "x__cvt_float32_to_int8", "op_type": "exDataConvert", "inputs": ["x"]},
    "c0": {"node": "conv0", "op_type": "Conv", "inputs": ["x_int8"]},
    "r0": {"node": "relu0", "op_type": "Relu", "inputs": ["c0"]},
    "c1": {"node": "conv1", "op_type": "Conv", "inputs": ["r0"]},
    "r1": {"node": "relu1", "op_type": "Relu", "inputs": ["c1"]},
    "c2": {"node": "conv2", "op_type": "Conv", "inputs": ["r1"]},
    "r2": {"node": "relu2", "op_type": "Relu", "inputs": ["c2"]},
    "y_int8": {"node": "conv3", "op_type": "Conv", "inputs": ["r2"]},
    "y": {"node": "y__cvt_int8_to_float16", "op_type": "exDataConvert", "inputs": ["y_int8"]},
}


def test_table_rows_are_parsed_with_fused_layers_left_empty():
    layers = accuracy.parse_error_analysis(FIXTURE.read_text())
    assert [layer["tensor"] for layer in layers] == ["x", "x_int8", "c0", "r0", "c1", "r1", "c2", "r2", "y_int8", "y"]
    by_tensor = {layer["tensor"]: layer for layer in layers}
    assert by_tensor["c1"]["single"] == {"cosine": None, "euclidean": None}  # fused into relu1
    assert by_tensor["r2"]["toolkit_op"] == "Relu"
    assert by_tensor["r2"]["single"]["cosine"] == pytest.approx(0.56433)
    assert by_tensor["r1"]["entire"]["euclidean"] == pytest.approx(315.27499)


def test_colour_codes_and_flags_are_tolerated():
    text = "\x1b[1;33m[Conv] a\x1b[0m  \x1b[1;33m0.5\x1b[0m | 2.0   q_zero | 1.0\n[Input] x 1.0 | 0.0 1.0 | 0.0\n"
    conv, _ = accuracy.parse_error_analysis(text)
    assert conv["entire"] == {"cosine": 0.5, "euclidean": 2.0}
    assert conv["single"] == {"cosine": None, "euclidean": 1.0} and conv["flags"] == ["q_zero"]


def test_worst_layers_are_named_by_node_and_skip_bookkeeping():
    layers = accuracy.name_layers(accuracy.parse_error_analysis(FIXTURE.read_text()), PRODUCERS)
    worst = accuracy.worst_layers(layers)
    assert worst[0]["node"] == "relu2" and worst[0]["op_type"] == "Relu"
    assert all(layer["op_type"] not in accuracy.BOOKKEEPING and layer["tensor"] != "x" for layer in worst)
    assert [layer["node"] for layer in worst] == ["relu2", "conv3", "relu0", "relu1"]  # the actionable four
    lines = accuracy.failure_lines(accuracy.record(layers, ["s.npy"], "test"))
    assert "relu2 (Relu, tensor r2): single cos 0.5643, entire cos 0.5643" in lines[1]


def test_a_fused_layer_is_placed_in_its_anchor_s_row_of_the_layer_table():
    layers = accuracy.name_layers(accuracy.parse_error_analysis(FIXTURE.read_text()), PRODUCERS)
    table = [{"node": "conv2", "full_name": "Conv:conv2", "op_type": "ConvRelu"},
             {"node": "conv3", "full_name": "Conv:conv3", "op_type": "Conv"}]
    placed = {layer["tensor"]: layer for layer in accuracy.place_layers(layers, table)}
    assert placed["r2"]["anchor"] == "conv2" and placed["r2"]["layer"] == "Conv:conv2 (ConvRelu)"
    assert placed["y_int8"]["layer"] == "Conv:conv3 (Conv)" and placed["r0"]["layer"] is None
    assert "relu2 (Relu, tensor r2, layer Conv:conv2 (ConvRelu)): single cos 0.5643" in accuracy.describe(placed["r2"])


def test_an_analysis_error_is_quoted_not_hidden():
    assert accuracy.failure_lines({"error": "The input shape is wrong"}) == [
        "per-layer analysis could not run: The input shape is wrong"]
    assert accuracy.failure_lines(None) == []


# --- real toolkit -------------------------------------------------------------------------------


def _outlier_model(tmp_path: Path, verify: dict) -> dict:
    sys.path.insert(0, str(REPO / "examples" / "models"))
    import make_outlier

    import onnx

    source = tmp_path / "outlier.onnx"
    onnx.save(make_outlier.build(), str(source))
    rng = np.random.default_rng(0)
    samples = []
    for index in range(4):
        path = tmp_path / f"s{index}.npy"
        np.save(path, rng.uniform(0, 255, (1, 3, 32, 32)).astype(np.float32))
        samples.append(str(path))
    dataset = tmp_path / "dataset.txt"
    dataset.write_text("".join(f"{path}\n" for path in samples))
    return {"name": "outlier", "source": str(source),
            "mean_values": [[127.5] * 3], "std_values": [[127.5] * 3],
            "quantization": {"dataset": str(dataset), "samples": [[p] for p in samples], "dtype": "w8a8"},
            "verify": verify}


@pytest.mark.toolkit
def test_failed_int8_check_names_the_layer_the_outlier_breaks(tmp_path):
    from pipeline.conversion import ConversionFailed, convert

    model = _outlier_model(tmp_path, {"samples": 2, "min_cosine": 0.99})
    workdir = tmp_path / "out"
    with pytest.raises(ConversionFailed) as failure:
        convert(model, "rk3588", {}, workdir)
    message = str(failure.value)
    assert "accuracy check failed" in message and "layers that lose the most" in message
    record = json.loads((workdir / "convert.json").read_text())
    analysis = json.loads((workdir / "accuracy.json").read_text())
    assert record["accuracy"]["worst"] == analysis["worst"] and record["accuracy"]["why"] == "the accuracy check failed"
    worst = accuracy.worst_layers(analysis["layers"])
    # The outlier channel lives in relu1's output; the layer that consumes it (conv2 + relu2) breaks.
    assert worst[0]["node"] in ("conv2", "relu2") and worst[0]["single"]["cosine"] < 0.9
    assert f"{worst[0]['node']} ({worst[0]['op_type']}, tensor {worst[0]['tensor']}, layer Conv:conv2" in message
    assert not (workdir / "work" / "analysis" / "snapshot").exists()  # the toolkit's tensor dumps are removed


@pytest.mark.toolkit
def test_verify_layers_analyses_a_passing_float_free_model(tmp_path):
    """verify.layers on an int8 build that passes: accuracy.json is written, the build succeeds."""
    from pipeline.conversion import convert

    model = _outlier_model(tmp_path, {"samples": 2, "min_cosine": 0.5, "layers": True})
    workdir = tmp_path / "out"
    record = convert(model, "rk3588", {}, workdir)
    assert record["ok"] and record["accuracy"]["why"] == "verify.layers is set"
    analysis = json.loads((workdir / "accuracy.json").read_text())
    assert {layer["node"] for layer in analysis["layers"]} >= {"conv0", "relu2", "conv3"}


@pytest.mark.toolkit
def test_an_analysis_the_toolkit_refuses_returns_its_message(tmp_path):
    from pipeline import worker
    from pipeline.toolkit import Session

    model = _outlier_model(tmp_path, {"samples": 1})
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((1, 5, 7, 7), np.float32))
    session = Session(verbose=False)
    session.config(target_platform="rk3588", mean_values=model["mean_values"], std_values=model["std_values"])
    session.load_onnx(model["source"])
    session.build(do_quantization=True, dataset=model["quantization"]["dataset"])
    job = {"samples": [[str(bad)]], "verify": {}, "build": {"do_quantization": True}}
    result = worker._analyse(session, job, tmp_path / "work", session.tensor_producers(), "test")
    session.release()
    assert "(1, 5, 7, 7) is wrong" in result["error"] and "layers" not in result


# --- repair and checked hybrid builds (real toolkit) --------------------------------------------


def test_a_repair_step_keeps_the_worst_layer_and_what_feeds_it():
    from pipeline import repair

    layers = accuracy.name_layers(accuracy.parse_error_analysis(FIXTURE.read_text()), PRODUCERS)
    chosen, new = repair.next_step(layers, PRODUCERS, {})
    assert chosen["tensor"] == "r2"
    # relu2 is folded into conv2, whose input r1 (relu1 folded into conv1) carries the outlier channel
    assert new == {"conv2": ["r2", "c2"], "conv1": ["r1", "c1"]}
    chosen, more = repair.next_step(layers, PRODUCERS, new)
    assert chosen["tensor"] == "y_int8" and more == {"conv3": ["y_int8"]}
    assert repair.summary_line({"float_layers": ["conv2", "conv1"], "cosine_before": 0.6055,
                                "cosine_after": 0.99989}) == "repaired: 2 float layers, cos 0.6055 -> 0.9999"


def test_layers_built_in_int8_against_the_request_are_found():
    from pipeline import repair

    table = [{"id": 2, "node": "conv1", "dtype": "INT8", "full_name": "Conv:conv1", "op_type": "ConvRelu"},
             {"id": 3, "node": "conv2", "dtype": "FLOAT16", "full_name": "Conv:conv2", "op_type": "ConvRelu"}]
    asked = {"r1": {"node": "relu1", "anchor": "conv1"}, "c2": {"node": "conv2", "anchor": "conv2"}}
    (wrong,) = repair.unfloated_layers(asked, table)
    assert wrong["tensor"] == "r1" and wrong["layer"] == "Conv:conv1" and wrong["dtype"] == "INT8"


@pytest.mark.toolkit
def test_repair_keeps_the_outlier_layers_in_float_and_passes(tmp_path):
    from pipeline.conversion import convert
    from pipeline.layer_table import parse_layer_table

    model = _outlier_model(tmp_path, {"samples": 2, "min_cosine": 0.99})
    model["quantization"]["repair"] = {"min_cosine": 0.99, "max_float_layers": 4}
    workdir = tmp_path / "out"
    record = convert(model, "rk3588", {}, workdir)
    repair = record["repair"]
    assert record["ok"] and repair["ok"] and repair["cosine_before"] < 0.9 <= 0.99 <= repair["cosine_after"]
    assert set(repair["float_layers"]) == {"conv1", "conv2"} and len(repair["attempts"]) == 1
    assert record["verify"]["passed"]
    layers = parse_layer_table((workdir / "convert.log").read_text())
    dtypes = {layer["node"]: layer["dtype"] for layer in layers if layer["node"]}
    assert dtypes["conv1"] == dtypes["conv2"] == "FLOAT16" and dtypes["conv0"] == dtypes["conv3"] == "INT8"


@pytest.mark.toolkit
def test_repair_out_of_budget_fails_with_the_best_cosine_and_the_layers_tried(tmp_path):
    from pipeline.conversion import ConversionFailed, convert

    model = _outlier_model(tmp_path, {"samples": 2, "min_cosine": 0.99})
    model["quantization"]["repair"] = {"min_cosine": 0.99, "max_float_layers": 1}
    workdir = tmp_path / "out"
    with pytest.raises(ConversionFailed, match=r"repair did not reach min_cosine 0.99: keeping relu2 .* over "
                                               r"max_float_layers 1\. Best cosine 0\.\d+ with 0 float layers"):
        convert(model, "rk3588", {}, workdir)
    record = json.loads((workdir / "convert.json").read_text())
    assert record["step"] == "repair" and record["repair"]["ok"] is False


@pytest.mark.toolkit
@pytest.mark.parametrize("start, end, ok", [("c1", "r2", True), ("x_int8", "x_int8", False)])
def test_hand_written_hybrid_ranges_are_checked_against_the_layer_table(tmp_path, start, end, ok):
    """c1..r2 puts conv1 and conv2 in float16 (and fixes the outlier); x_int8, the input's int8
    conversion, is a tensor the toolkit accepts in the .cfg and then ignores: its own layer table shows
    the input still INT8, and the build fails instead of shipping something other than what was asked."""
    from pipeline.conversion import ConversionFailed, convert

    model = _outlier_model(tmp_path, {"samples": 2, "min_cosine": 0.0})
    model["quantization"]["hybrid"] = {"custom_layers": [{"start": start, "end": end}]}
    workdir = tmp_path / "out"
    if ok:
        record = convert(model, "rk3588", {}, workdir)
        assert record["ok"] and record["verify"]["outputs"][0]["cosine"] > 0.99
        return
    with pytest.raises(ConversionFailed, match=r"tensor 'x_int8' -> layer InputOperator:x \(InputOperator\) is INT8"):
        convert(model, "rk3588", {}, workdir)


def test_repair_adds_to_hand_written_ranges_and_never_removes_them(tmp_path):
    import yaml

    from pipeline import worker

    cfg = tmp_path / "m.quantization.cfg"
    order = ["x", "c0", "r0", "c1", "r1", "c2", "r2", "y"]
    cfg.write_text(yaml.safe_dump({"custom_quantize_layers": {}, "quantize_parameters": {t: {} for t in order}},
                                  sort_keys=False))
    custom = worker._add_custom_hybrid_layers(cfg, [{"start": "c0", "end": "r0", "dtype": "int16"}],
                                              ["r0", "c2", "not_quantized"])
    assert custom == {"c0": "int16", "r0": "int16", "c2": "float16"}  # the hand-written range wins its tensors
    assert yaml.safe_load(cfg.read_text())["custom_quantize_layers"] == custom


def _example(name: str) -> str:
    """One model's block of the repository's models.yaml, under its header and defaults."""
    text = (REPO / "models.yaml").read_text()
    head = text[:text.index("models:")]
    start = text.index(f"  - name: {name}")
    end = text.find("\n  - name:", start + 1)
    return head + "models:\n" + text[start:end if end > 0 else None].rstrip() + "\n"


@pytest.mark.toolkit
def test_the_repaired_example_records_its_choice_and_a_rebuild_reuses_it(tmp_path):
    from conftest import Project

    project = Project(tmp_path)
    project.write_manifest(_example("outlier_repaired"))
    first = project.doit()
    line = next(line for line in first.stdout.splitlines() if line.startswith("convert outlier_repaired@rk3588"))
    assert "repaired: 2 float layers, cos 0.6" in line, line
    pair = project.root / "build" / "outlier_repaired" / "rk3588"
    choice = json.loads((pair / "resolved.json").read_text())["repair"]
    assert set(choice["float_layers"]) == {"conv1", "conv2"} and choice["cosine_after"] >= 0.99
    sidecar = json.loads((project.root / "dist" / "rk3588" / "outlier_repaired.json").read_text())
    assert sidecar["repair"]["float_tensors"] == choice["float_tensors"]
    lock = json.loads((project.root / "dist" / "models.lock.json").read_text())
    assert lock["entries"]["rk3588/outlier_repaired"]["repair"]["float_tensors"] == choice["float_tensors"]
    assert "repair: keeping" in (pair / "convert.log").read_text()

    project.doit("forget", "convert:outlier_repaired@rk3588")
    second = project.doit()
    assert "convert:outlier_repaired@rk3588" in Project.ran(second)
    assert "repair: keeping" not in (pair / "convert.log").read_text()  # built with the choice, no search
    record = json.loads((pair / "convert.json").read_text())
    assert record["repair"]["reused"] and record["repair"]["attempts"] == [] and record["verify"]["passed"]
    assert "(choice reused)" in second.stdout


def test_the_report_draws_each_analysed_layer_and_the_repair():
    from pipeline import report

    layers = accuracy.name_layers(accuracy.parse_error_analysis(FIXTURE.read_text()), PRODUCERS)
    records = [{"model": "outlier", "target": "rk3588", "status": "ok", "accuracy_layers": layers,
                "verify": {"min_cosine": 0.99, "passed": True, "outputs": [{"cosine": 0.9999}]},
                "repair": {"float_layers": ["conv2", "conv1"], "cosine_before": 0.6121, "cosine_after": 0.9999}},
               {"model": "plain", "target": "rk3588", "status": "ok"}]
    summary = report.build_report(records)
    page = report.render_html(summary)
    assert page.count('<g class="layer"') == 4  # relu0, relu1, relu2, conv3: the layers with a measured cosine
    assert 'data-single="0.56433"' in page and "relu2 (Relu)" in page
    text = report.render_markdown(summary)
    assert "## Per-layer accuracy" in text and "relu2 (Relu): single cos 0.5643, entire cos 0.5643" in text
    assert "pass (repaired: 2 float layers, cos 0.6121 -\\> 0.9999)" in text  # ">" escaped for Markdown


@pytest.mark.toolkit
def test_repair_works_on_a_rewritten_model_with_an_override(tmp_path):
    """The repair builds what resolution made (a rewritten ONNX, op_target) and never drops it."""
    import shutil

    from pipeline.conversion import convert

    model = _outlier_model(tmp_path, {"samples": 2, "min_cosine": 0.99})
    model["quantization"]["repair"] = {"min_cosine": 0.99, "max_float_layers": 4}
    rewritten = tmp_path / "rewritten.onnx"
    shutil.copy(model["source"], rewritten)
    resolved = {"converted_onnx": str(rewritten), "op_target": {"r0": "npu"}}
    workdir = tmp_path / "out"
    record = convert(model, "rk3588", resolved, workdir)
    assert record["repair"]["ok"] and set(record["repair"]["float_layers"]) == {"conv1", "conv2"}
    assert record["op_target"] == {"r0": "npu"} and record["converted_onnx"] == str(rewritten)
    cfg = (workdir / "work" / "rewritten.quantization.cfg").read_text()
    assert "c1: float16" in cfg and "c2: float16" in cfg


@pytest.mark.toolkit
def test_a_repair_choice_is_part_of_the_cache_key_and_is_restored(tmp_path):
    """The search is stored under its own key and under the key with its choice: a fresh checkout
    restores the search's entry and records the choice, and its next build restores by the choice."""
    from conftest import Project

    cache = tmp_path / "cache"
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first = Project(tmp_path / "a")
    first.env["RKNN_PIPELINE_CACHE"] = str(cache)
    first.write_manifest(_example("outlier_repaired"))
    first.doit()
    entries = [json.loads(entry.read_text()) for entry in cache.rglob("entry.json")]
    conversions = [entry for entry in entries if "model.rknn" in entry["files"]]
    assert len(conversions) == 2  # under the search's key and under the key with its choice

    second = Project(tmp_path / "b")  # another checkout, no build/ yet
    second.env["RKNN_PIPELINE_CACHE"] = str(cache)
    second.write_manifest(_example("outlier_repaired"))
    run = second.doit()
    assert "(cache hit)" in run.stdout and "repaired: 2 float layers" in run.stdout
    pair = second.root / "build" / "outlier_repaired" / "rk3588"
    choice = json.loads((pair / "resolved.json").read_text())["repair"]
    assert set(choice["float_layers"]) == {"conv1", "conv2"}
    second.doit("forget", "convert:outlier_repaired@rk3588")
    again = second.doit()
    assert "(cache hit)" in again.stdout
    record = json.loads((pair / "convert.json").read_text())
    assert record["cache"]["hit"] and record["cache"]["key"] != json.loads(
        (first.root / "build" / "outlier_repaired" / "rk3588" / "convert.json").read_text())["cache"]["key"]
