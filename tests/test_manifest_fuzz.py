"""Property-based fuzzing of the manifest loader.

Whatever a user (or a bad merge, a half-saved file, an editor with tabs)
puts in ``models.yaml``, ``load_manifest`` must either return a manifest or
raise ``ManifestError`` whose problems point at a real place in the file:
``PATH:LINE:COL: message`` with 1-based line and column. Any other exception
would surface as a traceback from inside doit's task loading.

Two generators feed that one property: arbitrary documents (YAML dumped from
random data, random text, random bytes) and mutations of a valid manifest,
which reach deeper into the checks because most of the document stays valid.
Example budgets are fixed and derandomized so every run tries the same inputs.
"""

from __future__ import annotations

import os
import re
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from conftest import make_pool_identity_model
from pipeline.manifest import Manifest, ManifestError, load_manifest

PROBLEM = re.compile(r"^(?P<path>.+):(?P<line>\d+):(?P<col>\d+): (?P<message>.+)$", re.S)
# Every sequence YAML counts as a line break (PyYAML's marks count them all).
LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

VALID = """\
# yaml-language-server: $schema=schema/models.schema.json
version: 1
toolkit: "2.5.0"
cache: { dir: .rknn-cache }
defaults: &defaults
  targets: [rk3588]
  mean_values: [[0, 0, 0]]
  std_values: [[1, 1, 1]]
  options: { optimization_level: 2, compress_weight: true }
  overrides:
    - match: { op_type: AveragePool, attrs: { count_include_pad: 0 } }
      action: npu
models:
  - name: squeeze
    source: sq.onnx
    targets: [rk3588, rv1106]
    inputs: { data_0: [1, 3, 224, 224] }
    outputs: [softmaxout_1]
    quantization: { dataset: calib/ds.txt, dtype: w8a8, algorithm: mmse }
    verify: { samples: 2, min_cosine: 0.99 }
    build: { rknn_batch_size: 1 }
  - name: squeeze.float
    source: sq.onnx
    quantization: null
    overrides:
      - match: { node: "n6*" }
        action: cpu
        targets: [rk3588]
    cpu_fallback: error
    timeout: 60
"""

# Words the manifest knows, so random documents often reach the checks behind the schema.
KEYS = ["version", "models", "defaults", "toolkit", "cache", "dir", "name", "source", "targets", "inputs",
        "outputs", "mean_values", "std_values", "quantization", "dataset", "dtype", "algorithm", "method",
        "hybrid", "custom_layers", "start", "end", "overrides", "match", "op_type", "attrs", "node", "tensor",
        "action", "options", "dynamic_input", "single_core_mode", "verify", "samples", "min_cosine", "timeout",
        "cpu_fallback", "build", "<<"]
WORDS = ["rk3588", "rv1106", "rk3566", "w8a8", "w4a16", "w16a16i", "gdq", "mmse", "npu", "cpu", "rewrite",
         "warn", "sq.onnx", "calib/ds.txt", "data_0", "AveragePool", "Conv", "../x", "", " ", "1.2.3"]
REPLACEMENT_VALUES = ["42", "-1", "0", "3.5", "1e400", ".nan", "-.inf", "true", "null", "~", "[]", "{}", '""',
                      '"text"', "[1, [2, [3]]]", "{a: {b: c}}", "2024-01-01", "0x10", "0o17", "!!str 5",
                      "!!binary aGk=", "!!python/none ''", "&a x", "*undefined", "|\n  block", "'unclosed"]


def _last_line(text: str) -> int:
    """The highest line a problem may name.

    libyaml reports errors at the end of the stream on the line after the
    last one when the file does not end in a line break (it adds one before
    the end): tolerated here, one line past the end and no further.
    """
    lines = len(LINE_BREAK.findall(text)) + 1
    return lines if not text or text[-1] in "\r\n\x85\u2028\u2029" else lines + 1


def _count(outcome: str) -> None:
    """Tally outcomes for ``--hypothesis-show-statistics``: a fuzzer that only ever sees refusals
    would not be reaching the checks behind the schema."""
    if currently_in_test_context():
        event(outcome)


def check_document(path: Path, raw: bytes) -> Manifest | None:
    """The property: a manifest, or ManifestError with well-formed positions inside the file."""
    path.write_bytes(raw)
    try:
        manifest = load_manifest(path, check_files=False)
    except ManifestError as error:
        _count("refused")
        assert error.problems, "a ManifestError without problems"
        lines = _last_line(raw.decode("utf-8", "replace"))
        for problem in error.problems:
            text = str(problem)
            match = PROBLEM.match(text)
            assert match, text
            assert match["path"] == str(path), text
            line, col = int(match["line"]), int(match["col"])
            assert line >= 1 and col >= 1, text
            assert line <= lines, f"{text} (past line {lines}, the end of the file)"
            assert match["message"].strip(), text
        return None
    _count("loaded")
    return manifest


