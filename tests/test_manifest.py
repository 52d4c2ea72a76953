"""Manifest loading: every kind of bad input must come back as a ManifestError
whose problems point at the exact line and column to fix, and good input must
come back as plain, normalised data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import platforms
from pipeline.manifest import Manifest, ManifestError, Problem, load_manifest
from pipeline.yaml_source import YamlError, parse_yaml

REPO = Path(__file__).resolve().parent.parent
SQUEEZENET = REPO / "examples" / "models" / "light_squeezenet.onnx"  # input data_0, output softmaxout_1
HEADER = "version: 1\nmodels:\n"


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A manifest directory with a model, a calibration set and some bad files."""
    import numpy as np

    shutil.copy(SQUEEZENET, tmp_path / "sq.onnx")
    (tmp_path / "bad.onnx").write_text("this is not a protobuf\n")
    (tmp_path / "folder.onnx").mkdir()
    (tmp_path / "empty.onnx").write_bytes(b"")
    os.symlink("loop.onnx", tmp_path / "loop.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "a.npy", np.zeros((1, 3, 224, 224), dtype=np.float32))
    (calib / "ds.txt").write_text("a.npy\n")
    (calib / "missing.txt").write_text("a.npy\n\nnope.npy\n")
    (calib / "two.txt").write_text("a.npy a.npy\n")
    (calib / "ragged.txt").write_text("a.npy\na.npy a.npy\n")
    (calib / "text.txt").write_text("ds.txt\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(directory: Path, text: str | bytes, name: str = "models.yaml") -> Path:
    path = directory / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path, **options) -> list[Problem]:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path.name, **options)
    return caught.value.problems


