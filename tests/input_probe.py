"""Ask the real rknn-toolkit2 how it treats model inputs: which axis mean/std count, and where they apply.

Usage: ``python tests/input_probe.py OUT.json``

Run as a subprocess by ``tests/test_input_facts.py`` (the toolkit prints from
C++ to fd 1). For each input shape in ``SHAPES`` a one-node model
``y = x + 0.5`` is written, and for every candidate count (each dim size, and 1)
``config(mean_values=[[1, 2, ..., k]], std_values=[[1] * k]) -> load_onnx ->
build`` runs float on rk3588 in a child forked from the process that imported
the toolkit (:func:`platform_probe.isolated`). When the toolkit accepts, the
simulator runs a zero input: ``0.5 - y`` then shows which axis the mean values
were subtracted along, if any.

Then the limits of ``dynamic_input`` (one model for several shape sets): a
recogniser-like model whose input ``x`` is ``[1, 3, H, W]`` with ``W`` (and, in
one case, ``H``) dynamic is built for each case in ``DYNAMIC_CASES``, quantized
with two ``.npy`` samples of the case's calibration shape, then simulated at
every shape set.

``OUT.json`` holds ``{"toolkit", "seconds", "results": [...], "dynamic": [...]}``;
a result is ``{"shape", "count", "outcome", "step", "message", "applied_axis"}``
where ``applied_axis`` is the axis the values were applied along (None:
accepted but not applied, or not accepted); a dynamic result is ``{"case",
"sets", "calibration", "size_list", "outcome", "step", "message"}``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from platform_probe import _ErrorLines, _refusal, isolated

SHAPES = ((5,), (1, 4), (2, 5), (1, 6, 5), (1, 3, 8, 8), (1, 8, 8, 3), (1, 2, 3, 4, 5))

_W = [[1, 3, 48, 160], [1, 3, 48, 320], [1, 3, 48, 640]]
# case -> (model input dims, shape sets, calibration sample shape, input_size_list or None)
DYNAMIC_CASES = {
    "widths, calibrated at the largest": ([1, 3, 48, "W"], _W, [1, 3, 48, 640], None),
    "widths, listed largest first": ([1, 3, 48, "W"], _W[::-1], [1, 3, 48, 640], None),
    "widths, calibrated at a smaller set": ([1, 3, 48, "W"], _W, [1, 3, 48, 320], None),
    "widths, calibrated at the first set": ([1, 3, 48, "W"], _W, [1, 3, 48, 160], None),
    "one shape set": ([1, 3, 48, "W"], _W[:1], [1, 3, 48, 160], None),
    "32 shape sets": ([1, 3, 48, "W"], [[1, 3, 48, 32 * (i + 1)] for i in range(32)], [1, 3, 48, 1024], None),
    "33 shape sets": ([1, 3, 48, "W"], [[1, 3, 48, 32 * (i + 1)] for i in range(33)], [1, 3, 48, 1056], None),
    "H and W vary, no set is largest in both": ([1, 3, "H", "W"], [[1, 3, 96, 160], [1, 3, 48, 640]],
                                                [1, 3, 48, 640], None),
    "H and W vary, calibrated at the other set": ([1, 3, "H", "W"], [[1, 3, 96, 160], [1, 3, 48, 640]],
                                                  [1, 3, 96, 160], None),
    "H and W vary, calibrated at the set with more elements": ([1, 3, "H", "W"], [[1, 3, 96, 320], [1, 3, 48, 480]],
                                                              [1, 3, 96, 320], None),
    "H and W vary, calibrated at the widest set": ([1, 3, "H", "W"], [[1, 3, 96, 320], [1, 3, 48, 480]],
                                                   [1, 3, 48, 480], None),
    "64 shape sets": ([1, 3, 48, "W"], [[1, 3, 48, 16 * (i + 1)] for i in range(64)], [1, 3, 48, 1024], None),
    "a set of another rank": ([1, 3, 48, "W"], [[1, 3, 48, 160], [3, 48, 320]], [1, 3, 48, 160], None),
    "a dim static in the model varies": ([1, 3, 48, "W"], [[1, 3, 48, 160], [1, 3, 96, 160]],
                                         [1, 3, 96, 160], None),
    "calibrated at the largest, with input_size_list": ([1, 3, 48, "W"], _W, [1, 3, 48, 640], [[1, 3, 48, 640]]),
}


def write_model(path: Path, shape: tuple[int, ...]) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    half = numpy_helper.from_array(np.array([0.5], np.float32), "half")
    graph = helper.make_graph([helper.make_node("Add", ["x", "half"], ["y"], name="add0")], "input_probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))], [half])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def run_case(rknn_class, onnx_path: Path, shape: tuple[int, ...], count: int, progress=None) -> dict:
    import logging

    import numpy as np

    mean = [float(i + 1) for i in range(count)]
    errors = _ErrorLines()
    logging.getLogger("rknnLogger").addHandler(errors)
    rknn = rknn_class(verbose=False)
    step = "config"
    try:
        steps = (("config", lambda: rknn.config(target_platform="rk3588", mean_values=[mean],
                                                std_values=[[1.0] * count])),
                 ("load_onnx", lambda: rknn.load_onnx(model=str(onnx_path))),
                 ("build", lambda: rknn.build(do_quantization=False)),
                 ("init_runtime", lambda: rknn.init_runtime()))
        for step, call in steps:
            if progress:
                progress(step)
            if call() != 0:
                return {"outcome": "refused", "step": step, "message": _refusal(step, errors.lines, step),
                        "applied_axis": None}
        step = "inference"
        layout = "nchw" if len(shape) == 4 else None
        out = rknn.inference(inputs=[np.zeros(shape, np.float32)], data_format=layout)[0]
    except Exception as exc:  # the toolkit raises plain ValueError for refused arguments
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return {"outcome": "refused", "step": step,
                "message": _refusal(step, errors.lines, lines[-1] if lines else type(exc).__name__),
                "applied_axis": None}
    finally:
        rknn.release()
    shifted = 0.5 - np.asarray(out, np.float64).reshape(shape)
    axis = None
    for candidate in range(len(shape)):
        if shape[candidate] == count:
            view = [1] * len(shape)
            view[candidate] = count
            if np.allclose(shifted, np.broadcast_to(np.reshape(mean, view), shape), atol=0.05):
                axis = candidate
    return {"outcome": "accepted", "step": None, "message": None, "applied_axis": axis}


def write_recogniser(path: Path, dims: list) -> None:
    """Conv(s2)+Relu twice, mean over H, a 1x1 Conv classifier: any width (and height) in, [1, 10, 1, W/4] out."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    weights = [numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
               for name, shape in (("w1", (8, 3, 3, 3)), ("b1", (8,)), ("w2", (16, 8, 3, 3)), ("b2", (16,)),
                                   ("w3", (10, 16, 1, 1)), ("b3", (10,)))]
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", **conv),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", **conv),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("ReduceMean", ["r2"], ["m"], name="pool_h", axes=[2], keepdims=1),
             helper.make_node("Conv", ["m", "w3", "b3"], ["y"], name="classifier", kernel_shape=[1, 1])]
    graph = helper.make_graph(nodes, "recogniser", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10, 1, "T"])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def run_dynamic_case(rknn_class, directory: Path, case: tuple, progress=None) -> dict:
    import logging

    import numpy as np

    dims, sets, calibration, size_list = case
    onnx_path = directory / "recogniser.onnx"
    write_recogniser(onnx_path, dims)
    rng = np.random.default_rng(4)
    for index in range(2):
        np.save(directory / f"calib_{index}.npy", rng.uniform(0, 255, calibration).astype(np.float32))
    (directory / "dataset.txt").write_text("calib_0.npy\ncalib_1.npy\n")
    errors = _ErrorLines()
    logging.getLogger("rknnLogger").addHandler(errors)
    rknn = rknn_class(verbose=False)
    load = {"inputs": ["x"], "input_size_list": size_list} if size_list else {}
    step = "config"
    try:
        steps = (("config", lambda: rknn.config(target_platform="rk3588", mean_values=[[0, 0, 0]],
                                                std_values=[[255, 255, 255]], dynamic_input=[[s] for s in sets])),
                 ("load_onnx", lambda: rknn.load_onnx(model=str(onnx_path), **load)),
                 ("build", lambda: rknn.build(do_quantization=True, dataset=str(directory / "dataset.txt"))),
                 ("init_runtime", lambda: rknn.init_runtime()))
        for step, call in steps:
            if progress:
                progress(step)
            if call() != 0:
                return {"outcome": "refused", "step": step, "message": _refusal(step, errors.lines, step)}
        for shape in sets:
            step = f"inference at {shape}"
            out = rknn.inference(inputs=[rng.uniform(0, 255, shape).astype(np.float32)], data_format="nchw")
            if out is None:
                return {"outcome": "refused", "step": step, "message": _refusal("inference", errors.lines, step)}
    except Exception as exc:  # the toolkit raises plain ValueError for refused arguments
        # The exception's last line explains (for a crash inside build() too); the log's first may not.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        last = lines[-1].removeprefix("ValueError: ") if lines else type(exc).__name__
        return {"outcome": "refused", "step": step, "message": _refusal(step, [], last.replace(f"{directory}/", ""))}
    finally:
        rknn.release()
    return {"outcome": "accepted", "step": None, "message": None}


