"""Ask the real rknn-toolkit2 which platform/option combinations it accepts.

Usage: ``python tests/platform_probe.py OUT.json``

Run as a subprocess by ``tests/test_platform_facts.py``: the toolkit prints
from C++ straight to file descriptor 1, so the caller sends stdout/stderr to a
log file and reads the results from ``OUT.json`` only.

A tiny model (Conv 1x3x8x8 -> Relu, fixed random weights, opset 13) and a
two-sample NCHW float32 ``.npy`` dataset are written to a temporary directory.
Then ``config -> load_onnx -> build`` runs, on a fresh ``RKNN`` object each
time, for every target in ``platforms.TARGETS`` and every case in ``CASES``
(the rejected dtype spellings only on ``SPELLING_TARGETS``). The
arguments come from ``pipeline.conversion.toolkit_arguments``, so the toolkit
sees what a real conversion would send.

The toolkit is imported once. Its native code aborts the whole process on some
combinations instead of returning an error, so each combination runs in a
child forked from the process that imported it (see :func:`isolated`).

Nothing is cut from the sweep: every case runs on every platform. A
combination takes 0.1-0.7 s (fork, build, and a refusal in ``config`` is
quicker still), about 20 s for the 89 combinations on two shared cores.

``OUT.json`` holds ``{"toolkit": version, "seconds": total, "cases": [names],
"results": [...]}``. A result is ``{"target", "case", "model", "outcome",
"step", "message", "seconds"}``: ``model`` is the manifest-style model dict
(``quantization`` / ``options``) the combination stands for; ``outcome`` is
``accepted``, ``refused`` (a toolkit step returned an error or raised) or
``crashed`` (the process died); ``step`` and ``message`` say where and, in the
toolkit's own words, why (both None when accepted).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
import traceback
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
}
# dtype spellings the toolkit is known to reject, tried on SPELLING_TARGETS only.
SPELLING_CASES = tuple(platforms.REJECTED_DTYPES)
CASES.update({spelling: {"quantization": {"dtype": spelling}} for spelling in SPELLING_CASES})
SPELLING_TARGETS = ("rk3588",)
CASE_TIMEOUT = 120  # seconds; a combination that takes longer is recorded as crashed

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TIMESTAMP = re.compile(r"^\[[0-9:.]+\]\s*")
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


def run_case(rknn_class, target: str, model: dict, onnx_path: Path, dataset: Path, progress=None) -> dict:
    """config -> load_onnx -> build on a fresh RKNN object; where and why it stopped.

    ``progress(step)`` is called before each step, so a caller can tell where
    the toolkit was when its process died.
    """
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
            if progress:
                progress(step)
            ret = call()
            if ret != 0:
                return {"outcome": "refused", "step": step,
                        "message": _refusal(step, errors.lines, f"rknn.{step}() returned {ret}")}
        return {"outcome": "accepted", "step": None, "message": None}
    except Exception as exc:  # the toolkit raises plain ValueError for refused options
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return {"outcome": "refused", "step": step,
                "message": _refusal(step, errors.lines, lines[-1] if lines else type(exc).__name__)}
    finally:
        logger.removeHandler(errors)
        rknn.release()


def _native_error(output: str) -> str | None:
    """The last error the toolkit's native code printed before dying, if any."""
    reason = None
    for line in _ANSI.sub("", output).splitlines():
        line = line.strip()
        if line.startswith("E RKNN:"):
            reason = _TIMESTAMP.sub("", line[len("E RKNN:"):].strip())
        elif line.startswith("terminate called"):
            reason = line
    return reason


def isolated(task, log_path: Path) -> dict:
    """``task(progress)`` in a forked child, so a native crash of the toolkit becomes a result.

    The toolkit's native code aborts the whole process on some combinations
    (it does not return an error code), so each combination runs in a child
    forked from the process that imported the toolkit. The child's fd 1 and 2
    go to ``log_path`` (copied to our stdout afterwards, so the caller's log
    keeps everything); it reports each step and then its result as JSON lines
    on a pipe. A child that dies before sending a result is ``crashed`` at the
    last step it reported, with the toolkit's last native error line. A child
    that sent its result and crashed while exiting keeps that result.
    """
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: never returns
        code = 1
        try:
            os.close(read_fd)
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            signal.alarm(CASE_TIMEOUT)
            with os.fdopen(write_fd, "w") as pipe:
                def progress(step: str) -> None:
                    pipe.write(json.dumps({"step": step}) + "\n")
                    pipe.flush()

                pipe.write(json.dumps({"result": task(progress)}) + "\n")
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        messages = [json.loads(line) for line in pipe if line.strip()]
    _, status = os.waitpid(pid, 0)
    output = log_path.read_bytes()
    sys.stdout.buffer.write(output)
    sys.stdout.flush()
    for message in messages:
        if "result" in message:
            return message["result"]
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
        death = f"timed out after {CASE_TIMEOUT} s"
    elif os.WIFSIGNALED(status):
        death = f"process killed by {signal.Signals(os.WTERMSIG(status)).name}"
    else:
        death = f"process exited with status {os.WEXITSTATUS(status)}"
    step = messages[-1]["step"] if messages else None
    return {"outcome": "crashed", "step": step,
            "message": _native_error(output.decode(errors="replace")) or death}


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
    """Every combination's outcome, in the ``OUT.json`` layout."""
    started = time.monotonic()
    from rknn.api import RKNN  # heavy: imports torch; once for the whole sweep

    from pipeline.toolkit import installed_version

    # The first RKNN object pays a one-off setup; paying it here, before
    # forking, saves it in every child.
    RKNN(verbose=False).release()
    onnx_path, dataset = write_inputs(directory)
    case_log = directory / "case.log"
    results = []

    def record(target: str, case: str, model: dict) -> dict:
        case_started = time.monotonic()
        print(f"== platform probe: {target} {case}", flush=True)
        outcome = isolated(lambda progress: run_case(RKNN, target, model, onnx_path, dataset, progress), case_log)
        result = {"target": target, "case": case, "model": model, **outcome,
                  "seconds": round(time.monotonic() - case_started, 3)}
        results.append(result)
        return result

    float_accepted = {}
    for target in platforms.TARGETS:
        float_accepted[target] = record(target, "float", CASES["float"])["outcome"] == "accepted"
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
