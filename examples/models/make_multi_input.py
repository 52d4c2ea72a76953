"""Regenerate the multi-input example models (deterministic): uv run python examples/models/make_multi_input.py

Two small models with real architectures and seeded random weights, written
with onnx.helper so the files are byte-for-byte reproducible:

- ``tiny_detector.onnx``: a one-box detector head. ``image`` [1, 3, 32, 32]
  goes through two strided Conv+Relu stages, global pooling and two Gemm heads:
  box deltas (scaled per coordinate by the second input ``scale`` [1, 4], the
  original image's size, as SSD-style decoders do) and class scores (Softmax).
  The 2-D ``scale`` input is the case where the toolkit wants 4 mean/std values
  (dim 1), not 1.
- ``tiny_two_tower.onnx``: an image/text matching model. An image tower
  (Conv+Relu, pooling, Gemm) and a text tower over ``ids`` [1, 8] int64 token
  ids (Gather from an embedding table, masked mean over ``mask`` [1, 8] float)
  meet in a dot-product score. Integer and mask inputs need .npy samples of
  their own dtype.
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
VOCAB, TOKENS, EMBED = 64, 8, 16


def _weights(rng, **shapes) -> list:
    scale = {"w": 0.3, "b": 0.1}
    return [numpy_helper.from_array((rng.standard_normal(shape) * scale[name.split(".")[-1][0]]).astype(np.float32),
                                    name) for name, shape in shapes.items()]


def _model(nodes, name, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="rknn-pipeline")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def detector() -> onnx.ModelProto:
    rng = np.random.default_rng(16)
    weights = _weights(rng, **{"c1.w": (8, 3, 3, 3), "c1.b": (8,), "c2.w": (16, 8, 3, 3), "c2.b": (16,),
                               "box.w": (16, 4), "box.b": (4,), "cls.w": (16, 5), "cls.b": (5,)})
    nodes = [
        helper.make_node("Conv", ["image", "c1.w", "c1.b"], ["c1"], name="conv1", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], name="conv2", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["feature"], name="flatten"),
        helper.make_node("Gemm", ["feature", "box.w", "box.b"], ["deltas"], name="box_head"),
        helper.make_node("Sigmoid", ["deltas"], ["unit_box"], name="box_sigmoid"),
        helper.make_node("Mul", ["unit_box", "scale"], ["boxes"], name="box_scale"),
        helper.make_node("Gemm", ["feature", "cls.w", "cls.b"], ["logits"], name="cls_head"),
        helper.make_node("Softmax", ["logits"], ["scores"], name="softmax", axis=1),
    ]
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 32, 32]),
              helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1, 4])]
    outputs = [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4]),
               helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 5])]
    return _model(nodes, "tiny_detector", inputs, outputs, weights)


def two_tower() -> onnx.ModelProto:
    rng = np.random.default_rng(17)
    weights = _weights(rng, **{"c1.w": (8, 3, 3, 3), "c1.b": (8,), "img.w": (8, EMBED), "img.b": (EMBED,),
                               "embed.w": (VOCAB, EMBED), "txt.w": (EMBED, EMBED), "txt.b": (EMBED,)})
    weights += [numpy_helper.from_array(np.array([axis], dtype=np.int64), f"axes{axis}") for axis in (1, 2)]
    nodes = [
        helper.make_node("Conv", ["image", "c1.w", "c1.b"], ["c1"], name="conv1", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["img_feature"], name="flatten"),
        helper.make_node("Gemm", ["img_feature", "img.w", "img.b"], ["img_vec"], name="img_proj"),
        helper.make_node("Gather", ["embed.w", "ids"], ["tokens"], name="embed", axis=0),  # [1, 8, 16]
        helper.make_node("Unsqueeze", ["mask", "axes2"], ["mask3"], name="mask_axis"),  # [1, 8, 1]
        helper.make_node("Mul", ["tokens", "mask3"], ["kept"], name="mask_tokens"),
        helper.make_node("ReduceSum", ["kept", "axes1"], ["summed"], name="sum_tokens", keepdims=0),
        helper.make_node("ReduceSum", ["mask", "axes1"], ["count"], name="count_tokens", keepdims=1),
        helper.make_node("Div", ["summed", "count"], ["txt_mean"], name="mean_tokens"),
        helper.make_node("Gemm", ["txt_mean", "txt.w", "txt.b"], ["txt_vec"], name="txt_proj"),
        helper.make_node("Mul", ["img_vec", "txt_vec"], ["product"], name="match"),
        helper.make_node("ReduceSum", ["product", "axes1"], ["score"], name="score", keepdims=1),
    ]
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 32, 32]),
              helper.make_tensor_value_info("ids", TensorProto.INT64, [1, TOKENS]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, TOKENS])]
    outputs = [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, 1])]
    return _model(nodes, "tiny_two_tower", inputs, outputs, weights)


def samples(directory: Path, count: int = 4) -> None:
    """Seeded calibration samples for both models (.npy, each of its input's shape and dtype)."""
    rng = np.random.default_rng(18)
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        np.save(directory / f"image_{index}.npy", rng.uniform(0, 255, (1, 3, 32, 32)).astype(np.float32))
        np.save(directory / f"scale_{index}.npy", np.array([[32, 32, 32, 32]], dtype=np.float32) * (index + 1))
        np.save(directory / f"ids_{index}.npy", rng.integers(0, VOCAB, (1, TOKENS)).astype(np.int64))
        mask = np.zeros((1, TOKENS), dtype=np.float32)
        mask[0, :TOKENS - index] = 1
        np.save(directory / f"mask_{index}.npy", mask)


def main() -> None:
    onnx.save(detector(), str(HERE / "tiny_detector.onnx"))
    onnx.save(two_tower(), str(HERE / "tiny_two_tower.onnx"))
    samples(HERE.parent / "calib" / "multi")
    print("wrote tiny_detector.onnx, tiny_two_tower.onnx and examples/calib/multi/")


if __name__ == "__main__":
    main()
