"""Rewrite padding-excluding AveragePool nodes into a form the Rockchip NPU runs.

Why: the NPU implements AveragePool only with ``count_include_pad=1`` and
without ``ceil_mode``.  A pool that excludes padding from its divisor (or uses
``ceil_mode``) falls back to the CPU, and the rv1106 CPU runtime cannot run it
at all.  Yet such a pool is exactly a padding-including pool times a constant:

    AveragePool(x) == AveragePool(x, count_include_pad=1, ceil_mode=0) * M

where ``M`` holds, per output position, the number of kernel taps divided by
the divisor the original op uses there.  ``ceil_mode`` becomes extra end
padding, which the include-pad pool fills with zeros, so the window sums agree.

The divisor reproduces onnxruntime's CPU kernels, the reference these models
are validated against:

* ``ceil_mode=1`` rounds the output count up, but a last window that would
  start inside the end padding is dropped;
* ``count_include_pad=0`` divides by the taps that land on real input;
* ``count_include_pad=1`` divides, since opset 19, by the taps inside the
  input plus its explicit pads (the ceil_mode overhang is not counted); before
  opset 19 it divides by the full kernel size, overhang included;
* a window without any real input tap yields 0.

Only nodes of the main graph are rewritten; subgraphs are left alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import reduce

import numpy as np
import onnx
from onnx import helper, numpy_helper
from pipeline.errors import PipelineError
from pipeline.names import nearest
from pipeline.onnx_util import inferred, is_default_domain, opset, value_types

__all__ = [
    "RewriteError",
    "infer_static_shapes",
    "name_unnamed_nodes",
    "rewrite_average_pools",
]

# Opset from which onnxruntime's AveragePool leaves the ceil_mode overhang out
# of the count_include_pad=1 divisor.
_OVERHANG_EXCLUDED_SINCE = 19
# Before this IR version every initializer must also be a graph input.
_INITIALIZERS_AS_INPUTS_BEFORE_IR = 4
# Opsets that introduced the attributes the rewrite relies on.
_COUNT_INCLUDE_PAD_SINCE = 7
_CEIL_MODE_SINCE = 10

_SUPPORTED_DTYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
}


class RewriteError(PipelineError, ValueError):
    """A requested AveragePool rewrite cannot be done exactly."""


@dataclass(frozen=True)
class _Pool:
    """Resolved geometry of one AveragePool; sequences have one entry per spatial axis."""

    input_shape: tuple[int, ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_before: tuple[int, ...]
    pads_after: tuple[int, ...]
    ceil_mode: int
    count_include_pad: int
    output_shape: tuple[int, ...]

    @property
    def extra_end_pad(self) -> tuple[int, ...]:
        """End padding a ``ceil_mode=0`` pool needs beyond ``pads_after`` to keep every window."""
        return tuple(
            max(0, (o - 1) * s + _span(k, d) - (i + b + a))
            for i, k, s, d, b, a, o in zip(
                self.input_shape, self.kernel, self.strides, self.dilations,
                self.pads_before, self.pads_after, self.output_shape,
            )
        )


def infer_static_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Map every tensor of the main graph whose rank is known to its shape.

    Args:
        model: the model; it is not modified (inference runs on a copy).

    Returns:
        tensor name -> list of dimensions, with ``None`` for each dimension
        that is symbolic or unknown.  Covers graph inputs, outputs, value_info
        found by ``onnx.shape_inference`` and initializers.
    """
    return {name: shape for name, (_, shape) in _infer_tensor_types(model).items()}


