"""Accuracy check: the built RKNN model on the toolkit's simulator against ONNX Runtime on the source.

Why: a conversion can succeed and still compute something else (int8
quantisation error, float16 overflow, a wrong mean/std, a graph optimisation
bug). Running the same samples through the toolkit's x86 simulator and through
onnxruntime on the ORIGINAL source ONNX (not a rewritten copy) and comparing
each output's cosine similarity catches that before a model ships. The
simulator does not model NPU hardware limits, so a pass is necessary, not
sufficient.

The two sides are not fed the same array, because the RKNN model contains the
configured mean/std normalisation and the ONNX model does not:

* 4-D inputs (static ``[N, C, H, W]``):

  - ``.npy`` sample: loaded (a missing batch axis is added); an NHWC array
    (last dim == C and dim 1 != C) is transposed to NCHW (rknn-toolkit2
    2.5.0's calibration itself accepts only NCHW ``.npy``). The simulator gets
    the raw array with ``data_format='nchw'``, onnxruntime gets
    ``(x - mean[c]) / std[c]`` per channel.
  - image sample (.jpg/.png/...): read with OpenCV (BGR), turned to RGB (kept BGR
    when ``quant_img_RGB2BGR`` is set, as the toolkit's calibration does) and
    resized to (W, H). The simulator gets NHWC uint8 with ``data_format='nhwc'``,
    onnxruntime the normalised NCHW array.
  - no dataset: seeded uniform values in [0, 255) when any of the input's std
    values is above 1 (an image-range input), else standard normal; then as
    for ``.npy``.

* other inputs: the same raw array on both sides, no normalisation (the toolkit
  applies mean/std to 4-D inputs only); random ones are standard normal.

How many mean/std values an input has is :func:`pipeline.inputs.channel_count`
(dim 1, whatever the rank), the rule the manifest checks at load. The dataset
rows are the files :mod:`pipeline.calibration` laid out, the ones the toolkit
calibrated with (images given per input arrive already decoded as ``.npy``).

Random inputs of integer or bool type are 0 or 1 whatever the rank.

onnxruntime always gets the dtype of the ONNX graph input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.inputs import channel_count
from pipeline.errors import PipelineError
from pipeline.onnx_util import inferred, value_types

DEFAULT_SAMPLES = 4
DEFAULT_MIN_COSINE = 0.99
DEFAULT_SEED = 0
SIMULATOR_NOTE = "simulator: the toolkit's x86 simulator does not model NPU hardware limits"

# onnx TensorProto element types for which a test input can be made.
_ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32,
                7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


class VerifyError(PipelineError, RuntimeError):
    """The accuracy check could not run (not: it ran and failed); ``step`` is ``"verify"``."""

    step = "verify"


@dataclass(frozen=True)
class InputSpec:
    """One model input as both runtimes see it; ``mean``/``std`` are per channel."""

    name: str
    shape: tuple[int, ...]
    dtype: type
    mean: np.ndarray
    std: np.ndarray
    bgr: bool = False

    @property
    def is_image_like(self) -> bool:
        """4-D NCHW input: the toolkit applies mean/std to it."""
        return len(self.shape) == 4


class Prepared(NamedTuple):
    """One input of one sample: the simulator's array and layout, and onnxruntime's array."""

    simulator: np.ndarray
    data_format: str
    reference: np.ndarray


# --- the check -------------------------------------------------------------------


def verify_model(session, job: dict) -> dict:
    """Compare ``session``'s built model (simulated) with onnxruntime on ``job["verify_source"]``.

    Returns the ``verify`` record: ``samples``, ``input_source``, ``min_cosine``,
    ``passed``, ``note`` and per output ``name``, ``cosine``, ``max_abs_error``,
    ``shape`` (and ``cosine_note`` when the cosine was defined by rule).
    Whether a failed check fails the conversion is the caller's decision.
    """
    import onnx

    settings = job.get("verify") or {}
    count = int(settings.get("samples", DEFAULT_SAMPLES))
    min_cosine = float(settings.get("min_cosine", DEFAULT_MIN_COSINE))
    seed = int(settings.get("seed", DEFAULT_SEED))
    load = job.get("load_onnx") or {}

    model = onnx.load(job["verify_source"])
    specs = input_specs(model, load, job.get("config") or {})
    outputs = list(load.get("outputs") or [o.name for o in model.graph.output])
    runtime = _ort_session(reference_model(model, [s.name for s in specs], outputs))
    lines = [_row(line) for line in job.get("samples") or []][:count]
    samples = (sample_inputs_from_rows(specs, lines) if lines
               else sample_inputs_random(specs, count, np.random.default_rng(seed)))

    expected, simulated = _run_both(session, runtime, specs, outputs, samples)
    results = [compare_output(name, want, got) for name, want, got in zip(outputs, expected, simulated)]
    return {
        "samples": len(samples),
        "input_source": "dataset" if lines else f"random(seed={seed})",
        "min_cosine": min_cosine,
        "passed": all(result["cosine"] >= min_cosine for result in results),
        "outputs": results,
        "note": SIMULATOR_NOTE,
    }


def verify_all_shapes(session, job: dict) -> dict:
    """:func:`verify_model` at every shape set of a dynamic model (``job["verify_shapes"]``), else once.

    Each set is fed the calibration steps that fit it (``job["verify_rows"]``:
    images decoded at its shapes, ``.npy`` samples of its shapes), else seeded
    random inputs. The record
    keeps each set's result under ``shapes`` and, per output, the worst
    cosine over all sets under ``outputs``; it passes when every set passes.
    """
    from pipeline.shapes import largest

    sets = job.get("verify_shapes")
    if not sets:
        return verify_model(session, job)
    biggest = largest(sets)
    per_shape = []
    fitting = job.get("verify_rows") or [None] * len(sets)
    for shape_set, rows in zip(sets, fitting):
        load = {**(job.get("load_onnx") or {}), "inputs": list(shape_set),
                "input_size_list": [list(shape) for shape in shape_set.values()]}
        samples = rows if rows is not None else (job.get("samples") if shape_set == biggest else [])
        per_shape.append({"inputs": shape_set, **verify_model(session, {**job, "load_onnx": load, "samples": samples})})
    worst = {}
    for result in per_shape:
        for output in result["outputs"]:
            if output["name"] not in worst or output["cosine"] < worst[output["name"]]["cosine"]:
                worst[output["name"]] = output
    return {"samples": sum(r["samples"] for r in per_shape),
            "input_source": ", ".join(dict.fromkeys(r["input_source"] for r in per_shape)),
            "min_cosine": per_shape[0]["min_cosine"], "passed": all(r["passed"] for r in per_shape),
            "outputs": list(worst.values()), "shapes": per_shape, "note": SIMULATOR_NOTE}


def analysis_inputs(job: dict, directory: Path) -> list[str]:
    """One sample for the toolkit's per-layer analysis: the first the accuracy check used.

    A dataset row is given as is (the toolkit calibrated with those files); a
    seeded random sample is drawn as :func:`verify_model` draws its first one
    and saved as ``.npy`` (NCHW for 4-D inputs, which is what the toolkit
    reads). A dynamic-shape model is analysed at the shapes of its first row.
    """
    import onnx

    lines = [_row(line) for line in job.get("samples") or []]
    if lines:
        return [str(path) for path in lines[0]]
    settings = job.get("verify") or {}
    load = job.get("load_onnx") or {}
    specs = input_specs(onnx.load(job["verify_source"]), load, job.get("config") or {})
    sample = sample_inputs_random(specs, 1, np.random.default_rng(int(settings.get("seed", DEFAULT_SEED))))[0]
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, prepared in enumerate(sample):
        path = directory / f"input{index}.npy"
        np.save(path, prepared.simulator)
        paths.append(str(path))
    return paths


def _run_both(session, runtime, specs: list[InputSpec], outputs: list[str],
              samples: list[list[Prepared]]) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """Per output, onnxruntime's and the simulator's arrays for every sample."""
    expected: list[list[np.ndarray]] = [[] for _ in outputs]
    simulated: list[list[np.ndarray]] = [[] for _ in outputs]
    for prepared in samples:
        got = session.simulate([p.simulator for p in prepared], data_format=[p.data_format for p in prepared])
        want = runtime.run(outputs, {spec.name: p.reference for spec, p in zip(specs, prepared)})
        if len(got) != len(outputs):
            raise VerifyError(f"the simulator returned {len(got)} outputs, the ONNX model {len(outputs)} "
                              f"({', '.join(outputs)})")
        for index in range(len(outputs)):
            expected[index].append(np.asarray(want[index]))
            simulated[index].append(np.asarray(got[index]))
    return expected, simulated


def compare_output(name: str, expected: list[np.ndarray], simulated: list[np.ndarray]) -> dict:
    """Cosine and max |error| of one output over all samples, each flattened to float64.

    The simulator may return another shape of the same size (e.g. a squeezed
    axis); values are compared in flattened order, and ``shape`` is the ONNX one.
    Non-finite values (e.g. a float16 overflow) are counted in ``cosine_note``
    and make ``max_abs_error`` None, since JSON has no NaN or infinity.
    """
    for want, got in zip(expected, simulated):
        if want.size != got.size:
            raise VerifyError(f"output '{name}': the simulator gave shape {list(got.shape)}, "
                              f"onnxruntime {list(want.shape)}")
    a = np.concatenate([x.astype(np.float64).ravel() for x in expected])
    b = np.concatenate([x.astype(np.float64).ravel() for x in simulated])
    cosine, note = cosine_similarity(a, b)
    error = max_abs_error(a, b)
    result = {"name": name, "cosine": cosine, "max_abs_error": error if np.isfinite(error) else None,
              "shape": [int(d) for d in expected[0].shape]}
    notes = [text for text in (note, _non_finite_note(a, b)) if text]
    if notes:
        result["cosine_note"] = "; ".join(notes)
    return result


def _non_finite_note(expected: np.ndarray, simulated: np.ndarray) -> str | None:
    """How many NaN/inf values each side produced, or None when all are finite."""
    counts = int(np.sum(~np.isfinite(simulated))), int(np.sum(~np.isfinite(expected)))
    if not any(counts):
        return None
    return f"non-finite values: {counts[0]} from the simulator, {counts[1]} from onnxruntime"


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> tuple[float, str | None]:
    """Cosine of two flat float64 vectors, and a note when it had to be defined by rule.

    A zero-norm or non-finite vector makes the cosine NaN: two all-zero vectors
    then count as 1.0 (identical), anything else as 0.0.
    """
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        value = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    if np.isfinite(value):
        return min(1.0, max(-1.0, value)), None  # rounding can step just outside [-1, 1]
    if not a.any() and not b.any():
        return 1.0, "cosine undefined (both outputs all zero); taken as 1.0"
    return 0.0, "cosine undefined (a zero or non-finite output); taken as 0.0"


def max_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| over two flat vectors (0.0 for empty ones; NaN or inf when they hold such values)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return float(np.max(np.abs(a - b), initial=0.0))


# --- the two models' inputs and outputs ----------------------------------------------


def input_specs(model, load: dict, config: dict) -> list[InputSpec]:
    """The inputs the toolkit compiled, in its order, with shapes, dtypes and normalisation.

    Names and shapes come from ``load_onnx``'s ``inputs`` / ``input_size_list``
    when given, else from the graph inputs that are not initializers.
    """
    initializers = {init.name for init in model.graph.initializer}
    names = list(load.get("inputs") or [i.name for i in model.graph.input if i.name not in initializers])
    types = _tensor_types(model, inner=not set(names) <= {i.name for i in model.graph.input})
    sizes = load.get("input_size_list") or [None] * len(names)
    specs = []
    for index, (name, size) in enumerate(zip(names, sizes)):
        if name not in types:
            raise VerifyError(f"input '{name}' has no known type in the source ONNX")
        elem_type, dims = types[name]
        shape = tuple(int(d) for d in size) if size else dims
        if shape is None or any(not isinstance(d, int) or d <= 0 for d in shape):
            raise VerifyError(f"input '{name}' has no static shape ({shape}); give the model's `inputs` shapes")
        if elem_type not in _ONNX_DTYPES:
            raise VerifyError(f"input '{name}' has ONNX element type {elem_type}, which verify cannot feed")
        channels = channel_count(shape)
        specs.append(InputSpec(name=name, shape=shape, dtype=_ONNX_DTYPES[elem_type],
                               mean=_per_channel(config.get("mean_values"), index, channels, 0.0),
                               std=_per_channel(config.get("std_values"), index, channels, 1.0),
                               bgr=_per_input_flag(config.get("quant_img_RGB2BGR"), index)))
    return specs


def reference_model(model, inputs: list[str], outputs: list[str]):
    """``model`` as the toolkit compiled it: graph inputs ``inputs`` and outputs ``outputs``.

    Returns ``model`` itself when nothing was cut; otherwise a copy whose graph
    outputs are those tensors (types from ONNX shape inference), extracted
    between ``inputs`` and ``outputs`` when an input is an inner tensor.
    """
    import onnx
    import onnx.utils

    graph_inputs = {i.name for i in model.graph.input}
    if [o.name for o in model.graph.output] == outputs and set(inputs) <= graph_inputs:
        return model
    typed = inferred(model)
    if not set(inputs) <= graph_inputs:
        return onnx.utils.Extractor(typed).extract_model(inputs, outputs)
    infos = {info.name: info for info in [*typed.graph.value_info, *typed.graph.output]}
    missing = [name for name in outputs if name not in infos or not infos[name].type.HasField("tensor_type")]
    if missing:
        raise VerifyError(f"cannot type the cut outputs {missing}: ONNX shape inference does not reach them")
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    del cut.graph.output[:]
    cut.graph.output.extend(infos[name] for name in outputs)
    return cut


def _tensor_types(model, inner: bool) -> dict[str, tuple[int, tuple | None]]:
    """Tensor name -> (ONNX element type, dims or None) of the graph inputs.

    With ``inner`` (``load_onnx`` named inner tensors as inputs), inner tensors
    typed by ONNX shape inference are included too.
    """
    infos = list(model.graph.input)
    if inner:
        infos += list(inferred(model).graph.value_info)
    return {name: (elem_type, None if shape is None else tuple(shape))
            for name, (elem_type, shape) in value_types(infos, symbolic=True).items()}


def _per_channel(values, index: int, channels: int, default: float) -> np.ndarray:
    """Input ``index``'s per-channel mean or std from the config (a single value is broadcast)."""
    row = values[index] if values and index < len(values) else [default]
    row = np.asarray(row, dtype=np.float64).ravel()
    if row.size == 1:
        row = np.full(channels, row[0])
    if row.size != channels:
        raise VerifyError(f"input {index}: {row.size} mean/std values for {channels} channels")
    return row


