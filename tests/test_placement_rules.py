"""The placement rules: the data file's facts and the predictor's logic.

The rules predict CPU fallbacks before a build, so these tests pin the facts that
were measured against rknn-toolkit2 2.5.0 (AveragePool and count_include_pad, the
reduced CPU runtimes, the light_inception_v2 layer table) and keep the YAML
inside the vocabulary its loader enforces.
"""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import pytest
import yaml
from onnx import helper, shape_inference

from pipeline.layer_table import parse_layer_table
from pipeline.placement_rules import DEFAULT_RULES_PATH, FOLDED_REASON, Rules, RulesError, validate

REPO = Path(__file__).resolve().parent.parent
INCEPTION = REPO / "examples" / "models" / "light_inception_v2.onnx"
INCEPTION_TABLE = Path(__file__).parent / "fixtures" / "layer_table_inception_v2_rk3588.log"

PLATFORMS = ["rk3566", "rk3568", "rk3588", "rk3562", "rv1103", "rv1106", "rk3576", "rv1126b",
             "rk2118", "rv1103b", "rv1106b"]
REQUIRED_OPS = ["Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "Resize", "Concat",
                "Reshape", "Transpose", "Softmax", "Gemm", "MatMul", "Add", "Mul", "Sub", "Div", "Sigmoid",
                "HardSigmoid", "HardSwish", "Relu", "Clip", "PRelu", "LeakyRelu", "Split", "Slice", "Gather",
                "ReduceMean", "LSTM", "Erf", "Pad", "BatchNormalization", "Flatten", "Identity", "Dropout",
                "Sum", "Squeeze", "Unsqueeze", "ConstantOfShape", "Constant", "Shape"]
SMALL_CPU = {"Concat", "DataConvert", "Div", "exLayerNorm", "Exp", "Gather", "ReduceL2", "ReduceMax", "Reshape",
             "ScatterND", "Softmax"}
# ONNX defaults the analyser is expected to fill in (opset 9-19 semantics).
POOL_DEFAULTS = {"auto_pad": "NOTSET", "ceil_mode": 0, "count_include_pad": 0, "storage_order": 0}
CONV_DEFAULTS = {"auto_pad": "NOTSET", "group": 1}


@pytest.fixture(scope="module")
def rules() -> Rules:
    return Rules.load()


@pytest.fixture(scope="module")
def data() -> dict:
    return yaml.safe_load(DEFAULT_RULES_PATH.read_text())


def make_node(op_type, attrs=None, inputs=((1, 16, 32, 32),), outputs=((1, 16, 32, 32),), domain=""):
    def shapes(items):
        return [None if shape is None else list(shape) for shape in items]
    return {"name": f"{op_type.lower()}0", "op_type": op_type, "domain": domain, "attrs": dict(attrs or {}),
            "input_shapes": shapes(inputs), "output_shapes": shapes(outputs)}


def average_pool(count_include_pad, pads):
    attrs = dict(POOL_DEFAULTS, kernel_shape=[3, 3], strides=[1, 1], pads=pads,
                 count_include_pad=count_include_pad)
    return make_node("AveragePool", attrs)


# --------------------------------------------------------------------------- AveragePool facts

def test_exclusive_average_pool_with_padding_falls_back_to_cpu_on_rk3588(rules):
    result = rules.predict(average_pool(0, [1, 1, 1, 1]), "rk3588")
    assert result["placement"] == "cpu"
    assert result["rule"] == "rk3588/AveragePool/count_include_pad"
    assert "count_include_pad=0 with non-zero pads" in result["reason"]
    assert "only with count_include_pad=1" in result["reason"]


@pytest.mark.parametrize("target", ["rv1106", "rv1103", "rv1106b", "rk2118"])
def test_exclusive_average_pool_with_padding_is_unsupported_without_a_cpu_average_pool(rules, target):
    result = rules.predict(average_pool(0, [1, 1, 1, 1]), target)
    assert result["placement"] == "unsupported"
    assert f"{target} CPU runtime cannot run AveragePool" in result["reason"]


def test_exclusive_average_pool_without_padding_stays_on_the_npu(rules):
    for target in PLATFORMS:
        assert rules.predict(average_pool(0, [0, 0, 0, 0]), target)["placement"] == "npu", target


def test_inclusive_average_pool_with_padding_stays_on_the_npu(rules):
    result = rules.predict(average_pool(1, [1, 1, 1, 1]), "rk3588")
    assert result == {"placement": "npu", "reason": "AveragePool runs on the rk3588 NPU",
                      "rule": "rk3588/AveragePool/npu"}


