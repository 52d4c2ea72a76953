"""Model inputs: several inputs, calibration samples checked at load, and the toolkit's dataset file.

The load-time checks run without the toolkit (the manifest must report every
sample the toolkit would misread, with line and column, all at once). The
toolkit tests build the two multi-input examples quantized in a checkout whose
path holds spaces and non-ASCII characters, the case that used to break every
quantized build.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline import inputs, verify
from pipeline.calibration import decode_image, write_dataset
from pipeline.manifest import ManifestError, load_manifest

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "examples" / "models"
JPEG = REPO / "examples" / "calib" / "sample_0.jpg"


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """The two multi-input models and samples of every good and bad kind."""
    for name in ("tiny_detector.onnx", "tiny_two_tower.onnx"):
        shutil.copy(MODELS / name, tmp_path / name)
    calib = tmp_path / "calib"
    calib.mkdir()
    saves = {
        "image_0": np.zeros((1, 3, 32, 32), np.float32),
        "image_1": np.ones((1, 3, 32, 32), np.uint8),
        "image_nhwc": np.zeros((1, 32, 32, 3), np.float32),
        "image_small": np.zeros((1, 3, 16, 16), np.float32),
        "scale_0": np.full((1, 4), 32, np.float32),
        "scale_1": np.full((1, 4), 64, np.float32),
        "ids_0": np.arange(8, dtype=np.int64).reshape(1, 8),
        "ids_float": np.zeros((1, 8), np.float32),
        "mask_0": np.ones((1, 8), np.float32),
    }
    for name, array in saves.items():
        np.save(calib / f"{name}.npy", array)
    shutil.copy(JPEG, calib / "photo.jpg")
    (calib / "pairs.txt").write_text("image_0.npy scale_0.npy\nimage_1.npy scale_1.npy\n")
    (calib / "bad pairs.txt").write_text("image_small.npy scale_0.npy\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def manifest(workdir: Path, body: str, source: str = "tiny_detector.onnx") -> Path:
    text = f"version: 1\nmodels:\n  - name: m\n    source: {source}\n    targets: [rk3588]\n"
    path = workdir / "models.yaml"
    path.write_text(text + textwrap.indent(textwrap.dedent(body), "    "))
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path.name)
    return [str(problem) for problem in caught.value.problems]


# --- the toolkit's rules, as measured -------------------------------------------


@pytest.mark.parametrize(("shape", "count"), [((1, 4), 4), ((1, 3, 32, 32), 3), ((1, 32, 32, 3), 32),
                                              ((1, 6, 5), 6), ((1, 2, 3, 4, 5), 2), ((5,), 1)])
def test_channel_count_is_dim_1_whatever_the_rank(shape, count):
    assert inputs.channel_count(shape) == count


def test_verify_and_the_manifest_agree_on_a_2d_input():
    """The issue's case: [1, 3, 32, 32] + [1, 4] with 3 + 4 mean values used to fail verify."""
    import onnx

    model = onnx.load(str(MODELS / "tiny_detector.onnx"))
    config = {"mean_values": [[0, 0, 0], [0, 0, 0, 0]], "std_values": [[1, 1, 1], [1, 1, 1, 1]]}
    specs = verify.input_specs(model, {}, config)
    assert [spec.mean.size for spec in specs] == [3, 4]
    info = inputs.InputInfo("scale", ((1, 4),), "float32")
    assert inputs.normalisation_problem([0, 0, 0, 0], info, "mean_values") is None
    assert "expects 4 (dim 1 of [1, 4])" in inputs.normalisation_problem([0], info, "mean_values")


# --- checked at load, all at once -------------------------------------------------


def test_a_good_mapping_is_laid_out_in_input_order(workdir):
    path = manifest(workdir, """\
        mean_values: { image: [0, 0, 0] }
        std_values: { image: [255, 255, 255] }
        quantization:
          dataset:
            scale: [calib/scale_0.npy, calib/scale_1.npy]
            image: [calib/image_0.npy, calib/image_1.npy]
        """)
    model = load_manifest(path.name).models[0]
    assert model["mean_values"] == [[0, 0, 0], [0, 0, 0, 0]]  # the input left out gets neutral values
    assert model["std_values"] == [[255, 255, 255], [1, 1, 1, 1]]
    calib = workdir / "calib"
    assert model["quantization"]["samples"] == [[str(calib / "image_0.npy"), str(calib / "scale_0.npy")],
                                                [str(calib / "image_1.npy"), str(calib / "scale_1.npy")]]
    assert model["quantization"]["images"] == [None, None]


