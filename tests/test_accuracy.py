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
    assert f"{worst[0]['node']} ({worst[0]['op_type']}, tensor {worst[0]['tensor']})" in message
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
