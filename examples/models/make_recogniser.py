"""Regenerate tiny_recogniser.onnx (deterministic): uv run python examples/models/make_recogniser.py

A text-line recogniser in the shape OCR models have: ``x`` is ``[1, 3, 48, W]``
with the width ``W`` dynamic in the ONNX file, so one model reads lines of any
length. Two strided Conv+Relu stages, a mean over the height, and a 1x1 Conv
classifier give per-column class scores ``[1, 10, 1, W/4]`` (the input of a CTC
decoder). Weights are seeded random values. The manifest builds it at several
widths, as buckets (one static .rknn per width) and as one dynamic model.
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(48)
    weights = [numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
               for name, shape in (("conv1.w", (16, 3, 3, 3)), ("conv1.b", (16,)), ("conv2.w", (32, 16, 3, 3)),
                                   ("conv2.b", (32,)), ("cls.w", (10, 32, 1, 1)), ("cls.b", (10,)))]
    strided = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]}
    nodes = [
        helper.make_node("Conv", ["x", "conv1.w", "conv1.b"], ["c1"], name="conv1", **strided),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.w", "conv2.b"], ["c2"], name="conv2", **strided),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("ReduceMean", ["r2"], ["columns"], name="mean_height", axes=[2], keepdims=1),
        helper.make_node("Conv", ["columns", "cls.w", "cls.b"], ["scores"], name="classifier", kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(nodes, "tiny_recogniser",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 48, "W"])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 10, 1, "T"])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="rknn-pipeline")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


if __name__ == "__main__":
    onnx.save(build(), str(HERE / "tiny_recogniser.onnx"))
    print("wrote tiny_recogniser.onnx")