def test_every_sample_problem_is_reported_at_its_line_and_column(workdir):
    path = manifest(workdir, """\
        mean_values: { image: [0, 0, 0], scale: [0], scael: [1] }
        quantization:
          dataset:
            image: [calib/image_nhwc.npy, calib/image_small.npy, calib/image_0.npy]
            scale: [calib/photo.jpg, calib/scale_0.npy, calib/scale_1.npy]
        """)
    found = problems(path)
    assert found == [
        "models.yaml:6:45: mean_values for input 'scale' has 1 value(s), but the toolkit expects 4 (dim 1 of "
        "[1, 4]); the toolkit checks but does not apply them to non-4-D inputs",
        "models.yaml:6:50: mean_values names 'scael', which is not an input of the model; did you mean 'scale'? "
        "(inputs: image, scale)",
        "models.yaml:9:17: sample 'image_nhwc.npy' has shape [1, 32, 32, 3], the NHWC form of input 'image' "
        "[1, 3, 32, 32]: the toolkit reads .npy samples in the input's own layout (NCHW here); save it with "
        "array.transpose(0, 3, 1, 2)",
        "models.yaml:9:39: sample 'image_small.npy' has shape [1, 3, 16, 16] but input 'image' is [1, 3, 32, 32]",
        "models.yaml:10:17: sample 'photo.jpg' is an image, but input 'scale' [1, 4] is not image-like "
        "(4-D with 1 or 3 channels): give .npy samples",
    ]


def test_names_counts_and_dtypes(workdir):
    path = manifest(workdir, """\
        quantization:
          dataset:
            image: [calib/image_0.npy]
            ids: [calib/ids_float.npy, calib/ids_0.npy]
            text: [calib/nope.npy]
        """, source="tiny_two_tower.onnx")
    found = problems(path)
    assert "models.yaml:8:9: dataset has no samples for input(s) 'mask': give samples for every input" in found
    assert ("models.yaml:8:9: every input needs the same number of samples (one per calibration step); "
            "got image: 1, ids: 2, text: 1") in found
    assert any(p.startswith("models.yaml:10:16: sample 'calib/nope.npy' does not exist") for p in found)
    assert any(p.startswith("models.yaml:10:9: dataset names 'text', which is not an input") for p in found)
    assert ("models.yaml:9:15: sample 'ids_float.npy' has dtype float32 but input 'ids' is int64: save it with "
            ".astype('int64')") in found  # samples of known inputs are checked whatever else is wrong
    assert len(found) == 5

    path = manifest(workdir, """\
        quantization:
          dataset:
            image: [calib/image_0.npy]
            ids: [calib/ids_float.npy]
            mask: [calib/mask_0.npy]
        """, source="tiny_two_tower.onnx")
    assert problems(path) == ["models.yaml:9:15: sample 'ids_float.npy' has dtype float32 but input 'ids' is "
                              "int64: save it with .astype('int64')"]


def test_the_dataset_file_form_is_checked_sample_by_sample(workdir):
    path = manifest(workdir, "quantization: { dataset: calib/bad pairs.txt }\n")
    assert problems(path) == ["models.yaml:6:30: dataset 'calib/bad pairs.txt' line 1: sample 'image_small.npy' "
                              "has shape [1, 3, 16, 16] but input 'image' is [1, 3, 32, 32]"]
    model = load_manifest(manifest(workdir, "quantization: { dataset: calib/pairs.txt }\n").name).models[0]
    assert model["quantization"]["samples"][1] == [str(workdir / "calib" / "image_1.npy"),
                                                   str(workdir / "calib" / "scale_1.npy")]


def test_list_form_mean_values_are_counted_per_input(workdir):
    good = manifest(workdir, "mean_values: [[0, 0, 0], [0, 0, 0, 0]]\nstd_values: [[1, 1, 1], [1, 1, 1, 1]]\n")
    assert load_manifest(good.name).models[0]["mean_values"] == [[0, 0, 0], [0, 0, 0, 0]]
    bad = manifest(workdir, "mean_values: [[0, 0, 0], [0]]\nstd_values: [[1, 1, 1], [1]]\n")
    assert [p.split(": ", 1)[0] for p in problems(bad)] == ["models.yaml:6:30", "models.yaml:7:29"]


