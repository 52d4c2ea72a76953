"""Automatic repair of a quantized model: which layers to keep in float16, and checks that they were.

Why: a failed int8 accuracy check leaves users reading the per-layer analysis
and guessing ``hybrid: custom_layers`` by hand, build after build. Measured
on rknn-toolkit2 2.5.0 (``examples/models/make_outlier.py``), two facts decide
how layers must be chosen:

* ``custom_quantize_layers`` is keyed by tensor, and the op that writes a
  listed tensor runs in float16: listing a Relu's output splits it from its
  Conv and runs only the Relu in float16 (the Conv, which loses the
  precision, stays int8), so a layer means the computing op with the
  activations after it;
* the layer the analysis marks worst (lowest cosine on its own) is usually
  the *consumer* of a damaged tensor: an outlier channel in conv1's output
  ruins its int8 scale, and conv2, which reads it, shows the error. Keeping
  conv2 alone in float does not help (its input was already rounded);
  keeping conv1 and conv2 does (cosine 0.61 -> 0.9999).

So one repair step takes the worst layer, walks back through activations to
the op that computes it (its *anchor*), and keeps in float the anchor's chain
and the chains of the anchors that produce its inputs. A float *layer*, as
counted against ``max_float_layers``, is one anchor node.

Pure functions over the analysis (:mod:`pipeline.accuracy`) and the producer
map of the toolkit's optimised graph; the worker runs the builds.
"""

from __future__ import annotations

from pipeline.accuracy import ACTIVATIONS, BOOKKEEPING, actionable

# Targets whose toolkit refuses float16 in custom_quantize_layers (2.5.0: "'c1: float16' not supported in
# custom_quantize_layers at rv1103/rv1106, only support int8/int16!"; the same for rv1103b/rv1106b).
NO_FLOAT16_HYBRID = frozenset({"rv1103", "rv1106", "rv1103b", "rv1106b"})


def chain(tensor: str, producers: dict[str, dict]) -> tuple[str | None, list[str]]:
    """The anchor node that computes ``tensor`` and the tensors from it to ``tensor`` (activations folded)."""
    tensors = [tensor]
    producer = producers.get(tensor)
    while producer and producer["op_type"] in ACTIVATIONS and producer["inputs"]:
        before = producer["inputs"][0]
        earlier = producers.get(before)
        if earlier is None or earlier["op_type"] in BOOKKEEPING:
            break
        tensors.append(before)
        producer = earlier
    if producer is None or producer["op_type"] in BOOKKEEPING:
        return None, []
    return producer["node"], tensors


def group(tensor: str, producers: dict[str, dict]) -> dict[str, list[str]]:
    """Anchor node -> tensors to keep in float so that ``tensor``'s layer and its inputs stay float16."""
    anchor, tensors = chain(tensor, producers)
    if anchor is None:
        return {}
    found = {anchor: tensors}
    node_inputs = next((p["inputs"] for p in producers.values() if p["node"] == anchor), [])
    for name in node_inputs:
        before, before_tensors = chain(name, producers)
        if before is not None:
            found.setdefault(before, []).extend(t for t in before_tensors if t not in found.get(before, []))
    return found


def next_step(layers: list[dict], producers: dict[str, dict], kept: dict[str, list[str]]) -> tuple[dict, dict] | None:
    """The next group to keep in float: (the worst layer not yet float, its group minus what is kept).

    ``kept`` is anchor -> tensors already in float. None when no actionable
    layer is left.
    """
    kept_tensors = {t for tensors in kept.values() for t in tensors}
    ranked = sorted((layer for layer in layers if actionable(layer) and layer["tensor"] not in kept_tensors),
                    key=lambda layer: layer["single"]["cosine"])
    for layer in ranked:
        found = group(layer["tensor"], producers)
        new = {anchor: [t for t in tensors if t not in kept_tensors] for anchor, tensors in found.items()}
        new = {anchor: tensors for anchor, tensors in new.items() if tensors}
        if new:
            return layer, new
    return None


def merge(kept: dict[str, list[str]], new: dict[str, list[str]]) -> dict[str, list[str]]:
    merged = {anchor: list(tensors) for anchor, tensors in kept.items()}
    for anchor, tensors in new.items():
        merged.setdefault(anchor, []).extend(t for t in tensors if t not in merged[anchor])
    return merged


def float_tensors(kept: dict[str, list[str]]) -> list[str]:
    return [t for tensors in kept.values() for t in tensors]


def summary_line(repair: dict) -> str:
    """``repaired: 2 float layers, cos 0.6055 -> 0.9999`` (the task line and the report)."""
    layers = len(repair.get("float_layers") or [])
    before, after = repair.get("cosine_before"), repair.get("cosine_after")
    text = f"repaired: {layers} float layer{'s' if layers != 1 else ''}"
    if before is not None and after is not None:
        text += f", cos {before:.4f} -> {after:.4f}"
    if repair.get("reused"):
        text += " (choice reused)"
    return text


def unfloated_layers(asked: dict[str, dict], layers: list[dict]) -> list[dict]:
    """Layers of the toolkit's layer table asked to stay float that it built in int8.

    ``asked`` maps each tensor written into ``custom_quantize_layers`` to its
    producer ``{"node", "anchor"}``; ``layers`` is the parsed layer table.
    A node fused into another layer (a Relu into its Conv) has no row of its
    own: its anchor's row decides.
    """
    by_node: dict[str, list[dict]] = {}
    for layer in layers:
        if layer.get("node"):
            by_node.setdefault(layer["node"], []).append(layer)
    wrong, seen = [], set()
    for tensor, where in asked.items():
        rows = (by_node.get(where.get("node")) or by_node.get(where.get("anchor"))
                or [row for name in where.get("via") or [] for row in by_node.get(name, [])])
        for row in rows:
            if row["dtype"].upper().startswith("INT") and row["id"] not in seen:
                seen.add(row["id"])
                wrong.append({"tensor": tensor, "node": row["node"], "layer": row["full_name"],
                              "op_type": row["op_type"], "dtype": row["dtype"]})
    return wrong
