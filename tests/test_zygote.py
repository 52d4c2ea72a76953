"""The worker model: a zygote per build forks a child per conversion; fresh processes are the fallback.

The tests without the toolkit point RKNN_PIPELINE_WORKER_PYTHON at a script
that records how it was started, to see which kind of worker the build asked for
and that a failing zygote makes the build fall back, saying so once. The tests
with the toolkit are the proof that forking after the toolkit's import is safe:
same results as a fresh process, twenty conversions from one zygote without
growth or leaks, crashes that stay in their child, a dead zygote survived.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, Project, make_pool_identity_model

MANIFEST = """\
version: 1
models:
  - name: alpha
    source: alpha.onnx
    targets: [rk3588, rk3566]
"""

FALLBACK = "falling back to a fresh worker process per conversion"


def _project(root, script_body: str) -> tuple[Project, object]:
    project = Project(root)
    make_pool_identity_model(project.root / "alpha.onnx", seed=1)
    project.write_manifest(MANIFEST)
    starts = project.root / "starts.txt"
    script = project.root / "fake-python.sh"
    script.write_text(f"#!/bin/sh\necho \"$2\" >> '{starts}'\n{script_body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    project.env["RKNN_PIPELINE_WORKER_PYTHON"] = str(script)
    project.env["RKNN_PIPELINE_PREWARM"] = "0"
    return project, starts


def test_a_zygote_that_cannot_start_falls_back_to_fresh_workers_and_says_so_once(tmp_path):
    project, starts = _project(tmp_path, "exit 97")
    proc = project.doit("--continue", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count(FALLBACK) == 1, out
    assert "exited with code 97 before it was ready" in out
    # one zygote for the build, then each conversion in its own fresh worker (which fails here)
    assert starts.read_text().split() == ["pipeline.zygote", "pipeline.worker", "pipeline.worker"]
    assert out.count("conversion worker exited with code 97 without a result") == 2


def test_the_escape_hatch_never_starts_a_zygote(tmp_path):
    project, starts = _project(tmp_path, "exit 97")
    project.env["RKNN_PIPELINE_WORKER"] = "fresh"
    proc = project.doit("--continue", check=False)
    out = proc.stdout + proc.stderr
    assert FALLBACK not in out
    assert starts.read_text().split() == ["pipeline.worker", "pipeline.worker"]


def test_an_unknown_worker_mode_is_a_clear_error(tmp_path):
    project, starts = _project(tmp_path, "exit 97")
    project.env["RKNN_PIPELINE_WORKER"] = "spawn"
    proc = project.doit("convert:alpha@rk3588", check=False)
    assert proc.returncode != 0
    assert "RKNN_PIPELINE_WORKER='spawn' is not one of fork, fresh" in proc.stdout + proc.stderr
    assert not starts.exists()



def test_only_the_pairs_doit_will_convert_start_the_toolkit(tmp_path):
    """The pipeline's reporter tells the build which conversions this run makes; nothing else starts one."""
    project, starts = _project(tmp_path, "exit 97")
    project.doit("resolve", reporter="rknn")
    assert not starts.exists(), "`doit resolve` started the toolkit"
    proc = project.doit("convert:alpha@rk3566", check=False, reporter="rknn")
    assert "[1/1] convert alpha@rk3566" in proc.stdout
    # one zygote (it fails here), then the one selected conversion in a fresh worker; not alpha@rk3588
    assert starts.read_text().split() == ["pipeline.zygote", "pipeline.worker"]


def test_a_bad_number_of_conversion_slots_is_a_clear_error(tmp_path):
    project, starts = _project(tmp_path, "exit 97")
    project.env["RKNN_PIPELINE_JOBS"] = "two"
    proc = project.doit("convert:alpha@rk3588", check=False, reporter="rknn")
    assert proc.returncode != 0
    assert "RKNN_PIPELINE_JOBS='two' is not a whole number of conversions" in proc.stdout + proc.stderr