def laughs() -> str:
    lines = ["version: 1", "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, 10):
        refs = ", ".join([f"*a{level - 1}"] * 10)
        lines.append(f"a{level}: &a{level} [{refs}]")
    return "\n".join(lines) + "\n"


def model(body: str, name: str = "m", source: str = "sq.onnx") -> str:
    """A one-model manifest; ``body`` holds extra model keys, 4 spaces deep."""
    text = f"{HEADER}  - name: {name}\n    source: {source}\n"
    return text + textwrap.indent(textwrap.dedent(body), "    ")


T = "targets: [rk3588]\n"

# (id, manifest text, expected message substring, "line:col")
INVALID = [
    ("misspelt-key", model("tragets: [rk3588]\n"), "unknown key 'tragets'; did you mean 'targets'?", "5:5"),
    ("misspelt-top-key", "version: 1\nmodel: []\n", "unknown key 'model'; did you mean 'models'?", "2:1"),
    ("key-in-wrong-place", model(T + "dtype: w8a8\n"), "'dtype' here: it belongs under quantization:", "6:5"),
    ("unknown-platform", model("targets: [rk3588, rk3589]\n"),
     "unknown platform 'rk3589'; did you mean 'rk3588'?", "5:23"),
    ("platform-case", model("targets: [RK3588]\n"), "did you mean 'rk3588'?", "5:15"),
    ("override-platform", model(T + "overrides:\n  - match: { op_type: Conv }\n    action: cpu\n"
                                "    targets: [rk3858]\n"), "unknown platform 'rk3858'", "9:19"),
    ("missing-source", model(T, source="nope.onnx"), "source 'nope.onnx' does not exist", "4:13"),
    ("non-onnx-source", model(T, source="bad.onnx"), "source 'bad.onnx' is not a valid ONNX model", "4:13"),
    ("empty-source", model(T, source="empty.onnx"), "source 'empty.onnx' is empty", "4:13"),
    ("directory-source", model(T, source="folder.onnx"), "is a directory, not a file", "4:13"),
    ("symlink-loop-source", model(T, source="loop.onnx"), "source 'loop.onnx' is a symlink loop", "4:13"),
    ("rv1106-float", model("targets: [rk3588, rv1106]\n"),
     "rv1106 requires quantization: the toolkit refuses do_quantization=False on rv1106", "5:23"),
    ("rv1106-float-defaults", "version: 1\ndefaults:\n  targets: [rv1103]\nmodels:\n  - name: m\n    source: sq.onnx\n",
     "rv1103 requires quantization", "3:13"),
    ("rk3588-w4a16", model("targets: [rk3576, rk3588]\nquantization: { dataset: calib/ds.txt, dtype: w4a16 }\n"),
     "rk3588 does not support quantization dtype w4a16: rknn-toolkit2 refuses it (measured 2.5.0)", "5:23"),
    ("rk3566-w8a16", model("targets: [rk3566]\nquantization: { dataset: calib/ds.txt, dtype: w8a16 }\n"),
     "only supported on rk3562 (Rockchip docs)", "5:15"),
    ("w16a16i", model(T + "quantization: { dataset: calib/ds.txt, dtype: w16a16i }\n"),
     "'w16a16i' is rejected by rknn-toolkit2 (measured 2.5.0); use 'w16a16i_dfp'", "6:51"),
    ("gdq-w8a8", model("targets: [rk3562]\nquantization: { dataset: calib/ds.txt, algorithm: gdq }\n"),
     "quantization algorithm gdq needs dtype w4a16 or w8a16, not w8a8", "6:55"),
    ("single-core-rk3566", model("targets: [rk3588, rk3566]\noptions: { single_core_mode: true }\n"),
     "rk3566 does not support single_core_mode", "5:23"),
    ("billion-laughs", laughs(), "aliases expand the document past 100000 nodes", "6:45"),
    ("recursive-alias", "version: 1\nmodels: &m [*m]\n", "recursive alias", "2:13"),
    ("undefined-alias", "version: 1\nmodels: *nothing\n", "undefined alias *nothing", "2:9"),
    ("duplicate-key", model(T + "targets: [rk3566]\n"), "duplicate key 'targets' (first defined at line 5)", "6:5"),
    ("duplicate-name", model(T) + "  - name: m\n    source: sq.onnx\n    targets: [rk3588]\n",
     "duplicate model name 'm' (first used at line 3)", "6:11"),
    ("name-dotdot", model(T, name="../x"), "invalid name '../x': use lowercase letters", "3:11"),
    ("name-space", model(T, name='"A B"'), "invalid name 'A B'", "3:11"),
    ("name-too-long", model(T, name="a" * 65), "longer than 64 characters", "3:11"),
    ("tab-indent", HEADER + "\t- name: m\n", "tab character", "3:1"),
    ("non-utf8", (HEADER + "  - name: m\n    source: caf\xe9.onnx\n").encode("latin-1"),
     "not valid UTF-8: byte 0xe9", "4:16"),
    ("control-character", HEADER + "  - name: m\x07\n", "control character U+0007", "3:12"),
    ("python-tag", "version: 1\nmodels: !!python/object/apply:os.system [echo hi]\n",
     "unsupported YAML tag !!python/object/apply:os.system", "2:9"),
    ("custom-tag", model("targets: !platforms [rk3588]\n"), "unsupported YAML tag !platforms", "5:14"),
    ("syntax-error", model("targets: [rk3588\n"), "YAML syntax error", "6:1"),
    ("two-documents", "version: 1\n---\nmodels: []\n", "expected a single YAML document", "2:1"),
    ("non-string-key", model(T + "options: { 3: true }\n"), "mapping keys must be strings, found integer 3", "6:16"),
    ("missing-version", "models:\n  - name: m\n    source: sq.onnx\n    targets: [rk3588]\n",
     "missing required key 'version' (add version: 1)", "1:1"),
    ("wrong-version", "version: 2\nmodels:\n  - name: m\n    source: sq.onnx\n    targets: [rk3588]\n",
     "version must be 1, got integer 2", "1:10"),
    ("missing-models", "version: 1\n", "missing required key 'models'", "1:1"),
    ("empty-models", "version: 1\nmodels: []\n", "models must not be empty", "2:9"),
    ("null-models", "version: 1\nmodels:\n", "models must be a list, got null", "2:1"),
    ("empty-file", "", "the manifest is empty", "1:1"),
    ("comments-only", "# nothing here\n", "the manifest is empty", "1:1"),
    ("top-level-list", "- version: 1\n", "must be a mapping with version: and models:, not a list", "1:1"),
    ("model-not-mapping", HEADER + "  - just a name\n", "each entry of models must be a mapping, got string", "3:5"),
    ("missing-source-key", HEADER + "  - name: m\n    targets: [rk3588]\n",
     "model is missing required key 'source'", "3:5"),
    ("no-targets", model(""), "model 'm' has no targets: add targets: to it or to defaults:", "3:5"),
    ("empty-targets", model("targets: []\n"), "targets must not be empty", "5:14"),
    ("repeated-target", model("targets: [rk3588, rk3566, rk3588]\n"), "targets lists 'rk3588' more than once", "5:31"),
    ("missing-dataset", model(T + "quantization: { dataset: calib/nope.txt }\n"),
     "dataset 'calib/nope.txt' does not exist", "6:30"),
    ("missing-sample", model(T + "quantization: { dataset: calib/missing.txt }\n"),
     "dataset 'calib/missing.txt' line 3: sample 'nope.npy' not found", "6:30"),
    ("sample-type", model(T + "quantization: { dataset: calib/text.txt }\n"),
     "line 1: sample 'ds.txt' is not one of .npy", "6:30"),
    ("ragged-dataset", model(T + "quantization: { dataset: calib/ragged.txt }\n"),
     "line 2 has 2 paths but line 1 has 1", "6:30"),
    ("dataset-width", model(T + "quantization: { dataset: calib/two.txt }\n"),
     "has 2 path(s) per line but the model has 1 inputs", "6:30"),
    ("dataset-missing-key", model(T + "quantization: { dtype: w8a8 }\n"),
     "quantization needs a dataset: (in the model or in defaults)", "6:19"),
    ("empty-match", model(T + "overrides:\n  - match: {}\n    action: cpu\n"),
     "match needs at least one of: op_type, attrs, node, tensor", "7:16"),
    ("bad-action", model(T + "overrides:\n  - match: { node: conv1 }\n    action: gpu\n"),
     "unknown action value 'gpu'", "8:17"),
    ("unknown-op-type", model(T + "overrides:\n  - match: { op_type: AvgPool }\n    action: cpu\n"),
     "unknown op_type 'AvgPool'; did you mean 'AveragePool'?", "7:27"),
    ("misspelt-match-key", model(T + "overrides:\n  - match: { op_typ: Conv }\n    action: cpu\n"),
     "unknown key 'op_typ'; did you mean 'op_type'?", "7:18"),
    ("missing-input", model(T + "inputs: { data: [1, 3, 224, 224] }\n"),
     "input 'data' is not a tensor of the model; did you mean 'data_0'?", "6:15"),
    ("input-rank", model(T + "inputs: { data_0: [1, 3, 224] }\n"),
     "input 'data_0' has 4 dimensions in the model, but 3 are given", "6:15"),
    ("zero-dimension", model(T + "inputs: { data_0: [1, 0, 224, 224] }\n"),
     "each entry of data_0 must be at least 1, got 0", "6:27"),
    ("missing-output", model(T + "outputs: [softmaxout_1, softmax]\n"),
     "output 'softmax' is not a tensor of the model", "6:29"),
    ("missing-layer", model(T + "quantization:\n  dataset: calib/ds.txt\n  hybrid:\n"
                            "    custom_layers: [{ start: r0, end: fire2/relu }]\n"),
     "end tensor 'fire2/relu' is not in the model", "9:43"),
    ("repair-without-verify", model(T + "quantization:\n  dataset: calib/ds.txt\n"
                                    "  repair: { min_cosine: 0.99, max_float_layers: 8 }\n"),
     "repair measures each rebuild with the accuracy check, which is off", "8:15"),
    ("repair-no-layers", model(T + "verify: {}\nquantization:\n  dataset: calib/ds.txt\n"
                               "  repair: { min_cosine: 0.99, max_float_layers: 0 }\n"),
     "max_float_layers must be at least 1, got 0", "9:53"),
    ("repair-cosine-zero", model(T + "verify: {}\nquantization:\n  dataset: calib/ds.txt\n"
                                 "  repair: { min_cosine: 0, max_float_layers: 8 }\n"),
     "min_cosine must be above 0, got 0", "9:29"),
    ("repair-cosine-above-one", model(T + "verify: {}\nquantization:\n  dataset: calib/ds.txt\n"
                                      "  repair: { min_cosine: 1.5, max_float_layers: 8 }\n"),
     "min_cosine must be at most 1, got 1.5", "9:29"),
    ("repair-rv1106", model("targets: [rk3588, rv1106]\nverify: {}\nquantization:\n  dataset: calib/ds.txt\n"
                            "  repair: { min_cosine: 0.99, max_float_layers: 8 }\n"),
     "which the toolkit refuses in hybrid quantization for rv1106", "9:15"),
    ("repair-and-auto-hybrid", model(T + "verify: {}\nquantization:\n  dataset: calib/ds.txt\n  auto_hybrid: true\n"
                                     "  repair: { min_cosine: 0.99, max_float_layers: 8 }\n"),
     "repair and auto_hybrid both choose float layers", "10:15"),
    ("std-count", model(T + "mean_values: [[0, 0, 0]]\nstd_values: [[1, 1, 1], [1, 1, 1]]\n"),
     "std_values has 2 entries but mean_values has 1", "7:17"),
    ("mean-count", model(T + "mean_values: [[0, 0, 0], [0, 0, 0]]\n"),
     "mean_values has 2 entries but the model has 1 inputs", "6:18"),
    ("timeout-string", model(T + "timeout: 30m\n"), "timeout must be an integer, got string '30m'", "6:14"),
    ("timeout-float", model(T + "timeout: 10.0\n"), "timeout must be an integer, got number 10.0", "6:14"),
    ("toolkit-number", "version: 1\ntoolkit: 2.5\nmodels: []\n",
     "toolkit must be a string, got number 2.5; quote it", "2:10"),
    ("option-type", model(T + "options: { optimization_level: 5 }\n"),
     "optimization_level must be at most 3, got 5", "6:36"),
    ("unknown-option", model(T + "options: { single_core: true }\n"),
     "unknown key 'single_core'; did you mean 'single_core_mode'?", "6:16"),
    ("name-in-defaults", "version: 1\ndefaults:\n  name: x\nmodels: []\n",
     "'name' cannot be set in defaults: each model needs its own", "3:3"),
    ("cache-without-dir", "version: 1\ncache: {}\nmodels: []\n", "cache needs at least one of: dir, url", "2:8"),
]


@pytest.mark.parametrize(("text", "message", "where"), [case[1:] for case in INVALID],
                         ids=[case[0] for case in INVALID])
def test_invalid_manifest(workdir, text, message, where):
    problems = problems_of(write(workdir, text))
    found = [(f"{p.line}:{p.col}", p.message) for p in problems]
    assert any(message in said and at == where for at, said in found), found
    assert all(p.path == "models.yaml" for p in problems)


def test_at_least_35_invalid_cases():
    assert len(INVALID) >= 35


def test_all_problems_reported_at_once(workdir):
    text = model("tragets: [rk3588]\n") + "  - name: n\n    source: nope.onnx\n    targets: [rv1106]\n"
    error = pytest.raises(ManifestError, load_manifest, write(workdir, text).name).value
    lines = str(error).splitlines()
    assert lines == [
        "models.yaml:3:5: model 'm' has no targets: add targets: to it or to defaults:",
        "models.yaml:5:5: unknown key 'tragets'; did you mean 'targets'?",
        "models.yaml:7:13: source 'nope.onnx' does not exist (looked for " + str(workdir / "nope.onnx") + ")",
        "models.yaml:8:15: rv1106 requires quantization: the toolkit refuses do_quantization=False on rv1106 "
        "(measured 2.5.0); add a quantization: block with a dataset",
    ]


def test_problem_and_error_formatting():
    problem = Problem("a/models.yaml", 3, 7, "bad")
    assert str(problem) == "a/models.yaml:3:7: bad"
    error = ManifestError([problem, problem._replace(line=4)])
    assert str(error) == "a/models.yaml:3:7: bad\na/models.yaml:4:7: bad"


def test_path_shown_as_given(workdir):
    (workdir / "sub").mkdir()
    path = write(workdir / "sub", "version: 2\nmodels: []\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(os.path.join("sub", path.name))
    assert str(caught.value).startswith(os.path.join("sub", "models.yaml") + ":1:10: ")


def test_defaults_problem_names_the_model(workdir):
    text = "version: 1\ndefaults:\n  targets: [rv1106]\nmodels:\n  - name: m\n    source: sq.onnx\n"
    (problem,) = problems_of(write(workdir, text))
    assert problem.message.endswith("(model 'm', set in defaults)")


def test_missing_manifest_file(workdir):
    (problem,) = problems_of(workdir / "absent.yaml")
    assert problem.path == "absent.yaml" and "cannot read file" in problem.message


def test_check_files_false_skips_files(workdir):
    text = model(T + "quantization: { dataset: calib/nope.txt }\n", source="nope.onnx")
    manifest = load_manifest(write(workdir, text).name, check_files=False)
    assert manifest.models[0]["quantization"]["samples"] is None
    assert manifest.models[0]["source"] == str(workdir / "nope.onnx")


VALID = """\
# yaml-language-server: $schema=schema/models.schema.json
version: 1
toolkit: "2.5.0"
cache: { dir: .rknn-cache }
defaults:
  targets: [rk3588]
  mean_values: [[0, 0, 0]]
  std_values: [[1, 1, 1]]
  options: { optimization_level: 2, compress_weight: true }
  quantization: { dataset: calib/ds.txt, algorithm: mmse }
  overrides:
    - match: { op_type: MaxPool }
      action: npu
models:
  - name: squeeze
    source: sq.onnx
    targets: [rk3588, rv1106]
    inputs: { data_0: [1, 3, 224, 224] }
    outputs: [softmaxout_1]
    quantization: { dtype: w16a16i_dfp }
    options: { optimization_level: 3 }
    verify: { samples: 2 }
    build: { rknn_batch_size: 1 }
  - name: squeeze.float
    source: sq.onnx
    quantization: null
    overrides: []
    cpu_fallback: error
    timeout: 60
"""


def test_valid_manifest_round_trips(workdir):
    manifest = load_manifest(write(workdir, VALID).name)
    assert isinstance(manifest, Manifest)
    assert (manifest.version, manifest.toolkit) == (1, "2.5.0")
    assert manifest.path == Path("models.yaml")
    assert manifest.directory == workdir
    assert manifest.cache_url == str(workdir / ".rknn-cache")
    assert json.loads(json.dumps(manifest.models)) == manifest.models
    squeeze = manifest.model("squeeze")
    assert squeeze["index"] == 0 and squeeze["source"] == str(workdir / "sq.onnx")
    assert squeeze["quantization"] == {
        "dataset": str(workdir / "calib" / "ds.txt"),
        "dtype": "w16a16i_dfp",
        "algorithm": "mmse",
        "method": "channel",
        "hybrid_level": 0,
        "auto_hybrid": False,
        "auto_hybrid_cos_thresh": 0.98,
        "auto_hybrid_euc_thresh": None,
        "hybrid": None,
        "samples": [[str(workdir / "calib" / "a.npy")]],
        "images": None,
    }
    assert squeeze["verify"] == {"samples": 2, "min_cosine": 0.99}
    assert squeeze["overrides"][0]["targets"] is None
    assert manifest.location("models", 0, "outputs", 0) == "models.yaml:19:15"


def test_defaults_merging(workdir):
    manifest = load_manifest(write(workdir, VALID).name)
    squeeze, plain = manifest.models
    assert squeeze["targets"] == ["rk3588", "rv1106"]  # lists are replaced
    assert squeeze["options"] == {"optimization_level": 3, "compress_weight": True}  # mappings merged
    assert squeeze["quantization"]["algorithm"] == "mmse"
    assert plain["targets"] == ["rk3588"] and plain["quantization"] is None
    assert plain["overrides"] == [] and plain["mean_values"] == [[0, 0, 0]]
    assert (plain["cpu_fallback"], plain["timeout"], plain["build"], plain["verify"]) == ("error", 60, {}, None)
    assert (squeeze["cpu_fallback"], squeeze["timeout"]) == ("warn", 1800)
    plain["options"]["optimization_level"] = 0  # models never share mutable data
    assert squeeze["options"]["optimization_level"] == 3


def test_location_falls_back(workdir):
    manifest = load_manifest(write(workdir, VALID).name)
    assert manifest.location("models", 0, "overrides", 0, "match") == "models.yaml:12:14"  # from defaults
    assert manifest.location("models", 1, "targets", 0) == "models.yaml:6:13"  # from defaults
    assert manifest.location("models", 1, "nothing", 3) == "models.yaml:24:5"  # nearest parent
    assert manifest.location("toolkit") == "models.yaml:3:10"
    with pytest.raises(KeyError):
        manifest.model("nope")


def test_example_manifest_parses():
    manifest = load_manifest(REPO / "models.yaml", check_files=False)
    assert manifest.models and all(model["targets"] for model in manifest.models)


def test_200_models(workdir):
    entry = ("  - name: m{i}\n    source: sq.onnx\n    targets: [rk3588, rv1106]\n"
             "    quantization: {{ dataset: calib/ds.txt }}\n")
    text = HEADER + "".join(entry.format(i=i) for i in range(200))
    manifest = load_manifest(write(workdir, text).name, check_files=False)
    assert [m["name"] for m in manifest.models] == [f"m{i}" for i in range(200)]
    assert load_manifest("models.yaml").models[199]["quantization"]["samples"] == [[str(workdir / "calib" / "a.npy")]]


def test_anchors_and_merge_keys(workdir):
    text = HEADER + (
        "  - &base\n    name: a\n    source: sq.onnx\n    targets: &t [rk3588]\n"
        "  - <<: *base\n    name: b\n    targets: *t\n"
    )
    manifest = load_manifest(write(workdir, text).name)
    assert [(m["name"], m["targets"]) for m in manifest.models] == [("a", ["rk3588"]), ("b", ["rk3588"])]
    assert manifest.location("models", 1, "targets") == "models.yaml:9:14"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "pipeline.manifest", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_cli_ok(workdir):
    write(workdir, VALID)
    done = run_cli("models.yaml", cwd=workdir)
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok: 2 models, 3 model x target conversions\n", "")


def test_cli_problems(workdir):
    write(workdir, model("tragets: [rk3588]\n"))
    done = run_cli("models.yaml", cwd=workdir)
    assert done.returncode == 1 and done.stdout == ""
    assert "models.yaml:5:5: unknown key 'tragets'" in done.stderr
    assert "Traceback" not in done.stderr


# -- the schema and platforms.py agree --------------------------------------------


def schema() -> dict:
    return json.loads((REPO / "schema" / "models.schema.json").read_text())


def test_schema_platform_facts_match_platforms_module():
    defs = schema()["$defs"]
    assert defs["platform"]["enum"] == list(platforms.TARGETS)
    assert defs["quantization"]["properties"]["dtype"]["enum"] == list(platforms.QUANTIZED_DTYPES)
    rules = {}
    for rule in defs["platformRules"]["allOf"]:
        condition = rule["if"]["properties"]
        quant = condition.get("quantization")
        key = quant["properties"]["dtype"]["const"] if quant else "single_core_mode"
        rules[key] = tuple(rule["then"]["properties"]["targets"]["items"]["enum"])
    assert rules == {
        "w4a16": platforms.QUANTIZED_DTYPES["w4a16"]["only"],
        "w8a16": platforms.QUANTIZED_DTYPES["w8a16"]["only"],
        "single_core_mode": platforms.OPTION_PLATFORMS["single_core_mode"]["only"],
    }
    (gdq,) = defs["quantization"]["allOf"]
    assert tuple(gdq["then"]["properties"]["dtype"]["enum"]) == platforms.ALGORITHM_DTYPES["gdq"]["dtypes"]


def walk_properties(node, path=()):
    """(path, subschema) for every property declared anywhere in the schema."""
    if isinstance(node, dict):
        for key, sub in node.get("properties", {}).items():
            yield path + (key,), sub
        for key, sub in node.items():
            yield from walk_properties(sub, path + (key,))
    elif isinstance(node, list):
        for index, sub in enumerate(node):
            yield from walk_properties(sub, path + (index,))


def test_schema_documents_every_key():
    document = schema()
    for path, sub in walk_properties(document):
        if "allOf" in path:
            continue  # platform rules, not keys
        while "$ref" in sub:
            target = document
            for part in sub["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            sub = target
        assert sub.get("description") and sub.get("examples"), path


def test_schema_closes_every_object():
    def objects(node):
        if isinstance(node, dict) and "allOf" in node:
            node = {key: sub for key, sub in node.items() if key != "allOf"}  # platform rule conditions
        if isinstance(node, dict):
            if node.get("type") == "object" or "object" in (node.get("type") or []):
                yield node
            for sub in node.values():
                yield from objects(sub)
        elif isinstance(node, list):
            for sub in node:
                yield from objects(sub)

    for node in objects(schema()):
        if "properties" in node:
            assert node["additionalProperties"] is False, node.get("description")


def test_fast_schema_check_agrees_with_jsonschema():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from pipeline.manifest import _fast_check, _validator

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2, 70), st.floats(-2, 5),
                        st.sampled_from(["rk3588", "w4a16", "gdq", "", "a b", "x" * 70, "cpu", "1.2.3", "data_0"]))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["dataset", "dtype", "op_type", "start", "end", "dir", "x"]), inner, max_size=3), max_leaves=8)
    keys = st.sampled_from(["name", "source", "targets", "inputs", "outputs", "mean_values", "quantization",
                            "overrides", "cpu_fallback", "verify", "timeout", "options", "build", "bogus"])

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(keys, values, max_size=4))
    def check(extra):
        document = {"version": 1, "models": [{"name": "m", "source": "m.onnx", **extra}]}
        errors = [e for e in _validator().iter_errors(document) if "allOf" not in e.absolute_schema_path]
        if _fast_check()(document):
            assert not errors

    check()


