"""Per-layer quantization accuracy: the toolkit's ``accuracy_analysis`` table, read and named.

Why: when the accuracy check fails on a quantized model, a cosine per output
says *that* int8 broke it, not *where*. The toolkit can run the model layer by
layer on its simulator against a float "golden" run and print, per layer, the
cosine and euclidean error of the whole model up to that layer (``entire``)
and of that layer alone given exact inputs (``single``). Its table names
layers by their output tensor in the toolkit's optimised graph; this module
parses the table (which the toolkit also writes to ``error_analysis.txt``) and
names each layer by the ONNX node and op type that produce the tensor, as the
placement table does, so a user can write ``hybrid: custom_layers`` from it,
and :mod:`pipeline.repair` can choose layers to keep in float.

Pure functions over text and dicts: no toolkit import (the worker runs the
analysis through :mod:`pipeline.toolkit` and hands the text here).
"""

from __future__ import annotations

import math
import re

ACCURACY_FORMAT = 1
# Layers the toolkit adds around the network (data type conversions, the inputs themselves):
# they have an error, but never one a user can act on.
BOOKKEEPING = frozenset({"Input", "exDataConvert", "InputOperator", "OutputOperator"})
WORST_COUNT = 5
# Single-input ops the compiler fuses into the op before them: they follow its data type.
ACTIVATIONS = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
                         "Selu", "Softplus", "Mish", "Gelu", "Swish", "Silu", "PRelu"})

_ROW = re.compile(r"^\[(?P<op>[^\]]+)\]\s+(?P<name>\S+)(?:\s+(?P<rest>.*))?$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _number(cell: str) -> float | None:
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_error_analysis(text: str) -> list[dict]:
    """The per-layer rows of the toolkit's error analysis table, in its order.

    A row is ``[OpType] tensor  entire_cos | entire_euc  single_cos | single_euc``;
    a layer the compiler fused into the next one has no values (all four are
    None). A cell that is not a number (the toolkit marks some, e.g.
    ``q_zero``) is kept in ``flags`` and its value is None.
    """
    layers = []
    for raw in text.splitlines():
        line = _ANSI.sub("", raw).strip()
        match = _ROW.match(line)
        if not match:
            continue
        cells = (match.group("rest") or "").replace("|", " ").split()
        values = [_number(cell) for cell in cells[:4]] + [None] * (4 - len(cells[:4]))
        flags = [cell for cell in cells if _number(cell) is None]
        layer = {"tensor": match.group("name"), "toolkit_op": match.group("op"),
                 "entire": {"cosine": values[0], "euclidean": values[1]},
                 "single": {"cosine": values[2], "euclidean": values[3]}}
        if flags:
            layer["flags"] = flags
        layers.append(layer)
    return layers


def name_layers(layers: list[dict], producers: dict[str, dict]) -> list[dict]:
    """Add ``node`` and ``op_type`` (the ONNX node that produces each layer's tensor).

    ``producers`` maps a tensor of the toolkit's optimised graph to
    ``{"node", "op_type", "inputs"}``; node names survive its optimisation
    (tensor names may not), so they match the source ONNX and the placement
    table. A tensor no node produces (a graph input) keeps ``node`` None.
    """
    named = []
    for layer in layers:
        producer = producers.get(layer["tensor"]) or {}
        anchor = producer
        while anchor.get("op_type") in ACTIVATIONS and anchor.get("inputs"):  # the op it is fused into
            before = producers.get(anchor["inputs"][0]) or {}
            if not before or before.get("op_type") in BOOKKEEPING:
                break
            anchor = before
        named.append({**layer, "node": producer.get("node"), "op_type": producer.get("op_type"),
                      "anchor": anchor.get("node")})
    return named


def place_layers(layers: list[dict], table: list[dict]) -> list[dict]:
    """Add ``layer``: the layer-table row (as in placement.json) each analysed tensor belongs to.

    A node fused into another (a Relu into its Conv) has no row of its own; its
    anchor's row is the layer the compiler built.
    """
    rows: dict[str, str] = {}
    for row in table:
        if row.get("node") and row.get("full_name"):
            rows.setdefault(row["node"], f"{row['full_name']} ({row['op_type']})")
    return [{**layer, "layer": rows.get(layer.get("node")) or rows.get(layer.get("anchor"))} for layer in layers]


def actionable(layer: dict) -> bool:
    """A layer a user could keep in float: a real node with a measured single-layer cosine."""
    return (layer["toolkit_op"] not in BOOKKEEPING and layer.get("op_type") not in BOOKKEEPING
            and layer.get("node") is not None and layer["single"]["cosine"] is not None)


def worst_layers(layers: list[dict], count: int = WORST_COUNT) -> list[dict]:
    """The ``count`` actionable layers that lose the most on their own (lowest single cosine first;
    ties by the accumulated cosine, then table order)."""
    ranked = sorted((layer for layer in layers if actionable(layer)),
                    key=lambda layer: (layer["single"]["cosine"],
                                       layer["entire"]["cosine"] if layer["entire"]["cosine"] is not None else 1.0))
    return ranked[:count]


def describe(layer: dict) -> str:
    """``conv2 (Conv, tensor r2): single cos 0.5643, entire cos 0.5643``."""
    parts = [f"single cos {layer['single']['cosine']:.4f}"]
    if layer["entire"]["cosine"] is not None:
        parts.append(f"entire cos {layer['entire']['cosine']:.4f}")
    where = f", layer {layer['layer']}" if layer.get("layer") else ""
    return f"{layer['node']} ({layer['op_type']}, tensor {layer['tensor']}{where}): {', '.join(parts)}"


def record(layers: list[dict], inputs: list[str], why: str) -> dict:
    """The ``accuracy.json`` document: every layer, and the worst ones by node."""
    return {"format": ACCURACY_FORMAT, "why": why, "inputs": inputs, "simulator": True,
            "layers": layers, "worst": [layer["node"] for layer in worst_layers(layers)]}


def failure_lines(accuracy: dict | None) -> list[str]:
    """What the failure message adds: the five worst layers, or why the analysis did not run."""
    if not accuracy:
        return []
    if accuracy.get("error"):
        return [f"per-layer analysis could not run: {accuracy['error']}"]
    worst = worst_layers(accuracy.get("layers") or [])
    if not worst:
        return ["per-layer analysis: no layer of the model has a measured error"]
    return ["layers that lose the most in int8 (keep them in float with quantization.hybrid.custom_layers, "
            "or let quantization.repair choose):"] + [f"  {describe(layer)}" for layer in worst]
