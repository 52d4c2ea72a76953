"""Model inputs as rknn-toolkit2 sees them: channels, normalisation, and what a calibration sample must be.

Why a module of its own: the manifest's checks, the dataset the pipeline writes
for the toolkit and the accuracy check must agree on these facts, and they used
to disagree (verify counted one channel for a ``[1, 4]`` input, the toolkit
four). Measured against rknn-toolkit2 2.5.0 by ``tests/input_probe.py``
(table in ``docs/platform-facts.md``):

* ``mean_values`` / ``std_values`` of an input of rank >= 2 must have exactly
  ``shape[1]`` entries, whatever the rank or layout (a ``[1, 8, 8, 3]`` input
  wants 8); a rank-1 input wants 1. A single value is not broadcast: it is
  refused (``expect N``).
* Only 4-D inputs are normalised; on other ranks the values are checked and
  then ignored.
* A ``.npy`` calibration sample is read in the input's own layout (the ONNX
  shape); an image is decoded by the toolkit itself. The pipeline therefore
  turns images given per input (the mapping form of ``quantization.dataset``)
  into ``.npy`` arrays itself, in the input's layout, so that size, layout and
  colour order are the manifest's decision, not a guess.

Nothing here imports the toolkit; numpy is imported only to read ``.npy``
headers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

IMAGE_TYPES = (".jpg", ".jpeg", ".png", ".bmp")
SAMPLE_TYPES = (".npy", *IMAGE_TYPES)
LAYOUTS = ("nchw", "nhwc")
COLOURS = ("rgb", "bgr")

# ONNX TensorProto element type -> numpy dtype name (types a sample can carry).
ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
               9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64"}
_FLOATS = ("float16", "float32", "float64")


def channel_axis(shape) -> int | None:
    """The axis whose size the toolkit wants ``mean_values``/``std_values`` to match (None: rank 1)."""
    return 1 if len(shape) >= 2 else None


def channel_count(shape) -> int:
    """How many ``mean_values``/``std_values`` entries the toolkit expects for an input of ``shape``."""
    axis = channel_axis(shape)
    return int(shape[axis]) if axis is not None else 1


def is_normalised(shape) -> bool:
    """Whether the toolkit applies mean/std to this input (4-D inputs only)."""
    return len(shape) == 4


def image_layout(shape, declared: str | None = None) -> str | None:
    """``nchw`` or ``nhwc`` if an image can feed an input of ``shape``, else None.

    A declared layout must leave 1 or 3 channels on its channel axis; without
    one, the layout is taken from the shape (NCHW wins when both fit).
    """
    if len(shape) != 4:
        return None
    fits = {"nchw": shape[1] in (1, 3), "nhwc": shape[3] in (1, 3)}
    if declared:
        return declared if fits[declared] else None
    return next((layout for layout in LAYOUTS if fits[layout]), None)


def is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_TYPES)


def sample_shape(path: str) -> tuple[int, ...] | None:
    """A ``.npy`` sample's shape (None for an image, which is resized to whatever it feeds)."""
    if is_image(path):
        return None
    header = npy_header(path)
    return None if isinstance(header, str) else header[0]


@dataclass(frozen=True)
class InputInfo:
    """One input the toolkit compiles: name, static shape(s) and numpy dtype name (None: unknown)."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: str | None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.shapes[0]


@functools.lru_cache(maxsize=4096)
def npy_header(path: str) -> tuple[tuple[int, ...], str] | str:
    """(shape, dtype name) of a ``.npy`` file without reading its data, or why it cannot be read."""
    import numpy as np

    try:
        with open(path, "rb") as stream:
            version = np.lib.format.read_magic(stream)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(stream)
    except (OSError, ValueError) as error:
        return f"is not a readable .npy file ({error})"
    return tuple(int(d) for d in shape), dtype.name


def sample_problem(path: str, info: InputInfo, layout: str | None = None) -> str | None:
    """Why ``path`` cannot be a calibration sample for ``info``, or None.

    A ``.npy`` sample must have one of ``info.shapes`` (a bucket takes the
    samples of its own shape); an image must fit every one (it is resized).
    """
    if is_image(path):
        return image_problem(info, layout)
    header = npy_header(path)
    if isinstance(header, str):
        return header
    shape, dtype = header
    if shape not in {tuple(expected) for expected in info.shapes}:
        for expected in info.shapes:
            if len(expected) == 4 and shape == (expected[0], expected[2], expected[3], expected[1]) \
                    and expected[1] != expected[3]:
                return (f"has shape {list(shape)}, the NHWC form of input {info.name!r} {list(expected)}: "
                        f"the toolkit reads .npy samples in the input's own layout (NCHW here); "
                        f"save it with array.transpose(0, 3, 1, 2)")
        wanted = " or ".join(str(list(expected)) for expected in info.shapes)
        return f"has shape {list(shape)} but input {info.name!r} is {wanted}"
    return dtype_problem(dtype, info)


def dtype_problem(dtype: str, info: InputInfo) -> str | None:
    """Float inputs take float or uint8 samples; any other input needs its own dtype exactly."""
    if info.dtype is None or dtype == info.dtype:
        return None
    if info.dtype in _FLOATS and (dtype in _FLOATS or dtype == "uint8"):
        return None
    return f"has dtype {dtype} but input {info.name!r} is {info.dtype}: save it with .astype('{info.dtype}')"


def image_problem(info: InputInfo, layout: str | None) -> str | None:
    """Why an image cannot feed ``info`` (rank, channels, dtype), or None."""
    for shape in info.shapes:
        if image_layout(shape, layout) is None:
            how = f"with layout {layout} " if layout else ""
            return (f"is an image, but input {info.name!r} {list(shape)} is not image-like {how}"
                    f"(4-D with 1 or 3 channels): give .npy samples")
    if info.dtype is not None and info.dtype not in (*_FLOATS, "uint8"):
        return f"is an image, but input {info.name!r} is {info.dtype}: give .npy samples of that dtype"
    return None


def normalisation_problem(values, info: InputInfo, key: str) -> str | None:
    """Whether one input's ``mean_values``/``std_values`` entry has the count the toolkit expects."""
    for shape in info.shapes:
        want = channel_count(shape)
        if len(values) != want:
            where = f"dim 1 of {list(shape)}" if channel_axis(shape) is not None else f"rank-1 input {list(shape)}"
            unused = "" if is_normalised(shape) else "; the toolkit checks but does not apply them to non-4-D inputs"
            if len(shape) == 4 and len(values) == shape[3] != shape[1]:
                unused += ("; it counts dim 1 of an NHWC input too, so per-colour values cannot be given: "
                           "normalise inside the model, or give the model an NCHW input")
            return (f"{key} for input {info.name!r} has {len(values)} value(s), but the toolkit expects "
                    f"{want} ({where}){unused}")
    return None