def test_any_document_gives_a_manifest_or_problems(workdir):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    names = st.sampled_from(["name", "source", "targets", "inputs", "outputs", "mean_values", "std_values",
                             "quantization", "dataset", "dtype", "algorithm", "hybrid", "custom_layers", "start",
                             "overrides", "match", "op_type", "action", "options", "single_core_mode", "verify"])
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-1, 4), st.sampled_from(
        ["sq.onnx", "bad.onnx", "loop.onnx", "calib/ds.txt", "rk3588", "rv1106", "w4a16", "gdq", "data_0", "Conv", ""]))
    values = st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3), max_leaves=10)
    documents = st.fixed_dictionaries({"version": st.just(1), "models": st.lists(
        st.dictionaries(names, values, max_size=5).map(lambda m: {"name": "m", "source": "sq.onnx", **m}), max_size=2)},
        optional={"defaults": st.dictionaries(names, values, max_size=3)})

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(documents, st.booleans())
    def check(document, check_files):
        write(workdir, json.dumps(document))  # JSON is YAML
        try:
            load_manifest("models.yaml", check_files=check_files)
        except ManifestError as error:
            assert error.problems and all(p.line >= 1 and p.col >= 1 for p in error.problems)

    check()


# -- platforms.py --------------------------------------------------------------------


