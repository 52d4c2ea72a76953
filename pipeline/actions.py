"""The override actions (``overrides[].action`` in the manifest): one registry, read by everyone.

Each :class:`Action` says what it does to a selected node, so that resolution,
the doit wiring and the export checks need no ``if action == "cpu"``:

- ``op_target``: the value resolution writes into the toolkit's ``op_target``
  for the node's output (None: the action adds no key);
- ``rewrites``: the graph is rewritten before conversion (resolve writes
  ``rewritten.onnx`` and convert depends on it), by ``rewrite(model, names)``;
- ``expected_on``: where the node's layers should end up ("cpu" layers asked
  for are not reported as fallbacks);
- ``problem(node, target, rules)``: why the action cannot apply to that node
  on that target (found at manifest load and again at resolve), or None;
- ``warning(index, nodes, target)``: an allowed-but-risky use worth a warning.

Adding an action is one entry in :data:`ACTIONS` plus its name in the schema's
enum (``tests/test_actions.py`` keeps the two equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Action:
    """What one override action does; see the module docstring for each field's reader."""

    name: str
    description: str
    op_target: str | None = None
    rewrites: bool = False
    expected_on: str | None = None
    needs_rules: bool = False  # ``problem`` consults the placement rules (loaded only then)
    problem: Callable[[dict, str, object], str | None] = lambda node, target, rules: None
    warning: Callable[[int, list, str], str | None] = lambda index, nodes, target: None
    rewrite: Callable | None = None  # (onnx model, node names) -> (rewritten model, records)


def _cpu_problem(node: dict, target: str, rules) -> str | None:
    if rules.cpu_can_run(node["op_type"], target):
        return None
    return (f"action cpu on {target}: the {target} CPU runtime cannot run {node['op_type']} "
            f"(node '{node['name']}'); the model would fail on the board. Use action: npu or rewrite, "
            f"or restrict the override with targets:")


def _forced_npu_warning(index: int, nodes: list[dict], target: str) -> str | None:
    """One warning per override for nodes forced onto an NPU whose constraints they break.

    Allowed (it is the documented workaround) but the NPU may compute them
    differently, e.g. AveragePool borders with count_include_pad=1 semantics.
    """
    breaking = [n for n in nodes if n["predicted"]["placement"] in ("cpu", "unsupported")]
    if not breaking:
        return None
    reasons = sorted({n["predicted"]["reason"] for n in breaking})
    hint = " Consider action: rewrite, which is exact." if all(n["op_type"] == "AveragePool" for n in breaking) else ""
    return (f"overrides[{index}]: {len(breaking)} node(s) forced onto the {target} NPU break its constraints "
            f"({'; '.join(reasons)}): {', '.join(n['name'] for n in breaking)}. On the NPU they may compute "
            f"different values.{hint}")


def _pool_problem(node: dict, target: str, rules) -> str | None:
    if node["op_type"] == "AveragePool":
        return None
    return f"action rewrite is defined for AveragePool only; node '{node['name']}' is {node['op_type']}"


def _rewrite_pools(model, names: list[str]):
    from pipeline.rewrite import rewrite_average_pools  # heavy: numpy + onnx

    return rewrite_average_pools(model, names)


ACTIONS: dict[str, Action] = {action.name: action for action in (
    Action("npu", "run the matching operators on the NPU", op_target="npu", expected_on="npu",
           warning=_forced_npu_warning),
    Action("cpu", "run the matching operators on the CPU", op_target="cpu", expected_on="cpu",
           needs_rules=True, problem=_cpu_problem),
    Action("rewrite", "rewrite the matching AveragePools into an exact NPU form", rewrites=True,
           expected_on="npu", problem=_pool_problem, rewrite=_rewrite_pools),
)}


def action(name: str) -> Action:
    """The registered action ``name`` (the schema has already refused any other)."""
    return ACTIONS[name]
