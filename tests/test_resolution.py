"""Overrides -> op_target: every selector kind, the errors users need, and the checks per platform.

These use the real analysis and rules table on the example models (no toolkit).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.analysis import analyze
from pipeline.placement_rules import Rules
from pipeline.resolution import ResolutionError, resolve

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"
PADDED_POOLS = {"n65", "n116", "n204", "n255", "n306", "n357", "n445"}


def _model(overrides, source="light_inception_v2.onnx", **extra):
    return {"name": "m", "source": str(EXAMPLES / source), "inputs": {"data_0": [1, 3, 224, 224]},
            "overrides": overrides, **extra}


@pytest.fixture(scope="module")
def rules():
    return Rules.load()


@pytest.fixture(scope="module")
def inception_rk3588(rules):
    return analyze(_model([]), "rk3588", rules)


def test_analysis_predicts_the_seven_padded_averagepools_on_cpu(inception_rk3588):
    off = [item for item in inception_rk3588["predicted_off_npu"] if item["op_type"] == "AveragePool"]
    assert {item["node"] for item in off} == PADDED_POOLS
    assert all(item["placement"] == "cpu" for item in off)
    assert inception_rk3588["op_histogram"]["AveragePool"] == 8
    pool = next(n for n in inception_rk3588["nodes"] if n["name"] == "n65")
    assert pool["attrs"]["count_include_pad"] == 0  # ONNX default applied
    assert pool["output_shapes"] == [[1, 192, 28, 28]]


def test_on_rv1106_the_fallbacks_are_not_runnable(rules):
    doc = analyze(_model([]), "rv1106", rules)
    pools = [i for i in doc["predicted_off_npu"] if i["op_type"] == "AveragePool"]
    assert len(pools) == 7 and all(i["placement"] == "unsupported" for i in pools)


def test_op_type_and_attrs_select_by_output_tensor(inception_rk3588, rules):
    model = _model([{"match": {"op_type": "AveragePool", "attrs": {"count_include_pad": 0}}, "action": "npu"}])
    resolved = resolve(model, "rk3588", inception_rk3588, rules)
    # The padding-free 7x7 pool (n505) has count_include_pad=0 too; it is selected as well.
    assert set(resolved["op_target"]) == {f"r{n[1:]}" for n in PADDED_POOLS} | {"r505"}
    assert set(resolved["op_target"].values()) == {"npu"}
    explanation = resolved["op_target"] and resolved["explanations"]["r65"]
    assert explanation["node"] == "n65" and explanation["override"] == 0
    # forcing a constraint-breaking node onto the NPU is allowed, with a warning that suggests rewrite
    [warning] = resolved["warnings"]
    assert "7 node(s) forced onto the rk3588 NPU" in warning and "action: rewrite" in warning
    assert all(name in warning for name in PADDED_POOLS)


def test_node_glob_and_exact_name(inception_rk3588, rules):
    resolved = resolve(_model([{"match": {"node": "n6?"}, "action": "npu"}]), "rk3588", inception_rk3588, rules)
    assert resolved["explanations"]["r65"]["node"] == "n65"
    exact = resolve(_model([{"match": {"node": "n116"}, "action": "npu"}]), "rk3588", inception_rk3588, rules)
    assert list(exact["op_target"]) == ["r116"]


def test_tensor_selector_and_node_name_given_as_tensor(inception_rk3588, rules):
    by_tensor = resolve(_model([{"match": {"tensor": "r204"}, "action": "npu"}]), "rk3588", inception_rk3588, rules)
    assert list(by_tensor["op_target"]) == ["r204"] and not by_tensor["notes"]
    by_node = resolve(_model([{"match": {"tensor": "n204"}, "action": "npu"}]), "rk3588", inception_rk3588, rules)
    assert list(by_node["op_target"]) == ["r204"]
    assert "is a node name, not a tensor" in by_node["notes"][0]


def test_no_match_lists_nearest_candidates(inception_rk3588, rules):
    with pytest.raises(ResolutionError) as err:
        resolve(_model([{"match": {"op_type": "AveragePool", "attrs": {"count_include_pad": 2}}, "action": "npu"}]),
                "rk3588", inception_rk3588, rules, locations={0: "models.yaml:9:9"})
    message = str(err.value)
    assert message.startswith("models.yaml:9:9: override matches no node")
    assert "AveragePool.count_include_pad values here: 0" in message
    with pytest.raises(ResolutionError, match="nearest nodes: n65"):
        resolve(_model([{"match": {"node": "n65x"}, "action": "npu"}]), "rk3588", inception_rk3588, rules)
    with pytest.raises(ResolutionError, match="op types here: AveragePool"):
        resolve(_model([{"match": {"op_type": "AveragePol"}, "action": "npu"}]), "rk3588", inception_rk3588, rules)


def test_cpu_action_on_a_platform_whose_cpu_cannot_run_the_op(rules):
    model = _model([{"match": {"node": "n65"}, "action": "cpu"}])
    doc = analyze(model, "rk2118", rules)
    with pytest.raises(ResolutionError, match=r"action cpu on rk2118: the rk2118 CPU runtime cannot run AveragePool \(node 'n65'\)"):
        resolve(model, "rk2118", doc, rules)


def test_cpu_action_where_the_cpu_can_run_it(inception_rk3588, rules):
    resolved = resolve(_model([{"match": {"op_type": "Softmax"}, "action": "cpu"}]), "rk3588", inception_rk3588, rules)
    assert list(resolved["op_target"].values()) == ["cpu"]


def test_targets_restrict_an_override(inception_rk3588, rules):
    model = _model([{"match": {"node": "n65"}, "action": "npu", "targets": ["rv1106"]}])
    assert resolve(model, "rk3588", inception_rk3588, rules)["op_target"] == {}


def test_conflicting_overrides_are_refused(inception_rk3588, rules):
    model = _model([{"match": {"node": "n65"}, "action": "npu"}, {"match": {"tensor": "r65"}, "action": "cpu"}])
    with pytest.raises(ResolutionError, match="also selected by overrides\\[0\\]"):
        resolve(model, "rk3588", inception_rk3588, rules)


def test_rewrite_writes_an_exact_model_and_leaves_op_target_empty(inception_rk3588, rules, tmp_path):
    model = _model([{"match": {"op_type": "AveragePool", "attrs": {"count_include_pad": 0}}, "action": "rewrite"}])
    resolved = resolve(model, "rk3588", inception_rk3588, rules, workdir=tmp_path)
    assert resolved["op_target"] == {}
    assert {r["node"] for r in resolved["rewrites"]} >= PADDED_POOLS
    assert Path(resolved["converted_onnx"]).is_file()
    rewritten = analyze({**model, "source": resolved["converted_onnx"]}, "rk3588", rules)
    assert not [i for i in rewritten["predicted_off_npu"] if i["op_type"] == "AveragePool"]


def test_rewrite_refuses_other_ops(inception_rk3588, rules, tmp_path):
    with pytest.raises(ResolutionError, match="rewrite is defined for AveragePool only"):
        resolve(_model([{"match": {"op_type": "Softmax"}, "action": "rewrite"}]), "rk3588", inception_rk3588, rules,
                workdir=tmp_path)


def test_analysis_of_a_cut_graph_covers_only_the_nodes_that_compute_its_outputs(rules):
    model = {"name": "stem", "source": str(EXAMPLES / "light_densenet121.onnx"), "inputs": {"data_0": [1, 3, 224, 224]},
             "outputs": ["r7"]}
    doc = analyze(model, "rk3588", rules)
    assert doc["op_histogram"]["Conv"] == 1 and doc["op_histogram"]["MaxPool"] == 1
    assert "Concat" not in doc["op_histogram"]