def name_unnamed_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` in which every unnamed main-graph node has a name.

    Node ``i`` of ``graph.node`` without a name becomes ``f"{op_type}_{i}"``,
    with ``_2``, ``_3``... appended if that name is already taken.  The scheme is
    deterministic, so callers can predict the names ``rewrite_average_pools``
    accepts for nodes that had none.
    """
    named = copy.deepcopy(model)
    _fill_node_names(named.graph)
    return named


def rewrite_average_pools(
    model: onnx.ModelProto, node_names: list[str]
) -> tuple[onnx.ModelProto, list[dict]]:
    """Replace each named AveragePool by a padding-including pool and a Mul.

    Each node becomes ``AveragePool(count_include_pad=1, ceil_mode=0, explicit
    pads including the ceil_mode overhang)`` writing ``f"{out}__cip1"``,
    followed by ``Mul`` (named ``f"{name}__cip_scale"``) with the constant map
    initializer ``f"{out}__cip_scale"`` of shape ``[1, 1, *output_spatial]``.
    The pool keeps the original node name and the Mul writes the original
    output name, so consumers, graph outputs and per-node settings keyed by
    name stay valid.  The opset is unchanged.

    Args:
        model: the model to rewrite; it is not modified.
        node_names: names of main-graph AveragePool nodes; duplicates are
            ignored.  Unnamed nodes are first named as ``name_unnamed_nodes``
            does, so they can be selected by those names.

    Returns:
        The rewritten model and one JSON-serialisable record per rewritten
        node with keys ``node``, ``output``, ``kernel_shape``, ``strides``,
        ``pads_before``, ``pads_after`` (the original op's resolved pads),
        ``ceil_mode``, ``extra_end_pad``, ``scale_min``, ``scale_max`` and
        ``scale_initializer``.

    Raises:
        RewriteError: a name is unknown or not an AveragePool, the pool's
            spatial input dims are not static, its dtype or opset is
            unsupported, or it cannot be rewritten exactly (see ``_resolve_pool``).
    """
    rewritten = name_unnamed_nodes(model)
    graph = rewritten.graph
    opset = _default_opset(rewritten)
    types = _infer_tensor_types(rewritten)
    taken = _tensor_names(graph)
    as_input = rewritten.ir_version < _INITIALIZERS_AS_INPUTS_BEFORE_IR
    records = []
    for name in dict.fromkeys(node_names):
        index = _find_pool(graph, name)
        pool = _resolve_pool(graph.node[index], types, opset)
        dtype = _pool_dtype(graph.node[index], types)
        scale = _scale_map(pool, opset).astype(dtype)
        records.append(_splice(graph, index, pool, scale, opset, taken, as_input))
    return rewritten, records


# --- node lookup -------------------------------------------------------------


def _fill_node_names(graph: onnx.GraphProto) -> None:
    """Name the unnamed nodes of ``graph`` in place (scheme: ``name_unnamed_nodes``)."""
    used = {node.name for node in graph.node if node.name}
    for index, node in enumerate(graph.node):
        if node.name:
            continue
        base = candidate = f"{node.op_type}_{index}"
        suffix = 1
        while candidate in used:
            suffix += 1
            candidate = f"{base}_{suffix}"
        node.name = candidate
        used.add(candidate)


def _find_pool(graph: onnx.GraphProto, name: str) -> int:
    """Index in ``graph.node`` of the AveragePool called ``name``; RewriteError otherwise."""
    pools = [n.name for n in graph.node if _is_average_pool(n)]
    for index, node in enumerate(graph.node):
        if node.name != name:
            continue
        if _is_average_pool(node):
            return index
        raise RewriteError(
            f"node {name!r} is a {node.op_type}, not an AveragePool; "
            f"AveragePool nodes: {_nearby(name, pools)}"
        )
    every = [n.name for n in graph.node]
    raise RewriteError(f"no node named {name!r}; nearby names: {_nearby(name, every)}")


def _is_average_pool(node: onnx.NodeProto) -> bool:
    return node.op_type == "AveragePool" and is_default_domain(node.domain)


def _nearby(name: str, candidates: list[str], limit: int = 8) -> list[str]:
    """Up to ``limit`` candidates that resemble ``name``, else the first ``limit`` ones."""
    return nearest(name, candidates, limit, cutoff=0.5, fallback=True)


# --- shapes, types and opset -------------------------------------------------


def _infer_tensor_types(model: onnx.ModelProto) -> dict[str, tuple[int, list[int | None]]]:
    """tensor name -> (ONNX elem_type, shape with None for unknown dims), via shape inference."""
    graph = inferred(model).graph
    found: dict[str, tuple[int, list[int | None]]] = {init.name: (init.data_type, list(init.dims))
                                                       for init in graph.initializer}
    for name, (elem_type, shape) in value_types((*graph.input, *graph.value_info, *graph.output)).items():
        if shape is not None:
            found.setdefault(name, (elem_type, shape))
    return found


def _default_opset(model: onnx.ModelProto) -> int:
    """Version of the default ONNX domain imported by ``model``."""
    version = opset(model)
    if not version:
        raise RewriteError("model imports no default-domain opset")
    return version


def _pool_dtype(node: onnx.NodeProto, types: dict) -> type:
    """Numpy dtype of the pool's input; RewriteError unless float16/float32/float64."""
    elem_type = types[node.input[0]][0]
    if elem_type not in _SUPPORTED_DTYPES:
        type_name = onnx.TensorProto.DataType.Name(elem_type)
        raise RewriteError(f"AveragePool {node.name!r}: unsupported input type {type_name}")
    return _SUPPORTED_DTYPES[elem_type]


# --- pool geometry -----------------------------------------------------------


def _span(kernel: int, dilation: int) -> int:
    """Extent of a dilated kernel along one axis."""
    return dilation * (kernel - 1) + 1


def _resolve_pool(node: onnx.NodeProto, types: dict, opset: int) -> _Pool:
    """Resolve ``node``'s attributes against its static input shape.

    Raises RewriteError for an opset without ``count_include_pad`` (< 7), an
    input shape that is unknown or has dynamic spatial dims, ``auto_pad``
    SAME_* combined with dilations (onnxruntime and the ONNX spec disagree on
    those pads), or rewritten pads that reach the kernel size (onnxruntime
    rejects such a pool; only possible with dilations).
    """
    where = f"AveragePool {node.name!r}"
    if opset < _COUNT_INCLUDE_PAD_SINCE:
        raise RewriteError(f"{where}: opset {opset} has no count_include_pad (needs >= 7)")
    shape = types.get(node.input[0], (None, None))[1]
    if shape is None or len(shape) < 3 or any(d is None for d in shape[2:]):
        raise RewriteError(
            f"{where}: spatial dims of input {node.input[0]!r} must be static, got {shape}"
        )
    spatial = tuple(shape[2:])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    rank = len(spatial)
    kernel = tuple(attrs["kernel_shape"])
    strides = tuple(attrs.get("strides") or (1,) * rank)
    dilations = tuple(attrs.get("dilations") or (1,) * rank)
    ceil_mode = int(attrs.get("ceil_mode", 0))
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad.startswith("SAME") and any(d != 1 for d in dilations):
        raise RewriteError(f"{where}: auto_pad={auto_pad} with dilations is not supported")
    before, after = _explicit_pads(auto_pad, attrs.get("pads"), spatial, kernel, strides)
    output = tuple(
        _output_size(*axis, ceil_mode)
        for axis in zip(spatial, kernel, strides, dilations, before, after)
    )
    pool = _Pool(
        input_shape=spatial,
        kernel=kernel,
        strides=strides,
        dilations=dilations,
        pads_before=before,
        pads_after=after,
        ceil_mode=ceil_mode,
        count_include_pad=int(attrs.get("count_include_pad", 0)),
        output_shape=output,
    )
    pads = [*before, *(a + e for a, e in zip(after, pool.extra_end_pad))]
    if any(p >= k for p, k in zip(pads, kernel * 2)):
        raise RewriteError(f"{where}: rewritten pads {pads} must stay below kernel {list(kernel)}")
    return pool


def _explicit_pads(
    auto_pad: str,
    pads: list[int] | None,
    spatial: tuple[int, ...],
    kernel: tuple[int, ...],
    strides: tuple[int, ...],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(pads_before, pads_after) per axis for ``auto_pad`` (NOTSET, VALID, SAME_UPPER, SAME_LOWER).

    NOTSET uses ``pads`` (default all zeros); VALID pads nothing; SAME_* pads so
    that the output has ``ceil(in / stride)`` positions, the odd pad going to
    the end (UPPER) or the start (LOWER).
    """
    rank = len(spatial)
    if auto_pad == "NOTSET":
        pads = list(pads or [0] * 2 * rank)
        return tuple(pads[:rank]), tuple(pads[rank:])
    if auto_pad == "VALID":
        return (0,) * rank, (0,) * rank
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise RewriteError(f"unknown auto_pad {auto_pad!r}")
    totals = [
        max(0, (-(-i // s) - 1) * s + k - i) for i, k, s in zip(spatial, kernel, strides)
    ]
    small = [t // 2 for t in totals]
    large = [t - t // 2 for t in totals]
    if auto_pad == "SAME_UPPER":
        return tuple(small), tuple(large)
    return tuple(large), tuple(small)


def _output_size(
    size: int, kernel: int, stride: int, dilation: int, before: int, after: int, ceil_mode: int
) -> int:
    """Output positions along one axis.

    With ``ceil_mode`` the count rounds up, minus a last window that would
    start in the end padding.
    """
    room = size + before + after - _span(kernel, dilation)
    if room < 0:
        raise RewriteError(
            f"kernel span {_span(kernel, dilation)} exceeds padded size {size + before + after}"
        )
    count = (-(-room // stride) if ceil_mode else room // stride) + 1
    if ceil_mode and (count - 1) * stride >= size + before:
        count -= 1
    return count


# --- scale map -----------------------------------------------------------------


def _axis_divisors(pool: _Pool, axis: int, opset: int) -> np.ndarray:
    """Per output position along ``axis``, the original op's divisor factor for that axis.

    The factor counts the window's taps inside the input (count_include_pad=0),
    inside input plus explicit pads (=1, opset >= 19), or all taps (=1, older).
    """
    size, kernel = pool.input_shape[axis], pool.kernel[axis]
    starts = np.arange(pool.output_shape[axis]) * pool.strides[axis] - pool.pads_before[axis]
    taps = starts[:, None] + pool.dilations[axis] * np.arange(kernel)[None, :]
    if not pool.count_include_pad:
        low, high = 0, size
    elif opset >= _OVERHANG_EXCLUDED_SINCE:
        low, high = -pool.pads_before[axis], size + pool.pads_after[axis]
    else:
        return np.full(len(starts), kernel)
    return ((taps >= low) & (taps < high)).sum(axis=1)


def _scale_map(pool: _Pool, opset: int) -> np.ndarray:
    """Map ``M`` (float64, shape ``[1, 1, *output_spatial]``): kernel taps / original divisor.

    Positions whose divisor is 0 (no real input tap) get 0, as the op outputs 0 there.
    """
    factors = [_axis_divisors(pool, axis, opset) for axis in range(len(pool.kernel))]
    divisor = reduce(np.multiply.outer, factors).astype(np.float64)
    taps = float(np.prod(pool.kernel))
    scale = np.divide(taps, divisor, out=np.zeros_like(divisor), where=divisor > 0)
    return scale.reshape((1, 1, *pool.output_shape))


# --- graph surgery -------------------------------------------------------------


def _tensor_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name used in the main graph."""
    infos = (*graph.input, *graph.output, *graph.value_info, *graph.initializer)
    names = {t.name for t in infos}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _claim(name: str, taken: set[str], node: str) -> str:
    """Reserve tensor ``name``; RewriteError if the graph already uses it."""
    if name in taken:
        raise RewriteError(f"AveragePool {node!r}: tensor name {name!r} already exists")
    taken.add(name)
    return name


def _splice(
    graph: onnx.GraphProto,
    index: int,
    pool: _Pool,
    scale: np.ndarray,
    opset: int,
    taken: set[str],
    as_input: bool,
) -> dict:
    """Replace ``graph.node[index]`` by the include-pad pool and its Mul; return the record.

    ``scale`` is the map in the pool's dtype; ``taken`` holds the graph's tensor
    names and gains the two new ones; ``as_input`` also lists the map among the
    graph inputs (required before IR version 4).
    """
    old = graph.node[index]
    name, source, output = old.name, old.input[0], old.output[0]
    pooled = _claim(f"{output}__cip1", taken, name)
    scale_name = _claim(f"{output}__cip_scale", taken, name)
    end = [a + e for a, e in zip(pool.pads_after, pool.extra_end_pad)]
    attrs = {
        "kernel_shape": list(pool.kernel),
        "strides": list(pool.strides),
        "pads": [*pool.pads_before, *end],
        "count_include_pad": 1,
    }
    if opset >= _CEIL_MODE_SINCE:
        attrs["ceil_mode"] = 0
    if any(d != 1 for d in pool.dilations):
        attrs["dilations"] = list(pool.dilations)
    new_pool = helper.make_node("AveragePool", [source], [pooled], name=name, **attrs)
    mul = helper.make_node("Mul", [pooled, scale_name], [output], name=f"{name}__cip_scale")
    graph.initializer.append(numpy_helper.from_array(scale, scale_name))
    if as_input:
        elem_type = helper.np_dtype_to_tensor_dtype(scale.dtype)
        graph.input.append(helper.make_tensor_value_info(scale_name, elem_type, scale.shape))
    del graph.node[index]
    graph.node.insert(index, mul)
    graph.node.insert(index, new_pool)
    return {
        "node": name,
        "output": output,
        "kernel_shape": list(pool.kernel),
        "strides": list(pool.strides),
        "pads_before": list(pool.pads_before),
        "pads_after": list(pool.pads_after),
        "ceil_mode": pool.ceil_mode,
        "extra_end_pad": list(pool.extra_end_pad),
        "scale_min": float(scale.min()),
        "scale_max": float(scale.max()),
        "scale_initializer": scale_name,
    }
