"""The calibration dataset file the toolkit reads, written by the pipeline from the manifest's samples.

Why the pipeline writes it: the toolkit's format is one line per calibration
step with one path per input, separated by spaces, in the model's input order.
A path holding a space (a checkout under ``My Models/``) is split in two, and
the per-input order is something users had to guess. The manifest gives the
samples (one file, or a mapping input name -> samples); this module lays them
out in a directory under ``build/`` as links (or decoded ``.npy`` arrays for
images given per input) whose names hold no space, and writes a dataset file
that names them relative to itself, which the toolkit resolves against the
file's own directory. The accuracy check reads the same files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline import files
from pipeline.inputs import image_layout, is_image, sample_shape


def write_dataset(quant: dict, directory: Path, dataset_file: Path) -> list[list[str]]:
    """Lay out ``quant["samples"]`` in ``directory`` and write ``dataset_file``; return the laid-out rows.

    ``quant["images"]`` (one entry per input, or None) says how an image given
    for that input is decoded: ``{"shape", "dtype", "layout", "colour"}``;
    without it the image is linked and the toolkit decodes it.
    """
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)  # samples of an earlier manifest must not linger
    directory.mkdir(parents=True)
    images = quant.get("images") or []
    lines, rows = [], []
    for step, row in enumerate(quant.get("samples") or []):
        names = []
        for index, source in enumerate(row):
            decode = images[index] if index < len(images) else None
            if decode and is_image(source):
                name = f"s{step:04d}-i{index}.npy"
                _save_decoded(source, decode, directory / name)
            else:
                name = f"s{step:04d}-i{index}{Path(source).suffix.lower()}"
                _link(source, directory / name)
            names.append(name)
        lines.append(" ".join(names))
        rows.append([str(directory / name) for name in names])
    files.atomic_write_text(dataset_file, "".join(f"{line}\n" for line in lines))
    return rows


def rows_per_shape(quant: dict, sets: list[dict], directory: Path) -> list[list[list[str]]]:
    """For a dynamic model's accuracy check: per shape set, the calibration steps that fit it.

    The toolkit calibrates at the largest set only; verify runs at every set.
    Images given per input are decoded again at each set's shapes (under
    ``directory``), images of a dataset file are resized by verify itself, and
    ``.npy`` samples serve the sets whose shapes they have.
    """
    images = quant.get("images") or []
    result = []
    for index, shape_set in enumerate(sets):
        shapes = [tuple(shape) for shape in shape_set.values()]
        rows = []
        for step, row in enumerate(quant.get("samples") or []):
            paths = []
            for position, source in enumerate(row):
                decode = images[position] if position < len(images) else None
                if decode and is_image(source):
                    decoded = Path(directory) / f"set{index}" / f"s{step:04d}-i{position}.npy"
                    _save_decoded(source, {**decode, "shape": list(shapes[position])}, decoded)
                    paths.append(str(decoded))
                elif is_image(source) or sample_shape(source) == shapes[position]:
                    paths.append(source)
            if len(paths) == len(row):
                rows.append(paths)
        result.append(rows)
    return result


def _link(source: str, link: Path) -> None:
    try:
        os.symlink(os.path.abspath(source), link)
    except OSError:  # a filesystem without symlinks: a copy costs space, not correctness
        files.atomic_copy(Path(source), link)


def decode_image(path: str, decode: dict):
    """An image as the input wants it: resized to its H x W, colour order and layout, batch repeated."""
    import cv2
    import numpy as np

    shape = decode["shape"]
    layout = image_layout(shape, decode.get("layout"))
    batch, height, width, channels = ((shape[0], shape[2], shape[3], shape[1]) if layout == "nchw"
                                      else tuple(shape))
    image = cv2.imread(path, cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot read the image {path}")
    if channels == 3 and decode.get("colour", "rgb") == "rgb":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)  # OpenCV decodes to BGR
    image = cv2.resize(image, (width, height)).reshape(height, width, channels)
    array = np.repeat(image[np.newaxis], batch, axis=0)
    if layout == "nchw":
        array = array.transpose(0, 3, 1, 2)
    dtype = decode.get("dtype") or "float32"
    return np.ascontiguousarray(array.astype(dtype))


def _save_decoded(source: str, decode: dict, destination: Path) -> None:
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, decode_image(source, decode))
    files.atomic_write_bytes(destination, buffer.getvalue())