def probe(directory: Path) -> dict:
    started = time.monotonic()
    from rknn.api import RKNN

    from pipeline.toolkit import installed_version

    RKNN(verbose=False).release()
    results = []
    for shape in SHAPES:
        onnx_path = directory / f"x{'x'.join(map(str, shape))}.onnx"
        write_model(onnx_path, shape)
        for count in sorted(set(shape) | {1}):
            print(f"== input probe: {list(shape)} with {count} mean values", flush=True)
            outcome = isolated(lambda progress: run_case(RKNN, onnx_path, shape, count, progress),
                               directory / "case.log")
            outcome.setdefault("applied_axis", None)
            results.append({"shape": list(shape), "count": count, **outcome})
    dynamic = []
    for name, case in DYNAMIC_CASES.items():
        print(f"== input probe: dynamic_input, {name}", flush=True)
        outcome = isolated(lambda progress: run_dynamic_case(RKNN, directory, case, progress), directory / "case.log")
        dims, sets, calibration, size_list = case
        dynamic.append({"case": name, "dims": dims, "sets": sets, "calibration": calibration,
                        "size_list": size_list, **outcome})
    return {"toolkit": installed_version(), "seconds": round(time.monotonic() - started, 1), "results": results,
            "dynamic": dynamic}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/input_probe.py OUT.json", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="input-probe-") as work:
        report = probe(Path(work))
    Path(argv[0]).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
