"""The pipeline's doit reporter: progress while converting, one line when nothing happens."""

from __future__ import annotations

import re

import pytest

from conftest import Project
from pipeline.reporter import duration_text, shown_verbosity

MANIFEST = """\
version: 1
models:
  - name: a
    source: examples/models/tiny_pool_identity.onnx
    targets: [rk3588, rk3566]
    inputs: {x: [1, 3, 32, 32]}
  - name: b
    source: examples/models/tiny_pool_identity.onnx
    targets: [rk3588]
    inputs: {x: [1, 3, 32, 32]}
"""


@pytest.mark.toolkit
def test_progress_lines_a_summary_and_one_line_when_up_to_date(project):
    project.write_manifest(MANIFEST)
    first = project.doit(reporter="rknn").stdout
    starts = re.findall(r"^\[(\d+)/(\d+)\] convert (\S+)$", first, flags=re.M)  # no estimate: nothing recorded
    assert [(i, n) for i, n, _ in starts] == [("1", "3"), ("2", "3"), ("3", "3")], first
    assert {pair for *_, pair in starts} == {"a@rk3588", "a@rk3566", "b@rk3588"}
    assert re.search(r"^3 conversions: 3 converted, 0 restored from the cache, 0 failed; \d", first, flags=re.M)
    assert "-- " not in first

    assert project.doit(reporter="rknn").stdout == "3 model x target pairs up to date\n"

    project.doit("forget", "convert:a@rk3566")
    again = project.doit(reporter="rknn").stdout
    assert re.search(r"^\[1/1\] convert a@rk3566 \(about \d+(\.\d)? s\)$", again, flags=re.M), again
    assert re.search(r"^1 conversion: 1 converted, 0 restored from the cache, 0 failed; 2 pairs up to date; ",
                     again, flags=re.M), again

    # doit's own flags still work: another reporter, and verbosity 0 (task output captured)
    assert "-- convert:a@rk3588" in project.doit(reporter="console").stdout
    project.doit("forget", "export:b@rk3588")
    quiet = project.doit("-v", "0", reporter="rknn").stdout
    assert ".  export:b@rk3588" in quiet and "export b@rk3588  dist/" not in quiet, quiet
    assert quiet.endswith("3 model x target pairs up to date; 1 other task run\n"), quiet  # same sidecar: no lock


def test_sizes_use_the_reports_binary_units():
    from pipeline import report, stages

    assert stages._size(21_504) == report.human_size(21_504) == "21.0 KiB"


def test_verbosity_and_durations():
    assert shown_verbosity([]) == 2 and shown_verbosity(["-v", "0"]) == 0 and shown_verbosity(["-v1"]) == 1
    assert shown_verbosity(["--verbosity=1", "convert"]) == 1
    assert [duration_text(s) for s in (0.34, 42, 125, 4000)] == ["0.3 s", "42 s", "2 min 5 s", "1 h 6 min"]


@pytest.mark.toolkit
def test_the_summary_counts_cache_restores(project, tmp_path):
    import shutil

    project.write_manifest(MANIFEST)
    project.env["RKNN_PIPELINE_CACHE"] = str(tmp_path / "cache")
    project.doit()
    for built in ("build", "dist", ".doit.db"):
        path = project.root / built
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out = project.doit(reporter="rknn").stdout
    assert re.search(r"^3 conversions: 0 converted, 3 restored from the cache, 0 failed; ", out, flags=re.M), out


@pytest.mark.toolkit
def test_two_hundred_pairs_up_to_date_are_one_line(project, tmp_path):
    """The issue's scale: 50 models x 4 targets. Identical settings share one cache key per target (the key
    holds no model name), so the first build converts 4 pairs and restores the other 196."""
    targets = ["rk3588", "rk3566", "rk3576", "rk3562"]
    models = "".join(f"""\
  - name: m{index:02d}
    source: examples/models/tiny_pool_identity.onnx
    targets: [{", ".join(targets)}]
    inputs: {{x: [1, 3, 32, 32]}}
""" for index in range(50))
    project.write_manifest("version: 1\nmodels:\n" + models)
    project.env["RKNN_PIPELINE_CACHE"] = str(tmp_path / "cache")
    first = project.doit(reporter="rknn").stdout
    starts = re.findall(r"^\[(\d+)/(\d+)\] convert (\S+)", first, flags=re.M)
    assert [int(i) for i, _, _ in starts] == list(range(1, 201)) and {n for _, n, _ in starts} == {"200"}
    assert len({pair for *_, pair in starts}) == 200
    assert re.search(r"^200 conversions: 4 converted, 196 restored from the cache, 0 failed; \d", first, flags=re.M), \
        first[-2000:]

    for flags in ((), ("-v", "0"), ("-n", "2")):  # quiet whatever the verbosity or the number of processes
        noop = project.doit(*flags, reporter="rknn")
        assert (noop.stdout, noop.stderr) == ("200 model x target pairs up to date\n", ""), flags
    # doit's own reporter still lists every task, and doit's commands still see them all
    console = project.doit(reporter="console").stdout.splitlines()
    skipped = [line for line in console if line.startswith("-- ")]
    assert len(skipped) == 4 * 200 + 2 and len(skipped) == len(console), console[:5]  # + lock and report
    listed = project.doit("list", "--all").stdout
    assert sum(line.startswith("convert:") for line in listed.splitlines()) == 200