# -- proof that forking is safe, with the real toolkit -------------------------------------------------


SMALL = """\
version: 1
defaults: {verify: {samples: 2, min_cosine: 0.9}}
models:
  - name: pool
    source: examples/models/tiny_pool_identity.onnx
    inputs: {x: [1, 3, 32, 32]}
    targets: [rk3588, rk3566, rk3576, rk3562]
  - name: stem
    source: examples/models/light_densenet121.onnx
    inputs: {data_0: [1, 3, 224, 224]}
    outputs: [r7]
    targets: [rk3588, rk3576]
  - name: detector
    source: examples/models/tiny_detector.onnx
    mean_values: {image: [0, 0, 0]}
    std_values: {image: [255, 255, 255]}
    targets: [rk3588]
  - name: pool_int8
    source: examples/models/tiny_pool_identity.onnx
    inputs: {x: [1, 3, 32, 32]}
    targets: [rk3588]
    quantization: {dataset: examples/calib/inception_v2.txt, dtype: w8a8}
"""


def _recording_python(project: Project) -> Path:
    """An interpreter wrapper that appends the module it is asked to run to starts.txt."""
    starts = project.root / "starts.txt"
    script = project.root / "python.sh"
    script.write_text(f"#!/bin/sh\necho \"$2\" >> '{starts}'\nexec '{sys.executable}' \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    project.env["RKNN_PIPELINE_WORKER_PYTHON"] = str(script)
    return starts


def _outcome(project: Project, name: str, target: str) -> dict:
    """What must not depend on how the worker was started: layer table, placement summary, verify cosines."""
    workdir = project.root / "build" / name / target
    record = json.loads((workdir / "convert.json").read_text())
    cosines = [round(output["cosine"], 6) for output in (record.get("verify") or {}).get("outputs") or []]
    return {"layers": json.loads((workdir / "placement.json").read_text()), "placement": record["placement"],
            "cosines": cosines, "op_target": record["op_target"], "remaps": record["remaps"]}


@pytest.mark.toolkit
def test_every_example_model_converts_the_same_in_a_forked_child_and_in_a_fresh_process(tmp_path):
    projects = {}
    for mode in ("fork", "fresh"):
        (tmp_path / mode).mkdir()
        project = projects[mode] = Project(tmp_path / mode)
        shutil.copy(REPO / "models.yaml", project.root / "models.yaml")
        starts = _recording_python(project)
        project.env["RKNN_PIPELINE_WORKER"] = mode
        project.env["RKNN_PIPELINE_PREWARM"] = "0"
        # forked: with the pipeline's reporter, so conversions start ahead and run two at once
        out = project.doit("convert", reporter="rknn" if mode == "fork" else "console")
        assert FALLBACK not in out.stdout + out.stderr
        started = starts.read_text().split()
        pairs = sorted(path.parent for path in project.root.glob("build/*/*/convert.json"))
        assert len(pairs) >= 8
        if mode == "fork":  # one import for the whole build, every conversion forked from it
            assert started == ["pipeline.zygote"]
        else:
            assert started == ["pipeline.worker"] * len(pairs)
    for workdir in pairs:
        name, target = workdir.parent.name, workdir.name
        forked, fresh = (_outcome(projects[mode], name, target) for mode in ("fork", "fresh"))
        assert forked["layers"], f"{name}@{target}: no layer table in convert.log"
        assert forked == fresh, f"{name}@{target} differs between a forked and a fresh worker"


@pytest.mark.toolkit
def test_a_zygote_started_by_a_conversion_ahead_outlives_that_conversion(tmp_path):
    """With a cache the zygote starts at resolve, from the thread of the first conversion started ahead;
    it must serve the next ones (a zygote dies with the thread that started it, unless that is a
    long-lived one)."""
    project = Project(tmp_path)
    project.write_manifest("""\
version: 1
models:
  - name: pool
    source: examples/models/tiny_pool_identity.onnx
    inputs: {x: [1, 3, 32, 32]}
    targets: [rk3588, rk3566, rk3576]
""")
    starts = _recording_python(project)
    project.env.update(RKNN_PIPELINE_CACHE=str(tmp_path / "cache"), RKNN_PIPELINE_JOBS="1",
                       RKNN_PIPELINE_PREWARM="0")
    out = project.doit(reporter="rknn")
    assert FALLBACK not in out.stdout + out.stderr
    assert "3 conversions: 3 converted" in out.stdout
    assert starts.read_text().split() == ["pipeline.zygote"]

def _rollup(pid: int) -> dict[str, int]:
    """A process's memory in kB: proportional (pss), unique (uss), and what it wrote itself (anonymous,
    private_dirty). Only the last two can show a leak: pss and uss also move when other processes map or
    unmap the same library files (the toolkit's torch libraries are shared by every process that loads
    them, on a shared machine too)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0])
    return {"pss": fields["Pss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"],
            "anonymous": fields["Anonymous"], "private_dirty": fields["Private_Dirty"]}


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


class _InProcess:
    """Conversions driven from the test process, through the same call the convert task makes,
    so the test can see (and kill) the zygote and its children."""

    def __init__(self, root: Path, manifest: str):
        from pipeline.layout import Layout
        from pipeline.manifest import load_manifest

        self.project = Project(root)
        self.project.write_manifest(manifest)
        self.project.doit("resolve")
        self.manifest = load_manifest(self.project.root / "models.yaml")
        self.layout = Layout(self.manifest.directory)

    def convert(self, name: str, target: str) -> dict:
        from pipeline import stages

        stages.convert_with_cache(self.manifest, self.layout, self.manifest.model(name), target)
        return _outcome(self.project, name, target)

    @staticmethod
    def zygote():
        from pipeline.conversion import _Zygotes

        live = list(_Zygotes.live.values())
        assert len(live) == 1 and live[0].alive() and not _Zygotes.refused, (live, _Zygotes.refused)
        return live[0]


@pytest.fixture
def in_process(tmp_path, monkeypatch):
    from pipeline.conversion import _Zygotes

    for name in ("RKNN_PIPELINE_WORKER", "RKNN_PIPELINE_WORKER_PYTHON", "RKNN_PIPELINE_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RKNN_PIPELINE_PREWARM", "0")
    monkeypatch.chdir(tmp_path)
    _Zygotes.close_all()
    _Zygotes.refused, _Zygotes.stopping = {}, False
    yield lambda manifest=SMALL: _InProcess(tmp_path, manifest)
    _Zygotes.close_all()


@pytest.mark.toolkit
def test_twenty_conversions_from_one_zygote_neither_grow_it_nor_leak_into_the_next_child(in_process, monkeypatch):
    run = in_process()
    pairs = [(m["name"], t) for m in run.manifest.models for t in m["targets"]]
    order = [pairs[i % len(pairs)] for i in range(20)]
    first: dict = {}
    memory = []
    pid = None
    for name, target in order:
        outcome = run.convert(name, target)
        zygote = run.zygote()
        pid = pid or zygote.pid
        assert zygote.pid == pid, "the zygote was replaced: conversions did not all come from one"
        assert not _children(pid), "a child outlived its conversion"
        memory.append(_rollup(pid))
        # Every repeat of a pair matches its first conversion: nothing leaks from one child to the next.
        assert outcome == first.setdefault((name, target), outcome), f"{name}@{target} changed on a repeat"
    growth = {key: memory[-1][key] - memory[0][key] for key in ("anonymous", "private_dirty")}
    assert growth["anonymous"] < 1024 and growth["private_dirty"] < 1024, (growth, memory)
    last = order[-1]
    monkeypatch.setenv("RKNN_PIPELINE_WORKER", "fresh")
    assert run.convert(*last) == first[last], f"{last} differs from a fresh-process build"


def _kill_the_child_when_it_logs(zygote_pid: int, log: Path, delay: float) -> threading.Thread:
    def kill():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for child in _children(zygote_pid):
                try:
                    if os.readlink(f"/proc/{child}/fd/1") == str(log):
                        time.sleep(delay)
                        os.kill(child, signal.SIGKILL)
                        return
                except OSError:
                    pass
            time.sleep(0.05)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


@pytest.mark.toolkit
def test_a_killed_or_natively_crashing_child_fails_only_its_own_conversion(in_process, tmp_path):
    from pipeline.stages import StageFailed

    manifest = SMALL + """\
  - name: crash
    source: examples/models/tiny_pool_identity.onnx
    inputs: {x: [1, 3, 32, 32]}
    targets: [rk3588]
    quantization: {dataset: examples/calib/inception_v2.txt, dtype: w8a8}
  - name: slow
    source: examples/models/light_inception_v2.onnx
    inputs: {data_0: [1, 3, 224, 224]}
    targets: [rk3588]
"""
    run = in_process(manifest)
    before = run.convert("pool", "rk3588")
    zygote = run.zygote()

    # SIGKILL of the child mid-build (what the OOM killer does)
    killer = _kill_the_child_when_it_logs(zygote.pid, run.layout.log("slow", "rk3588"), 1.0)
    with pytest.raises(StageFailed, match="slow@rk3588: conversion failed at worker: conversion worker "
                                          "killed by signal SIGKILL"):
        run.convert("slow", "rk3588")
    killer.join()
    assert run.zygote() is zygote
    assert run.convert("pool", "rk3588") == before

    # A native abort inside the toolkit: w8a8 for rk2118 ("Meet unsupported conv"). The manifest may
    # refuse that pair at load, so the job is the rk3588 one aimed at rk2118.
    crash_dir = run.layout.workdir("crash", "rk2118")
    crash_dir.mkdir(parents=True)
    shutil.copy(run.layout.resolved("crash", "rk3588"), run.layout.resolved("crash", "rk2118"))
    with pytest.raises(StageFailed, match="killed by signal SIGABRT") as failure:
        run.convert("crash", "rk2118")
    assert "Meet unsupported conv" in str(failure.value)
    assert not list(crash_dir.glob("*.rknn*")), "a crashed conversion left a model behind"
    assert run.zygote() is zygote  # a crash in the fresh retry too: the toolkit's own, not fork's
    assert run.convert("pool", "rk3588") == before


@pytest.mark.toolkit
def test_a_dead_zygote_makes_the_build_fall_back_once_and_carry_on(in_process, capsys):
    from pipeline.conversion import _Zygotes

    run = in_process()
    before = run.convert("pool", "rk3588")
    zygote = run.zygote()
    os.kill(zygote.pid, signal.SIGKILL)
    zygote.proc.wait()
    assert run.convert("pool", "rk3588") == before
    assert run.convert("pool", "rk3566")["layers"]
    err = capsys.readouterr().err
    assert err.count(FALLBACK) == 1 and "was killed by signal SIGKILL" in err, err
    assert not _Zygotes.live


@pytest.mark.toolkit
def test_a_forked_child_past_its_timeout_is_killed_with_its_group_and_the_zygote_goes_on(in_process):
    from pipeline.stages import StageFailed

    run = in_process(SMALL + """\
  - name: slow
    source: examples/models/light_inception_v2.onnx
    inputs: {data_0: [1, 3, 224, 224]}
    targets: [rk3588]
    timeout: 1
""")
    before = run.convert("pool", "rk3588")
    zygote = run.zygote()
    with pytest.raises(StageFailed, match="slow@rk3588: conversion failed at timeout: conversion timed out"):
        run.convert("slow", "rk3588")
    assert not _children(zygote.pid)
    assert not list(run.layout.workdir("slow", "rk3588").glob("model.rknn*"))
    assert run.zygote() is zygote
    assert run.convert("pool", "rk3588") == before
