"""Build single-op ONNX models with the real rknn-toolkit2 and compare its layer table with the rules.

Usage::

    python tests/placement_probe.py OUT.json [--case OP/VARIANT ...] [--targets T,...]

Run as a subprocess (by ``tests/test_placement_facts.py`` and
``benchmarks/placement_agreement.py``): the toolkit prints its layer table from
C++ to file descriptor 1, so the caller sends stdout/stderr to a log file and
reads the results from ``OUT.json`` only.

Each case in :data:`CASES` is one ONNX node (made with ``onnx.helper``; its
other inputs are initializers, so the graph has one float input ``x``), chosen
to exercise a constraint of ``pipeline/data/op_rules.yaml`` where that is
cheap (AveragePool count_include_pad 0/1, Transpose permutations, Pow
exponents...). For every case and target in :data:`TARGETS` the probe

- predicts the node's placement with ``pipeline.analysis.analyze`` and the
  packaged rules, exactly as the ``analyze`` task does;
- runs ``config -> load_onnx -> build`` with ``RKNN(verbose=True)`` in a child
  forked from the process that imported the toolkit once (``platform_probe.isolated``:
  a native abort becomes a result), float16 where the target allows it and w8a8
  with a two-sample ``.npy`` dataset on the targets that refuse float;
- parses the layer table with ``pipeline.layer_table.parse_layer_table`` and
  compares it with the prediction through ``pipeline.stages.placement_comparison``,
  the comparison the export sidecar's ``predicted_vs_actual`` comes from.

``OUT.json`` holds ``{"toolkit", "rules_version", "rules_digest", "seconds",
"targets", "unprobed": [op types of the rules no case builds], "results": [...]}``.
A result is ``{"op", "variant", "target", "dtype", "predicted", "reason",
"rule", "actual", "layers", "outcome", "agree", "step", "message", "seconds"}``:

- ``outcome``: ``compared`` (the layer table places the node), ``no_layer``
  (the build succeeded but emitted no layer for the node), ``not_compared``
  (the rules fold the op, but alone in a graph the toolkit keeps a layer),
  ``refused`` or ``crashed`` (see ``platform_probe.run_case``);
- ``actual``: ``npu`` / ``cpu`` from the layer table, or None;
- ``agree``: True or False for ``compared``; for ``no_layer``, True exactly when
  the rules say the toolkit folds the op (placement ``none``); None otherwise;
- ``layers``: ``OpType:TARGET`` of every layer named after the node (the
  toolkit renames what it rewrites: ``probe_node#1``, ``x_tp``...; in a one-node
  graph every named layer comes from that node), to show what it became.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from platform_probe import isolated, run_case  # noqa: E402

from pipeline import platforms  # noqa: E402

# The targets the rules' measurements name: one per platform group.
TARGETS = ("rk3588", "rk3566", "rk3562", "rk3576", "rv1106", "rv1103b", "rk2118")
X = [1, 4, 8, 8]  # the graph input of every 4-D case: small, so a build takes a fraction of a second
NODE = "probe_node"
TWO_OUTPUTS = {"Split", "TopK"}  # ops whose second output is not optional
OPSET = 13


class Case(NamedTuple):
    """One single-node model. ``spec(numpy)`` returns ``{"op", "attrs", "consts": [(input name, array)],
    "inputs", "shape", "opset", "dtype"}`` (all but ``op`` optional; see :func:`make_model`)."""

    op: str
    variant: str
    spec: Callable[..., dict]

    @property
    def key(self) -> str:
        return f"{self.op}/{self.variant}"


def _c(name, array):
    """An initializer record: (input name, numpy array)."""
    return (name, array)


def _unary(op, **attrs):
    return lambda np: {"op": op, "attrs": attrs}


def _binary(op, other=None, **attrs):
    """``op(x, const)``; the constant has x's shape unless given."""
    return lambda np: {"op": op, "attrs": attrs,
                       "consts": [_c("b", other(np) if other else np.full(X, 0.5, np.float32))]}


def _consts(op, consts, shape=None, opset=OPSET, dtype="float32", **attrs):
    """``op(x, *consts)``; ``consts`` is a function of numpy returning [(name or '', array or None)]."""
    return lambda np: {"op": op, "attrs": attrs, "consts": consts(np), "shape": shape or X,
                       "opset": opset, "dtype": dtype}


