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

``OUT.json`` holds ``{"toolkit", "seconds", "results": [...]}``; a result is
``{"shape", "count", "outcome", "step", "message", "applied_axis"}`` where
``applied_axis`` is the axis the values were applied along (None: accepted
but not applied, or not accepted).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from platform_probe import _ErrorLines, _refusal, isolated

SHAPES = ((5,), (1, 4), (2, 5), (1, 6, 5), (1, 3, 8, 8), (1, 8, 8, 3), (1, 2, 3, 4, 5))


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
    return {"toolkit": installed_version(), "seconds": round(time.monotonic() - started, 1), "results": results}


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