def test_image_samples_are_decoded_by_the_pipeline(workdir, tmp_path):
    path = manifest(workdir, """\
        quantization:
          dataset:
            image: { samples: [calib/photo.jpg, calib/photo.jpg], colour: bgr }
            scale: [calib/scale_0.npy, calib/scale_1.npy]
        """)
    quant = load_manifest(path.name).models[0]["quantization"]
    assert quant["images"] == [{"shape": [1, 3, 32, 32], "dtype": "float32", "layout": "nchw", "colour": "bgr"},
                               None]
    out = tmp_path / "laid out with spaces"
    rows = write_dataset(quant, out, out / "dataset.txt")
    lines = (out / "dataset.txt").read_text().splitlines()
    assert lines == ["s0000-i0.npy s0000-i1.npy", "s0001-i0.npy s0001-i1.npy"]
    decoded = np.load(rows[0][0])
    assert decoded.shape == (1, 3, 32, 32) and decoded.dtype == np.float32
    import cv2

    bgr = cv2.resize(cv2.imread(str(JPEG)), (32, 32))
    assert np.array_equal(decoded[0].transpose(1, 2, 0), bgr.astype(np.float32))  # colour: bgr keeps OpenCV's order
    rgb = decode_image(str(JPEG), {**quant["images"][0], "colour": "rgb"})
    assert np.array_equal(rgb[0, 0], decoded[0, 2])
    assert np.array_equal(np.load(rows[1][1]), np.full((1, 4), 64, np.float32))  # .npy samples are links


def test_a_declared_layout_must_fit_the_input(workdir):
    path = manifest(workdir, """\
        quantization:
          dataset:
            image: { samples: [calib/photo.jpg], layout: nhwc }
            scale: [calib/scale_0.npy]
        """)
    assert problems(path) == ["models.yaml:8:28: sample 'photo.jpg' is an image, but input 'image' [1, 3, 32, 32] "
                              "is not image-like with layout nhwc (4-D with 1 or 3 channels): give .npy samples"]


# --- the real toolkit -------------------------------------------------------------

MULTI = """\
version: 1
defaults:
  targets: [rk3588]
  verify: { samples: 2, min_cosine: 0.98 }
models:
  - name: detector
    source: examples/models/tiny_detector.onnx
    mean_values: { image: [0, 0, 0] }
    std_values: { image: [255, 255, 255] }
    quantization:
      dataset:
        image: [examples/calib/multi/image_0.npy, examples/calib/multi/image_1.npy]
        scale: [examples/calib/multi/scale_0.npy, examples/calib/multi/scale_1.npy]
  - name: detector_file
    source: examples/models/tiny_detector.onnx
    mean_values: [[0, 0, 0], [0, 0, 0, 0]]
    std_values: [[255, 255, 255], [1, 1, 1, 1]]
    quantization: { dataset: "calib set é.txt" }
  - name: detector_jpeg
    source: examples/models/tiny_detector.onnx
    mean_values: { image: [0, 0, 0] }
    std_values: { image: [255, 255, 255] }
    quantization:
      dataset:
        image: { samples: [examples/calib/sample_0.jpg, examples/calib/sample_1.jpg], colour: rgb }
        scale: [examples/calib/multi/scale_0.npy, examples/calib/multi/scale_1.npy]
  - name: two_tower
    source: examples/models/tiny_two_tower.onnx
    mean_values: { image: [0, 0, 0] }
    std_values: { image: [255, 255, 255] }
    quantization:
      dataset:
        image: [examples/calib/multi/image_0.npy, examples/calib/multi/image_1.npy]
        ids: [examples/calib/multi/ids_0.npy, examples/calib/multi/ids_1.npy]
        mask: [examples/calib/multi/mask_0.npy, examples/calib/multi/mask_1.npy]
"""


