"""Tiny ONNX models and calibration samples made on the fly, shared by the tests and the benchmarks.

Seeded, so a model or a sample set is the same bytes every time it is made.
"""

from __future__ import annotations

from pathlib import Path


def make_pool_identity_model(path: Path, seed: int = 0) -> Path:
    """Conv -> AveragePool(count_include_pad=0, pads 1) -> Identity -> graph output.

    The toolkit folds the Identity, so the pool's output tensor '301' is renamed
    to the graph output 'y' and op_target={'301': ...} is rejected: the remap case.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.random.default_rng(seed).standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv0", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("AveragePool", ["c"], ["301"], name="pool0", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         count_include_pad=0),
        helper.make_node("Identity", ["301"], ["y"], name="ident0"),
    ]
    graph = helper.make_graph(nodes, "pool_identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_npy_dataset(directory: Path, count: int = 2, shape=(1, 3, 16, 16), seed: int = 0) -> Path:
    """A calibration list of .npy samples (``dataset.txt``, paths relative to it)."""
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for index in range(count):
        name = f"sample_{index}.npy"
        np.save(directory / name, rng.uniform(0, 1, size=shape).astype(np.float32))
        names.append(name)
    (directory / "dataset.txt").write_text("".join(f"{name}\n" for name in names))
    return directory / "dataset.txt"


def make_tiny_model(path: Path, seed: int) -> None:
    """Conv(3->8, 3x3, pad 1) -> AveragePool(2x2, stride 2) on a 1x3x16x16 input."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["c"], ["y"], name="pool", kernel_shape=[2, 2], strides=[2, 2])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