def test_global_average_pool_runs_on_the_npu_even_beyond_the_documented_7x7(rules):
    small = make_node("GlobalAveragePool", inputs=[(1, 64, 7, 7)], outputs=[(1, 64, 1, 1)])
    large = make_node("GlobalAveragePool", inputs=[(1, 64, 56, 56)], outputs=[(1, 64, 1, 1)])
    assert rules.predict(small, "rk3588")["placement"] == "npu"
    result = rules.predict(large, "rk3588")
    assert result["placement"] == "npu"
    assert "measured on the NPU" in result["reason"]


def test_unknown_attribute_values_are_assumed_within_limits(rules):
    node = make_node("AveragePool", {"kernel_shape": [3, 3], "count_include_pad": 0})  # no pads known
    assert rules.predict(node, "rk3588")["placement"] == "npu"


def test_symbolic_shapes_are_assumed_within_limits_and_said_so(rules):
    result = rules.predict(make_node("GlobalAveragePool", inputs=[(1, 64, "h", None)]), "rk3588")
    assert result["placement"] == "npu"
    assert "not checked without static shapes" in result["reason"]
    assert rules.predict(make_node("Softmax", {"axis": -1}, inputs=[None]), "rk3588")["placement"] == "npu"


# --------------------------------------------------------------------------- CPU runtimes

def test_softmax_is_cpu_capable_on_rv1106(rules):
    assert rules.cpu_can_run("Softmax", "rv1106")
    assert not rules.cpu_can_run("AveragePool", "rv1106")
    assert rules.predict(make_node("Softmax", {"axis": 1}), "rv1106")["placement"] == "npu"


def test_reduced_cpu_runtimes_run_exactly_the_documented_subset(rules):
    for target in ("rv1103", "rv1106", "rv1103b", "rv1106b"):
        assert {op for op in rules.op_types() | SMALL_CPU if rules.cpu_can_run(op, target)} >= SMALL_CPU
        assert not rules.cpu_can_run("Erf", target)


def test_rk2118_cpu_runs_nothing(rules):
    assert not any(rules.cpu_can_run(op, "rk2118") for op in rules.op_types() | SMALL_CPU)
    result = rules.predict(make_node("Erf"), "rk2118")
    assert result["placement"] == "unsupported"
    assert "rk2118 CPU runtime cannot run Erf either" in result["reason"]


def test_an_op_off_the_npu_falls_back_where_the_cpu_can_run_it(rules):
    assert rules.predict(make_node("Erf"), "rk3588")["placement"] == "cpu"
    assert rules.predict(make_node("Erf"), "rv1106")["placement"] == "unsupported"
    assert rules.predict(make_node("Softmax", {"axis": 1}), "rk3566")["placement"] == "cpu"


# --------------------------------------------------------------------------- measured facts

X = (1, 16, 32, 32)
# Single-op models built with rknn-toolkit2 2.5.0; "unsupported" where the build
# listed a CPU layer that the platform's CPU runtime cannot run.
MEASURED = [
    ("Div", {}, [X, X], "rk3588", "npu"),
    ("Div", {}, [X, X], "rv1106", "cpu"),
    ("Transpose", {"perm": [0, 2, 3, 1]}, [X], "rk3566", "cpu"),
    ("Transpose", {"perm": [0, 2, 3, 1]}, [X], "rk3588", "npu"),
    ("LayerNormalization", {"axis": -1, "epsilon": 1e-5}, [(1, 16, 64)], "rk3588", "npu"),
    ("LayerNormalization", {"axis": -1, "epsilon": 1e-5}, [(1, 16, 64)], "rv1106", "cpu"),
    ("AveragePool", dict(POOL_DEFAULTS, kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 0, 0], ceil_mode=1,
                         count_include_pad=1), [X], "rk3576", "cpu"),
    ("AveragePool", dict(POOL_DEFAULTS, kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 0, 0], ceil_mode=1,
                         count_include_pad=1), [X], "rk3588", "npu"),
    ("MaxPool", dict(POOL_DEFAULTS, kernel_shape=[9, 9], strides=[1, 1], pads=[4, 4, 4, 4]), [X], "rv1106", "npu"),
    ("Conv", {"kernel_shape": [32, 32], "strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1],
              "group": 1}, [(1, 3, 64, 64), (8, 3, 32, 32)], "rk3566", "npu"),
    ("Gemm", {"transB": 1}, [(1, 64), (32, 64)], "rk2118", "npu"),
    ("MatMul", {}, [(2, 16, 32), (2, 32, 8)], "rv1103b", "npu"),
    ("ReduceMean", {"axes": [2, 3], "keepdims": 1}, [X], "rv1106", "npu"),
    ("Sum", {}, [X, X], "rk3562", "npu"),
    ("Softmax", {"axis": -1}, [(1, 16, 64)], "rv1103b", "cpu"),
    ("Softmax", {"axis": -1}, [(1, 16, 64)], "rv1106", "npu"),
    ("Pad", {"mode": "reflect", "pads": [0, 0, 1, 1, 0, 0, 1, 1]}, [X], "rv1103b", "unsupported"),
    ("Sqrt", {}, [X], "rk2118", "npu"),
    ("Sqrt", {}, [X], "rv1106", "unsupported"),
    ("Neg", {}, [X], "rv1103b", "npu"),
    ("Min", {}, [X, X], "rk3588", "cpu"),
    ("Exp", {}, [X], "rv1106", "cpu"),
    ("LSTM", {"hidden_size": 32, "input_forget": 0}, [(8, 1, 16)], "rk3588", "npu"),
    ("LSTM", {"hidden_size": 32, "input_forget": 0}, [(8, 1, 16)], "rv1103b", "unsupported"),
]