@pytest.mark.toolkit
def test_quantized_multi_input_builds_in_a_path_with_spaces_and_accents(tmp_path):
    from conftest import Project

    root = tmp_path / "my models é ü"
    root.mkdir()
    project = Project(root)
    (root / "calib set é.txt").write_text("examples/calib/multi/image_0.npy examples/calib/multi/scale_0.npy\n"
                                          "examples/calib/multi/image_1.npy examples/calib/multi/scale_1.npy\n")
    project.write_manifest(MULTI)
    project.doit()
    for name in ("detector", "detector_file", "detector_jpeg", "two_tower"):
        sidecar = json.loads((root / "dist" / "rk3588" / f"{name}.json").read_text())
        assert sidecar["verify"]["passed"] and sidecar["verify"]["input_source"] == "dataset", name
        assert sidecar["arguments"]["build"]["do_quantization"] is True
        listing = root / "build" / name / "rk3588" / "calibration" / "dataset.txt"
        lines = listing.read_text().splitlines()
        assert len(lines) == 2 and all(" " not in path for line in lines for path in line.split())
        log = (root / "build" / name / "rk3588" / "convert.log").read_text()
        assert "Quantize calibration include 2 samples" in log, name
    detector = json.loads((root / "dist" / "rk3588" / "detector.json").read_text())
    assert [s["path"] for s in detector["inputs"]["dataset"]["samples"]] == [
        "examples/calib/multi/image_0.npy", "examples/calib/multi/scale_0.npy",
        "examples/calib/multi/image_1.npy", "examples/calib/multi/scale_1.npy"]


# --- several shapes: buckets and one dynamic model ------------------------------

WIDTHS = "inputs: { x: [[1, 3, 48, 160], [1, 3, 48, 320], [1, 3, 48, 640]] }\n"


@pytest.fixture
def recogniser(workdir) -> Path:
    shutil.copy(MODELS / "tiny_recogniser.onnx", workdir / "rec.onnx")
    for width in (160, 320, 640):
        np.save(workdir / "calib" / f"line_{width}.npy", np.zeros((1, 3, 48, width), np.float32))
    return workdir


def test_buckets_become_units_of_work_with_their_own_names_and_samples(recogniser):
    path = manifest(recogniser, WIDTHS + textwrap.dedent("""\
        quantization:
          dataset:
            x: [calib/line_160.npy, calib/line_320.npy, calib/line_640.npy, calib/photo.jpg]
        """), source="rec.onnx")
    loaded = load_manifest(path.name)
    assert [m["name"] for m in loaded.models] == ["m.1x3x48x160", "m.1x3x48x320", "m.1x3x48x640"]
    bucket = loaded.model("m.1x3x48x320")
    assert bucket["inputs"] == {"x": [1, 3, 48, 320]} and bucket["bucket"]["model"] == "m"
    calib = recogniser / "calib"
    assert bucket["quantization"]["samples"] == [[str(calib / "line_320.npy")], [str(calib / "photo.jpg")]]
    assert bucket["quantization"]["images"][0]["shape"] == [1, 3, 48, 320]  # the image is decoded per bucket
    from pipeline.conversion import toolkit_arguments

    args = toolkit_arguments(bucket, "rk3588", "rec.onnx")
    assert args["load_onnx"]["input_size_list"] == [[1, 3, 48, 320]] and "dynamic_input" not in args["config"]


def test_a_dynamic_model_is_one_unit_calibrated_at_its_largest_set(recogniser):
    path = manifest(recogniser, WIDTHS + "shapes: dynamic\nquantization: { dataset: { x: [calib/line_640.npy] } }\n",
                    source="rec.onnx")
    (model,) = load_manifest(path.name).models
    assert model["name"] == "m" and model["inputs"] == {"x": [1, 3, 48, 640]} and len(model["shape_sets"]) == 3
    from pipeline.conversion import toolkit_arguments

    args = toolkit_arguments(model, "rk3588", "rec.onnx")
    assert args["config"]["dynamic_input"] == [[[1, 3, 48, 160]], [[1, 3, 48, 320]], [[1, 3, 48, 640]]]
    assert args["load_onnx"] == {}  # the toolkit's build fails with input_size_list beside dynamic_input


