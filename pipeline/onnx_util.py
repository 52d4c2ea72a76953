"""Small ONNX facts every stage asks for: default domains, opset versions, tensor types and shapes.

One implementation each, so that the manifest check, the analysis, the pool
rewrite and the accuracy check cannot disagree about, say, whether
``ai.onnx`` is the default domain. ``onnx`` itself is imported lazily: the
manifest check calls these on memoised facts without it.
"""

from __future__ import annotations

DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})


def is_default_domain(domain: str) -> bool:
    return domain in DEFAULT_DOMAINS


def opset(model, domain: str = "") -> int:
    """The version ``model`` imports for ``domain`` (``""`` and ``"ai.onnx"`` are one domain); 0 if none."""
    wanted = DEFAULT_DOMAINS if is_default_domain(domain) else {domain}
    for entry in model.opset_import:
        if entry.domain in wanted:
            return entry.version
    return 0


def dims(value, symbolic: bool = False) -> list | None:
    """The shape of a ``ValueInfoProto``: ints, and for unknown dims their name (``symbolic``) or None.

    None when the value has no shape at all (unknown rank).
    """
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else ((d.dim_param or None) if symbolic else None)
            for d in tensor.shape.dim]


def value_types(values, symbolic: bool = False) -> dict[str, tuple[int, list | None]]:
    """Tensor name -> (ONNX element type, :func:`dims`) for ``values``; the first one of a name wins."""
    found: dict[str, tuple[int, list | None]] = {}
    for value in values:
        found.setdefault(value.name, (value.type.tensor_type.elem_type, dims(value, symbolic)))
    return found


def inferred(model, **options):
    """``model`` after ONNX shape inference (a new model; ``options`` go to ``infer_shapes``)."""
    import onnx

    return onnx.shape_inference.infer_shapes(model, **options)