# -- property 1: arbitrary documents ---------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(WORDS), st.text(max_size=20),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=12))
trees = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)), max_leaves=25)
manifest_like = st.fixed_dictionaries(
    {"version": st.sampled_from([1, 1, 2, "1", None]),
     "models": st.lists(st.dictionaries(keys, trees, max_size=6), max_size=3) | trees},
    optional={"defaults": st.dictionaries(keys, trees, max_size=4), "toolkit": scalars, "cache": trees},
)


def _dump(data) -> bytes:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False).encode("utf-8")


documents = st.one_of(
    trees.map(_dump),
    manifest_like.map(_dump),
    st.text(max_size=300).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.binary(max_size=300),
)


@settings(FUZZ, max_examples=1500)
@given(raw=documents)
def test_any_document_gives_a_manifest_or_located_problems(tmp_path, raw):
    check_document(tmp_path / "models.yaml", raw)


# -- property 2: mutations of a valid manifest --------------------------------------------------

KEY_LINE = re.compile(r"^(?P<indent>\s*(?:- )?)(?P<key>[A-Za-z_<][\w<]*):(?P<rest>.*)$")


def _key_lines(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if KEY_LINE.match(line)]


def _delete_key(text: str, draw) -> bytes:
    lines = text.split("\n")
    index = draw(st.sampled_from(_key_lines(lines)))
    return "\n".join(lines[:index] + lines[index + 1:]).encode()


def _rename_key(text: str, draw) -> bytes:
    lines = text.split("\n")
    index = draw(st.sampled_from(_key_lines(lines)))
    match = KEY_LINE.match(lines[index])
    name = draw(st.one_of(st.sampled_from(KEYS), st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1,
                                                          max_size=12), st.just(match["key"].upper())))
    lines[index] = f"{match['indent']}{name}:{match['rest']}"
    return "\n".join(lines).encode()


def _retype_value(text: str, draw) -> bytes:
    lines = text.split("\n")
    with_values = [i for i in _key_lines(lines) if KEY_LINE.match(lines[i])["rest"].strip()]
    index = draw(st.sampled_from(with_values or _key_lines(lines)))
    match = KEY_LINE.match(lines[index])
    lines[index] = f"{match['indent']}{match['key']}: {draw(st.sampled_from(REPLACEMENT_VALUES))}"
    return "\n".join(lines).encode()


def _duplicate_key(text: str, draw) -> bytes:
    lines = text.split("\n")
    index = draw(st.sampled_from(_key_lines(lines)))
    copy = lines[index].replace("- ", "  ", 1)  # a second key in the same mapping, not a new list item
    return "\n".join(lines[: index + 1] + [copy] + lines[index + 1:]).encode()


def _insert_tab(text: str, draw) -> bytes:
    where = draw(st.integers(0, len(text)))
    if draw(st.booleans()):  # replace one line's indentation by a tab
        lines = text.split("\n")
        index = draw(st.integers(0, len(lines) - 1))
        lines[index] = "\t" + lines[index].lstrip(" ")
        return "\n".join(lines).encode()
    return (text[:where] + "\t" + text[where:]).encode()


def _truncate(text: str, draw) -> bytes:
    data = text.encode()
    return data[: draw(st.integers(0, len(data)))]


def _replace_character(text: str, draw) -> bytes:
    where = draw(st.integers(0, len(text) - 1))
    char = draw(st.one_of(st.characters(), st.sampled_from(list(":-[]{}&*!|>'\"#%@`,?\n \t\x00\x07\ufeff"))))
    return (text[:where] + char + text[where + 1:]).encode("utf-8", "surrogatepass")


def _inject_bytes(text: str, draw) -> bytes:
    data = text.encode()
    where = draw(st.integers(0, len(data)))
    junk = draw(st.binary(min_size=1, max_size=4).map(lambda b: bytes(0x80 | x for x in b)))
    return data[:where] + junk + data[where:]


def _alias_bomb(text: str, draw) -> bytes:
    depth, fan = draw(st.integers(1, 12)), draw(st.integers(2, 12))
    bomb = [f"b0: &b0 [{', '.join(['lol'] * fan)}]"]
    bomb += [f"b{level}: &b{level} [{', '.join([f'*b{level - 1}'] * fan)}]" for level in range(1, depth)]
    lines = text.split("\n")
    index = draw(st.sampled_from(_key_lines(lines)))
    match = KEY_LINE.match(lines[index])
    if match["indent"] == "" and draw(st.booleans()):  # new top-level keys, then use the last one
        lines[index:index] = bomb + [f"{match['key']}_bomb: *b{depth - 1}"]
    else:  # defined at the top, expanded deep inside the document
        lines[index] = f"{match['indent']}{match['key']}: *b{depth - 1}"
        lines[:0] = bomb
    return "\n".join(lines).encode()


