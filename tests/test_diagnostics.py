"""The diagnostics table against real rknn-toolkit2 output.

Every entry of ``pipeline/data/diagnostics.yaml`` must explain a line captured
from a real toolkit run (``fixtures/toolkit_logs``). The few messages that could
not be provoked are checked against lines made from the toolkit's own format
strings (``fixtures/toolkit_strings``) and listed in ``FROM_STRINGS_ONLY``, so
that list only changes on purpose.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline import diagnostics
from pipeline.diagnostics import error_lines, explain_log, load_table

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(__file__).parent / "fixtures" / "toolkit_logs"
STRINGS = Path(__file__).parent / "fixtures" / "toolkit_strings"
FROM_STRINGS_ONLY = {"cpu-fallback", "rknn-model-version-mismatch"}

# (fixture, table id, a phrase of its explanation): each entry has at least one.
EXPECTED = [
    ("averagepool_fallback.log", "averagepool-count-include-pad", "count_include_pad=0"),
    ("averagepool_unsupported_rk3562.log", "averagepool-unsupported", "cannot run this AveragePool"),
    ("transpose_size_limit.log", "transpose-size-limit", "larger than the NPU can transpose"),
    ("unknown_op_target.log", "unknown-op-target-0", "build carries on and succeeds"),
    ("unknown_op_target_pad_wrap.log", "unknown-op-target-0", "operators it runs on the CPU"),
    ("../toolkit_strings/librknnc_messages.log", "cpu-fallback", "moved it to the CPU"),
    ("regtask_overflow.log", "regtask-field-overflow", "register commands"),
    ("softmax_unsupported_axis.log", "softmax-unsupported-axis", "Softmax does not support the axis"),
    ("rnn_hidden_size.log", "rnn-hidden-size-alignment", "multiple of 32"),
    ("rv1106_no_quant.log", "float-build-refused", "only runs quantized models"),
    ("w4a16_rk3588.log", "quantized-dtype-unsupported", "not available on this platform"),
    ("w8a16_rk3588.log", "quantized-dtype-unsupported", "not available on this platform"),
    ("invalid_quantized_dtype.log", "quantization-setting-invalid", "does not know"),
    ("invalid_quantized_algorithm.log", "quantization-setting-invalid", "does not know"),
    ("invalid_quantized_method.log", "quantization-setting-invalid", "does not know"),
    ("invalid_float_dtype.log", "float-dtype-invalid", "options.float_dtype"),
    ("invalid_target_platform.log", "target-platform-invalid", "target platform"),
    ("optimization_level_replaced.log", "option-value-replaced", "used its default"),
    ("invalid_op_target_key.log", "op-target-key-invalid", "optimised graph does not have"),
    ("invalid_input_name.log", "input-name-invalid", "not an input"),
    ("invalid_input_name.log", "crop-notice", "harmless"),
    ("invalid_input_name.log", "warning-summary", "count of warnings"),
    ("invalid_output_name.log", "output-name-invalid", "not a tensor"),
    ("dynamic_input_shape.log", "dynamic-input-shape", "symbolic dimension"),
    ("dynamic_input_rank.log", "dynamic-input-rank", "number of dimensions"),
    ("dynamic_input_rank.log", "dynamic-input-notice", "options.dynamic_input is set"),
    ("mean_values_length.log", "normalisation-length", "channels"),
    ("normalisation_default.log", "normalisation-default", "mean 0, std 1"),
    ("model_file_missing.log", "model-file-missing", "does not exist"),
    ("onnx_opset_too_new.log", "onnx-opset-too-new", "newer ONNX opset"),
    ("dropout_opset9.log", "onnx-op-opset-unsupported", "no converter for this operator"),
    ("ir_version_too_new.log", "onnx-ir-version-too-new", "newer ONNX IR version"),
    ("input_shape_mismatch.log", "onnx-shape-inference", "input shape does not fit"),
    ("onnx_invalid_graph.log", "onnxruntime-rejected-model", "onnxruntime refused"),
    ("onnxruntime_pad_error.log", "onnxruntime-rejected-model", "onnxruntime refused"),
    ("../toolkit_strings/librknnc_messages.log", "rknn-model-version-mismatch", "different toolkit version"),
    ("dataset_file_missing.log", "dataset-file-missing", "dataset list does not exist"),
    ("dataset_sample_missing.log", "dataset-sample-missing", "does not exist"),
    ("dataset_two_files_per_line.log", "dataset-input-count", "different number of files"),
    ("dataset_empty.log", "dataset-input-count", "an empty list gives 0"),
    ("dataset_wrong_layout.log", "dataset-sample-shape", "wrong shape or layout"),
    ("qtype_float16_default.log", "qtype-float16-default", "stays float16"),
    ("int8_build_notices.log", "io-dtype-int8", "int8 by default"),
    ("int8_build_notices.log", "mini-rknn-forced", "compact model format"),
    ("int8_build_notices.log", "compute-order-env", "temporary environment variable"),
    ("w4a16_rk3588.log", "error-banner", "repeats its version"),
]


def read(name: str) -> str:
    return (REAL / name).read_text(encoding="utf-8")


def items_by_id(log_text: str, **kwargs) -> dict[str, dict]:
    return {item["id"]: item for item in explain_log(log_text, **kwargs)}


def write_table(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps(entries))  # JSON is YAML
    return path


def entry(**changes) -> dict:
    base = {"id": "some-entry", "pattern": "something", "level": "warning", "benign": False,
            "explanation": "Why.", "fix": "What to set.", "manifest_keys": ["inputs"]}
    return {**base, **changes}


# --- each entry explains its real line ----------------------------------------------------


@pytest.mark.parametrize(("fixture", "entry_id", "phrase"), EXPECTED,
                         ids=[f"{entry_id}:{Path(fixture).stem}" for fixture, entry_id, _ in EXPECTED])
def test_fixture_is_explained_by_its_entry(fixture, entry_id, phrase):
    items = items_by_id(read(fixture))
    assert entry_id in items, f"{fixture}: got {sorted(items)}"
    item = items[entry_id]
    assert phrase in item["explanation"]
    row = next(row for row in load_table() if row["id"] == entry_id)
    assert re.search(row["pattern"], item["example"])
    assert item["count"] >= 1
    assert set(item) == {"id", "level", "benign", "explanation", "fix", "count", "example"}


def test_every_entry_has_a_test():
    tested = {entry_id for _, entry_id, _ in EXPECTED}
    assert sorted(row["id"] for row in load_table() if row["id"] not in tested) == []


def test_every_entry_matches_a_real_capture_unless_listed():
    real = {item["id"] for path in REAL.glob("*.log") for item in explain_log(path.read_text())}
    strings = {item["id"] for path in STRINGS.glob("*.log") for item in explain_log(path.read_text())}
    ids = {row["id"] for row in load_table()}
    assert sorted(ids - real - FROM_STRINGS_ONLY) == []
    assert sorted(FROM_STRINGS_ONLY & real) == [], "captured for real now: drop it from FROM_STRINGS_ONLY"
    assert FROM_STRINGS_ONLY <= strings


@pytest.mark.parametrize("path", sorted(REAL.glob("*.log")), ids=lambda path: path.stem)
def test_real_captures_have_no_unexplained_error(path):
    unknown = [item["example"] for item in explain_log(path.read_text()) if item["id"] == "unknown-error"]
    assert unknown == []


def test_manifest_keys_exist_in_the_schema():
    known = _schema_paths()
    for row in load_table():
        assert set(row["manifest_keys"]) <= known, row["id"]


def _schema_paths() -> set[str]:
    """Dotted paths of a model entry in models.schema.json, plus the top-level ``toolkit``."""
    schema = json.loads((ROOT / "schema" / "models.schema.json").read_text())

    def resolve(node: dict) -> dict:
        while "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        return resolve(node["items"]) if "items" in node else node

    def walk(node: dict, prefix: str) -> set[str]:
        paths = set()
        for key, child in (resolve(node).get("properties") or {}).items():
            paths |= {prefix + key} | walk(child, prefix + key + ".")
        return paths

    return walk(schema["$defs"]["model"], "") | {"toolkit"}


# --- counting, benign lines, unexplained errors ---------------------------------------------


def test_counts_every_fallback_once():
    assert items_by_id(read("averagepool_fallback.log"))["averagepool-count-include-pad"]["count"] == 7


def test_traceback_repeat_of_an_error_is_not_counted_again():
    items = items_by_id(read("invalid_op_target_key.log"))
    assert items["op-target-key-invalid"]["count"] == 1


def test_error_only_in_a_traceback_is_still_explained():
    item = items_by_id(read("dataset_sample_missing.log"))["dataset-sample-missing"]
    assert item["example"].startswith("FileNotFoundError: [Errno 2] No such file or directory")


def test_benign_error_lines_do_not_count_as_errors():
    text = read("unknown_op_target.log")
    assert error_lines(text) == ["E RKNN: [13:47:07.535] Unkown op target: 0"]
    items = explain_log(text)
    assert [item["id"] for item in items] == ["unknown-op-target-0"]
    assert items[0]["benign"] is True and items[0]["level"] != "error"


def test_unexplained_error_is_quoted_verbatim(tmp_path):
    empty = write_table(tmp_path / "empty.yaml", [])
    examples = {item["example"]: item for item in explain_log(read("rv1106_no_quant.log"), table=empty)}
    line = "E build: Current target_platform(rv1106) not support do_quantization = False!"
    assert examples[line] == {"id": "unknown-error", "level": "error", "benign": False,
                              "explanation": "unexplained toolkit error", "fix": "see convert.log",
                              "count": 1, "example": line}


def test_unexplained_compiler_error_keeps_its_prefix_and_groups_repeats(tmp_path):
    empty = write_table(tmp_path / "empty.yaml", [])
    items = explain_log(read("regtask_overflow.log"), table=empty)
    prefix = "E RKNN: [13:50:50.385] REGTASK: The bit width of field value exceeds the limit, target: v2, "
    assert [(item["example"], item["count"]) for item in items] == [
        (f"{prefix}offset: 0x4030, shift = 0, limit: 0x1fff, value: 0x5fff", 2),
        (f"{prefix}offset: 0x405c, shift = 0, limit: 0x1fff, value: 0x5fff", 2),
    ]


def test_unexplained_traceback_error_quotes_the_exception_line(tmp_path):
    empty = write_table(tmp_path / "empty.yaml", [])
    examples = [item["example"] for item in explain_log(read("dataset_sample_missing.log"), table=empty)]
    assert "FileNotFoundError: [Errno 2] No such file or directory: 'calib/does_not_exist.npy'" in examples


# --- stripping colours and prefixes ------------------------------------------------------


def test_examples_have_no_colours_or_prefixes():
    items = items_by_id(read("invalid_input_name.log") + read("averagepool_fallback.log"))
    assert items["input-name-invalid"]["example"] == "load_onnx: The 'nope' in inputs=['nope'] is invalid!"
    assert items["averagepool-count-include-pad"]["example"] == "AveragePool count_include_pad=0, fallback to cpu"


def test_error_lines_strip_colours_only_and_drop_repeats():
    assert error_lines(read("w4a16_rk3588.log")) == [
        "E config: The quantized_dtype = 'w4a16' not support in 'rk3588'!",
        "E rknn-toolkit2 version: 2.5.0",
        "E config: Traceback (most recent call last):",
    ]


def test_error_glued_to_a_progress_bar_is_found():
    first = error_lines(read("dataset_wrong_layout.log"))[0]
    assert first.startswith("E build: The input('calib/ds3_0.npy') shape (1, 16, 16, 3) is wrong")


def test_multi_line_warning_is_one_message():
    items = items_by_id(read("int8_build_notices.log"))
    assert items["io-dtype-int8"]["count"] == 2  # input and output, each with an indented second line


# --- the table itself --------------------------------------------------------------------


def test_default_table_is_cached_and_copied():
    first = load_table()
    first[0]["id"] = "changed"
    assert load_table()[0]["id"] != "changed"
    assert diagnostics._compiled_table.cache_info().hits > 0


@pytest.mark.parametrize(("entries", "message"), [
    ({"not": "a list"}, "expected a list"),
    ([entry(extra=1)], r"entry 1 \('some-entry'\): unknown keys \['extra'\]"),
    ([{k: v for k, v in entry().items() if k != "fix"}], r"'some-entry'\): unknown keys \[\], missing keys \['fix'\]"),
    ([entry(pattern="fallback (to cpu")], r"'some-entry'\): bad pattern"),
    ([entry(), entry()], r"entry 2 \('some-entry'\): duplicate id"),
    ([entry(level="fatal")], r"'some-entry'\): level must be one of"),
    ([entry(benign="yes")], r"'some-entry'\): 'benign' must be a bool"),
    ([entry(benign=True, level="error")], r"'some-entry'\): a benign entry cannot have level error"),
    ([entry(id="Bad_Id")], r"'Bad_Id'\): id must be"),
    ([entry(id="unknown-error")], r"id must be .* not 'unknown-error'"),
    ([entry(explanation=" ")], r"explanation and fix must not be empty"),
    ([entry(manifest_keys=[""])], r"manifest_keys must be non-empty strings"),
    (["just a string"], r"entry 1: expected a mapping"),
])
def test_invalid_table_is_refused_naming_the_entry(tmp_path, entries, message):
    path = write_table(tmp_path / "table.yaml", entries)
    with pytest.raises(ValueError, match=message):
        load_table(path)


def test_invalid_yaml_is_refused(tmp_path):
    path = tmp_path / "table.yaml"
    path.write_text("- id: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_table(path)