@pytest.mark.parametrize(("target", "model", "expected"), [
    ("rv1106", {"quantization": None}, "requires quantization"),
    ("rv1106", {"quantization": {"dataset": "d"}}, None),
    ("rk3588", {"quantization": {"dtype": "w4a16"}}, "refuses it (measured 2.5.0)"),
    ("rk3588", {"quantization": {"dtype": "w16a16i_dfp"}}, None),
    ("rk3576", {"quantization": {"dtype": "w4a16"}}, None),
    ("rv1126b", {"quantization": {"dtype": "w4a16"}}, None),
    ("rk3568", {"quantization": {"dtype": "w4a16"}}, "only supported on rk3576, rv1126b (Rockchip docs)"),
    ("rk3562", {"quantization": {"dtype": "w8a16"}}, None),
    ("rk3576", {"options": {"single_core_mode": True}}, None),
    ("rk2118", {"options": {"single_core_mode": True}}, "does not support single_core_mode"),
    ("rk3599", {}, "unknown target platform"),
])
def test_check_target_options(target, model, expected):
    problems = platforms.check_target_options(target, model)
    assert (problems == []) if expected is None else any(expected in p for p in problems), problems


def test_check_model_options():
    assert platforms.check_model_options({"quantization": {"algorithm": "gdq", "dtype": "w4a16"}}) == []
    (problem,) = platforms.check_model_options({"quantization": {"algorithm": "gdq"}})
    assert "needs dtype w4a16 or w8a16, not w8a8" in problem


