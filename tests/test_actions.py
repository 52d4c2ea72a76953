"""The override action registry: the schema agrees with it, and an action is one entry in it.

No toolkit: the real analysis of an example model and the real rules table.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import actions, schema
from pipeline.actions import ACTIONS, Action
from pipeline.analysis import analyze
from pipeline.placement_rules import Rules
from pipeline.resolution import resolve, selector_problems
from pipeline.stages import placement_check

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"


def test_the_schema_enum_is_the_registry():
    override = schema.load()["$defs"]["override"]["properties"]["action"]
    assert override["enum"] == list(ACTIONS)
    assert set(override.get("examples", [])) <= set(ACTIONS)


def test_each_action_is_described_consistently():
    for name, spec in ACTIONS.items():
        assert spec.name == name and spec.description
        assert spec.rewrites == (spec.rewrite is not None), name
        assert spec.op_target in (None, "npu", "cpu") and spec.expected_on in (None, "npu", "cpu")


@pytest.fixture(scope="module")
def inception():
    model = {"name": "m", "source": str(EXAMPLES / "light_inception_v2.onnx"), "inputs": {"data_0": [1, 3, 224, 224]},
             "targets": ["rk3588"]}
    return model, analyze({**model, "overrides": []}, "rk3588", Rules.load())


def test_a_fourth_action_that_does_nothing_needs_only_its_registry_entry(inception, monkeypatch):
    # What the architecture doc promises: a new action touches the registry (and the schema's enum).
    monkeypatch.setitem(ACTIONS, "keep", Action("keep", "leave the matching operators where the toolkit puts them"))
    model, analysis = inception
    model = {**model, "overrides": [{"match": {"op_type": "AveragePool"}, "action": "keep"}]}
    resolved = resolve(model, "rk3588", analysis, Rules.load())
    assert resolved["op_target"] == {} and resolved["rewrites"] == [] and resolved["converted_onnx"] is None
    assert resolved["overrides_applied"][0]["action"] == "keep" and len(resolved["overrides_applied"][0]["nodes"]) == 8
    assert selector_problems(model, analysis["nodes"]) == []
    # ...and it still conflicts with another action on the same node, like any action.
    both = {**model, "overrides": [*model["overrides"], {"match": {"node": "n65"}, "action": "npu"}]}
    assert "make the selectors disjoint" in selector_problems(both, analysis["nodes"])[0][2]


def test_cpu_layers_an_action_expects_are_not_fallbacks(inception, monkeypatch):
    model, _ = inception
    record = {"placement": {"cpu_layers": [{"name": "AveragePool:n65", "node": "n65", "op_type": "AveragePool"}]}}
    resolved = {"explanations": {"r65": {"node": "n65", "action": "cpu"}}}
    strict = {**model, "cpu_fallback": "error"}
    assert placement_check(strict, "rk3588", record, resolved, Rules.load()) == ([], [])
    # An action that puts the node anywhere does not excuse a CPU layer.
    monkeypatch.setitem(ACTIONS, "anywhere", Action("anywhere", "a test action", op_target="cpu"))
    resolved = {"explanations": {"r65": {"node": "n65", "action": "anywhere"}}}
    warnings, errors = placement_check(strict, "rk3588", record, resolved, Rules.load())
    assert len(errors) == 1 and "AveragePool:n65" in errors[0]


def test_actions_module_lookup():
    assert actions.action("cpu").needs_rules and actions.action("rewrite").rewrites
