"""Shared fixtures: tiny ONNX models made on the fly, and throwaway doit projects."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def make_pool_identity_model(path: Path, seed: int = 0) -> Path:
    """Conv -> AveragePool(count_include_pad=0, pads 1) -> Identity -> graph output.

    The toolkit folds the Identity, so the pool's output tensor '301' is renamed
    to the graph output 'y' and op_target={'301': ...} is rejected: the remap case.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.random.default_rng(seed).standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv0", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("AveragePool", ["c"], ["301"], name="pool0", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         count_include_pad=0),
        helper.make_node("Identity", ["301"], ["y"], name="ident0"),
    ]
    graph = helper.make_graph(nodes, "pool_identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_npy_dataset(directory: Path, count: int = 2, shape=(1, 3, 16, 16), seed: int = 0) -> Path:
    """A calibration list of .npy samples (``dataset.txt``, paths relative to it)."""
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for index in range(count):
        name = f"sample_{index}.npy"
        np.save(directory / name, rng.uniform(0, 1, size=shape).astype(np.float32))
        names.append(name)
    (directory / "dataset.txt").write_text("".join(f"{name}\n" for name in names))
    return directory / "dataset.txt"


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
