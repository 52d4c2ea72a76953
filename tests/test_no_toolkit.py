"""``pytest -m "not toolkit"`` never imports rknn: proved by running tests where it cannot be imported.

A ``sitecustomize`` on ``PYTHONPATH`` puts an import blocker first on
``sys.meta_path`` of every Python process of the run (pytest, doit
subprocesses, workers), and leaves a mark saying who tried. The whole
unmarked subset takes minutes on a loaded 2-core machine, so this runs a
representative part: the decision-layer tests, resolution and actions, doit
runs that stop at manifest errors, analysis and resolution under spawn, and
the cache without the toolkit. The CI's ``-m "not toolkit"`` run is the rest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

BLOCKER = '''
import os, sys, traceback

class _NoToolkit:
    def find_spec(self, name, path=None, target=None):
        if name == "rknn" or name.startswith("rknn."):
            with open(os.environ["RKNN_PIPELINE_TEST_BLOCK_MARK"], "a") as mark:
                mark.write(f"pid {os.getpid()} {sys.argv[:2]} imported {name}\\n")
                mark.write("".join(traceback.format_stack(limit=8)) + "\\n")
            raise ImportError(f"{name} is blocked: this run must not import the toolkit")
        return None

sys.meta_path.insert(0, _NoToolkit())
'''

SUBSET = ["tests/test_decisions.py", "tests/test_actions.py", "tests/test_resolution.py", "tests/test_doit_errors.py",
          "tests/test_spawn.py", "tests/test_cache.py", "tests/test_identity.py", "tests/test_placement_facts.py"]


def _blocked_env(tmp_path: Path) -> tuple[dict, Path]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    mark = tmp_path / "rknn-imported"
    env = {**os.environ, "RKNN_PIPELINE_TEST_BLOCK_MARK": str(mark),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    return env, mark


def test_the_blocker_blocks(tmp_path):
    env, mark = _blocked_env(tmp_path)
    proc = subprocess.run([sys.executable, "-c", "import rknn.api"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "rknn is blocked" in proc.stderr
    assert "imported rknn" in mark.read_text()


@pytest.mark.skipif(bool(os.environ.get("RKNN_PIPELINE_TEST_BLOCK_MARK")), reason="already inside a blocked run")
def test_the_not_toolkit_subset_never_imports_rknn(tmp_path):
    env, mark = _blocked_env(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "not toolkit", "-q", "-p", "no:cacheprovider",
                           "--basetemp", str(tmp_path / "run"), *SUBSET],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    tried = mark.read_text() if mark.exists() else ""
    assert not tried, f"rknn was imported during the not-toolkit subset:\n{tried}"
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