def test_every_fact_names_its_source():
    facts = [*platforms.FLOAT_REFUSED.values(), *platforms.OPTION_PLATFORMS.values(),
             *platforms.ALGORITHM_DTYPES.values(), *platforms.QUANTIZED_DTYPES.values(),
             *platforms.REJECTED_DTYPES.values()]
    sources = {platforms.MEASURED, platforms.DOCS}
    for fact in facts:
        fact = fact if isinstance(fact, dict) else {"source": fact}
        assert fact["source"] in sources
        assert fact.get("only_source", platforms.DOCS) in sources
        for outcome in ("refused", "accepted"):
            assert set(fact.get(outcome, {}).values()) <= sources


# -- yaml_source.py --------------------------------------------------------------------


def test_yaml_positions():
    doc = parse_yaml("a:\n  - x\n  -   y\nb: { c: 1 }\n", "f.yaml")
    assert doc.data == {"a": ["x", "y"], "b": {"c": 1}}
    assert doc.position(("a", 1)) == (3, 7)
    assert doc.key_position(("b", "c")) == (4, 6)
    assert doc.position(("b", "c")) == (4, 9)
    assert doc.position(("a", 5)) is None and doc.key_position(("a", 0)) is None
    assert doc.nearest(("b", "c", "d")) == (("b", "c"), (4, 9))


