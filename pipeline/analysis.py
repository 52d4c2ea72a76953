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

Analysis is also the last stop before the toolkit, whose own failures arrive
late (after seconds of start-up), deep in a traceback, and sometimes only at
``build()``. So :func:`analyze` first refuses, with the file and the reason,
every model that is known to fail there: external weight files that are
missing or lie outside the model's directory, a graph whose nodes read
tensors nothing produces, opsets and operators the toolkit cannot load, ops
from custom domains, and inputs whose shape the manifest leaves dynamic.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import NamedTuple
from pipeline.errors import PipelineError
from pipeline.formats import ANALYSIS_FORMAT
from pipeline.onnx_util import DEFAULT_DOMAINS, dims, inferred, opset

_KEEP_ELEMENTS = 1024  # initializers up to this size keep their values for shape propagation
_CONSTANT_ELEMENTS = 16  # constant inputs up to this size are recorded beside the attributes


class AnalysisError(PipelineError, ValueError):
    """The model cannot be analysed (and so cannot be converted) as declared."""


# -- what rknn-toolkit2 cannot load (measured with 2.5.0) ----------------------

# ``load_onnx`` refuses newer opsets outright: "Unsupport onnx opset 20, need <= 19!".
TOOLKIT_MAX_OPSET = 19


class Unloadable(NamedTuple):
    """An operator the toolkit refuses at some default-domain opsets.

    ``first_opset``/``last_opset`` bound the model's default-domain opset import
    (what the toolkit's message calls "opset-N"); ``min_outputs`` narrows the
    entry to nodes with at least that many outputs.
    """

    op_type: str
    first_opset: int
    last_opset: int
    min_outputs: int
    toolkit_says: str
    fix: str