def test_shape_problems_are_reported_at_load(recogniser):
    bad_lists = manifest(recogniser, "inputs: { x: [[1, 3, 48, 160], 320] }\n", source="rec.onnx")
    assert [p.split(": ", 1)[1] for p in problems(bad_lists)] == [
        "input 'x' mixes dims and shapes: give one shape [1, 3, 224, 224] or a list of shapes "
        "[[1, 3, 48, 160], [1, 3, 48, 320]]"]
    unequal = manifest(recogniser, "inputs: { image: [[1, 3, 32, 32], [1, 3, 64, 64]], "
                       "scale: [[1, 4], [1, 4], [1, 4]] }\n")
    assert problems(unequal) == ["models.yaml:6:13: inputs with a list of shapes must list the same number "
                                 "(one per shape set); got image: 2, scale: 3"]
    static_dim = manifest(recogniser, "inputs: { x: [[1, 3, 48, 160], [1, 3, 96, 160]] }\nshapes: dynamic\n",
                          source="rec.onnx")
    assert problems(static_dim) == ["models.yaml:6:36: shape [1, 3, 96, 160] changes dim 2, which the model fixes "
                                    "at 48: the toolkit refuses it in dynamic_input (only dims dynamic in the ONNX "
                                    "model may vary)"]
    rank = manifest(recogniser, "inputs: { x: [[1, 3, 48, 160], [3, 48, 320]] }\nshapes: dynamic\n", source="rec.onnx")
    assert problems(rank) == ["models.yaml:6:15: input 'x' has 4 dimensions in the model, but 3 are given"]
    twice = manifest(recogniser, WIDTHS + "shapes: dynamic\noptions: { dynamic_input: [[[1, 3, 48, 160]]] }\n",
                     source="rec.onnx")
    assert problems(twice)[0].startswith("models.yaml:8:31: options.dynamic_input and a list of shapes in inputs")
    reordered = manifest(recogniser, "inputs: { scale: [[1, 4], [1, 4]], image: [[1, 3, 32, 32], [1, 3, 64, 64]] }\n"
                         "shapes: dynamic\n")
    assert "list every model input in the model's order (image, scale)" in problems(reordered)[0]


def test_samples_must_fit_the_toolkits_calibration_shape(recogniser):
    dynamic = manifest(recogniser, WIDTHS + "shapes: dynamic\n"
                       "quantization: { dataset: { x: [calib/line_320.npy] } }\n", source="rec.onnx")
    assert problems(dynamic) == ["models.yaml:8:36: sample 'line_320.npy' has shape [1, 3, 48, 320] but input 'x' "
                                 "is [1, 3, 48, 640]"]
    buckets = manifest(recogniser, WIDTHS + "quantization: { dataset: { x: [calib/line_160.npy, calib/line_640.npy] } }\n",
                       source="rec.onnx")
    assert problems(buckets) == ["models.yaml:7:30: bucket 'm.1x3x48x320' has no calibration step whose samples all "
                                 "have its shapes (x [1, 3, 48, 320]): add .npy samples of that shape, or give "
                                 "images, which are resized"]


def test_a_bucket_name_may_not_clash_with_a_model(recogniser):
    text = (f"version: 1\nmodels:\n  - name: m.1x3x48x320\n    source: rec.onnx\n    targets: [rk3588]\n"
            f"  - name: m\n    source: rec.onnx\n    targets: [rk3588]\n    {WIDTHS}")
    (recogniser / "models.yaml").write_text(text)
    assert problems(recogniser / "models.yaml") == [
        "models.yaml:9:13: bucket 'm.1x3x48x320' of this model has the name of the model at line 3"]


ROWS = """\
version: 1
defaults:
  targets: [rk3588]
  verify: { samples: 2, min_cosine: 0.98 }
  mean_values: [[0, 0, 0]]
  std_values: [[255, 255, 255]]
  quantization:
    dataset: { x: [examples/calib/sample_0.jpg, examples/calib/sample_1.jpg] }
models:
  - name: rec
    source: examples/models/tiny_recogniser.onnx
    inputs: { x: [[1, 3, 48, 160], [1, 3, 48, 320], [1, 3, 48, 640]] }
  - name: rec_dynamic
    source: examples/models/tiny_recogniser.onnx
    inputs: { x: [[1, 3, 48, 160], [1, 3, 48, 320], [1, 3, 48, 640]] }
    shapes: dynamic
"""


