"""Prove that rewrite_average_pools preserves model outputs exactly.

Each check runs the original and the rewritten model in onnxruntime on seeded
random inputs and requires max|original - rewritten| <= 1e-5 * max(1, max|original|)
(float16 models get a tolerance matching their precision).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.rewrite import (
    RewriteError,
    infer_static_shapes,
    name_unnamed_nodes,
    rewrite_average_pools,
)

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"
CONFORMANCE = Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"
CONFORMANCE_CASES = sorted(CONFORMANCE.glob("test_averagepool*"))
TOLERANCE = {np.float32: 1e-5, np.float16: 2e-3, np.float64: 1e-12}


# --- helpers -------------------------------------------------------------------


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime warns about stale inferred shapes
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _random_feeds(model: onnx.ModelProto, shapes: dict[str, list[int]], seed: int = 0) -> dict:
    """Seeded normal inputs for the named graph inputs, in the input's dtype."""
    rng = np.random.default_rng(seed)
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    return {
        name: rng.standard_normal(shape).astype(helper.tensor_dtype_to_np_dtype(types[name]))
        for name, shape in shapes.items()
    }


def _assert_equivalent(original: onnx.ModelProto, rewritten: onnx.ModelProto, feeds: dict) -> None:
    """Both models give the same outputs (shape and value) on ``feeds``."""
    expected = _session(original).run(None, feeds)
    actual = _session(rewritten).run(None, feeds)
    for want, got in zip(expected, actual):
        assert got.shape == want.shape
        assert got.dtype == want.dtype
        limit = TOLERANCE[want.dtype.type] * max(1.0, float(np.abs(want).max(initial=0.0)))
        error = np.abs(want.astype(np.float64) - got.astype(np.float64)).max(initial=0.0)
        assert error <= limit, f"max error {error} > {limit}"


def _pool_names(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in name_unnamed_nodes(model).graph.node if n.op_type == "AveragePool"]


def _assert_rewritten_form(model: onnx.ModelProto, records: list[dict]) -> None:
    """Every rewritten pool is include-pad, ceil-free, explicit-pad, and feeds its Mul."""
    nodes = {n.name: n for n in model.graph.node}
    producers = {out: n for n in model.graph.node for out in n.output}
    for record in records:
        pool = nodes[record["node"]]
        attrs = {a.name: helper.get_attribute_value(a) for a in pool.attribute}
        assert pool.op_type == "AveragePool"
        assert attrs["count_include_pad"] == 1
        assert attrs.get("ceil_mode", 0) == 0
        assert "auto_pad" not in attrs
        assert pool.output[0] == f"{record['output']}__cip1"
        mul = producers[record["output"]]
        assert mul.op_type == "Mul" and mul.name == f"{record['node']}__cip_scale"
        assert list(mul.input) == [pool.output[0], record["scale_initializer"]]
    json.dumps(records)  # records must be JSON-serialisable


