"""The decision layer without the toolkit: what a build decides from what a real toolkit session said.

A :class:`FakeSession` replays what rknn-toolkit2 2.5.0 reported for the
pool/identity model (``tests/fixtures/toolkit_session/``, captured by its
``capture.py``: the optimised graph's node outputs, the hybrid step's ``.cfg``
and the build log with its layer table), and a layer table captured from a
real build of the example inception model. Each test checks one decision:
op_target remapping, hybrid ranges, log reconciliation, job construction,
placement policy, lock entries and the doit task keys.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline import conversion, diagnostics, stages, tasks, worker
from pipeline.layer_table import parse_layer_table, summarize
from pipeline.layout import Layout, PairLayout
from pipeline.placement_rules import Rules

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SESSION = FIXTURES / "toolkit_session"


class FakeSession:
    """Answers what the worker asks a built session, from a capture of a real one."""

    def __init__(self, outputs: dict[str, list[str]]):
        self.outputs = outputs

    def optimized_node_outputs(self) -> dict[str, list[str]]:
        return {node: list(names) for node, names in self.outputs.items()}


@pytest.fixture
def session():
    return FakeSession(json.loads((SESSION / "optimized_outputs.json").read_text())["outputs"])


@pytest.fixture(scope="module")
def pool_layers():
    return parse_layer_table((SESSION / "build.log").read_text())


@pytest.fixture(scope="module")
def inception_layers():
    return parse_layer_table((FIXTURES / "layer_table_inception_v2_rk3588.log").read_text())


# --- worker: op_target remapping and hybrid ranges ---------------------------------------------


def test_a_key_the_toolkit_renamed_is_remapped_to_the_same_nodes_new_output(session):
    # The Identity after pool0 is folded: pool0's output '301' becomes the graph output 'y'.
    remapped, remaps = worker._remap_op_target(session, {"301": "npu", "c": "cpu"},
                                               {"301": ["pool0", 0], "c": ["conv0", 0]})
    assert remapped == {"y": "npu", "c": "cpu"}
    assert remaps == [{"from": "301", "to": "y", "node": "pool0", "reason": "renamed by the toolkit's graph optimisation"}]


def test_an_output_index_beyond_the_new_outputs_takes_the_last(session):
    session.outputs["split0"] = ["a", "b"]
    remapped, _ = worker._remap_op_target(session, {"gone": "npu"}, {"gone": ["split0", 5]})
    assert remapped == {"b": "npu"}


def test_a_key_whose_node_did_not_survive_is_an_error_naming_it(session):
    with pytest.raises(RuntimeError, match="'ident0' did not survive optimisation"):
        worker._remap_op_target(session, {"301": "npu"}, {"301": ["ident0", 0]})
    with pytest.raises(RuntimeError, match="'None'"):
        worker._remap_op_target(session, {"nowhere": "npu"}, {})


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "pool_identity.quantization.cfg"
    shutil.copy(SESSION / path.name, path)
    return path


def test_a_hybrid_range_keeps_every_tensor_between_its_ends_in_float(cfg):
    custom = worker._add_custom_hybrid_layers(cfg, [{"start": "c", "end": "y"}])
    assert custom == {"c": "float16", "y": "float16"}
    import yaml

    written = yaml.safe_load(cfg.read_text())
    assert written["custom_quantize_layers"] == custom
    original = yaml.safe_load((SESSION / cfg.name).read_text())
    assert written["quantize_parameters"] == original["quantize_parameters"]  # the toolkit's own part is untouched


def test_a_range_given_backwards_or_as_one_tensor_is_the_same_range(cfg):
    assert worker._add_custom_hybrid_layers(cfg, [{"start": "y", "end": "c"}]) == {"c": "float16", "y": "float16"}


def test_a_single_tensor_range_and_the_repairs_extra_layers(cfg):
    custom = worker._add_custom_hybrid_layers(cfg, [{"start": "c", "dtype": "float16"}], ["y", "not-a-tensor"])
    assert custom == {"c": "float16", "y": "float16"}


def test_the_repair_never_overrides_a_dtype_the_manifest_chose(cfg):
    custom = worker._add_custom_hybrid_layers(cfg, [{"start": "c", "dtype": "int16"}], ["c"])
    assert custom == {"c": "int16"}


def test_an_unknown_range_end_names_the_nearest_tensors(cfg):
    with pytest.raises(ValueError, match=r"'cc' is not a tensor the toolkit quantizes \(nearest: c"):
        worker._add_custom_hybrid_layers(cfg, [{"start": "cc", "end": "y"}])


# --- conversion: reconciling the log with the result -------------------------------------------


def _item(identifier: str) -> dict:
    return {"id": identifier, "level": "warning", "explanation": "", "fix": ""}


def test_reconcile_drops_the_invalid_key_message_once_a_remap_made_the_build_good(pool_layers):
    items = [_item("op-target-key-invalid"), _item("something-else")]
    kept = conversion.reconcile(items, {"ok": True, "remaps": [{"from": "301", "to": "y"}]}, pool_layers)
    assert [item["id"] for item in kept] == ["something-else"]
    # Without a remap, or in a failed build, the message is the explanation: it stays.
    assert len(conversion.reconcile(items, {"ok": True, "remaps": []}, pool_layers)) == 2
    assert len(conversion.reconcile(items, {"ok": False, "remaps": [{}]}, pool_layers)) == 2


def test_reconcile_keeps_the_pool_fallback_message_only_while_a_pool_is_on_the_cpu(inception_layers):
    items = [_item("averagepool-count-include-pad")]
    assert any(layer["op_type"] == "AveragePool" and layer["target"] == "CPU" for layer in inception_layers)
    assert conversion.reconcile(items, {"ok": True}, inception_layers) == items
    on_npu = [{**layer, "target": "NPU"} for layer in inception_layers]
    assert conversion.reconcile(items, {"ok": True}, on_npu) == []
    assert conversion.reconcile(items, {"ok": False}, []) == items  # no table: nothing proves it moot


def test_the_captured_logs_explain_themselves():
    log = (FIXTURES / "toolkit_logs" / "invalid_op_target_key.log").read_text(errors="replace")
    assert "op-target-key-invalid" in [item["id"] for item in diagnostics.explain_log(log)]


# --- conversion: the job document --------------------------------------------------------------


def _model(**extra) -> dict:
    return {"name": "pool", "source": "/src/pool.onnx", "targets": ["rk3588"], "inputs": {"x": [1, 3, 16, 16]},
            **extra}


def test_the_job_puts_every_file_where_the_pair_layout_says(tmp_path):
    pair = Layout(tmp_path).pair("pool", "rk3588")
    resolved = {"op_target": {"301": "npu"},
                "explanations": {"301": {"node": "pool0", "output_index": 0, "action": "npu"}}}
    job = conversion.make_job(_model(), "rk3588", resolved, pair)
    assert (job["workdir"], job["job_path"], job["rknn_path"], job["result_path"]) == (
        str(pair.work), str(pair.job), str(pair.partial_rknn), str(pair.worker_result))
    assert job["onnx"] == job["verify_source"] == "/src/pool.onnx"
    assert job["op_target"] == {"301": "npu"} and job["op_target_nodes"] == {"301": ["pool0", 0]}
    assert job["config"] == {"target_platform": "rk3588"}
    assert job["load_onnx"] == {"inputs": ["x"], "input_size_list": [[1, 3, 16, 16]]}
    assert job["build"] == {"do_quantization": False}
    json.dumps(job)  # plain JSON: it crosses a process boundary
    # A bare directory still works for callers that have one (tests, benchmarks).
    assert conversion.make_job(_model(), "rk3588", resolved, pair.dir) == job


def test_the_job_converts_the_rewritten_graph_but_verifies_against_the_source(tmp_path):
    job = conversion.make_job(_model(), "rk3588", {"converted_onnx": "/b/rewritten.onnx"}, PairLayout(tmp_path))
    assert job["onnx"] == "/b/rewritten.onnx" and job["verify_source"] == "/src/pool.onnx"


def test_the_job_reads_the_calibration_the_pipeline_laid_out(tmp_path):
    model = _model(quantization={"dataset": "/data/list.txt", "samples": [["/data/a.npy"]], "auto_hybrid": True},
                   mean_values=[[0, 0, 0]])
    calibration = {"dataset": tmp_path / "calibration" / "dataset.txt", "rows": [["calibration/0.npy"]],
                   "verify_rows": None}
    job = conversion.make_job(model, "rk3588", {}, PairLayout(tmp_path), calibration)
    assert job["build"] == {"do_quantization": True, "dataset": str(calibration["dataset"]), "auto_hybrid": True}
    assert job["samples"] == [["calibration/0.npy"]] and job["config"]["mean_values"] == [[0, 0, 0]]
    without = conversion.make_job(model, "rk3588", {}, PairLayout(tmp_path))
    assert without["build"]["dataset"] == "/data/list.txt" and without["samples"] == [["/data/a.npy"]]


# --- stages: placement policy and lock entries -------------------------------------------------


def _record(layers: list[dict]) -> dict:
    return {"placement": summarize(layers)}


@pytest.mark.parametrize("policy, warned, failed", [("allow", 0, 0), ("warn", 1, 0), ("error", 0, 1)])
def test_cpu_fallback_policy_on_a_real_layer_table(inception_layers, policy, warned, failed):
    record = _record(inception_layers)
    assert record["placement"]["cpu_by_op"] == {"AveragePool": 7}
    warnings, errors = stages.placement_check(_model(cpu_fallback=policy), "rk3588", record, {}, Rules.load())
    assert (len(warnings), len(errors)) == (warned, failed)
    for message in warnings + errors:
        assert "7 layer(s) run on the CPU that no override asked for" in message and "AveragePool:n65" in message


def test_cpu_layers_an_override_asked_for_are_not_reported(inception_layers):
    record = _record(inception_layers)
    cpu_nodes = [layer["node"] for layer in record["placement"]["cpu_layers"]]
    resolved = {"explanations": {f"r{node[1:]}": {"node": node, "action": "cpu"} for node in cpu_nodes}}
    assert stages.placement_check(_model(cpu_fallback="error"), "rk3588", record, resolved, Rules.load()) == ([], [])


def test_cpu_layers_a_boards_cpu_cannot_run_are_a_warning_under_every_policy(inception_layers):
    record = _record(inception_layers)
    warnings, errors = stages.placement_check(_model(cpu_fallback="allow"), "rv1106", record, {}, Rules.load())
    assert errors == [] and len(warnings) == 1 and "rv1106 CPU runtime cannot run them" in warnings[0]


def test_predicted_vs_actual_leaves_out_what_an_override_moved(inception_layers):
    nodes = [{"name": "n65", "op_type": "AveragePool", "predicted": {"placement": "npu", "reason": "r"}},
             {"name": "n0", "op_type": "Conv", "predicted": {"placement": "npu", "reason": "r"}}]
    analysis = {"nodes": nodes}
    missed = stages.predicted_vs_actual(analysis, inception_layers, {})
    assert missed == [{"node": "n65", "op_type": "AveragePool", "predicted": "npu", "actual": "cpu", "reason": "r"}]
    steered = {"explanations": {"r65": {"node": "n65", "action": "cpu"}}}
    assert stages.predicted_vs_actual(analysis, inception_layers, steered) == []


def test_a_lock_entry_is_the_reproducible_part_of_a_sidecar():
    sidecar = {"model": "pool", "target": "rk3588", "rknn": {"sha256": "bytes differ per build"},
               "convert_seconds": 3.2, "cache": {"hit": True}, "inputs": {"source": {"sha256": "s"}},
               "versions": {"rknn-toolkit2": "2.5.0"}, "arguments": {"config": {}}, "op_target": {"y": "npu"},
               "placement": {"npu": 2}, "verify": {"samples": 4, "min_cosine": 0.99, "passed": True,
                                                   "outputs": [{"cosine": 0.9991}], "seconds": 1.0}}
    entry = stages.lock_entry(sidecar)
    assert set(entry) == {*stages.LOCK_FIELDS, "verify"}
    assert entry["verify"] == {"samples": 4, "min_cosine": 0.99, "passed": True}
    assert "rknn" not in entry and "convert_seconds" not in entry and "cache" not in entry
    # Timing and cache facts differ between two builds of the same inputs; the entry does not.
    again = {**sidecar, "convert_seconds": 9.9, "cache": {"hit": False}, "rknn": {"sha256": "other"},
             "verify": {**sidecar["verify"], "seconds": 2.0, "outputs": [{"cosine": 0.9992}]}}
    assert stages.lock_entry(again) == entry
    assert stages.lock_entry({**sidecar, "verify": None})["verify"] is None


# --- tasks: what makes each task run again -----------------------------------------------------


def test_task_keys_change_with_what_each_stage_reads_and_only_that(tmp_path):
    base = _model(overrides=[{"match": {"op_type": "AveragePool"}, "action": "npu", "targets": ["rv1106"]}],
                  quantization={"dataset": "d.txt"})
    keys = {name: getattr(tasks, f"{name}_key") for name in ("analyze", "resolve", "export")}

    def all_keys(model):
        found = {name: key(model, "rk3588") for name, key in keys.items()}
        found["convert"] = tasks.convert_key(model, "rk3588", tmp_path)
        return found

    before = all_keys(base)
    json.dumps(before)  # doit's config_changed stores them as JSON
    changed = {
        "inputs": ({**base, "inputs": {"x": [1, 3, 32, 32]}}, {"analyze", "resolve", "convert"}),
        "an override for this target": ({**base, "overrides": [{"match": {"op_type": "Conv"}, "action": "cpu"}]},
                                         {"resolve"}),
        "the policy": ({**base, "cpu_fallback": "error"}, {"export"}),
        "verify": ({**base, "verify": {"samples": 8}}, {"convert", "export"}),
        "mean values": ({**base, "mean_values": [[1, 2, 3]]}, {"convert"}),
        "the dataset": ({**base, "quantization": {"dataset": "e.txt"}}, {"convert"}),
        "repair": ({**base, "quantization": {"dataset": "d.txt", "repair": {"min_cosine": 0.99}}}, {"convert"}),
    }
    for what, (model, expected) in changed.items():
        after = all_keys(model)
        assert {name for name in before if after[name] != before[name]} == expected, what
    # An override restricted to another target changes nothing for this one.
    other = {**base, "overrides": [*base["overrides"], {"match": {"op_type": "Conv"}, "action": "cpu",
                                                        "targets": ["rk3562"]}]}
    assert all_keys(other) == before
    # Paths in arguments are relative to the project: two checkouts get the same keys.
    inside = {**base, "quantization": {"dataset": str(tmp_path / "d.txt")}}
    assert tasks.convert_key(inside, "rk3588", tmp_path)["arguments"]["build"]["dataset"] == "d.txt"
