"""``pipeline/inputs.py`` against the real rknn-toolkit2: how many mean/std values an input takes, and where.

``tests/input_probe.py`` builds a one-node model per input shape with every
candidate count of mean values (in a subprocess: the toolkit prints from C++
to fd 1). The toolkit must accept exactly the count ``inputs.channel_count``
predicts and apply the values along axis 1 exactly when
``inputs.is_normalised`` says so. The measured table is the "Model inputs"
section of ``docs/platform-facts.md``; after a deliberate change rewrite it
with ``RKNN_INPUT_FACTS_WRITE=1 uv run pytest tests/test_input_facts.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import inputs, shapes

pytestmark = pytest.mark.toolkit

REPO = Path(__file__).resolve().parent.parent
PROBE = REPO / "tests" / "input_probe.py"
DOC = REPO / "docs" / "platform-facts.md"
WRITE_DOC = "RKNN_INPUT_FACTS_WRITE"
MARKER = "\n<!-- input facts -->\n"  # the platform table's test owns everything before it


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("input-probe")
    out, log = work / "results.json", work / "probe.log"
    with log.open("wb") as sink:
        proc = subprocess.run([sys.executable, str(PROBE), str(out)], cwd=REPO, stdout=sink,
                              stderr=subprocess.STDOUT, timeout=600)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"input probe failed ({proc.returncode}):\n{log.read_bytes()[-4000:].decode(errors='replace')}")
    return json.loads(out.read_text())


def test_the_toolkit_takes_exactly_the_predicted_channel_count(probe):
    wrong = []
    for result in probe["results"]:
        shape, count = result["shape"], result["count"]
        expected = "accepted" if count == inputs.channel_count(shape) else "refused"
        if result["outcome"] != expected:
            wrong.append(f"{shape} with {count} values: toolkit {result['outcome']} ({result['message']}), "
                         f"pipeline.inputs predicts {expected}")
        if expected == "refused" and result["outcome"] == "refused":
            assert f"expect {inputs.channel_count(shape)}" in result["message"]
    assert not wrong, "\n".join(wrong)
    assert probe["toolkit"] == "2.5.0"


def test_mean_values_apply_along_axis_1_of_4d_inputs_only(probe):
    for result in probe["results"]:
        if result["outcome"] == "accepted":
            expected = inputs.channel_axis(result["shape"]) if inputs.is_normalised(result["shape"]) else None
            assert result["applied_axis"] == expected, result


def test_dynamic_input_limits_are_the_ones_the_manifest_enforces(probe):
    """What pipeline.shapes and the manifest assume about dynamic_input, case by case."""
    for result in probe["dynamic"]:
        sets = [{"x": shape} for shape in result["sets"]]
        static_dims = [d for d in result["dims"] if isinstance(d, int)]
        fixed_dim_varies = any(axis < len(shape) and shape[axis] != d for shape in result["sets"]
                               for axis, d in enumerate(result["dims"]) if isinstance(d, int))
        if any(len(shape) != len(result["dims"]) for shape in result["sets"]):
            # the manifest refuses a shape whose rank is not the model input's (as for one shape)
            assert result["outcome"] == "refused", result
        elif fixed_dim_varies:
            assert (result["outcome"], result["step"]) == ("refused", "load_onnx"), result
            assert "not match" in result["message"]
        elif result["size_list"]:
            assert (result["outcome"], result["step"]) == ("refused", "build"), result
        elif result["calibration"] != shapes.largest(sets)["x"]:
            assert (result["outcome"], result["step"]) == ("refused", "build"), result
            assert f"like {tuple(shapes.largest(sets)['x'])}" in result["message"]
        else:
            assert result["outcome"] == "accepted", result
        assert static_dims  # every case keeps batch and channels static
    assert max(len(r["sets"]) for r in probe["dynamic"] if r["outcome"] == "accepted") == 64


def render(probe: dict) -> str:
    lines = [
        f"## Model inputs (measured with rknn-toolkit2 {probe['toolkit']})",
        "",
        "How many `mean_values`/`std_values` an input takes, measured by `tests/input_probe.py` and checked",
        "against `pipeline/inputs.py` by `tests/test_input_facts.py`: a `y = x + 0.5` model per input shape,",
        "built float on rk3588 with each candidate count, then simulated on a zero input to see along which",
        "axis the values were subtracted. The toolkit counts dim 1 whatever the rank and layout (an NHWC",
        "`[1, 8, 8, 3]` input wants 8 values), never broadcasts a single value, and applies the values to",
        "4-D inputs only. Regenerate with",
        f"`{WRITE_DOC}=1 uv run pytest tests/test_input_facts.py`.",
        "",
        "| input shape | values accepted | values refused | applied along |",
        "| --- | --- | --- | --- |",
    ]
    by_shape: dict[tuple, list[dict]] = {}
    for result in probe["results"]:
        by_shape.setdefault(tuple(result["shape"]), []).append(result)
    for shape, results in by_shape.items():
        accepted = [r for r in results if r["outcome"] == "accepted"]
        refused = [f"{r['count']} (`{r['message']}`)" for r in results if r["outcome"] != "accepted"]
        axes = {r["applied_axis"] for r in accepted}
        applied = ", ".join("not applied" if a is None else f"axis {a}" for a in sorted(axes, key=str))
        lines.append(f"| {list(shape)} | {', '.join(str(r['count']) for r in accepted) or 'none'} | "
                     f"{'; '.join(refused) or 'none'} | {applied or '-'} |")
    lines += [
        "",
        f"### `dynamic_input` (measured with rknn-toolkit2 {probe['toolkit']})",
        "",
        "One model for several shape sets (`shapes: dynamic`): a recogniser-like model (`x` is `[1, 3, 48, W]`",
        "or `[1, 3, H, W]` in the ONNX file) built w8a8 on rk3588 with two `.npy` calibration samples of the",
        "given shape, then simulated at every set. The manifest enforces what is refused here: samples at the",
        "set with the most elements, only dims dynamic in the ONNX model may vary, and no `input_size_list`",
        "(so a dynamic model names every model input, in order). No limit on the number of sets was found.",
        "",
        "| case | model input | shape sets | calibration shape | outcome |",
        "| --- | --- | --- | --- | --- |",
    ]
    for result in probe["dynamic"]:
        sets = result["sets"]
        shown = (", ".join(str(s) for s in sets) if len(sets) <= 3
                 else f"{len(sets)} sets, {sets[0]} to {sets[-1]}")
        outcome = result["outcome"] + (f" in {result['step']}: `{result['message']}`" if result["message"] else "")
        lines.append(f"| {result['case']} | {result['dims']} | {shown} | {result['calibration']} | {outcome} |")
    return "\n".join(lines) + "\n"


def test_input_facts_doc_is_current(probe):
    """Everything after the marker is this test's; everything before it the platform table's."""
    text = render(probe)
    head, _, rest = DOC.read_text().partition(MARKER)
    if os.environ.get(WRITE_DOC):
        DOC.write_text(head + MARKER + text)
        rest = text
    assert rest == text, (f"the Model inputs section of {DOC.relative_to(REPO)} is out of date: regenerate it "
                          f"with {WRITE_DOC}=1 uv run pytest tests/test_input_facts.py")
