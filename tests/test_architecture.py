"""The package's shape: no import cycles, one owner per name, one error base, shared helpers.

These run without the toolkit and without onnx models; they guard the layering
that lets a feature touch one module instead of six.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere (top level or inside a function)."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    found.add(node.module.split(".")[0])
                elif node.level == 1 or node.module == "pipeline":
                    found |= {alias.name for alias in node.names if alias.name in modules}
                elif node.module and node.module.startswith("pipeline."):
                    found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("pipeline.")}
        graph[path.stem] = (found & modules) - {path.stem}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_package_has_no_import_cycle():
    # Lazy (function-level) imports count too: a cycle through them still means two modules
    # that each need the other, which is what makes a feature touch both.
    found = cycles(import_graph())
    assert found == [], f"import cycles in pipeline/: {found}"


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("leaf", ["formats", "errors", "names", "onnx_util", "schema", "cache_entry"])
def test_leaf_modules_stay_low(leaf):
    # These exist so that others can share them without importing each other.
    allowed = {"errors"}
    assert import_graph()[leaf] <= allowed


def test_ci_reads_the_format_without_the_doit_wiring():
    assert "tasks" not in import_graph()["ci"]


FILE_NAME = re.compile(r"""["'][\w.-]+\.(?:json|log|rknn|onnx|html|md|txt|cfg|npy)["']""")


def test_only_the_layout_spells_a_build_file_name():
    # Store object names (entry.json, the shard plan) live inside the store; the schema is package data.
    # "ai.onnx" is the ONNX default domain, not a file.
    owned_elsewhere = {"*": {'"ai.onnx"'}, "cache_entry.py": {'"entry.json"'}, "schema.py": {'"models.schema.json"'},
                       "shard.py": {'"pair.json"', '"plan.json"', '"duration.json"'},
                       "toolkit_envs.py": {'"rknn-pipeline-env.json"'},  # a toolkit venv's own marker
                       "toolkit.py": {'"error_analysis.txt"'}}  # the toolkit's own output
    offenders = []
    for path in PACKAGE.glob("*.py"):
        if path.name == "layout.py":
            continue
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            for name in FILE_NAME.findall(line):
                if name not in owned_elsewhere.get(path.name, set()) | owned_elsewhere["*"]:
                    offenders.append(f"{path.name}:{line_no}: {name}")
    assert offenders == []


def test_every_user_facing_error_shares_one_base():
    from pipeline import (analysis, cache, conversion, manifest, placement_rules, resolution, rewrite,
                          rknn_file, shard, signing, stages, toolkit, verify, yaml_source)
    from pipeline.errors import PipelineError

    classes = [analysis.AnalysisError, cache.CacheError, cache.CorruptEntry, conversion.ConversionFailed,
               manifest.ManifestError, placement_rules.RulesError, resolution.ResolutionError,
               rewrite.RewriteError, rknn_file.RknnFileError, shard.ShardError, signing.SignatureError,
               stages.StageFailed, toolkit.ToolkitError, verify.VerifyError, yaml_source.YamlError]
    assert [c.__name__ for c in classes if not issubclass(c, PipelineError)] == []
    # ...and keep the built-in bases callers already catch.
    assert issubclass(cache.CacheError, OSError) and issubclass(resolution.ResolutionError, ValueError)


def test_the_translator_turns_pipeline_errors_into_task_failures_only():
    from doit.exceptions import TaskFailed

    from pipeline.errors import PipelineError, as_task_failure
    from pipeline.stages import StageFailed

    def refuse():
        raise StageFailed("m@rk3588: refused")

    failure = as_task_failure(refuse, "models.yaml:3:5: ")
    assert isinstance(failure, TaskFailed) and "models.yaml:3:5: m@rk3588: refused" in failure.message
    assert as_task_failure(lambda: None) is None

    def bug():
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        as_task_failure(bug)
    assert issubclass(StageFailed, PipelineError)


def test_nearest_names():
    from pipeline.names import nearest

    assert nearest("Conv2", ["Conv", "Relu"]) == ["Conv"]
    assert nearest("zzz", ["Conv", "Relu"]) == []
    assert nearest("zzz", ["Conv", "Relu", "Add"], limit=2, fallback=True) == ["Conv", "Relu"]
    assert nearest(None, ["a"]) == []


def test_onnx_facts():
    from onnx import TensorProto, helper

    from pipeline import onnx_util

    model = helper.make_model(helper.make_graph([], "g", [], []),
                              opset_imports=[helper.make_opsetid("ai.onnx", 13), helper.make_opsetid("com.x", 2)])
    assert onnx_util.opset(model) == 13 and onnx_util.opset(model, "") == 13
    assert onnx_util.opset(model, "com.x") == 2 and onnx_util.opset(model, "com.y") == 0
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", None])
    assert onnx_util.dims(value) == [1, None, None]
    assert onnx_util.dims(value, symbolic=True) == [1, "n", None]
    unranked = helper.make_tensor_value_info("u", TensorProto.INT64, None)
    assert onnx_util.value_types([value, unranked]) == {"x": (TensorProto.FLOAT, [1, None, None]),
                                                        "u": (TensorProto.INT64, None)}


def test_pair_layout_names_every_file_of_a_pair(tmp_path):
    from pipeline.layout import CACHED_FILES, Layout, PairLayout

    layout = Layout(tmp_path)
    pair = layout.pair("m", "rk3588")
    assert pair.dir == tmp_path.resolve() / "build" / "m" / "rk3588"
    assert layout.convert_record("m", "rk3588") == pair.convert_record
    assert {pair.rknn.name, pair.convert_record.name, pair.placement.name, pair.log.name} == set(CACHED_FILES)
    assert pair.job.parent == pair.work and pair.partial_rknn.name.startswith(pair.rknn.name)
    assert PairLayout.of(pair) is pair and PairLayout.of(pair.dir) == pair
    with pytest.raises(ValueError):
        layout.pair("..", "rk3588")


def test_records_check_their_format_on_read(tmp_path):
    from pipeline.errors import PipelineError
    from pipeline.records import ANALYSIS, CONVERT, RESOLUTION, SIDECAR, StaleRecord

    pair = tmp_path / "build" / "m" / "rk3588"
    written = RESOLUTION.write(pair / "resolved.json", {"model": "m", "target": "rk3588", "op_target": {},
                                                          "explanations": {}, "rewrites": []})
    assert RESOLUTION.read(pair / "resolved.json") == written and written["format"] == RESOLUTION.format
    (pair / "analysis.json").write_text('{"format": 0, "model": "m", "target": "rk3588", "nodes": []}')
    with pytest.raises(StaleRecord, match=r"analysis record from another version .*format 0.*delete .*rk3588 and run"):
        ANALYSIS.read(pair / "analysis.json")
    # A convert.json from before records carried a format: a rebuild message, not a KeyError.
    (pair / "convert.json").write_text('{"model": "m", "target": "rk3588"}')
    with pytest.raises(PipelineError, match="convert record"):
        CONVERT.read(pair / "convert.json")
    (pair / "convert.json").write_text(f'{{"format": {CONVERT.format}, "model": "m", "target": "rk3588"}}')
    with pytest.raises(StaleRecord, match="no ok"):
        CONVERT.read(pair / "convert.json")
    assert SIDECAR.read(tmp_path / "dist" / "rk3588" / "m.json", missing_ok=True) is None
    with pytest.raises(StaleRecord, match="has not run"):
        SIDECAR.read(tmp_path / "dist" / "rk3588" / "m.json")
    with pytest.raises(StaleRecord):  # a writer that forgets a key is caught before anyone reads it
        SIDECAR.write(tmp_path / "s.json", {"model": "m"})
    assert not (tmp_path / "s.json").exists()
