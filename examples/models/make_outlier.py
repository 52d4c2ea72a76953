"""Regenerate tiny_outlier.onnx and its samples (deterministic): uv run python examples/models/make_outlier.py

A model we wrote to break per-tensor int8 the way real networks sometimes do:
one output channel of the middle convolution is 2000x larger than the others,
and the next convolution's weights undo it. In float the model is well
behaved; quantized with one scale per activation tensor, that channel takes
the whole int8 range and every other channel rounds to zero, so the output is
wrong (the accuracy check fails). Keeping the layers around the outlier in
float16 (``quantization.repair``) fixes it. Weights are seeded random values;
the calibration samples (``examples/calib/outlier/``) are seeded uniform
values in [0, 255), NCHW, for ``mean 127.5 / std 127.5``.
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
CALIB = HERE.parent / "calib" / "outlier"
SAMPLES = 4
OUTLIER_SCALE = 2000.0


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(13)
    w0 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    w1 = rng.standard_normal((8, 8, 1, 1)).astype(np.float32) * 0.3
    w1[0] *= OUTLIER_SCALE  # channel 0 of conv1's output is 2000x the others
    w2 = rng.standard_normal((8, 8, 1, 1)).astype(np.float32) * 0.3
    w2[:, 0] /= OUTLIER_SCALE  # ... and conv2 undoes it
    w3 = rng.standard_normal((4, 8, 3, 3)).astype(np.float32) * 0.3
    inits = [numpy_helper.from_array(w, f"conv{i}.weight") for i, w in enumerate((w0, w1, w2, w3))]
    inits += [numpy_helper.from_array(rng.standard_normal(w.shape[0]).astype(np.float32) * 0.1, f"conv{i}.bias")
              for i, w in enumerate((w0, w1, w2, w3))]
    nodes = []
    prev = "x"
    for i, kernel in enumerate((3, 1, 1, 3)):
        pad = kernel // 2
        nodes.append(helper.make_node("Conv", [prev, f"conv{i}.weight", f"conv{i}.bias"], [f"c{i}"], name=f"conv{i}",
                                      kernel_shape=[kernel, kernel], pads=[pad] * 4))
        prev = f"c{i}"
        if i < 3:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"], name=f"relu{i}"))
            prev = f"r{i}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "tiny_outlier",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 32, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="rknn-pipeline")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_samples(directory: Path = CALIB) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(SAMPLES):
        path = directory / f"x_{index}.npy"
        np.save(path, rng.uniform(0, 255, (1, 3, 32, 32)).astype(np.float32))
        paths.append(path)
    return paths


if __name__ == "__main__":
    onnx.save(build(), str(HERE / "tiny_outlier.onnx"))
    write_samples()