def _i64(np, values):
    return np.array(values, np.int64)


def _f32(np, values):
    return np.array(values, np.float32)


def _weights(np, shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


CASES: list[Case] = [
    # activations and elementwise unary ops
    *[Case(op, "plain", _unary(op)) for op in (
        "Relu", "Sigmoid", "Tanh", "HardSigmoid", "Elu", "Softplus", "LeakyRelu", "Abs", "Neg",
        "Exp", "Log", "Sqrt", "Erf", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "Reciprocal", "Softsign",
        "Selu", "Celu", "ThresholdedRelu", "Acos", "Asin", "Atan", "Tan", "Sinh", "Cosh", "Shrink", "IsNaN",
        "Identity", "Dropout", "LRN", "MeanVarianceNormalization", "LpNormalization", "InstanceNormalization",
        "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
      if op not in ("LRN", "InstanceNormalization")],
    Case("LRN", "size 3", _unary("LRN", size=3)),
    Case("InstanceNormalization", "plain", _consts(
        "InstanceNormalization", lambda np: [_c("s", np.ones(X[1], np.float32)), _c("b", np.zeros(X[1], np.float32))])),
    Case("HardSwish", "opset 14", _consts("HardSwish", lambda np: [], opset=14)),
    Case("Mish", "opset 18", _consts("Mish", lambda np: [], opset=18)),
    Case("LayerNormalization", "epsilon set", _consts(
        "LayerNormalization", lambda np: [_c("s", np.ones(X[-1], np.float32)), _c("b", np.zeros(X[-1], np.float32))],
        opset=17, axis=-1, epsilon=1e-5)),
    Case("BatchNormalization", "plain", _consts("BatchNormalization", lambda np: [
        _c(name, np.full(X[1], value, np.float32)) for name, value in (("s", 1), ("b", 0), ("m", 0), ("v", 1))])),
    # elementwise binary ops against a constant of x's shape
    *[Case(op, "const", _binary(op)) for op in (
        "Add", "Sub", "Mul", "Div", "Max", "Min", "Mean", "Sum", "Equal", "Greater", "Less", "GreaterOrEqual",
        "LessOrEqual")],
    Case("Mod", "fmod", _binary("Mod", fmod=1)),
    Case("PRelu", "per channel", _binary("PRelu", lambda np: np.full([X[1], 1, 1], 0.1, np.float32))),
    Case("Pow", "exponent 2", _binary("Pow", lambda np: _f32(np, 2.0))),
    Case("Pow", "exponent 4", _binary("Pow", lambda np: _f32(np, 4.0))),
    Case("Clip", "0..6", _consts("Clip", lambda np: [_c("lo", _f32(np, 0)), _c("hi", _f32(np, 6))])),
    Case("Clip", "-1..1", _consts("Clip", lambda np: [_c("lo", _f32(np, -1)), _c("hi", _f32(np, 1))])),
    Case("Where", "const", lambda np: {"op": "Where", "inputs": ["cond", "x", "b"], "consts": [
        _c("cond", np.arange(np.prod(X)).reshape(X) % 2 == 0), _c("b", np.zeros(X, np.float32))]}),
    # convolutions
    Case("Conv", "3x3 pad 1", _consts("Conv", lambda np: [_c("w", _weights(np, [8, X[1], 3, 3]))],
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1])),
    Case("Conv", "dilation 2", _consts("Conv", lambda np: [_c("w", _weights(np, [8, X[1], 3, 3]))],
                                       kernel_shape=[3, 3], pads=[2, 2, 2, 2], dilations=[2, 2])),
    Case("Conv", "depthwise 9x9", _consts("Conv", lambda np: [_c("w", _weights(np, [X[1], 1, 9, 9]))],
                                          kernel_shape=[9, 9], pads=[4, 4, 4, 4], group=X[1])),
    Case("ConvTranspose", "stride 2", _consts("ConvTranspose", lambda np: [_c("w", _weights(np, [X[1], 8, 2, 2]))],
                                              kernel_shape=[2, 2], strides=[2, 2])),
    Case("ConvTranspose", "stride 3", _consts("ConvTranspose", lambda np: [_c("w", _weights(np, [X[1], 8, 3, 3]))],
                                              kernel_shape=[3, 3], strides=[3, 3])),
    # pooling
    Case("MaxPool", "2x2 stride 2", _unary("MaxPool", kernel_shape=[2, 2], strides=[2, 2])),
    Case("MaxPool", "1x1", _unary("MaxPool", kernel_shape=[1, 1])),
    Case("AveragePool", "count_include_pad 0", _unary("AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                                      count_include_pad=0)),
    Case("AveragePool", "count_include_pad 1", _unary("AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                                      count_include_pad=1)),
    Case("AveragePool", "ceil_mode 1", _unary("AveragePool", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1,
                                              count_include_pad=1)),
    Case("AveragePool", "ceil_mode 1 cip 0", _unary("AveragePool", kernel_shape=[3, 3], strides=[2, 2],
                                                    ceil_mode=1, count_include_pad=0)),
    Case("LpPool", "2x2", _unary("LpPool", kernel_shape=[2, 2], strides=[2, 2])),
    # resizing and layout
    Case("Resize", "nearest x2", _consts("Resize", lambda np: [_c("", None), _c("scales", _f32(np, [1, 1, 2, 2]))],
                                         mode="nearest")),
    Case("Resize", "linear x2", _consts("Resize", lambda np: [_c("", None), _c("scales", _f32(np, [1, 1, 2, 2]))],
                                        mode="linear")),
    Case("Resize", "linear x1.5", _consts("Resize", lambda np: [_c("", None),
                                                                _c("scales", _f32(np, [1, 1, 1.5, 1.5]))],
                                          mode="linear")),
    Case("DepthToSpace", "block 2", _unary("DepthToSpace", blocksize=2)),
    Case("SpaceToDepth", "block 2", _unary("SpaceToDepth", blocksize=2)),
    Case("Transpose", "perm 0,2,3,1", _unary("Transpose", perm=[0, 2, 3, 1])),
    Case("Transpose", "perm 2,1,0,3", _unary("Transpose", perm=[2, 1, 0, 3])),
    Case("Transpose", "rank 3", _consts("Transpose", lambda np: [], shape=[4, 8, 16], perm=[0, 2, 1])),
    Case("Reshape", "to rank 3", _consts("Reshape", lambda np: [_c("shape", _i64(np, [1, X[1], -1]))])),
    Case("Flatten", "axis 1", _unary("Flatten", axis=1)),
    Case("Squeeze", "axis 0", _consts("Squeeze", lambda np: [_c("axes", _i64(np, [0]))])),
    Case("Unsqueeze", "axis 0", _consts("Unsqueeze", lambda np: [_c("axes", _i64(np, [0]))])),
    Case("Expand", "width", _consts("Expand", lambda np: [_c("shape", _i64(np, X))], shape=[1, X[1], X[2], 1])),
    Case("Tile", "x2", _consts("Tile", lambda np: [_c("repeats", _i64(np, [1, 1, 2, 2]))])),
    Case("Pad", "constant", _consts("Pad", lambda np: [_c("pads", _i64(np, [0, 0, 1, 1, 0, 0, 1, 1]))],
                                    mode="constant")),
    Case("Pad", "reflect", _consts("Pad", lambda np: [_c("pads", _i64(np, [0, 0, 1, 1, 0, 0, 1, 1]))],
                                   mode="reflect")),
    Case("Pad", "edge", _consts("Pad", lambda np: [_c("pads", _i64(np, [0, 0, 1, 1, 0, 0, 1, 1]))], mode="edge")),
    Case("Concat", "axis 1", lambda np: {"op": "Concat", "inputs": ["x", "b"], "attrs": {"axis": 1},
                                         "consts": [_c("b", np.zeros(X, np.float32))]}),
    Case("Split", "axis 1", _consts("Split", lambda np: [_c("split", _i64(np, [2, 2]))], axis=1)),
    Case("Slice", "step 1", _consts("Slice", lambda np: [
        _c("starts", _i64(np, [1])), _c("ends", _i64(np, [7])), _c("axes", _i64(np, [3])), _c("steps", _i64(np, [1]))])),
    Case("Slice", "step 2", _consts("Slice", lambda np: [
        _c("starts", _i64(np, [0])), _c("ends", _i64(np, [8])), _c("axes", _i64(np, [3])), _c("steps", _i64(np, [2]))])),
    Case("Gather", "axis 1", _consts("Gather", lambda np: [_c("indices", _i64(np, [0, 2]))], axis=1)),
    Case("GatherElements", "axis 3", _consts("GatherElements", lambda np: [_c("indices", np.zeros(X, np.int64))],
                                             axis=3)),
    Case("GatherND", "2 indices", _consts("GatherND", lambda np: [_c("indices", _i64(np, [[0, 1], [0, 2]]))])),
    Case("ScatterND", "one row", _consts("ScatterND", lambda np: [
        _c("indices", _i64(np, [[0, 1]])), _c("updates", np.zeros([1, *X[2:]], np.float32))])),
    Case("ScatterElements", "axis 3", _consts("ScatterElements", lambda np: [
        _c("indices", np.zeros(X, np.int64)), _c("updates", np.zeros(X, np.float32))], axis=3)),
    Case("Cast", "to float16", _unary("Cast", to=10)),
    Case("Shape", "plain", _unary("Shape")),
    # reductions and softmax
    Case("ReduceMean", "axes 2,3", _unary("ReduceMean", axes=[2, 3], keepdims=1)),
    Case("ReduceMean", "axis 1", _unary("ReduceMean", axes=[1], keepdims=1)),
    Case("ReduceSum", "axis 1", _consts("ReduceSum", lambda np: [_c("axes", _i64(np, [1]))], keepdims=1)),
    *[Case(op, "axis 1", _unary(op, axes=[1], keepdims=1)) for op in (
        "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1", "ReduceProd", "ReduceLogSumExp", "ReduceSumSquare")],
    Case("ArgMax", "axis 1", _unary("ArgMax", axis=1, keepdims=1)),
    Case("ArgMin", "axis 1", _unary("ArgMin", axis=1, keepdims=1)),
    Case("Softmax", "axis 1", _unary("Softmax", axis=1)),
    Case("Softmax", "axis 3", _unary("Softmax", axis=3)),
    Case("Softmax", "rank 3", _consts("Softmax", lambda np: [], shape=[1, 8, 16], axis=-1)),
    Case("LogSoftmax", "axis 1", _unary("LogSoftmax", axis=1)),
    Case("Hardmax", "axis 1", _unary("Hardmax", axis=1)),
    Case("TopK", "k 2", _consts("TopK", lambda np: [_c("k", _i64(np, [2]))], axis=-1), ),
    Case("CumSum", "axis 3", _consts("CumSum", lambda np: [_c("axis", _i64(np, 3))])),
    # matrix products and recurrent cells
    Case("MatMul", "const", _binary("MatMul", lambda np: _weights(np, [X[-1], 16]))),
    Case("Gemm", "const", _consts("Gemm", lambda np: [_c("w", _weights(np, [64, 32]))], shape=[1, 64], transB=0)),
    Case("LSTM", "hidden 16", _consts("LSTM", lambda np: [
        _c("W", _weights(np, [1, 64, 8])), _c("R", _weights(np, [1, 64, 16]))], shape=[4, 1, 8], hidden_size=16)),
    Case("GRU", "hidden 16", _consts("GRU", lambda np: [
        _c("W", _weights(np, [1, 48, 8])), _c("R", _weights(np, [1, 48, 16]))], shape=[4, 1, 8], hidden_size=16)),
    Case("RNN", "hidden 16", _consts("RNN", lambda np: [
        _c("W", _weights(np, [1, 16, 8])), _c("R", _weights(np, [1, 16, 16]))], shape=[4, 1, 8], hidden_size=16)),
    Case("RoiAlign", "2 boxes", _consts("RoiAlign", lambda np: [
        _c("rois", _f32(np, [[0, 0, 4, 4], [2, 2, 7, 7]])), _c("batch", _i64(np, [0, 0]))],
        output_height=2, output_width=2)),
    Case("GridSample", "bilinear", _consts("GridSample", lambda np: [
        _c("grid", np.zeros([1, X[2], X[3], 2], np.float32))], opset=16)),
]


def make_model(case: Case, path: Path):
    """Write the case's single-node model to ``path``; return (input shape, numpy dtype name)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    spec = case.spec(np)
    shape, dtype = spec.get("shape", X), spec.get("dtype", "float32")
    consts = spec.get("consts", [])
    inputs = spec.get("inputs") or ["x", *(name for name, _ in consts)]
    initializers = [numpy_helper.from_array(np.asarray(array), name) for name, array in consts if name]
    outputs = ["y", "y2"] if spec["op"] in TWO_OUTPUTS else ["y"]
    node = helper.make_node(spec["op"], inputs, outputs, name=NODE, **spec.get("attrs", {}))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", elem, shape)], [], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.get("opset", OPSET))])
    model.ir_version = 8
    # The outputs' types and shapes come from ONNX's own inference: no per-op table here. Its
    # inference skips some function ops (GroupNormalization); those keep x's shape and type.
    inferred = onnx.shape_inference.infer_shapes(model)
    values = {value.name: value for value in inferred.graph.value_info}
    model.graph.output.extend(values.get(name) or helper.make_tensor_value_info(name, elem, shape)
                              for name in node.output)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return shape, dtype


def quantized(target: str) -> bool:
    """True on targets whose toolkit refuses unquantized builds (measured: platforms.py)."""
    return any("do_quantization" in problem
               for problem in platforms.check_target_options(target, {"quantization": None}))


def predict(model_path: Path, target: str) -> dict:
    from pipeline.analysis import analyze
    from pipeline.placement_rules import Rules

    return analyze({"name": "probe", "source": str(model_path)}, target, Rules.load())


def rules_digest() -> str:
    """sha256 of the rules' content (not their comments), so a doc can say which rules it measured."""
    from pipeline.placement_rules import DEFAULT_RULES_PATH

    import yaml

    data = yaml.safe_load(DEFAULT_RULES_PATH.read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def unprobed(cases: list[Case]) -> list[str]:
    from pipeline.placement_rules import Rules

    return sorted(Rules.load().op_types() - {case.op for case in cases})


def compare(analysis: dict, layers: list[dict]) -> dict:
    """The node's prediction against the layer table (``stages.placement_comparison``).

    The toolkit renames what it rewrites (``probe_node#1``, ``probe_node_2conv``, ``x_tp``),
    so a real model's comparison loses those nodes; here the graph has one node, and every
    named layer comes from it. Unnamed layers are the toolkit's own input conversion.
    """
    from pipeline.layer_table import BOOKKEEPING_OPS
    from pipeline.stages import placement_comparison

    predicted = next(n for n in analysis["nodes"] if n["name"] == NODE)["predicted"]
    own = [{**layer, "node": NODE} for layer in layers if layer["node"] and layer["op_type"] not in BOOKKEEPING_OPS]
    emitted = [f"{layer['op_type']}:{layer['target']}" for layer in own]
    compared = placement_comparison(analysis, own, {})
    if compared:
        outcome, actual, agree = "compared", compared[0]["actual"], compared[0]["agree"]
    elif own:  # predicted "none": a folded op kept as a layer because it is the graph's only node
        outcome, actual, agree = "not_compared", None, None
    else:
        outcome, actual, agree = "no_layer", None, predicted["placement"] == "none"
    return {"predicted": predicted["placement"], "reason": predicted["reason"], "rule": predicted["rule"],
            "outcome": outcome, "actual": actual, "agree": agree, "layers": emitted}


DIGEST_LABEL = "Rules digest"


def digest_line(digest: str) -> str:
    """The doc's line naming the rules it measured (``tests/test_placement_facts.py`` reads it back)."""
    return f"{DIGEST_LABEL} (sha256 of the parsed `op_rules.yaml`, comments left out): `{digest}`"


def doc_digest(text: str) -> str | None:
    for line in text.splitlines():
        if line.startswith(DIGEST_LABEL):
            return line.rsplit("`", 2)[-2]
    return None


def cell(result: dict) -> str:
    """One case on one target, as the doc's table shows it."""
    outcome, predicted = result["outcome"], result["predicted"]
    if outcome == "compared":
        return result["actual"] if result["agree"] else f"**{result['actual']}** (predicted {predicted})"
    if outcome == "no_layer":
        return "no layer" if result["agree"] else f"**no layer** (predicted {predicted})"
    if outcome == "not_compared":
        return "kept (folded in graphs)"
    return f"{outcome} in {result['step']}"


def doc_cells(text: str) -> dict[tuple[str, str, str], str]:
    """(op, variant, target) -> cell, read back from the doc's "Every case" table."""
    cells: dict[tuple[str, str, str], str] = {}
    targets: list[str] = []
    section = text.partition("### Every case")[2]
    for line in section.splitlines():
        if not line.startswith("|"):
            if targets:
                break
            continue
        row = [part.strip() for part in line.strip().strip("|").split(" | ")]
        if row[:2] == ["op", "variant"]:
            targets = row[2:]
        elif targets and set(row[0]) != {"-"}:
            cells.update({(row[0], row[1], target): value for target, value in zip(targets, row[2:])})
    return cells


def selected(keys: list[str] | None) -> list[Case]:
    if not keys:
        return list(CASES)
    by_key = {case.key: case for case in CASES}
    missing = [key for key in keys if key not in by_key]
    if missing:
        raise SystemExit(f"unknown case(s): {', '.join(missing)}; known: {', '.join(by_key)}")
    return [by_key[key] for key in keys]


def probe(directory: Path, cases: list[Case], targets: list[str]) -> dict:
    started = time.monotonic()
    import numpy as np
    from rknn.api import RKNN  # heavy: imports torch; once for the whole sweep

    from pipeline.layer_table import parse_layer_table
    from pipeline.placement_rules import Rules
    from pipeline.toolkit import installed_version

    RKNN(verbose=False).release()  # the one-off setup, paid before forking
    case_log = directory / "case.log"
    results = []
    for index, case in enumerate(cases):
        model_dir = directory / f"case{index}"
        model_dir.mkdir()
        model_path = model_dir / "model.onnx"
        shape, dtype = make_model(case, model_path)
        sample = model_dir / "sample_0.npy"
        np.save(sample, np.random.default_rng(index).uniform(0, 1, size=shape).astype(dtype))
        np.save(model_dir / "sample_1.npy", np.random.default_rng(index + 1).uniform(0, 1, size=shape).astype(dtype))
        dataset = model_dir / "dataset.txt"
        dataset.write_text("sample_0.npy\nsample_1.npy\n")
        for target in targets:
            case_started = time.monotonic()
            print(f"== placement probe: {case.key} {target}", flush=True)
            model = {"quantization": {"dtype": "w8a8"} if quantized(target) else None}
            verbose_rknn = lambda verbose=False: RKNN(verbose=True)  # noqa: E731  (the layer table needs verbose)
            built = isolated(lambda progress: run_case(verbose_rknn, target, model, model_path, dataset, progress),
                             case_log)
            analysis = predict(model_path, target)
            layers = parse_layer_table(case_log.read_text(errors="replace")) if built["outcome"] == "accepted" else []
            verdict = compare(analysis, layers)
            if built["outcome"] != "accepted":
                verdict.update(outcome=built["outcome"], actual=None, agree=None)
            results.append({"op": case.op, "variant": case.variant, "target": target,
                            "dtype": "w8a8" if model["quantization"] else "float16", **verdict,
                            "step": built["step"], "message": built["message"],
                            "seconds": round(time.monotonic() - case_started, 3)})
    return {"toolkit": installed_version(), "rules_version": Rules.load().version, "rules_digest": rules_digest(),
            "seconds": round(time.monotonic() - started, 1), "targets": list(targets),
            "unprobed": unprobed(CASES), "results": results}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--case", action="append", help="an OP/VARIANT key, repeatable (default: every case)")
    parser.add_argument("--targets", help=f"comma-separated targets (default: {','.join(TARGETS)})")
    args = parser.parse_args(argv)
    cases = selected(args.case)
    targets = args.targets.split(",") if args.targets else list(TARGETS)
    with tempfile.TemporaryDirectory(prefix="placement-probe-") as work:
        report = probe(Path(work), cases, targets)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
