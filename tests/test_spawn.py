"""Task actions under the spawn start method: nothing they need may come only from fork inheritance.

doit -n N starts its task processes with multiprocessing's default start
method: fork on Linux, spawn on macOS and Windows (and wherever a user sets
it). A spawned process inherits the environment but not the parent's memory:
not doit's command-line variables (``manifest=``), not the loaded manifest and
not the tree lock the parent holds, which a child used to wait on forever.
"""

from __future__ import annotations

import sys

SPAWNING_DOIT = """
import multiprocessing
import sys

if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")
    from doit.__main__ import main

    sys.argv = ["doit", *sys.argv[1:]]
    main()
"""

MANIFEST = """\
version: 1
models:
  - name: inception
    source: examples/models/light_inception_v2.onnx
    inputs: {data_0: [1, 3, 224, 224]}
    targets: [rk3588, rk3562]
    overrides:
      - match: {op_type: AveragePool, attrs: {count_include_pad: 0}}
        action: rewrite
        targets: [rk3562]
"""


def test_analyze_and_resolve_run_in_spawned_task_processes(project):
    import subprocess

    # Not models.yaml: the children must learn the manifest from the parent, not guess it.
    project.write_manifest(MANIFEST, name="other.yaml")
    (project.root / "spawning_doit.py").write_text(SPAWNING_DOIT)
    env = {**project.env, "RKNN_PIPELINE_LOCK_WAIT": "10",  # a child waiting on its parent's lock fails fast
           "RKNN_PIPELINE_WORKER": "fresh"}  # resolve starts no toolkit process ahead of a conversion
    proc = subprocess.run([sys.executable, "spawning_doit.py", "-n", "2", "-P", "process", "--reporter", "console",
                           "manifest=other.yaml", "analyze", "resolve"],
                          cwd=project.root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "another doit run" not in proc.stderr
    ran = project.ran(proc)
    assert ran == {f"{stage}:inception@{target}" for stage in ("analyze", "resolve") for target in ("rk3588", "rk3562")}
    pair = project.root / "build" / "inception"
    assert (pair / "rk3562" / "rewritten.onnx").exists() and not (pair / "rk3588" / "rewritten.onnx").exists()
    assert "rewrites 8" in proc.stdout  # the rk3562-only override reached the child that resolved rk3562


def test_a_child_of_the_lock_holder_does_not_wait_for_it(tmp_path, monkeypatch):
    import os

    from pipeline import tasks

    monkeypatch.setenv(tasks.LOCK_ENV, f"{os.getppid()}:{tmp_path.resolve()}")
    assert tasks._parent_holds_lock(tmp_path) and tasks._parent_holds_lock(None)
    assert not tasks._parent_holds_lock(tmp_path / "elsewhere")
    monkeypatch.setenv(tasks.LOCK_ENV, f"{os.getpid()}:{tmp_path.resolve()}")  # not our parent
    assert not tasks._parent_holds_lock(tmp_path)