# Data, not code: add a row when a toolkit run shows another refusal. Each row
# was reproduced on a tiny model; tests/fixtures/toolkit_logs/ keeps the log.
UNLOADABLE_OPS = (
    # Refused in build() at opset 9 only when the mask output exists; opsets
    # 6-8 and 10-13, and opset 9 without the mask, convert.
    Unloadable("Dropout", 9, 9, 2, "Not support 'Dropout' of opset-9!",
               "re-export the model with another opset (e.g. 13), or without Dropout's mask output"),
)


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
        done = inferred(skeleton, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference errors should not hide the rest of the analysis
        raise AnalysisError(f"ONNX shape inference failed: {exc}") from exc
    shapes: dict[str, list | None] = {}
    for value in list(done.graph.input) + list(done.graph.value_info) + list(done.graph.output):
        shapes[value.name] = dims(value, symbolic=True)
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


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


def needed_nodes(model, outputs: list[str] | None) -> set[int]:
    """Indices of the nodes that compute ``outputs`` (all nodes when None).

    ``outputs`` cuts the graph in the toolkit's load_onnx; the analysis must
    describe the same subgraph, or it would predict placements for nodes that
    are never converted.
    """
    nodes = list(model.graph.node)
    if not outputs:
        return set(range(len(nodes)))
    producer = {out: index for index, node in enumerate(nodes) for out in node.output}
    kept: set[int] = set()
    pending = [producer[name] for name in outputs if name in producer]
    while pending:
        index = pending.pop()
        if index in kept:
            continue
        kept.add(index)
        pending += [producer[name] for name in nodes[index].input if name in producer]
    return kept


def small_constants(model, limit: int = _CONSTANT_ELEMENTS) -> dict[str, list]:
    """Values of small constant tensors (initializers and Constant outputs), by tensor name.

    Slice steps, Resize scales or a Pow exponent are inputs, not attributes,
    since opset 10 or so; the placement rules need their values all the same.
    """
    from onnx import numpy_helper

    values: dict[str, list] = {}
    for init in model.graph.initializer:
        if math.prod(init.dims) <= limit and init.data_location != 1:  # 1: EXTERNAL
            values[init.name] = numpy_helper.to_array(init).ravel().tolist()
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and math.prod(attr.t.dims) <= limit:
                    values[node.output[0]] = numpy_helper.to_array(attr.t).ravel().tolist()
    return values


def constant_inputs(node, opset: int, constants: dict, attrs: dict) -> dict:
    """A node's constant inputs under their ONNX input names (``steps``, ``scales``, ...), beside its attributes."""
    import onnx

    found = {}
    try:
        formal = onnx.defs.get_schema(node.op_type, opset, node.domain).inputs
    except Exception:  # unknown op: nothing to name the inputs by
        return found
    for position, tensor in enumerate(node.input):
        if position == 0 or not tensor or tensor not in constants or position >= len(formal):
            continue
        name = formal[position].name
        if name not in attrs:
            found[name] = constants[tensor]
    return found


def _value_record(value, shapes: dict) -> dict:
    import onnx

    shape = shapes.get(value.name, dims(value, symbolic=True))
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
    source = model_record["source"]
    model = load_graph(source)
    problems = [*external_data_problems(model, source), *wiring_problems(model), *toolkit_problems(model)]
    if problems:
        raise AnalysisError(_problem_text(source, problems))
    fix_input_shapes(model, model_record.get("inputs"))
    problems = static_input_problems(model, model_record.get("options"))
    if problems:
        raise AnalysisError(_problem_text(source, problems))
    shapes = infer_shapes(model)
    initializers = _initializer_names(model)
    produced = {out for node in model.graph.node for out in node.output}
    known_tensors = produced | {v.name for v in model.graph.input}
    for name in model_record.get("outputs") or []:
        if name not in known_tensors:
            raise AnalysisError(f"outputs: '{name}' is not a tensor of the model")

    constants = small_constants(model)
    kept = needed_nodes(model, model_record.get("outputs"))
    nodes = []
    for index, node in enumerate(model.graph.node):
        if index not in kept:
            continue
        attrs = node_attributes(node, opset(model, node.domain))
        attrs.update(constant_inputs(node, opset(model, node.domain), constants, attrs))
        record = {
            "index": index,
            "name": node.name,
            "op_type": node.op_type,
            "domain": node.domain,
            "attrs": attrs,
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
        "external_data": external_data_locations(model),
    }


def external_data_locations(model) -> list[str]:
    """The external weight files the model names, relative to it (they are part of its identity)."""
    import onnx

    return sorted({entry.value for tensor in _all_tensors(model.graph)
                   if tensor.data_location == onnx.TensorProto.EXTERNAL
                   for entry in tensor.external_data if entry.key == "location" and entry.value})


# -- checks for models the toolkit would fail on ------------------------------


def _problem_text(source, problems: list[str]) -> str:
    """One error for all problems, so a single run shows everything to fix."""
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    return f"{source}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


def _all_tensors(graph):
    """Every TensorProto stored in ``graph``: initializers, constants, subgraphs'."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_tensors(sub)


def external_data_problems(model, source) -> list[str]:
    """Why the model's external weight files cannot be read, as the toolkit will read them.

    ``load_graph`` skips external data, so a missing ``w.bin`` would otherwise
    surface only inside the toolkit. A location must also stay inside the
    model's directory (after symlinks): a model file must not make the build
    read arbitrary files such as ``../../etc/passwd``.
    """
    import onnx

    base = os.path.realpath(os.path.dirname(os.path.abspath(source)))
    needs: dict[str, tuple[int, str]] = {}  # location -> (bytes needed, a tensor that needs them)
    problems = []
    for tensor in _all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        if not location:
            problems.append(f"tensor {tensor.name!r} is stored externally but names no file (location)")
            continue
        try:
            end = int(info.get("offset") or 0) + int(info.get("length") or 0)
        except ValueError:
            problems.append(f"tensor {tensor.name!r} has a non-numeric external data offset or length")
            continue
        if end > needs.get(location, (-1, ""))[0]:
            needs[location] = (end, tensor.name)
    for location, (end, tensor) in sorted(needs.items()):
        path = os.path.realpath(os.path.join(base, location))
        if os.path.isabs(location) or os.path.commonpath([base, path]) != base:
            problems.append(f"external data file {location!r} (tensor {tensor!r}) lies outside the model's "
                            f"directory; keep weight files beside the .onnx file")
        elif not os.path.isfile(path):
            problems.append(f"external data file {location!r} (tensor {tensor!r}) does not exist next to the "
                            f"model; copy it beside the .onnx file or re-save the model with its weights inside")
        elif os.path.getsize(path) < end:
            problems.append(f"external data file {location!r} is {os.path.getsize(path)} bytes, but tensor "
                            f"{tensor!r} needs {end}: the file is truncated or belongs to another model")
    return problems


def wiring_problems(model) -> list[str]:
    """Node inputs and graph outputs that no node, input or initializer provides.

    A byte flipped inside a tensor name still parses as ONNX; the broken link
    shows up only here, or as an obscure toolkit or onnxruntime error.
    """
    available = {value.name for value in model.graph.input} | _initializer_names(model)
    available |= {sparse.values.name for sparse in model.graph.sparse_initializer}
    available |= {out for node in model.graph.node for out in node.output}
    dangling = [f"node {node.name or node.op_type!r} ({node.op_type}) reads tensor {name!r}"
                for node in model.graph.node for name in node.input if name and name not in available]
    dangling += [f"graph output {value.name!r}" for value in model.graph.output if value.name not in available]
    if not dangling:
        return []
    more = f" (and {len(dangling) - 3} more)" if len(dangling) > 3 else ""
    message = (f"{'; '.join(dangling[:3])}{more}: no node, graph input or initializer provides it; "
               f"the file is corrupt or was edited by hand")
    return [message]


def toolkit_problems(model) -> list[str]:
    """Opsets, operators and domains that rknn-toolkit2 2.5.0 refuses to load or build."""
    problems = []
    version = opset(model, "")
    if version > TOOLKIT_MAX_OPSET:
        problems.append(f"the model uses ONNX opset {version}, but rknn-toolkit2 loads opsets up to "
                        f"{TOOLKIT_MAX_OPSET}; re-export it with opset {TOOLKIT_MAX_OPSET} or lower "
                        f"(e.g. opset_version={TOOLKIT_MAX_OPSET} in torch.onnx.export)")
    custom = Counter((node.domain, node.op_type) for node in model.graph.node if node.domain not in DEFAULT_DOMAINS)
    for (domain, op_type), count in sorted(custom.items()):
        problems.append(f"{count} {op_type} node(s) from the custom domain {domain!r}: rknn-toolkit2 converts "
                        f"only standard ONNX operators; replace them or export without custom ops")
    for rule in UNLOADABLE_OPS:
        if not rule.first_opset <= version <= rule.last_opset:
            continue
        nodes = [node.name or node.op_type for node in model.graph.node
                 if node.op_type == rule.op_type and node.domain in DEFAULT_DOMAINS
                 and len(node.output) >= rule.min_outputs]
        if nodes:
            problems.append(f"{rule.op_type} node(s) {', '.join(map(repr, nodes[:3]))} at opset {version}: "
                            f"rknn-toolkit2 refuses them ({rule.toolkit_says!r}); {rule.fix}")
    return problems


def static_input_problems(model, options: dict | None) -> list[str]:
    """Inputs whose shape is still dynamic after the manifest's ``inputs`` were applied.

    The toolkit needs every size fixed at conversion time and otherwise stops in
    ``load_onnx`` ("The input shape ['N', 3, 16, 16] of 'x' is not support!").
    ``options.dynamic_input`` is the toolkit's own way to accept several shapes;
    then each listed set must give one shape of the right rank per input.
    """
    initializers = _initializer_names(model)
    inputs = [value for value in model.graph.input if value.name not in initializers]
    dynamic_sets = (options or {}).get("dynamic_input")
    if dynamic_sets:
        return _dynamic_input_problems(inputs, dynamic_sets)
    problems = []
    for value in inputs:
        shape = dims(value, symbolic=True)
        if shape is None:
            problems.append(f"input {value.name!r} has no shape in the model: fix it in the manifest with "
                            f"`inputs: {{{value.name}: [...]}}` (one size per dimension)")
        elif any(not isinstance(size, int) or size <= 0 for size in shape):
            example = [size if isinstance(size, int) and size > 0 else 1 for size in shape]
            shown = [size if size is not None else "?" for size in shape]
            problems.append(f"input {value.name!r} has the dynamic shape {shown}: the toolkit needs fixed sizes; "
                            f"set them in the manifest, e.g. `inputs: {{{value.name}: {example}}}`, "
                            f"or list accepted shapes in options.dynamic_input")
    return problems


def _dynamic_input_problems(inputs: list, dynamic_sets: list) -> list[str]:
    problems = []
    for index, shapes in enumerate(dynamic_sets):
        if len(shapes) != len(inputs):
            problems.append(f"options.dynamic_input[{index}] gives {len(shapes)} shape(s), but the model has "
                            f"{len(inputs)} input(s): give one shape per input")
            continue
        for value, shape in zip(inputs, shapes):
            rank = dims(value, symbolic=True)
            if rank is not None and len(rank) != len(shape):
                problems.append(f"options.dynamic_input[{index}] gives {list(shape)} for input {value.name!r}, "
                                f"which has {len(rank)} dimensions")
    return problems


def summary_line(analysis: dict) -> str:
    """One line for the task output: counts, in Polygraphy's spirit ("N nodes, ...")."""
    s = analysis["predicted_summary"]
    ops = Counter(item["op_type"] for item in analysis["predicted_off_npu"])
    off = ", ".join(f"{op} x{n}" for op, n in ops.most_common()) or "none"
    return (f"{analysis['node_count']} nodes, predicted NPU {s['npu']} / CPU {s['cpu']} / "
            f"not runnable {s['unsupported']} (folded {s['none']}); off NPU: {off}")