def test_yaml_keeps_data_plain():
    doc = parse_yaml("d: 2024-01-01\nn: ~\nh: 0x10\ny: yes\nf: .inf\ns: !!str 12\n")
    assert doc.data == {"d": "2024-01-01", "n": None, "h": 16, "y": True, "f": float("inf"), "s": "12"}


@pytest.mark.parametrize("text", ["a: &a [*a]\n", "a: &a {b: *a}\n", laughs(), "a: " + "[" * 100 + "]" * 100])
def test_yaml_refuses_hostile_input(text):
    with pytest.raises(YamlError):
        parse_yaml(text)


# -- what users naturally write ----------------------------------------------------------


def test_verify_true_and_false(workdir):
    write(workdir, """\
        version: 1
        defaults: {targets: [rk3588], verify: {samples: 2}}
        models:
          - {name: checked, source: sq.onnx, verify: true}
          - {name: unchecked, source: sq.onnx, verify: false}
          - {name: inherited, source: sq.onnx}
        """)
    checked, unchecked, inherited = load_manifest("models.yaml").models
    assert checked["verify"] == inherited["verify"] and checked["verify"]["samples"] == 2  # defaults: verify
    assert unchecked["verify"] is None
    write(workdir, "version: 1\nmodels:\n  - {name: a, source: sq.onnx, targets: [rk3588], verify: true}\n")
    (model,) = load_manifest("models.yaml").models
    assert model["verify"]["samples"] == 4 and model["verify"]["min_cosine"] == 0.99  # the schema's defaults