def _per_input_flag(value, index: int) -> bool:
    """A config flag given as one bool or as a per-input list."""
    if isinstance(value, (list, tuple)):
        return bool(value[index]) if index < len(value) else False
    return bool(value)


def _ort_session(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # cut graphs leave unused nodes, which onnxruntime warns about
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


# --- sample preparation ----------------------------------------------------------------


def sample_inputs_from_rows(specs: list[InputSpec], rows: list[list[str]]) -> list[list[Prepared]]:
    """Each calibration step (one path per input, in input order) prepared for both runtimes."""
    return [[prepare_file(spec, path) for spec, path in zip(specs, _check_row(row, specs))] for row in rows]


def sample_inputs_random(specs: list[InputSpec], count: int, rng: np.random.Generator) -> list[list[Prepared]]:
    """``count`` seeded random samples, drawn sample by sample, input by input."""
    return [[prepare_random(spec, rng) for spec in specs] for _ in range(count)]


def _row(line) -> list[str]:
    """A calibration step as a list of paths (a dataset-file line is split on whitespace)."""
    return line.split() if isinstance(line, str) else list(line)


def _check_row(paths: list[str], specs: list[InputSpec]) -> list[str]:
    if len(paths) != len(specs):
        raise VerifyError(f"calibration step {paths} has {len(paths)} paths for {len(specs)} inputs")
    return paths


def prepare_file(spec: InputSpec, path: str) -> Prepared:
    """One input from a dataset file: ``.npy`` arrays or images."""
    if Path(path).suffix.lower() == ".npy":
        return prepare_array(spec, np.load(path))
    return prepare_image(spec, path)


def prepare_array(spec: InputSpec, array: np.ndarray) -> Prepared:
    """A raw array: 4-D inputs get NCHW for the simulator and normalised NCHW for onnxruntime."""
    if not spec.is_image_like:
        array = array.reshape(spec.shape).astype(spec.dtype)
        return Prepared(array, "nchw", array)
    if array.ndim == 3:
        array = array[np.newaxis]
    channels = spec.shape[1]
    if array.ndim == 4 and array.shape[-1] == channels and array.shape[1] != channels:
        array = array.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if array.shape != spec.shape:
        raise VerifyError(f"input '{spec.name}': sample shape {list(array.shape)} is not {list(spec.shape)}")
    simulator = array if array.dtype == np.uint8 else array.astype(np.float32)
    return Prepared(np.ascontiguousarray(simulator), "nchw", normalise(spec, array))


def prepare_image(spec: InputSpec, path: str) -> Prepared:
    """An image file for a 4-D input: NHWC uint8 for the simulator, normalised NCHW for onnxruntime."""
    import cv2

    if not spec.is_image_like or spec.shape[1] not in (1, 3):
        raise VerifyError(f"input '{spec.name}' with shape {list(spec.shape)} cannot take the image {path}")
    _, channels, height, width = spec.shape
    image = cv2.imread(path, cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR)
    if image is None:
        raise VerifyError(f"cannot read the image {path}")
    if channels == 3 and not spec.bgr:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    image = cv2.resize(image, (width, height)).reshape(height, width, channels)
    nhwc = np.repeat(image[np.newaxis], spec.shape[0], axis=0)
    return Prepared(np.ascontiguousarray(nhwc), "nhwc", normalise(spec, nhwc.transpose(0, 3, 1, 2)))


def prepare_random(spec: InputSpec, rng: np.random.Generator) -> Prepared:
    """A seeded random input: image range [0, 255) when any std > 1, else standard normal."""
    if not np.issubdtype(spec.dtype, np.floating):
        return prepare_array(spec, rng.integers(0, 2, size=spec.shape))
    if spec.is_image_like and np.any(spec.std > 1):
        return prepare_array(spec, rng.uniform(0.0, 255.0, size=spec.shape))
    return prepare_array(spec, rng.standard_normal(spec.shape))


def normalise(spec: InputSpec, nchw: np.ndarray) -> np.ndarray:
    """``(x - mean[c]) / std[c]`` per channel, in the ONNX input's dtype."""
    mean = spec.mean.reshape(1, -1, 1, 1)
    std = spec.std.reshape(1, -1, 1, 1)
    return np.ascontiguousarray(((nchw.astype(np.float64) - mean) / std).astype(spec.dtype))
