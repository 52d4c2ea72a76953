"""Safety: a manifest is data. Nothing in it is executed or imported, and no model
name can make the build write outside ``build/`` and ``dist/``.

A manifest is often copied from elsewhere or generated; if YAML tags could
construct Python objects, or a name like ``../../x`` reached a path, a build
could run code or overwrite files. These tests try such values and require
that they are refused at manifest load with ``PATH:LINE:COL``, or treated as
plain strings (a ``source`` that looks like code is just a missing file).
The artifact cache's own safety (entries naming paths outside their
destination, corrupt entries) is tested in tests/test_cache.py.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_pool_identity_model
from pipeline.layout import Layout
from pipeline.manifest import ManifestError, load_manifest

CANARY_MODULE = "rknn_safety_canary"


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A manifest directory with one real model, and a module that records any import of it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    make_pool_identity_model(tmp_path / "m.onnx")
    (tmp_path / f"{CANARY_MODULE}.py").write_text(
        "from pathlib import Path\n"
        "Path(__file__).with_name('imported').write_text('the manifest imported me')\n"
        "def run(*args, **kwargs):\n"
        "    Path(__file__).with_name('executed').write_text('the manifest ran me')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop(CANARY_MODULE, None)


def _untouched(directory: Path) -> None:
    assert not (directory / "imported").exists(), "a manifest value imported a module"
    assert not (directory / "executed").exists(), "a manifest value ran code"
    assert not (directory / "pwned").exists(), "a manifest value ran a shell command"
    assert CANARY_MODULE not in sys.modules


def _problems(directory: Path, text: str, **options) -> list[str]:
    (directory / "models.yaml").write_text(textwrap.dedent(text))
    with pytest.raises(ManifestError) as caught:
        load_manifest("models.yaml", **options)
    return [str(problem) for problem in caught.value.problems]


# -- nothing is executed or imported ------------------------------------------------------------

PYTHON_TAGS = [
    ("object-apply", f"!!python/object/apply:{CANARY_MODULE}.run [x]", "!!python/object/apply:"),
    ("object-new", f"!!python/object/new:{CANARY_MODULE}.Thing {{}}", "!!python/object/new:"),
    ("object", f"!!python/object:{CANARY_MODULE}.Thing {{a: 1}}", "!!python/object:"),
    ("name", f"!!python/name:{CANARY_MODULE}.run ''", "!!python/name:"),
    ("module", f"!!python/module:{CANARY_MODULE} ''", "!!python/module:"),
    ("os-system", "!!python/object/apply:os.system ['touch pwned']", "!!python/object/apply:os.system"),
    ("subprocess", "!!python/object/apply:subprocess.check_output [[touch, pwned]]", "!!python/object/apply:"),
    ("tuple", "!!python/tuple [rk3588]", "!!python/tuple"),
    ("local-tag", f"!{CANARY_MODULE} x", f"!{CANARY_MODULE}"),
]


@pytest.mark.parametrize(("value", "tag"), [case[1:] for case in PYTHON_TAGS], ids=[case[0] for case in PYTHON_TAGS])
@pytest.mark.parametrize("where", ["source", "targets", "top"])
def test_python_tags_are_refused_and_never_run(workdir, value, tag, where):
    if where == "top":
        text = f"version: 1\nextra: {value}\nmodels:\n  - name: m\n    source: m.onnx\n    targets: [rk3588]\n"
        at = "2:8"
    elif where == "source":
        text = f"version: 1\nmodels:\n  - name: m\n    source: {value}\n    targets: [rk3588]\n"
        at = "4:13"
    else:
        text = f"version: 1\nmodels:\n  - name: m\n    source: m.onnx\n    targets: {value}\n"
        at = "5:14"
    (problem,) = _problems(workdir, text)
    assert problem.startswith(f"models.yaml:{at}: unsupported YAML tag {tag}"), problem
    assert problem.endswith("only plain data is allowed"), problem
    _untouched(workdir)


@pytest.mark.parametrize("source", [
    "os.system('touch pwned')",
    "__import__('os').system('touch pwned')",
    "$(touch pwned).onnx",
    "`touch pwned`.onnx",
    "m.onnx; touch pwned",
    f"{CANARY_MODULE}.run()",
])
def test_a_source_that_looks_like_code_is_just_a_missing_file(workdir, source):
    quoted = source.replace("'", "''")
    text = f"version: 1\nmodels:\n  - name: m\n    source: '{quoted}'\n    targets: [rk3588]\n"
    (problem,) = _problems(workdir, text)
    assert problem.startswith(f"models.yaml:4:13: source {source!r} does not exist (looked for "), problem
    _untouched(workdir)


def test_values_that_look_like_code_elsewhere_stay_plain_strings(workdir):
    text = f"""\
        version: 1
        models:
          - name: m
            source: m.onnx
            targets: [rk3588]
            outputs: ["__import__('{CANARY_MODULE}').run()"]
            overrides:
              - match: {{ op_type: "eval('1+1')" }}
                action: npu
        """
    problems = _problems(workdir, text)
    assert any(p.startswith("models.yaml:6:15: output \"__import__('rknn_safety_canary').run()\" is not a tensor")
               for p in problems), problems
    assert any(p.startswith("models.yaml:8:27: unknown op_type \"eval('1+1')\"") for p in problems), problems
    _untouched(workdir)


# -- names never leave build/ and dist/ -----------------------------------------------------------

BAD_NAMES = [
    ("dotdot", "'..'", "invalid name '..'"),
    ("dot", "'.'", "invalid name '.'"),
    ("parent-prefix", "../x", "invalid name '../x'"),
    ("deep-parent", "a/../../x", "invalid name 'a/../../x'"),
    ("slash", "a/b", "invalid name 'a/b'"),
    ("absolute", "/abs", "invalid name '/abs'"),
    ("absolute-etc", "/etc/passwd", "invalid name '/etc/passwd'"),
    ("backslash", "'a\\b'", "invalid name 'a\\\\b'"),
    ("home", "'~'", "invalid name '~'"),
    ("hidden", ".hidden", "invalid name '.hidden'"),
    ("uppercase", "Model", "invalid name 'Model'"),
    ("empty", "''", "invalid name ''"),
    ("too-long", "a" * 65, "name is longer than 64 characters"),
    ("very-long", "a" * 5000, "name is longer than 64 characters"),
    ("number", "12", "name must be a string, got integer 12; quote it"),
    ("null", "null", "name must be a string, got null"),
    ("list", "[a, b]", "name must be a string, got a list"),
]


@pytest.mark.parametrize(("name", "message"), [case[1:] for case in BAD_NAMES], ids=[case[0] for case in BAD_NAMES])
def test_unsafe_model_names_are_refused_at_manifest_load(workdir, name, message):
    problems = _problems(workdir, f"version: 1\nmodels:\n  - name: {name}\n    source: m.onnx\n    targets: [rk3588]\n",
                         check_files=False)
    assert any(p.startswith(f"models.yaml:3:11: {message}") for p in problems), problems
    assert not (workdir / "build").exists() and not (workdir / "dist").exists()


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.one_of(st.text(max_size=70), st.text(alphabet="a./-_~\\\n0", max_size=12),
                      st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True)))
def test_every_name_the_manifest_accepts_stays_inside_build_and_dist(workdir, name):
    """Whatever the manifest lets through, every path built from it is inside build/ or dist/."""
    (workdir / "models.yaml").write_text(
        f"version: 1\nmodels:\n  - name: {_yaml_string(name)}\n    source: m.onnx\n    targets: [rk3588]\n")
    try:
        manifest = load_manifest("models.yaml", check_files=False)
    except ManifestError:
        return
    accepted = manifest.models[0]["name"]
    assert accepted == name
    layout = Layout(workdir)
    inside_build = [layout.workdir(accepted, "rk3588"), layout.analysis(accepted, "rk3588"),
                    layout.rknn(accepted, "rk3588"), layout.log(accepted, "rk3588")]
    inside_dist = [layout.dist_rknn(accepted, "rk3588"), layout.sidecar(accepted, "rk3588")]
    for path in inside_build:
        assert path.resolve().is_relative_to(layout.build / accepted), path
    for path in inside_dist:
        assert path.resolve().parent == layout.dist / "rk3588", path


def _yaml_string(text: str) -> str:
    """``text`` as a YAML double-quoted scalar (JSON strings are valid YAML)."""
    import json

    return json.dumps(text)


def test_a_name_ending_in_a_newline_is_refused(workdir):
    text = 'version: 1\nmodels:\n  - name: "abc\\n"\n    source: m.onnx\n    targets: [rk3588]\n'
    problems = _problems(workdir, text, check_files=False)
    assert any(p.startswith("models.yaml:3:11: invalid name") for p in problems), problems


# -- Layout re-checks what the manifest already refused --------------------------------------------


@pytest.mark.parametrize(("name", "target"), [
    ("..", "rk3588"), ("m", ".."), ("../..", "rk3588"), ("a/../..", "rk3588"), ("/abs", "rk3588"),
    ("m", "/etc"), ("m", "../../x"), (".", "rk3588"),
])
def test_layout_refuses_paths_that_leave_build(tmp_path, name, target):
    layout = Layout(tmp_path)
    with pytest.raises(ValueError, match="refusing path outside"):
        layout.workdir(name, target)


@pytest.mark.parametrize(("name", "target"), [
    ("../x", "rk3588"), ("../../x", "rk3588"), ("m", ".."), ("/abs", "rk3588"), ("m", "../build"),
])
def test_layout_refuses_paths_that_leave_dist(tmp_path, name, target):
    layout = Layout(tmp_path)
    with pytest.raises(ValueError, match="refusing path outside"):
        layout.dist_rknn(name, target)
    with pytest.raises(ValueError, match="refusing path outside"):
        layout.sidecar(name, target)


def test_layout_accepts_ordinary_names(tmp_path):
    layout = Layout(tmp_path)
    root = tmp_path.resolve()
    assert layout.rknn("inception_v2", "rk3588") == root / "build" / "inception_v2" / "rk3588" / "model.rknn"
    assert layout.sidecar("a..b", "rk3588") == root / "dist" / "rk3588" / "a..b.json"
