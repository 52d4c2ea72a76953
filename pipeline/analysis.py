"""Graph analysis: what is in an ONNX model and where each node is predicted to run.

Produces ``build/<name>/<target>/analysis.json`` without importing the toolkit
(seconds, not a toolkit start-up) so that overrides can be resolved and checked
before any conversion. Shapes come from ONNX shape inference after the
manifest's ``inputs`` have fixed the dynamic dimensions; placement predictions
come from the rules table (:mod:`pipeline.placement_rules`), which is data
derived from Rockchip's operator support list. The prediction is a forecast:
the toolkit's layer table after conversion is the truth, and the report shows
where the two disagree.

Weights are never needed here, so external data is not loaded and initializer
payloads are dropped before shape inference; a model with hundreds of MB of
external weights is analysed in the memory of its graph structure.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

ANALYSIS_FORMAT = 1
_KEEP_ELEMENTS = 1024  # initializers up to this size keep their values for shape propagation


class AnalysisError(ValueError):
    """The model cannot be analysed (and so cannot be converted) as declared."""


def load_graph(source: str | Path):
    """Load an ONNX model's structure, skipping external weight files.

    Raises :class:`AnalysisError` with a readable message for files that are
    not ONNX or are truncated.
    """
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(source), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise AnalysisError(f"{source}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    if not model.graph.node:
        raise AnalysisError(f"{source}: the ONNX graph has no nodes")
    return model


def _initializer_names(model) -> set[str]:
    return {init.name for init in model.graph.initializer}


def fix_input_shapes(model, inputs: dict | None) -> None:
    """Overwrite graph input dims in place with the manifest's ``inputs`` shapes.

    Args:
        model: an ``onnx.ModelProto`` (modified in place).
        inputs: input name -> list of ints, or None to leave every input as declared.
    Raises:
        AnalysisError: an input named in ``inputs`` is not a graph input, or the rank differs.
    """
    if not inputs:
        return
    graph_inputs = {value.name: value for value in model.graph.input}
    for name, shape in inputs.items():
        if name not in graph_inputs:
            real = sorted(set(graph_inputs) - _initializer_names(model))
            raise AnalysisError(f"inputs: '{name}' is not an input of the model (inputs: {', '.join(real)})")
        dims = graph_inputs[name].type.tensor_type.shape.dim
        if len(dims) and len(dims) != len(shape):
            raise AnalysisError(f"inputs: '{name}' has rank {len(dims)} in the model, the manifest gives "
                                f"{len(shape)} dims {list(shape)}")
        del dims[:]
        for size in shape:
            dims.add().dim_value = int(size)


def _shape_of(value) -> list | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]


def infer_shapes(model) -> dict[str, list | None]:
    """Tensor name -> inferred shape (ints, or dim names / None where unknown).

    Initializer payloads are cleared on a copy first: shape inference only needs
    their dims, and this keeps memory flat for big models.
    """
    import onnx

    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for init in skeleton.graph.initializer:
        # Small initializers are often shapes that inference propagates: keep those.
        if math.prod(init.dims) <= _KEEP_ELEMENTS:
            continue
        init.ClearField("raw_data")
        for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            init.ClearField(field)
        init.ClearField("external_data")
        init.data_location = onnx.TensorProto.DEFAULT
        # Keep the dims visible to inference without the payload.
        skeleton.graph.value_info.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference errors should not hide the rest of the analysis
        raise AnalysisError(f"ONNX shape inference failed: {exc}") from exc
    shapes: dict[str, list | None] = {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        shapes[value.name] = _shape_of(value)
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _opset(model, domain: str) -> int:
    for entry in model.opset_import:
        if entry.domain in (domain, "ai.onnx" if domain == "" else domain):
            return entry.version
    return 0


def _plain(value):
    """An attribute value as JSON data; tensors and subgraphs are summarised, not copied."""
    import onnx

    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, onnx.TensorProto):
        return {"tensor": list(value.dims)}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, (int, float, str)):
        return value
    return {"opaque": type(value).__name__}


def node_attributes(node, opset: int) -> dict:
    """Attributes as plain values, with ONNX schema defaults filled in where absent.

    Tensor and graph attributes are summarised (``{"tensor": dims}``) rather than copied.
    """
    import onnx
    from onnx import helper

    attrs: dict = {}
    for attr in node.attribute:
        value = _plain(helper.get_attribute_value(attr))
        attrs[attr.name] = value
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except Exception:  # unknown op or domain: keep only what the node states
        return attrs
    for name, spec in schema.attributes.items():
        if name in attrs or not spec.default_value.name:
            continue
        default = _plain(helper.get_attribute_value(spec.default_value))
        if not isinstance(default, dict):
            attrs[name] = default
    return attrs


def _value_record(value, shapes: dict) -> dict:
    import onnx

    shape = shapes.get(value.name, _shape_of(value))
    elem = value.type.tensor_type.elem_type
    return {
        "name": value.name,
        "dtype": onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else None,
        "shape": shape,
        "dynamic_dims": [i for i, d in enumerate(shape or []) if not isinstance(d, int) or d <= 0],
    }


def analyze(model_record: dict, target: str, rules) -> dict:
    """Analyse one model for one target platform.

    Args:
        model_record: the manifest's effective model (uses ``source``, ``inputs``, ``outputs``).
        target: a toolkit target platform, e.g. ``"rk3588"``.
        rules: a :class:`pipeline.placement_rules.Rules`.
    Returns:
        The ``analysis.json`` document (plain JSON data).
    """
    model = load_graph(model_record["source"])
    fix_input_shapes(model, model_record.get("inputs"))
    shapes = infer_shapes(model)
    initializers = _initializer_names(model)
    produced = {out for node in model.graph.node for out in node.output}
    known_tensors = produced | {v.name for v in model.graph.input}
    for name in model_record.get("outputs") or []:
        if name not in known_tensors:
            raise AnalysisError(f"outputs: '{name}' is not a tensor of the model")

    nodes = []
    for index, node in enumerate(model.graph.node):
        record = {
            "index": index,
            "name": node.name,
            "op_type": node.op_type,
            "domain": node.domain,
            "attrs": node_attributes(node, _opset(model, node.domain)),
            "inputs": list(node.input),
            "outputs": list(node.output),
            "input_shapes": [shapes.get(name) if name else None for name in node.input],
            "output_shapes": [shapes.get(name) for name in node.output],
        }
        record["predicted"] = rules.predict(record, target)
        nodes.append(record)

    placements = Counter(node["predicted"]["placement"] for node in nodes)
    inputs = [_value_record(v, shapes) for v in model.graph.input if v.name not in initializers]
    return {
        "format": ANALYSIS_FORMAT,
        "model": model_record["name"],
        "target": target,
        "platform_group": rules.group_of(target),
        "rules_version": rules.version,
        "opsets": {entry.domain or "ai.onnx": entry.version for entry in model.opset_import},
        "graph_inputs": inputs,
        "graph_outputs": [_value_record(v, shapes) for v in model.graph.output],
        "dynamic_inputs": [i["name"] for i in inputs if i["dynamic_dims"]],
        "node_count": len(nodes),
        "op_histogram": dict(Counter(node["op_type"] for node in nodes).most_common()),
        "predicted_summary": {key: placements.get(key, 0) for key in ("npu", "cpu", "unsupported", "none")},
        "predicted_off_npu": [
            {"node": n["name"], "op_type": n["op_type"], "outputs": n["outputs"], **n["predicted"]}
            for n in nodes if n["predicted"]["placement"] in ("cpu", "unsupported")
        ],
        "nodes": nodes,
    }


def summary_line(analysis: dict) -> str:
    """One line for the task output: counts, in Polygraphy's spirit ("N nodes, ...")."""
    s = analysis["predicted_summary"]
    ops = Counter(item["op_type"] for item in analysis["predicted_off_npu"])
    off = ", ".join(f"{op} x{n}" for op, n in ops.most_common()) or "none"
    return (f"{analysis['node_count']} nodes, predicted NPU {s['npu']} / CPU {s['cpu']} / "
            f"not runnable {s['unsupported']} (folded {s['none']}); off NPU: {off}")