@pytest.mark.toolkit
def test_a_recogniser_builds_as_buckets_and_as_one_dynamic_model_verified_at_each_width(tmp_path):
    from conftest import Project

    project = Project(tmp_path)
    project.write_manifest(ROWS)
    first = project.doit()
    dist = tmp_path / "dist" / "rk3588"
    for width in (160, 320, 640):
        name = f"rec.1x3x48x{width}"
        sidecar = json.loads((dist / f"{name}.json").read_text())
        assert (dist / f"{name}.rknn").stat().st_size > 1000
        assert sidecar["shapes"] == {"mode": "buckets", "model": "rec", "inputs": {"x": [1, 3, 48, width]}}
        assert sidecar["verify"]["passed"] and sidecar["verify"]["input_source"] == "dataset"
        assert sidecar["verify"]["outputs"][0]["shape"] == [1, 10, 1, width // 4]
        assert f"convert {name}@rk3588" in first.stdout
    dynamic = json.loads((dist / "rec_dynamic.json").read_text())
    assert dynamic["arguments"]["config"]["dynamic_input"] == [[[1, 3, 48, w]] for w in (160, 320, 640)]
    per_width = dynamic["verify"]["shapes"]
    assert [s["inputs"]["x"][3] for s in per_width] == [160, 320, 640]
    assert all(s["passed"] and s["outputs"][0]["cosine"] >= 0.98 for s in per_width)
    assert all(s["input_source"] == "dataset" for s in per_width)  # the images, decoded at each width
    assert [s["outputs"][0]["shape"] for s in per_width] == [[1, 10, 1, w // 4] for w in (160, 320, 640)]
    lock = json.loads((tmp_path / "dist" / "models.lock.json").read_text())["entries"]
    assert sorted(lock) == ["rk3588/rec.1x3x48x160", "rk3588/rec.1x3x48x320", "rk3588/rec.1x3x48x640",
                            "rk3588/rec_dynamic"]
    keys = {json.loads((tmp_path / "build" / f"rec.1x3x48x{w}" / "rk3588" / "convert.json").read_text())
            ["cache"]["key"] for w in (160, 320, 640)}
    assert len(keys) == 3  # each bucket is its own conversion identity


def test_an_nhwc_input_gets_a_hint_about_the_toolkits_channel_axis():
    info = inputs.InputInfo("image", ((1, 32, 32, 3),), "float32")
    problem = inputs.normalisation_problem([0, 0, 0], info, "mean_values")
    assert "expects 32 (dim 1 of [1, 32, 32, 3])" in problem and "counts dim 1 of an NHWC input too" in problem
    assert inputs.image_layout((1, 32, 32, 3)) == "nhwc" and inputs.image_layout((1, 3, 32, 3)) == "nchw"
    assert inputs.image_layout((1, 3, 32, 32), "nhwc") is None


def test_shape_sets_names_and_largest():
    from pipeline import shapes

    declared = {"image": [[1, 3, 32, 32], [1, 3, 64, 64]], "scale": [1, 4], "ids": [[1, 8], [1, 16]]}
    sets = shapes.shape_sets(declared)
    assert sets == [{"image": [1, 3, 32, 32], "scale": [1, 4], "ids": [1, 8]},
                    {"image": [1, 3, 64, 64], "scale": [1, 4], "ids": [1, 16]}]
    assert shapes.varying(sets) == ["image", "ids"]
    assert shapes.bucket_names({"name": "m", "shape_sets": sets}) == ["m.1x3x32x32_1x8", "m.1x3x64x64_1x16"]
    assert shapes.largest([{"x": [1, 3, 96, 320]}, {"x": [1, 3, 48, 480]}]) == {"x": [1, 3, 96, 320]}  # most elements
    assert shapes.shape_sets({"x": [[1, 2], [1, 3]], "y": [[1], [2], [3]]}) is None  # unequal lists
    assert shapes.mode({"shape_sets": sets[:1], "shapes": "dynamic"}) is None  # one set: a static model


def make_nhwc_model(path: Path) -> Path:
    """image [1, 32, 32, 3] (NHWC, as TensorFlow exports) -> Transpose -> Conv -> Relu; seeded weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    weights = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.01).astype(np.float32), "w")]
    nodes = [helper.make_node("Transpose", ["image"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["nchw", "w"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "nhwc", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 32, 32, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 32, 32])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.toolkit
def test_images_for_an_nhwc_input_are_decoded_in_its_layout_and_colour_order(tmp_path):
    from conftest import Project

    project = Project(tmp_path)
    make_nhwc_model(tmp_path / "nhwc.onnx")
    project.write_manifest("""\
version: 1
models:
  - name: nhwc
    source: nhwc.onnx
    targets: [rk3588]
    verify: { samples: 2, min_cosine: 0.98 }
    quantization:
      dataset:
        image: { samples: [examples/calib/sample_0.jpg, examples/calib/sample_1.jpg], layout: nhwc, colour: bgr }
""")
    project.doit()
    sidecar = json.loads((tmp_path / "dist" / "rk3588" / "nhwc.json").read_text())
    assert sidecar["verify"]["passed"] and sidecar["verify"]["input_source"] == "dataset"
    decoded = np.load(tmp_path / "build" / "nhwc" / "rk3588" / "calibration" / "s0000-i0.npy")
    import cv2

    assert decoded.shape == (1, 32, 32, 3)
    assert np.array_equal(decoded[0], cv2.resize(cv2.imread(str(REPO / "examples/calib/sample_0.jpg")), (32, 32)))