@pytest.mark.parametrize("op_type, attrs, inputs, target, expected", MEASURED)
def test_measured_placements(rules, op_type, attrs, inputs, target, expected):
    result = rules.predict(make_node(op_type, attrs, inputs=inputs, outputs=[None]), target)
    assert result["placement"] == expected, result["reason"]


# --------------------------------------------------------------------------- other constraints

@pytest.mark.parametrize("target, expected", [("rk3588", "cpu"), ("rk3562", "npu")])
def test_fractional_resize_scale(rules, target, expected):
    resize = make_node("Resize", {"mode": "linear", "coordinate_transformation_mode": "half_pixel",
                                  "antialias": 0}, inputs=[(1, 8, 16, 16)], outputs=[(1, 8, 24, 24)])
    assert rules.predict(resize, target)["placement"] == expected


def test_cubic_resize_runs_nowhere(rules):
    resize = make_node("Resize", {"mode": "cubic"}, inputs=[(1, 8, 16, 16)], outputs=[(1, 8, 32, 32)])
    result = rules.predict(resize, "rk3588")
    assert result["placement"] == "unsupported" and result["rule"] == "cpu/Resize/mode"


def test_slice_with_a_step_falls_back(rules):
    node = make_node("Slice", {"axes": [3], "steps": [2]})
    assert rules.predict(node, "rk3588")["rule"] == "rk3588/Slice/steps"
    assert rules.predict(node, "rk3588")["placement"] == "cpu"
    assert rules.predict(node, "rv1106")["placement"] == "unsupported"


def test_conv_transpose_stride_limits_differ_by_group(rules):
    node = make_node("ConvTranspose", {"strides": [3, 3], "kernel_shape": [3, 3], "pads": [0, 0, 0, 0],
                                       "dilations": [1, 1], "group": 1})
    assert rules.predict(node, "rk3588")["placement"] == "cpu"
    assert rules.predict(node, "rv1106")["placement"] == "npu"


def test_negative_axes_are_normalised_with_the_input_rank(rules):
    node = make_node("Slice", {"axes": [-1], "steps": [1]}, inputs=[(1, 2, 3, 4, 6)])
    assert rules.predict(node, "rk3588")["rule"] == "rk3588/Slice/axes"


def test_folded_ops_are_placed_nowhere(rules):
    for op in ("Constant", "ConstantOfShape", "Shape", "Identity", "Dropout"):
        assert rules.predict(make_node(op), "rk2118") == {"placement": "none", "reason": FOLDED_REASON,
                                                          "rule": f"folded/{op}"}


def test_non_default_domain_ops_are_not_npu_ops(rules):
    result = rules.predict(make_node("Softmax", domain="com.microsoft"), "rk3588")
    assert result["placement"] == "cpu" and "com.microsoft" in result["reason"]
    assert rules.predict(make_node("FusedConv", domain="com.microsoft"), "rk3588")["placement"] == "unsupported"


# --------------------------------------------------------------------------- the data file

def test_every_group_covers_the_required_ops(rules, data):
    for name, group in data["groups"].items():
        known = set(group["npu"]) | set(group.get("off_npu") or {}) | set(data["folded"]) | set(data["off_npu"])
        for op in REQUIRED_OPS:
            assert op in known, f"{name} does not cover {op}"
            target = group["platforms"][0]
            assert rules.predict(make_node(op), target)["placement"] in {"npu", "cpu", "unsupported", "none"}


def test_cpu_ops_are_onnx_ops_or_documented_rockchip_ops(data):
    rockchip = data["rockchip_ops"]
    assert not [name for name in rockchip if onnx.defs.has(name)]
    for name, group in data["groups"].items():
        strangers = [op for op in group["cpu_ops"] if not onnx.defs.has(op) and op not in rockchip]
        assert not strangers, f"{name}: {strangers}"


def test_the_onnx_names_in_the_rules_are_real(rules, data):
    assert not [op for op in rules.op_types() if not onnx.defs.has(op)]
    assert all(onnx.defs.has(op) for op in data["unsupported_onnx_ops"])


