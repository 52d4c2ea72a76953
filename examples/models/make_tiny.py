"""Regenerate tiny_pool_identity.onnx (deterministic): uv run python examples/models/make_tiny.py

A model we wrote to show two traps in one small graph:
- its batch dimension is dynamic ("N"), so the manifest must fix it with `inputs:`;
- an AveragePool with count_include_pad=0 feeds an Identity that is the graph output;
  the toolkit folds the Identity, renames the pool's output tensor "301" to "y",
  and rejects op_target={"301": ...}. The pipeline remaps it and records the remap.
Weights are seeded random values, so the accuracy check compares real numbers.
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(2026)
    weights = numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.2, "conv0.weight")
    bias = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "conv0.bias")
    nodes = [
        helper.make_node("Conv", ["x", "conv0.weight", "conv0.bias"], ["c"], name="conv0", pads=[1, 1, 1, 1],
                         kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"], name="relu0"),
        helper.make_node("AveragePool", ["r"], ["301"], name="pool0", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         count_include_pad=0),
        helper.make_node("Identity", ["301"], ["y"], name="identity0"),
    ]
    graph = helper.make_graph(nodes, "tiny_pool_identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 32, 32])],
                              [weights, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="rknn-pipeline")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


if __name__ == "__main__":
    onnx.save(build(), str(HERE / "tiny_pool_identity.onnx"))
