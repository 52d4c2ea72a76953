"""The worker model: a zygote per build forks a child per conversion; fresh processes are the fallback.

The tests without the toolkit point RKNN_PIPELINE_WORKER_PYTHON at a script
that records how it was started, to see which kind of worker the build asked for
and that a failing zygote makes the build fall back, saying so once.
"""

from __future__ import annotations

import stat

from conftest import Project, make_pool_identity_model

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
