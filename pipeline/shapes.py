"""Models declared at several input shapes: one static model per shape set (buckets), or one dynamic model.

Why a module of its own: ``inputs: {x: [[1, 3, 48, 160], [1, 3, 48, 320]]}``
turns one manifest entry into several units of work (``shapes: buckets``) or
into one conversion with the toolkit's ``dynamic_input`` (``shapes:
dynamic``). Everything downstream (analysis, tasks, cache, sidecars, lock)
keeps working on units with static ``inputs``: :func:`expand` hands out one
model dict per bucket, named ``<name>.<dims>`` so that the file names
``dist/<target>/rec.1x3x48x320.rknn`` fall out of the existing layout, and a
dynamic model whose ``inputs`` are its largest shape set (what analysis and
calibration see), with all sets in ``shape_sets``.

The toolkit's limits on ``dynamic_input``, measured against 2.5.0 by
``tests/input_probe.py`` (table in ``docs/platform-facts.md``):

* calibration samples must have, per input, the shape with the most elements
  among the sets (not the first, not the last, not the widest);
* a dim that is static in the ONNX model must keep its value in every set;
* ``load_onnx``'s ``input_size_list`` cannot be combined with it (build fails),
  so a dynamic model names every model input, in the model's order, and cannot
  cut the graph at inner tensors;
* up to 64 shape sets were accepted (no limit found).
"""

from __future__ import annotations

import math

MODES = ("buckets", "dynamic")


def declared(inputs) -> dict[str, list[list[int]]] | None:
    """Input name -> its declared shapes (one for a single shape); None if ``inputs`` is not usable."""
    if not isinstance(inputs, dict) or not inputs:
        return None
    result = {}
    for name, value in inputs.items():
        if not isinstance(value, list) or not value:
            return None
        if all(isinstance(item, list) for item in value):
            result[name] = [list(item) for item in value]
        elif all(isinstance(item, int) for item in value):
            result[name] = [list(value)]
        else:
            return None
    return result


def shape_sets(inputs) -> list[dict[str, list[int]]] | None:
    """The shape sets: the n-th shape of every input with a list (single shapes repeat); None if unusable."""
    shapes = declared(inputs)
    if shapes is None:
        return None
    count = max(len(items) for items in shapes.values())
    if any(len(items) not in (1, count) for items in shapes.values()):
        return None
    return [{name: items[index if len(items) > 1 else 0] for name, items in shapes.items()} for index in range(count)]


def varying(sets: list[dict]) -> list[str]:
    """Names of the inputs whose shape differs between sets."""
    return [name for name in sets[0] if any(s[name] != sets[0][name] for s in sets)]


def tag(shape_set: dict, names: list[str]) -> str:
    """``1x3x48x320`` (one varying input) or ``1x3x48x320_1x40`` (several): the bucket's name suffix."""
    return "_".join("x".join(str(d) for d in shape_set[name]) for name in names)


def largest(sets: list[dict]) -> dict[str, list[int]]:
    """Per input, the shape with the most elements (the toolkit calibrates dynamic models at it)."""
    return {name: max((s[name] for s in sets), key=math.prod) for name in sets[0]}


def mode(model: dict) -> str | None:
    """``buckets`` or ``dynamic`` for a model with several shape sets, else None."""
    sets = model.get("shape_sets") or []
    return (model.get("shapes") or "buckets") if len(sets) > 1 else None


def bucket_names(model: dict) -> list[str]:
    sets = model.get("shape_sets") or []
    names = varying(sets)
    return [f"{model['name']}.{tag(s, names)}" for s in sets]


def dynamic_input(model: dict) -> list[list[list[int]]] | None:
    """The toolkit's ``dynamic_input`` for a dynamic model (sets x inputs in order), else None."""
    if mode(model) != "dynamic":
        return None
    return [[list(shape) for shape in s.values()] for s in model["shape_sets"]]


def expand(models: list[dict], sample_shape) -> list[dict]:
    """The units of work: each bucket as a model of its own, a dynamic model at its largest set.

    ``sample_shape(path)`` gives a ``.npy`` sample's shape (None for an image,
    which is decoded to whatever shape it feeds); a bucket calibrates with
    the steps whose samples all fit it.
    """
    units = []
    for model in models:
        how = mode(model)
        if how is None:
            units.append(model)
        elif how == "dynamic":
            units.append(_at(model, largest(model["shape_sets"]), sample_shape, keep_sets=True))
        else:
            for name, shape_set in zip(bucket_names(model), model["shape_sets"]):
                unit = _at(model, shape_set, sample_shape, keep_sets=False)
                unit.update(name=name, bucket={"model": model["name"], "inputs": shape_set})
                units.append(unit)
    return units


def _at(model: dict, shape_set: dict, sample_shape, keep_sets: bool) -> dict:
    """A copy of ``model`` with static ``inputs`` = ``shape_set``, its samples and image decoding to match."""
    import copy

    unit = copy.deepcopy(model)
    unit["inputs"] = {name: list(shape) for name, shape in shape_set.items()}
    if not keep_sets:
        unit["shape_sets"] = [unit["inputs"]]
    quant = unit.get("quantization")
    if quant and quant.get("samples"):
        order = list(shape_set)
        quant["samples"] = [row for row in quant["samples"]
                            if all(sample_shape(path) in (None, tuple(shape_set[name]))
                                   for path, name in zip(row, order))]
        for name, decode in zip(order, quant.get("images") or []):
            if decode:
                decode["shape"] = list(shape_set[name])
    return unit