def test_the_data_file_validates_and_has_a_version(data, rules):
    validate(data)
    assert rules.version == str(data["version"])
    assert Rules.load() is Rules.load(DEFAULT_RULES_PATH)


def _mutated(data, mutate):
    broken = copy.deepcopy(data)
    mutate(broken)
    return broken


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["groups"]["rk3588"]["npu"]["AveragePool"]["constraints"].append(
        {"attr": "pads", "range": [0, 7], "bogus": 1, "id": "x"}), "bogus"),
    (lambda d: d["groups"]["rk3588"]["npu"]["Conv"]["constraints"].append({"equals": 1}), "subject"),
    (lambda d: d["groups"]["rk3588"]["npu"]["Conv"]["constraints"].append({"attr": "group"}), "no test"),
    (lambda d: d["groups"]["rk3588"]["npu"]["Conv"].update(limits=[]), "limits"),
    (lambda d: d["groups"]["rk3588"].update(gpu_ops=[]), "gpu_ops"),
    (lambda d: d.update(extras={}), "extras"),
    (lambda d: d["groups"]["rk3588"].update(off_npu={"Conv": "x"}), "both in npu and off_npu"),
])
def test_the_loader_rejects_words_outside_the_vocabulary(data, mutate, message):
    with pytest.raises(RulesError, match=message):
        validate(_mutated(data, mutate))


def test_load_rejects_a_broken_file(tmp_path, data):
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(_mutated(data, lambda d: d["groups"]["rk2118"].update(npu={
        "Relu": {"constraints": [{"attr": "x", "equals": 1, "unknown_test": 2}]}}))))
    with pytest.raises(RulesError, match="unknown_test"):
        Rules.load(path)


def test_group_of_every_platform(rules, data):
    for name, group in data["groups"].items():
        for platform in group["platforms"]:
            assert rules.group_of(platform) == name
            assert rules.group_of(platform.upper()) == name
    assert sorted(rules.targets) == sorted(PLATFORMS)


def test_group_of_an_unknown_target_lists_the_known_ones(rules):
    with pytest.raises(ValueError, match="rk3588") as error:
        rules.group_of("rk9999")
    assert not isinstance(error.value, KeyError)
    with pytest.raises(ValueError):
        rules.predict(make_node("Relu"), "rk9999")


# --------------------------------------------------------------------------- a real model

def _static_shapes(model: onnx.ModelProto) -> dict[str, list]:
    infos = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    return {info.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                        for d in info.type.tensor_type.shape.dim] for info in infos}


def _defaults(op_type: str) -> dict:
    if op_type in ("AveragePool", "MaxPool"):
        return dict(POOL_DEFAULTS, pads=[0, 0, 0, 0], strides=[1, 1])
    return dict(CONV_DEFAULTS) if op_type == "Conv" else {}


def node_dicts(path: Path) -> list[dict]:
    """The analyser's view of a model: one dict per node, ONNX defaults filled in."""
    model = shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = _static_shapes(model)
    return [{"name": n.name, "op_type": n.op_type, "domain": n.domain,
             "attrs": {**_defaults(n.op_type), **{a.name: _plain(helper.get_attribute_value(a)) for a in n.attribute}},
             "input_shapes": [shapes.get(name) for name in n.input],
             "output_shapes": [shapes.get(name) for name in n.output]}
            for n in model.graph.node]


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def test_light_inception_v2_on_rk3588_puts_exactly_the_padded_average_pools_on_cpu(rules):
    nodes = node_dicts(INCEPTION)
    pools = [n for n in nodes if n["op_type"] == "AveragePool"]
    cpu = [n["name"] for n in nodes if rules.predict(n, "rk3588")["placement"] == "cpu"]
    assert len(pools) == 8
    assert len(cpu) == 7
    assert {n["op_type"] for n in nodes if n["name"] in cpu} == {"AveragePool"}
    unpadded = [n["name"] for n in pools if not any(n["attrs"]["pads"])]
    assert len(unpadded) == 1 and unpadded[0] not in cpu
    assert not [n for n in nodes if rules.predict(n, "rk3588")["placement"] == "unsupported"]


def test_light_inception_v2_prediction_matches_the_measured_layer_table(rules):
    assert INCEPTION_TABLE.exists(), f"the committed fixture {INCEPTION_TABLE.name} is missing"
    layers = parse_layer_table(INCEPTION_TABLE.read_text())
    measured = {layer["node"] for layer in layers if layer["target"] == "CPU"
                and layer["op_type"] not in ("InputOperator", "OutputOperator")}
    predicted = {n["name"] for n in node_dicts(INCEPTION) if rules.predict(n, "rk3588")["placement"] == "cpu"}
    assert predicted == measured
