"""The one adapter around rknn-toolkit2: every ``rknn`` import and private access lives here.

Why one module: the toolkit is heavy (it imports torch), keeps global state,
changes environment variables and prints from C++ straight to file descriptor 1,
so it only ever runs inside a conversion worker process (:mod:`pipeline.worker`).
Its private API (the optimised graph after ``build()``) is needed to find the
names that ``op_target`` accepts; keeping that access here, behind
:func:`optimized_node_outputs`, means a toolkit upgrade breaks one function and
one test (``tests/test_toolkit_adapter.py``), not the whole pipeline.

Nothing in this module is imported by the doit task definitions except
:func:`installed_version`, which reads package metadata without importing the
toolkit.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import metadata
from pipeline.errors import PipelineError

DISTRIBUTION = "rknn-toolkit2"
_INVALID_OP_TARGET_KEY = re.compile(r"Invalid key of '(?P<key>.*?)' in 'op_target'")


@lru_cache(maxsize=1)
def installed_version() -> str | None:
    """The installed rknn-toolkit2 version, read from package metadata (no import; once per process)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def rejected_op_target_key(message: str) -> str | None:
    """The key named by the toolkit's ``Invalid key of 'X' in 'op_target'!`` error, if any."""
    match = _INVALID_OP_TARGET_KEY.search(message)
    return match.group("key") if match else None


class Session:
    """One RKNN object, driven through config -> load_onnx -> build -> export.

    Each step raises :class:`ToolkitError` with the step's name when the toolkit
    returns a non-zero code, so the worker can report where a build stopped.
    """

    def __init__(self, verbose: bool = True):
        from rknn.api import RKNN  # heavy: imports torch

        self.rknn = RKNN(verbose=verbose)

    def _check(self, step: str, ret) -> None:
        if ret != 0:
            raise ToolkitError(step, f"rknn.{step}() returned {ret}")

    def config(self, **kwargs) -> None:
        self._check("config", self.rknn.config(**kwargs))

    def load_onnx(self, model: str, **kwargs) -> None:
        self._check("load_onnx", self.rknn.load_onnx(model=model, **kwargs))

    def _call(self, step: str, method, **kwargs) -> None:
        try:
            ret = method(**kwargs)
        except Exception as exc:  # the toolkit raises plain ValueError/AttributeError
            # Its messages embed a whole traceback; the last line is the one that explains.
            lines = [line for line in str(exc).splitlines() if line.strip()]
            raise ToolkitError(step, lines[-1] if lines else type(exc).__name__) from exc
        self._check(step, ret)

    def build(self, **kwargs) -> None:
        self._call("build", self.rknn.build, **kwargs)

    def export(self, path: str) -> None:
        self._check("export_rknn", self.rknn.export_rknn(path))

    def hybrid_step1(self, dataset: str, **kwargs) -> None:
        self._call("hybrid_quantization_step1", self.rknn.hybrid_quantization_step1, dataset=dataset, **kwargs)

    def hybrid_step2(self, model_input: str, data_input: str, cfg: str) -> None:
        self._call("hybrid_quantization_step2", self.rknn.hybrid_quantization_step2, model_input=model_input,
                   data_input=data_input, model_quantization_cfg=cfg)

    def simulate(self, inputs: list, data_format: str | list | None = None) -> list:
        """Run the built model in the toolkit's x86 simulator (``init_runtime()`` without target)."""
        if getattr(self, "_runtime_ready", False) is False:
            self._check("init_runtime", self.rknn.init_runtime())
            self._runtime_ready = True
        outputs = self.rknn.inference(inputs=inputs, data_format=data_format)
        if outputs is None:
            raise ToolkitError("inference", "rknn.inference() returned None")
        return outputs

    def optimized_node_outputs(self) -> dict[str, list[str]]:
        return optimized_node_outputs(self.rknn)

    def tensor_producers(self) -> dict[str, dict]:
        return tensor_producers(self.rknn)

    def accuracy_analysis(self, inputs: list[str], output_dir: str) -> str:
        """Run the toolkit's per-layer analysis on the simulator; return its table (``error_analysis.txt``).

        Needs a quantized build in this session. The toolkit raises with a whole
        traceback embedded in the message; the last line is the one that explains.
        """
        from pathlib import Path

        try:
            ret = self.rknn.accuracy_analysis(inputs=list(inputs), output_dir=output_dir, target=None)
        except Exception as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            raise ToolkitError("accuracy_analysis", lines[-1] if lines else type(exc).__name__) from exc
        self._check("accuracy_analysis", ret)
        table = Path(output_dir) / "error_analysis.txt"
        if not table.exists():
            raise ToolkitError("accuracy_analysis", f"the toolkit wrote no {table.name}")
        return table.read_text(errors="replace")

    def release(self) -> None:
        self.rknn.release()


class ToolkitError(PipelineError, RuntimeError):
    """A toolkit step failed; ``step`` names it (config, load_onnx, build, ...)."""

    def __init__(self, step: str, message: str):
        super().__init__(message)
        self.step = step


def tensor_producers(rknn) -> dict[str, dict]:
    """Tensor -> ``{"node", "op_type", "inputs"}`` of the node producing it in the optimised graph.

    PRIVATE API (as :func:`optimized_node_outputs`): the per-layer analysis names
    layers by these tensors; this is how they are traced back to ONNX nodes.
    Empty when the graph is not exposed (the analysis then names tensors only).
    """
    try:
        nodes = rknn.rknn_base.ir.model.graph.node
    except AttributeError:
        return {}
    return {output: {"node": node.name, "op_type": node.op_type, "inputs": list(node.input)}
            for node in nodes if node.name for output in node.output}


def optimized_node_outputs(rknn) -> dict[str, list[str]]:
    """Node name -> output tensor names in the toolkit's optimised graph.

    PRIVATE API of rknn-toolkit2 2.5.0: after ``build()`` (even a failed one),
    ``rknn.rknn_base.ir.model`` is the ``onnx.ModelProto`` the toolkit compiled.
    Node names survive its optimisation while output tensor names may not, which
    is why ``op_target`` keys are remapped through node names.
    """
    try:
        model = rknn.rknn_base.ir.model
        nodes = model.graph.node
    except AttributeError as exc:
        raise ToolkitError(
            "optimized_graph",
            "this rknn-toolkit2 no longer exposes rknn_base.ir.model; op_target keys cannot be "
            "remapped automatically. Give the renamed tensor in the override's match.tensor, "
            "or pin rknn-toolkit2==2.5.0") from exc
    return {node.name: list(node.output) for node in nodes if node.name}