MUTATIONS = {
    "delete a key": _delete_key,
    "rename a key": _rename_key,
    "change a value's type": _retype_value,
    "duplicate a key": _duplicate_key,
    "insert a tab": _insert_tab,
    "truncate": _truncate,
    "replace a character": _replace_character,
    "inject non-UTF-8 bytes": _inject_bytes,
    "inject an alias bomb": _alias_bomb,
}


@st.composite
def mutated(draw) -> bytes:
    """VALID after one to three mutations; later ones apply to the earlier result's text."""
    raw = VALID.encode()
    for _ in range(draw(st.integers(1, 3))):
        text = raw.decode("utf-8", "replace") or "\n"
        if not _key_lines(text.split("\n")):
            text = VALID
        raw = MUTATIONS[draw(st.sampled_from(sorted(MUTATIONS)))](text, draw)
    return raw


def test_the_unmutated_manifest_is_valid(tmp_path):
    manifest = check_document(tmp_path / "models.yaml", VALID.encode())
    assert isinstance(manifest, Manifest) and [m["name"] for m in manifest.models] == ["squeeze", "squeeze.float"]


@settings(FUZZ, max_examples=1500)
@given(raw=mutated())
def test_any_mutation_of_a_valid_manifest_gives_a_manifest_or_located_problems(tmp_path, raw):
    check_document(tmp_path / "models.yaml", raw)


# -- explicit hostile inputs ---------------------------------------------------------------------


def _big_manifest(count: int, last_name: str) -> str:
    entries = "".join(f"  - name: model-{i}\n    source: sq.onnx\n    targets: [rk3588]\n" for i in range(count - 1))
    return f"version: 1\nmodels:\n{entries}  - name: {last_name}\n    source: sq.onnx\n    targets: [rk3588]\n"


@pytest.mark.parametrize("last_name", ["model-9999", "model-0"], ids=["valid", "last-name-repeats-the-first"])
def test_a_10000_model_manifest_stays_within_bounded_memory(tmp_path, monkeypatch, last_name):
    """Memory, not time: a large manifest loads (sources checked) or is refused without blowing up.

    The refused variant fails only at its last line, so every model is read and checked first.
    """
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    make_pool_identity_model(tmp_path / "sq.onnx")
    path = tmp_path / "models.yaml"
    path.write_text(_big_manifest(10_000, last_name))
    tracemalloc.start()
    try:
        try:
            outcome = load_manifest(path)
        except ManifestError as error:
            outcome = error
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 500 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    if last_name == "model-9999":
        assert isinstance(outcome, Manifest) and len(outcome.models) == 10_000
    else:
        assert isinstance(outcome, ManifestError)
        assert str(outcome) == f"{path}:30000:11: duplicate model name 'model-0' (first used at line 3)"


def test_non_utf8_bytes_are_located(tmp_path):
    raw = b"version: 1\nmodels:\n  - name: m\n    source: mod\xe8le.onnx\n"
    path = tmp_path / "models.yaml"
    path.write_bytes(raw)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, check_files=False)
    assert str(caught.value) == (f"{path}:4:16: not valid UTF-8: byte 0xe8 cannot be decoded; "
                                 f"save the file as UTF-8")


@pytest.mark.parametrize(("text", "where"), [
    ("version: 1\nmodels:\n\t- name: m\n", "3:1"),
    ("version: 1\nmodels:\n  - name: m\n\t  source: m.onnx\n", "4:1"),
    ("version:\t1\nmodels:\n  - name: m\n    source:\tm.onnx\n    targets: [rk3588]\n", None),  # YAML allows a tab here
])
def test_tabs(tmp_path, text, where):
    path = tmp_path / "models.yaml"
    path.write_text(text)
    if where is None:
        assert load_manifest(path, check_files=False).version == 1
        return
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, check_files=False)
    assert str(caught.value).startswith(f"{path}:{where}: tab character"), str(caught.value)


@pytest.mark.parametrize("source", ["a.onnx", "loopdir/m.onnx"], ids=["two-link-loop", "directory-loop"])
def test_a_symlink_loop_as_source_is_a_located_problem(tmp_path, source):
    os.symlink("b.onnx", tmp_path / "a.onnx")
    os.symlink("a.onnx", tmp_path / "b.onnx")
    os.symlink("loopdir", tmp_path / "loopdir")
    path = tmp_path / "models.yaml"
    path.write_text(f"version: 1\nmodels:\n  - name: m\n    source: {source}\n    targets: [rk3588]\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, check_files=True)
    assert str(caught.value) == f"{path}:4:13: source '{source}' is a symlink loop"
