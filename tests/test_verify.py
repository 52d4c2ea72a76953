"""The accuracy check (pipeline.verify): its math and input conventions, then real toolkit conversions.

The toolkit tests run one real conversion each and read the ``verify`` block
of the conversion record. The random-weight Conv model is the proof that a
good conversion passes; light_squeezenet (constant weights) overflows float16
and proves that a bad one fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper, version_converter

from pipeline import verify
from pipeline.conversion import ConversionFailed, convert

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"


# --- helpers -------------------------------------------------------------------


def make_conv_model(path: Path) -> Path:
    """x[1,3,8,8] -> Conv(8, 3x3) 'c' -> Relu 'r' -> Conv(4, 1x1) 'y'; seeded random weights."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.3, "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"], name="relu1"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(nodes, "conv_relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w1, b1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def spec(shape=(1, 3, 2, 2), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> verify.InputSpec:
    return verify.InputSpec("x", tuple(shape), np.float32, np.array(mean), np.array(std))


class OrtSimulator:
    """Stands in for pipeline.toolkit.Session: applies the RKNN model's mean/std itself, then onnxruntime."""

    def __init__(self, path: Path, mean, std):
        self.runtime = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.mean = np.asarray(mean, np.float64).reshape(1, -1, 1, 1)
        self.std = np.asarray(std, np.float64).reshape(1, -1, 1, 1)
        self.formats: list = []

    def simulate(self, inputs, data_format=None):
        self.formats.append(list(data_format))
        (array,), (layout,) = inputs, data_format
        nchw = array.transpose(0, 3, 1, 2) if layout == "nhwc" else array
        x = ((nchw - self.mean) / self.std).astype(np.float32)
        return self.runtime.run(None, {"x": x})


# --- the math and the input conventions (no toolkit) ------------------------------


def test_cosine_and_max_error_math():
    a = np.array([1.0, 2.0, 3.0])
    assert verify.cosine_similarity(a, 2 * a) == (pytest.approx(1.0), None)
    assert verify.cosine_similarity(a, -a)[0] == pytest.approx(-1.0)
    assert verify.cosine_similarity(np.array([1.0, 0.0]), np.array([0.0, 1.0]))[0] == pytest.approx(0.0)
    assert verify.max_abs_error(a, np.array([1.5, 2.0, 0.0])) == pytest.approx(3.0)

    zeros = np.zeros(3)
    cosine, note = verify.cosine_similarity(zeros, zeros)
    assert cosine == 1.0 and "all zero" in note
    cosine, note = verify.cosine_similarity(zeros, a)
    assert cosine == 0.0 and "taken as 0.0" in note
    assert verify.cosine_similarity(np.array([np.nan, 1.0]), a[:2])[0] == 0.0


def test_non_finite_simulator_output_is_reported_not_serialised():
    result = verify.compare_output("out", [np.ones(3, np.float32)], [np.array([1, np.inf, np.nan], np.float16)])
    assert result["cosine"] == 0.0 and result["max_abs_error"] is None
    assert "2 from the simulator, 0 from onnxruntime" in result["cosine_note"]


def test_compare_output_spans_all_samples():
    """Cosine over the concatenation of the samples, not an average of per-sample cosines."""
    expected = [np.array([[1.0, 0.0]], np.float32), np.array([[0.0, 10.0]], np.float32)]
    simulated = [np.array([[0.0, 1.0]], np.float16), np.array([[0.0, 10.0]], np.float16)]
    result = verify.compare_output("out", expected, simulated)
    assert result["cosine"] == pytest.approx(100 / (np.sqrt(101) * np.sqrt(101)))
    assert result["max_abs_error"] == pytest.approx(1.0)
    assert result["shape"] == [1, 2] and "cosine_note" not in result


def test_npy_nhwc_is_transposed_and_normalised_for_onnxruntime_only():
    nhwc = np.arange(12, dtype=np.float32).reshape(1, 2, 2, 3)
    prepared = verify.prepare_array(spec(mean=(1, 2, 3), std=(2, 4, 8)), nhwc)
    nchw = nhwc.transpose(0, 3, 1, 2)
    assert prepared.data_format == "nchw"
    np.testing.assert_array_equal(prepared.simulator, nchw)
    np.testing.assert_allclose(prepared.reference[0, 2], (nchw[0, 2] - 3) / 8)
    assert prepared.reference.dtype == np.float32


def test_non_image_inputs_are_not_normalised():
    raw = np.array([[5.0, 6.0, 7.0]])
    prepared = verify.prepare_array(spec(shape=(1, 3), mean=(1,), std=(2,)), raw)
    np.testing.assert_array_equal(prepared.simulator, prepared.reference)
    np.testing.assert_array_equal(prepared.reference, raw.astype(np.float32))


def test_random_inputs_follow_the_std_range():
    rng = np.random.default_rng(0)
    image = verify.prepare_random(spec(std=(127.5,) * 3), rng)
    assert image.simulator.min() >= 0 and image.simulator.max() < 255
    normal = verify.prepare_random(spec(), rng)
    assert normal.simulator.min() < 0


def test_cut_reference_model_outputs_the_inner_tensor(tmp_path):
    model = onnx.load(str(make_conv_model(tmp_path / "conv.onnx")))
    cut = verify.reference_model(model, ["x"], ["r"])
    assert [o.name for o in cut.graph.output] == ["r"]
    assert [o.name for o in model.graph.output] == ["y"]  # the source model is untouched
    runtime = ort.InferenceSession(cut.SerializeToString(), providers=["CPUExecutionProvider"])
    (r,) = runtime.run(None, {"x": np.ones((1, 3, 8, 8), np.float32)})
    assert r.shape == (1, 8, 8, 8) and r.min() >= 0


def test_inner_input_cuts_the_reference_model_there(tmp_path):
    """load_onnx ``inputs`` naming an inner tensor: onnxruntime starts the graph there too."""
    model = onnx.load(str(make_conv_model(tmp_path / "conv.onnx")))
    (inner,) = verify.input_specs(model, {"inputs": ["r"], "input_size_list": [[1, 8, 8, 8]]}, {})
    assert inner.shape == (1, 8, 8, 8) and inner.dtype == np.float32
    cut = verify.reference_model(model, ["r"], ["y"])
    runtime = ort.InferenceSession(cut.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = runtime.run(None, {"r": np.zeros((1, 8, 8, 8), np.float32)})
    assert y.shape == (1, 4, 8, 8) and not y.any()  # conv2 has no bias


def test_verify_model_feeds_images_as_nhwc_uint8(tmp_path):
    """With a stand-in simulator that normalises like the RKNN model, the two sides agree exactly."""
    import cv2

    source = make_conv_model(tmp_path / "conv.onnx")
    images = []
    for index in range(2):
        path = tmp_path / f"img{index}.png"
        cv2.imwrite(str(path), np.random.default_rng(index).integers(0, 256, (16, 16, 3), dtype=np.uint8))
        images.append(str(path))
    mean, std = [[10.0, 20.0, 30.0]], [[50.0, 60.0, 70.0]]
    job = {"verify": {"samples": 5}, "verify_source": str(source), "samples": images,
           "config": {"mean_values": mean, "std_values": std}, "load_onnx": {}}
    session = OrtSimulator(source, mean, std)
    result = verify.verify_model(session, job)
    assert result["samples"] == 2 and result["input_source"] == "dataset"
    assert session.formats == [["nhwc"], ["nhwc"]]
    (output,) = result["outputs"]
    assert output["name"] == "y" and output["shape"] == [1, 4, 8, 8]
    assert output["cosine"] == pytest.approx(1.0) and output["max_abs_error"] < 1e-4
    assert result["passed"] and result["min_cosine"] == 0.99


# --- real toolkit conversions ---------------------------------------------------------


@pytest.mark.toolkit
def test_squeezenet_float16_overflow_fails_the_check(tmp_path):
    """light_squeezenet's constant 0.02 weights grow activations past 1e9 (float32 copes);
    in float16 the simulator overflows to inf/NaN, and verify must fail the conversion.

    The toolkit rejects the example's opset-9 Dropout, so an opset-13 copy is
    converted while onnxruntime still runs the original source.
    """
    source = MODELS / "light_squeezenet.onnx"
    upgraded = tmp_path / "squeezenet_opset13.onnx"
    onnx.save(version_converter.convert_version(onnx.load(str(source)), 13), str(upgraded))
    model = {"name": "sq", "source": str(source),
             "mean_values": [[0, 0, 0]], "std_values": [[1, 1, 1]],
             "verify": {"samples": 2, "min_cosine": 0.99}}
    workdir = tmp_path / "out"
    with pytest.raises(ConversionFailed, match="accuracy check failed.*softmaxout_1"):
        convert(model, "rk3588", {"converted_onnx": str(upgraded)}, workdir)
    record = json.loads((workdir / "convert.json").read_text())
    assert record["step"] == "verify" and not (workdir / "model.rknn").exists()
    result = record["verify"]
    assert result["samples"] == 2 and result["input_source"] == "random(seed=0)"
    assert not result["passed"] and "simulator" in result["note"]
    (output,) = result["outputs"]
    assert output["name"] == "softmaxout_1" and output["shape"] == [1, 1000, 1, 1]
    assert output["cosine"] == 0.0 and output["max_abs_error"] is None
    assert "from the simulator" in output["cosine_note"]


@pytest.mark.toolkit
def test_int8_with_npy_dataset_and_normalisation(tmp_path):
    source = make_conv_model(tmp_path / "conv.onnx")
    rng = np.random.default_rng(1)
    samples = []
    for index in range(4):
        path = tmp_path / f"sample{index}.npy"
        # NCHW: rknn-toolkit2 2.5.0's calibration rejects NHWC .npy files for ONNX models
        # (the NHWC branch of verify is covered by the unit test above).
        np.save(path, rng.uniform(0, 255, (1, 3, 8, 8)).astype(np.float32))
        samples.append(str(path))
    dataset = tmp_path / "dataset.txt"
    dataset.write_text("".join(f"{path}\n" for path in samples))
    model = {"name": "conv", "source": str(source),
             "mean_values": [[127.5, 127.5, 127.5]], "std_values": [[127.5, 127.5, 127.5]],
             "quantization": {"dataset": str(dataset), "samples": samples, "dtype": "w8a8"},
             "verify": {"samples": 3, "min_cosine": 0.98}}
    record = convert(model, "rk3588", {}, tmp_path / "out")
    result = record["verify"]
    assert result["samples"] == 3 and result["input_source"] == "dataset"
    (output,) = result["outputs"]
    assert output["name"] == "y" and output["cosine"] > 0.98 and result["passed"]


@pytest.mark.toolkit
def test_cut_graph_compares_the_intermediate_tensor(tmp_path):
    source = make_conv_model(tmp_path / "conv.onnx")
    model = {"name": "conv", "source": str(source), "outputs": ["c"],
             "verify": {"samples": 2, "min_cosine": 0.99}}
    record = convert(model, "rk3588", {}, tmp_path / "out")
    result = record["verify"]
    (output,) = result["outputs"]
    assert output["name"] == "c" and output["shape"] == [1, 8, 8, 8]
    assert output["cosine"] > 0.99 and result["passed"]
