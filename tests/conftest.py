"""Shared fixtures: tiny ONNX models made on the fly, and throwaway doit projects."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from model_makers import make_npy_dataset, make_pool_identity_model  # noqa: F401  (imported from here by tests)

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


@pytest.fixture
def pool_identity_model(tmp_path) -> Path:
    return make_pool_identity_model(tmp_path / "pool_identity.onnx")


# doit commands other than a build (a build is `doit`, `doit run ...` or `doit TASK ...`)
DOIT_COMMANDS = {"run", "list", "info", "help", "forget", "clean", "ignore", "auto", "dumpdb", "strace",
                 "reset-dep", "tabcompletion", "rknn-status", "rknn-report"}


class Project:
    """A throwaway doit project: the repo's dodo.py, a manifest, and example files."""

    def __init__(self, root: Path):
        self.root = root
        shutil.copy(REPO / "dodo.py", root / "dodo.py")
        shutil.copytree(EXAMPLES, root / "examples")
        self.env = dict(os.environ)
        self.env.pop("RKNN_PIPELINE_CACHE", None)

    def write_manifest(self, text: str, name: str = "models.yaml") -> Path:
        path = self.root / name
        path.write_text(text)
        return path

    def doit(self, *args: str, check: bool = True, timeout: float = 1800,
             reporter: str = "console") -> subprocess.CompletedProcess:
        """``doit ARGS``; a build runs with doit's console reporter (a line per task, which ``ran`` reads)
        unless ``reporter`` names another (``"rknn"``, the pipeline's default, is tested on its own)."""
        if not args or args[0] not in DOIT_COMMANDS or args[0] == "run":
            at = 1 if args and args[0] == "run" else 0
            args = (*args[:at], "--reporter", reporter, *args[at:])
        proc = subprocess.run([sys.executable, "-m", "doit", *args], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"doit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    @staticmethod
    def ran(proc: subprocess.CompletedProcess) -> set[str]:
        """Tasks doit executed (lines '. task'), as opposed to up-to-date ones ('-- task')."""
        return set(re.findall(r"^\.  (\S+)$", proc.stdout, flags=re.M))


@pytest.fixture
def project(tmp_path) -> Project:
    return Project(tmp_path)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto server mode) on a free loopback port, for the whole session."""
    from s3_server import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, request) -> str:
    """A fresh bucket on the test S3 server, with the standard AWS_* variables pointing at it."""
    import uuid

    for key, value in s3_server.environment().items():
        monkeypatch.setenv(key, value)
    name = f"rknn-{uuid.uuid4().hex[:12]}"
    s3_server.make_bucket(name)
    return name
