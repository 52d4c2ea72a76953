"""Resolution: turn the manifest's declarative overrides into the exact ``op_target`` the toolkit gets.

Users state intent ("every AveragePool with count_include_pad=0 runs on the
NPU", "rewrite it exactly"); the toolkit wants a dict keyed by *output tensor*
names. This module selects nodes from the analysis, checks each action against
the platform's rules, and writes ``resolved.json``: the op_target dict, one
explanation per key (which override, which node, which rule), the rewrites
applied and the notes and warnings a user should read. Names that the
toolkit's own optimisation renames are fixed later, in the worker, where the
optimised graph exists (see :func:`pipeline.worker._remap_op_target`).
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from pathlib import Path
from pipeline.actions import ACTIONS
from pipeline.errors import PipelineError
from pipeline.formats import RESOLUTION_FORMAT
from pipeline.names import nearest



class ResolutionError(PipelineError, ValueError):
    """An override cannot be applied as written; the message says where and what to change."""


def override_applies(override: dict, target: str) -> bool:
    """True when ``override`` is not restricted to other platforms."""
    targets = override.get("targets")
    return not targets or target in targets


def _equal(actual, expected) -> bool:
    if isinstance(expected, list) or isinstance(actual, list):
        return isinstance(actual, list) and isinstance(expected, list) and len(actual) == len(expected) \
            and all(_equal(a, e) for a, e in zip(actual, expected))
    if isinstance(actual, (int, float)) and isinstance(expected, (int, float)) and not isinstance(expected, bool):
        return float(actual) == float(expected)
    return actual == expected


def _matches(node: dict, match: dict, tensor_names: set[str]) -> bool:
    if "op_type" in match and node["op_type"] != match["op_type"]:
        return False
    if "node" in match and not fnmatch.fnmatchcase(node["name"], match["node"]):
        return False
    for key, expected in (match.get("attrs") or {}).items():
        if key not in node["attrs"] or not _equal(node["attrs"][key], expected):
            return False
    return not ("tensor" in match and not tensor_names.intersection(node["outputs"]))


def select_nodes(nodes: list[dict], match: dict) -> tuple[list[dict], list[str]]:
    """Nodes that satisfy every key of ``match``, plus notes on how the selector was read.

    A ``tensor`` value that is no tensor but is a node name selects that node
    (people mix the two up; the toolkit does not forgive it, we do, and say so).
    """
    notes: list[str] = []
    tensors = {match["tensor"]} if "tensor" in match else set()
    if tensors:
        all_outputs = {out for node in nodes for out in node["outputs"]}
        if match["tensor"] not in all_outputs:
            named = [node for node in nodes if node["name"] == match["tensor"]]
            if named:
                tensors = set(named[0]["outputs"])
                notes.append(f"match.tensor '{match['tensor']}' is a node name, not a tensor; using that node's "
                             f"output tensor(s) {', '.join(named[0]['outputs'])}")
    return [node for node in nodes if _matches(node, match, tensors)], notes


def nearest_candidates(nodes: list[dict], match: dict, limit: int = 5) -> str:
    """Plain-language hint of what the selector could have meant."""
    hints = []
    if "op_type" in match:
        present = sorted({n["op_type"] for n in nodes})
        close = nearest(match["op_type"], present, 3)
        hints.append(f"op types here: {', '.join(close or present[:12])}")
        same_op = [n for n in nodes if n["op_type"] == match["op_type"]]
        for key in match.get("attrs") or {}:
            values = sorted({repr(n["attrs"].get(key)) for n in same_op})
            if values:
                hints.append(f"{match['op_type']}.{key} values here: {', '.join(values)}")
    if "node" in match:
        names = [n["name"] for n in nodes if n["name"]]
        hints.append("nearest nodes: " + ", ".join(nearest(match["node"], names, limit, 0.3, fallback=True)))
    if "tensor" in match:
        outs = [o for n in nodes for o in n["outputs"]]
        hints.append("nearest tensors: " + ", ".join(nearest(match["tensor"], outs, limit, 0.3, fallback=True)))
    return "; ".join(hints) or "the selector is empty"


def _check_action(action: str, node: dict, target: str, rules, where: str) -> None:
    """Refuse what the action cannot do to ``node`` on ``target`` (see :mod:`pipeline.actions`)."""
    problem = ACTIONS[action].problem(node, target, rules)
    if problem:
        raise ResolutionError(f"{where}: {problem}")


def resolve(model: dict, target: str, analysis: dict, rules, *, locations: dict | None = None,
            workdir: Path | None = None) -> dict:
    """Resolve ``model['overrides']`` for ``target`` against ``analysis``.

    Args:
        model: the manifest's effective model record.
        target: the platform being built.
        analysis: the document from :func:`pipeline.analysis.analyze` for this model x target.
        rules: the placement rules, for the cpu/npu checks.
        locations: override index -> ``"PATH:LINE:COL"``, used in error messages only.
        workdir: the pair's :class:`pipeline.layout.PairLayout` (or its directory): where a
            rewritten ONNX is written; required when an override uses ``action: rewrite``.
    Returns:
        The ``resolved.json`` document.
    Raises:
        ResolutionError: a selector matches nothing, two overrides disagree on a node, or an
            action is impossible on this platform.
    """
    locations = locations or {}
    nodes = analysis["nodes"]
    chosen: dict[int, tuple[str, int]] = {}  # node index -> (action, override index)
    notes: list[str] = []
    warnings: list[str] = []
    applied = []
    for index, override in enumerate(model.get("overrides") or []):
        if not override_applies(override, target):
            continue
        where = locations.get(index, f"{model['name']}: overrides[{index}]")
        selected, selector_notes = select_nodes(nodes, override["match"])
        notes += [f"overrides[{index}]: {note}" for note in selector_notes]
        if not selected:
            raise ResolutionError(f"{where}: override matches no node of '{model['name']}' "
                                  f"({_describe(override['match'])}); {nearest_candidates(nodes, override['match'])}")
        action = override["action"]
        for node in selected:
            earlier = chosen.get(node["index"])
            if earlier and earlier[0] != action:
                raise ResolutionError(f"{where}: node '{node['name']}' is also selected by overrides[{earlier[1]}] "
                                      f"with action {earlier[0]}; make the selectors disjoint")
            _check_action(action, node, target, rules, where)
            chosen[node["index"]] = (action, index)
        warnings += filter(None, [ACTIONS[action].warning(index, selected, target)])
        applied.append({"override": index, "action": action, "targets": override.get("targets"),
                        "nodes": [node["name"] for node in selected]})

    op_target: dict[str, str] = {}
    explanations: dict[str, dict] = {}
    rewrite_nodes: dict[str, list[str]] = defaultdict(list)  # action -> node names, in graph order
    for node_index, (action, override_index) in sorted(chosen.items()):
        node = nodes[node_index]
        spec = ACTIONS[action]
        if spec.rewrites:
            rewrite_nodes[action].append(node["name"])
        if spec.op_target is None:
            continue
        key = node["outputs"][0]
        op_target[key] = spec.op_target
        explanations[key] = {
            "override": override_index, "action": action, "node": node["name"], "op_type": node["op_type"],
            "output_index": 0, "predicted": node["predicted"],
        }

    rewrites: list[dict] = []
    converted = None
    if rewrite_nodes:
        if workdir is None:
            raise ResolutionError("internal: rewrite needs a working directory")
        converted, rewrites = _rewrite(model, rewrite_nodes, workdir)
    return {
        "format": RESOLUTION_FORMAT,
        "model": model["name"],
        "target": target,
        "op_target": op_target,
        "explanations": explanations,
        "overrides_applied": applied,
        "rewrites": rewrites,
        "converted_onnx": converted,
        "notes": notes,
        "warnings": warnings,
    }


def selector_problems(model: dict, nodes: list[dict]) -> list[tuple[int, tuple, str]]:
    """Everything :func:`resolve` would refuse on any of the model's targets, from the graph alone.

    The manifest loader calls this with the memoised node facts, so a selector typo in
    the tenth model fails the build before the first conversion starts. Returns
    ``(override index, path inside that override, message)`` triples, each once.
    """
    overrides = model.get("overrides") or []
    selected: dict[int, list[dict]] = {}
    problems: list[tuple[int, tuple, str]] = []
    for index, override in enumerate(overrides):
        found, _ = select_nodes(nodes, override["match"])
        if found:
            selected[index] = found
        else:
            problems.append((index, ("match",), f"override matches no node of '{model['name']}' "
                             f"({_describe(override['match'])}); {nearest_candidates(nodes, override['match'])}"))
    rules = None
    if any(ACTIONS[overrides[index]["action"]].needs_rules for index in selected):
        from pipeline.placement_rules import Rules

        rules = Rules.load()
    for target in model.get("targets") or ():
        chosen: dict[int, tuple[str, int]] = {}
        for index, found in selected.items():
            override = overrides[index]
            if not override_applies(override, target):
                continue
            action = override["action"]
            for node in found:
                earlier = chosen.get(node["index"])
                try:
                    if earlier and earlier[0] != action:
                        raise ResolutionError(f"node '{node['name']}' is also selected by overrides[{earlier[1]}] "
                                              f"with action {earlier[0]}; make the selectors disjoint")
                    _check_action(action, node, target, rules, "")  # rules: loaded when an action needs them
                except ResolutionError as error:
                    problem = (index, ("action",), str(error).removeprefix(": "))
                    if problem not in problems:
                        problems.append(problem)
                chosen[node["index"]] = (action, index)
    return problems


def _describe(match: dict) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in match.items())


def _rewrite(model: dict, node_names: dict[str, list[str]], workdir) -> tuple[str, list[dict]]:
    """Write ``rewritten.onnx``: each rewriting action (:mod:`pipeline.actions`) applied to its nodes."""
    import onnx

    from pipeline import files
    from pipeline.analysis import fix_input_shapes
    from pipeline.layout import PairLayout

    graph = onnx.load(model["source"])
    fix_input_shapes(graph, model.get("inputs"))
    records: list[dict] = []
    for action, names in node_names.items():
        try:
            graph, done = ACTIONS[action].rewrite(graph, names)
        except PipelineError as exc:
            raise ResolutionError(f"{model['name']}: {action} failed: {exc}") from exc
        records += done
    path = PairLayout.of(workdir).rewritten_onnx
    files.atomic_write_bytes(path, graph.SerializeToString())
    return str(path), records


def summary_line(resolved: dict) -> str:
    kinds = defaultdict(int)
    for item in resolved["explanations"].values():
        kinds[item["action"]] += 1
    parts = [f"op_target {len(resolved['op_target'])} keys" + (f" ({', '.join(f'{k} {v}' for k, v in kinds.items())})" if kinds else ""),
             f"rewrites {len(resolved['rewrites'])}"]
    return ", ".join(parts)
