"""Ask the real rknn-toolkit2 which platform/option combinations it accepts.

Usage: ``python tests/platform_probe.py OUT.json``

Run as a subprocess by ``tests/test_platform_facts.py``: the toolkit prints
from C++ straight to file descriptor 1, so the caller sends stdout/stderr to a
log file and reads the results from ``OUT.json`` only.

A tiny model (Conv 1x3x8x8 -> Relu, fixed random weights, opset 13) and a
two-sample NCHW float32 ``.npy`` dataset are written to a temporary directory.
Then, with a fresh ``RKNN`` object per combination, ``config -> load_onnx ->
build`` runs for every target in ``platforms.TARGETS`` and every case in
``CASES``; the arguments come from ``pipeline.conversion.toolkit_arguments``,
so the toolkit sees what a real conversion would send. ``w16a16i`` (a rejected
spelling) is only tried on ``SPELLING_TARGETS``. The toolkit is imported once.

Every combination is swept on every platform: with this model a combination
takes well under a second (about 0.05 s for a build, less for a refusal in
``config``), so the whole sweep stays around ten seconds on two cores and there
was no need to cut it to one platform per group.

``OUT.json`` holds ``{"toolkit": version, "seconds": total, "cases": [names],
"results": [...]}``; a result is ``{"target", "case", "model", "accepted",
"step", "message", "seconds"}`` where ``model`` is the manifest-style model
dict (``quantization`` / ``options``) the combination stands for, and ``step``
and ``message`` name where and why the toolkit refused (both None when it
accepted).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

from pipeline import platforms
from pipeline.conversion import toolkit_arguments

# Case name -> manifest-style model fragment. "single_core_mode" is special:
# it runs unquantized where the toolkit accepted the "float" case on that
# target, and with w8a8 where it refused it.
CASES: dict[str, dict] = {
    "float": {"quantization": None},
    "w8a8": {"quantization": {"dtype": "w8a8"}},
    "w8a16": {"quantization": {"dtype": "w8a16"}},
    "w16a16i_dfp": {"quantization": {"dtype": "w16a16i_dfp"}},
    "w4a16": {"quantization": {"dtype": "w4a16"}},
    "gdq w8a8": {"quantization": {"dtype": "w8a8", "algorithm": "gdq"}},
    "gdq w4a16": {"quantization": {"dtype": "w4a16", "algorithm": "gdq"}},
    "single_core_mode": {"quantization": None, "options": {"single_core_mode": True}},
    "w16a16i": {"quantization": {"dtype": "w16a16i"}},
}
SPELLING_CASES = ("w16a16i",)
SPELLING_TARGETS = ("rk3588",)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SHAPE = (1, 3, 8, 8)


def write_inputs(directory: Path) -> tuple[Path, Path]:
    """The tiny ONNX model and its calibration list (``dataset.txt``)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv0", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu0"),
    ]
    graph = helper.make_graph(nodes, "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(_SHAPE))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx_path = directory / "probe.onnx"
    onnx.save(model, str(onnx_path))

    names = []
    for index in range(2):
        name = f"sample_{index}.npy"
        np.save(directory / name, rng.uniform(0, 1, size=_SHAPE).astype(np.float32))
        names.append(name)
    dataset = directory / "dataset.txt"
    dataset.write_text("".join(f"{name}\n" for name in names))
    return onnx_path, dataset


class _ErrorLines(logging.Handler):
    """Keeps the toolkit's error records (its logger is the standard ``rknnLogger``)."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = _ANSI.sub("", record.getMessage()).strip()
        if text:
            self.lines.append(text.splitlines()[0])


def _refusal(step: str, errors: list[str], fallback: str) -> str:
    """The toolkit's own explanation: its first error line, without the ``step:`` prefix."""
    message = errors[0] if errors else fallback
    prefix = f"{step}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def run_case(rknn_class, target: str, model: dict, onnx_path: Path, dataset: Path) -> dict:
    """config -> load_onnx -> build on a fresh RKNN object; where and why it stopped."""
    manifest_model = dict(model)
    if manifest_model.get("quantization"):
        manifest_model["quantization"] = {**manifest_model["quantization"], "dataset": str(dataset)}
    args = toolkit_arguments(manifest_model, target, str(onnx_path))

    logger = logging.getLogger("rknnLogger")
    errors = _ErrorLines()
    rknn = rknn_class(verbose=False)
    logger.addHandler(errors)
    step = "config"
    try:
        steps = (
            ("config", lambda: rknn.config(**args["config"])),
            ("load_onnx", lambda: rknn.load_onnx(model=str(onnx_path), **args["load_onnx"])),
            ("build", lambda: rknn.build(**args["build"])),
        )
        for step, call in steps:
            ret = call()
            if ret != 0:
                return {"accepted": False, "step": step,
                        "message": _refusal(step, errors.lines, f"rknn.{step}() returned {ret}")}
        return {"accepted": True, "step": None, "message": None}
    except Exception as exc:  # the toolkit raises plain ValueError for refused options
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return {"accepted": False, "step": step,
                "message": _refusal(step, errors.lines, lines[-1] if lines else type(exc).__name__)}
    finally:
        logger.removeHandler(errors)
        rknn.release()


def combinations(float_accepted: dict[str, bool]) -> list[tuple[str, str, dict]]:
    """(target, case, model) for every case after "float"; needs the float outcomes."""
    result = []
    for target in platforms.TARGETS:
        for case, model in CASES.items():
            if case == "float" or (case in SPELLING_CASES and target not in SPELLING_TARGETS):
                continue
            if case == "single_core_mode" and not float_accepted[target]:
                model = {**model, "quantization": {"dtype": "w8a8"}}
            result.append((target, case, model))
    return result


def probe(directory: Path) -> dict:
    started = time.monotonic()
    from rknn.api import RKNN  # heavy: imports torch; once for the whole sweep

    from pipeline.toolkit import installed_version

    onnx_path, dataset = write_inputs(directory)
    results = []

    def record(target: str, case: str, model: dict) -> dict:
        case_started = time.monotonic()
        outcome = run_case(RKNN, target, model, onnx_path, dataset)
        result = {"target": target, "case": case, "model": model, **outcome,
                  "seconds": round(time.monotonic() - case_started, 3)}
        results.append(result)
        return result

    float_accepted = {target: record(target, "float", CASES["float"])["accepted"] for target in platforms.TARGETS}
    for target, case, model in combinations(float_accepted):
        record(target, case, model)
    return {"toolkit": installed_version(), "seconds": round(time.monotonic() - started, 1),
            "cases": list(CASES), "results": results}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/platform_probe.py OUT.json", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="platform-probe-") as work:
        report = probe(Path(work))
    Path(argv[0]).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