@pytest.mark.parametrize("name", ["report.html", "report.md"])
def test_a_model_named_like_a_file_the_build_writes_is_refused(workdir, name):
    path = write(workdir, f"version: 1\nmodels:\n  - name: {name}\n    source: sq.onnx\n    targets: [rk3588]\n")
    (problem,) = problems_of(path)
    assert (problem.line, problem.col) == (3, 11)
    assert f"model name '{name}' is reserved: the build writes build/{name} itself" in problem.message


@pytest.mark.parametrize(("target", "dtype"), sorted(platforms.ABORTS))
def test_a_dtype_that_aborts_the_toolkit_is_refused_at_load(workdir, target, dtype):
    path = write(workdir, f"""\
        version: 1
        models:
          - name: a
            source: sq.onnx
            targets: [{target}]
            quantization: {{dataset: calib/ds.txt, dtype: {dtype}}}
        """)
    (problem,) = problems_of(path)
    assert problem.line == 5
    assert f"{target} cannot build quantization dtype {dtype}: config() accepts it, then the toolkit's " \
           "compiler aborts the whole process in build()" in problem.message
    assert "(measured 2.5.0)" not in problem.message and "measured 2.5.0" in problem.message


def test_an_intermittent_crash_is_retried_not_refused():
    model = {"quantization": {"dataset": "d", "dtype": "w8a16"}}
    assert platforms.check_target_options("rk3562", model) == []
    assert platforms.attempts("rk3562", model) == 3 and platforms.attempts("rk3588", {"quantization": None}) == 1