def _pool_model(
    shape: list, opset: int = 22, elem_type: int = TensorProto.FLOAT, name: str = "pool", **attrs
) -> onnx.ModelProto:
    """A one-AveragePool model reading ``x`` of ``shape`` and writing ``y``."""
    node = helper.make_node("AveragePool", ["x"], ["y"], name=name, **attrs)
    graph = helper.make_graph(
        [node],
        "pool",
        [helper.make_tensor_value_info("x", elem_type, shape)],
        [helper.make_tensor_value_info("y", elem_type, [None] * len(shape))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _check_pool(shape: list[int], opset: int = 22, elem_type: int = TensorProto.FLOAT, **attrs):
    """Rewrite the one pool of a fresh model; check form and exactness; return (model, records)."""
    model = _pool_model(shape, opset, elem_type, **attrs)
    rewritten, records = rewrite_average_pools(model, ["pool"])
    onnx.checker.check_model(rewritten, full_check=True)
    _assert_rewritten_form(rewritten, records)
    _assert_equivalent(model, rewritten, _random_feeds(model, {"x": shape}))
    return rewritten, records


def _scale(model: onnx.ModelProto, record: dict) -> np.ndarray:
    init = next(i for i in model.graph.initializer if i.name == record["scale_initializer"])
    return numpy_helper.to_array(init)


# --- (a) onnx conformance cases ----------------------------------------------------


def test_conformance_cases_are_shipped():
    assert len(CONFORMANCE_CASES) >= 20


# Conformance cases the installed onnxruntime cannot run, each with why; any other failure to run
# a case is a test failure, and a listed case that runs after all fails too (the list stays true).
# Empty with onnxruntime 1.2x: it runs all of them.
ORT_CANNOT_RUN: dict[str, str] = {}


@pytest.mark.parametrize("case", CONFORMANCE_CASES, ids=lambda p: p.name)
def test_conformance_case(case: Path):
    model = onnx.load(case / "model.onnx")
    if case.name in ORT_CANNOT_RUN:
        with pytest.raises(Exception):
            _session(model)
        pytest.skip(f"onnxruntime cannot run the original: {ORT_CANNOT_RUN[case.name]}")
    _session(model)
    names = _pool_names(model)
    assert names, "case has no AveragePool"
    rewritten, records = rewrite_average_pools(model, names)
    _assert_rewritten_form(rewritten, records)
    inputs = {i.name for i in model.graph.input}
    shapes = {n: s for n, s in infer_static_shapes(model).items() if n in inputs}
    _assert_equivalent(model, rewritten, _random_feeds(model, shapes))


# --- (b) example models ------------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "input_name"),
    [("light_inception_v2.onnx", "data_0"), ("light_shufflenet.onnx", "gpu_0/data_0")],
)
def test_example_model(file: str, input_name: str):
    model = onnx.load(MODELS / file)
    before = model.SerializeToString()
    names = _pool_names(model)
    rewritten, records = rewrite_average_pools(model, names)
    assert model.SerializeToString() == before, "input model must stay untouched"
    assert [r["node"] for r in records] == names
    assert max(r["scale_max"] for r in records) == pytest.approx(9 / 4)
    _assert_rewritten_form(rewritten, records)
    assert [o.name for o in rewritten.graph.output] == [o.name for o in model.graph.output]
    onnx.checker.check_model(rewritten)
    feeds = _random_feeds(model, {input_name: [1, 3, 224, 224]}, seed=1)
    _assert_equivalent(model, rewritten, feeds)


# --- (c) hand-made cases -----------------------------------------------------------


def test_3x3_pad1_stride1_corner_scale():
    rewritten, [record] = _check_pool([1, 2, 6, 7], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    scale = _scale(rewritten, record)[0, 0]
    assert scale.shape == (6, 7)
    assert scale[0, 0] == scale[-1, -1] == pytest.approx(9 / 4)
    assert scale[0, 3] == scale[3, 0] == pytest.approx(9 / 6)
    assert scale[2, 3] == 1.0
    assert (record["scale_min"], record["scale_max"]) == (1.0, 2.25)
    assert record["extra_end_pad"] == [0, 0]


def test_asymmetric_pads():
    _, [record] = _check_pool([1, 3, 7, 8], kernel_shape=[3, 3], pads=[0, 1, 2, 0])
    assert (record["pads_before"], record["pads_after"]) == ([0, 1], [2, 0])


@pytest.mark.parametrize("opset", [10, 11, 18, 19, 22])
@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize(
    ("size", "kernel", "pads"),
    [(8, 3, [0, 0, 0, 0]), (7, 3, [1, 1, 1, 1]), (6, 2, [1, 0, 1, 0]), (4, 3, [1, 1, 2, 2])],
)
def test_ceil_mode_stride2(opset, count_include_pad, size, kernel, pads):
    _, [record] = _check_pool(
        [2, 3, size, size + 1], opset,
        kernel_shape=[kernel, kernel], strides=[2, 2], pads=pads,
        ceil_mode=1, count_include_pad=count_include_pad,
    )
    assert record["ceil_mode"] == 1


def test_ceil_mode_overhang_becomes_end_pad():
    _, [record] = _check_pool([1, 1, 5, 5], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
    assert record["extra_end_pad"] == [1, 1]
    assert record["scale_max"] == 4.0  # the corner window keeps 1 of 4 taps


def test_ceil_mode_drops_window_starting_in_end_pad():
    rewritten, [record] = _check_pool(
        [1, 1, 4, 4], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1
    )
    assert _scale(rewritten, record).shape == (1, 1, 2, 2)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("ceil_mode", [0, 1])
def test_auto_pad(auto_pad, ceil_mode):
    rewritten, [record] = _check_pool(
        [1, 2, 9, 10], kernel_shape=[4, 3], strides=[2, 3], auto_pad=auto_pad, ceil_mode=ceil_mode
    )
    if auto_pad == "SAME_LOWER":
        assert record["pads_before"][0] > record["pads_after"][0]


def test_1d():
    _check_pool([2, 4, 11], kernel_shape=[4], strides=[3], pads=[2, 1], ceil_mode=1)


def test_3d():
    _check_pool(
        [1, 2, 5, 6, 7],
        kernel_shape=[3, 2, 3], strides=[2, 1, 2], pads=[1, 0, 2, 1, 1, 0], ceil_mode=1,
    )


@pytest.mark.parametrize("count_include_pad", [0, 1])
def test_dilations(count_include_pad):
    _, [record] = _check_pool(
        [1, 2, 10, 9], kernel_shape=[3, 2], strides=[2, 3], dilations=[2, 3], pads=[1, 1, 1, 0],
        ceil_mode=1, count_include_pad=count_include_pad,
    )
    assert record["extra_end_pad"] == [1, 0]


def test_float16():
    rewritten, [record] = _check_pool(
        [1, 3, 9, 9], elem_type=TensorProto.FLOAT16, kernel_shape=[3, 3], strides=[2, 2],
        pads=[1, 1, 1, 1], ceil_mode=1,
    )
    assert _scale(rewritten, record).dtype == np.float16


def test_double_map_dtype():
    model = _pool_model(
        [1, 1, 5, 5], elem_type=TensorProto.DOUBLE, kernel_shape=[3, 3], pads=[1, 1, 1, 1]
    )
    rewritten, [record] = rewrite_average_pools(model, ["pool"])
    onnx.checker.check_model(rewritten, full_check=True)
    assert _scale(rewritten, record).dtype == np.float64


def test_dynamic_batch_is_fine():
    model = _pool_model(["N", 3, 6, 6], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    rewritten, _ = rewrite_average_pools(model, ["pool"])
    _assert_equivalent(model, rewritten, _random_feeds(model, {"x": [5, 3, 6, 6]}))


def test_seeded_random_configurations():
    """A sweep over random geometries, opsets and modes."""
    rng = np.random.default_rng(7)
    for _ in range(150):
        rank = int(rng.integers(1, 4))
        opset = int(rng.choice([11, 19, 22]))
        kernel = rng.integers(1, 5, rank)
        dilations = rng.integers(1, 3, rank) if opset >= 19 else np.ones(rank, int)
        pads = [int(rng.integers(0, k)) for k in (*kernel, *kernel)]
        spatial = [int(s) for s in (dilations * (kernel - 1) + 1 + rng.integers(0, 6, rank))]
        attrs = {
            "kernel_shape": [int(k) for k in kernel],
            "strides": [int(s) for s in rng.integers(1, 4, rank)],
            "pads": pads,
            "ceil_mode": int(rng.integers(0, 2)),
            "count_include_pad": int(rng.integers(0, 2)),
        }
        if opset >= 19:
            attrs["dilations"] = [int(d) for d in dilations]
        try:
            _check_pool([1, 2, *spatial], opset, **attrs)
        except RewriteError as error:  # only a dilated end pad may outgrow the kernel
            assert "must stay below kernel" in str(error) and max(dilations) > 1, attrs


# --- unnamed nodes -----------------------------------------------------------------


def test_unnamed_nodes_get_deterministic_names():
    model = _pool_model([1, 1, 4, 4], name="", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    assert _pool_names(model) == ["AveragePool_0"]
    rewritten, [record] = rewrite_average_pools(model, ["AveragePool_0"])
    assert record["node"] == "AveragePool_0"
    assert [n.name for n in rewritten.graph.node] == ["AveragePool_0", "AveragePool_0__cip_scale"]
    assert model.graph.node[0].name == ""


# --- (d) errors --------------------------------------------------------------------


def test_dynamic_spatial_dims_are_refused():
    model = _pool_model([1, 3, "H", 8], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    with pytest.raises(RewriteError, match="'pool'.*static"):
        rewrite_average_pools(model, ["pool"])


def test_unknown_node_name_lists_nearby_names():
    model = _pool_model([1, 3, 8, 8], kernel_shape=[3, 3])
    with pytest.raises(RewriteError, match=r"no node named 'pol'.*\['pool'\]"):
        rewrite_average_pools(model, ["pol"])


def test_non_average_pool_is_refused():
    model = _pool_model([1, 3, 8, 8], kernel_shape=[3, 3])
    model.graph.node.insert(0, helper.make_node("Relu", ["x"], ["r"], name="relu"))
    model.graph.node[1].input[0] = "r"
    with pytest.raises(RewriteError, match=r"'relu' is a Relu.*\['pool'\]"):
        rewrite_average_pools(model, ["relu"])


def test_same_auto_pad_with_dilations_is_refused():
    model = _pool_model([1, 1, 8, 8], kernel_shape=[2, 2], dilations=[2, 2], auto_pad="SAME_UPPER")
    with pytest.raises(RewriteError, match="dilations"):
        rewrite_average_pools(model, ["pool"])


def test_dilated_end_pad_reaching_kernel_is_refused():
    model = _pool_model(
        [1, 1, 9, 10],
        kernel_shape=[3, 2], strides=[2, 3], dilations=[2, 3], pads=[1, 1, 2, 0], ceil_mode=1,
    )
    with pytest.raises(RewriteError, match="must stay below kernel"):
        rewrite_average_pools(model, ["pool"])
