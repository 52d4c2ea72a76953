"""One environment per rknn-toolkit2 version, made by uv on demand, so one manifest can build for boards
whose runtimes need different toolkits.

A model's ``toolkit: "2.3.2"`` (or a mapping from target to version) runs that
conversion in a virtual environment holding that toolkit, created once under
``$RKNN_PIPELINE_TOOLKITS`` (default: the per-user cache,
``~/.cache/rknn-pipeline/toolkits``) and reused by every later build. The
version installed in the project's own environment runs there, as before.

Each environment gets the version's known constraints (``data/toolkits.yaml``)
and the project's own torch where the toolkit's range admits it, so uv links
the same files for every version. The worker runs there with this package on
``PYTHONPATH`` (a directory holding only a link to it, so nothing else of the
project's environment leaks in). Two builds that need the same environment at
once take turns on a file lock; an environment counts only once its marker,
written last, exists.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ENV_VAR = "RKNN_PIPELINE_TOOLKITS"
DATA = Path(__file__).resolve().parent / "data" / "toolkits.yaml"
PACKAGE = Path(__file__).resolve().parent
READY = "rknn-pipeline-env.json"  # written last: the environment is complete


class ToolkitEnvError(RuntimeError):
    """An environment could not be made; the message quotes uv and says what to try."""


@functools.lru_cache(maxsize=1)
def table() -> dict:
    import yaml

    return yaml.safe_load(DATA.read_text())


def root() -> Path:
    base = os.environ.get(ENV_VAR)
    if base:
        return Path(base).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "rknn-pipeline" / "toolkits"


def installed_version() -> str | None:
    from pipeline.toolkit import installed_version as installed

    return installed()


def uses_own_environment(version: str | None) -> bool:
    """Whether ``version`` runs in an environment of its own (not the project's)."""
    return bool(version) and version != installed_version()


def requirements(version: str) -> list[str]:
    """Everything installed into ``version``'s environment, as pip requirement strings."""
    data = table()
    row = (data.get("versions") or {}).get(version) or {}
    wanted = [f"rknn-toolkit2=={version}", *data.get("common", []), *row.get("constraints", []),
              *data.get("worker", [])]
    if data.get("share_torch"):
        try:
            torch = metadata.version("torch")
        except metadata.PackageNotFoundError:
            torch = None
        if torch and within(torch, row.get("torch", "")):
            wanted.append(f"torch=={torch}")
    return wanted


def within(version: str, specifiers: str) -> bool:
    """Whether release ``version`` ("2.2.0", "2.2.0+cpu") meets comma-separated ``specifiers``
    (">=1.13.1,<=2.1.0"; empty: any). Only the operators the data table uses, on release numbers."""
    import operator
    import re

    def release(text: str) -> tuple[int, ...]:
        parts = [int(part) for part in re.match(r"\d+(?:\.\d+)*", text.strip()).group().split(".")]
        while parts and parts[-1] == 0:  # 2.1 == 2.1.0
            parts.pop()
        return tuple(parts)

    compare = {">=": operator.ge, "<=": operator.le, "==": operator.eq, ">": operator.gt, "<": operator.lt}
    for spec in filter(None, (item.strip() for item in specifiers.split(","))):
        op = next(op for op in (">=", "<=", "==", ">", "<") if spec.startswith(op))
        if not compare[op](release(version), release(spec[len(op):])):
            return False
    return True


def environment_dir(version: str) -> Path:
    return root() / f"rknn-toolkit2-{version}-py{sys.version_info.major}{sys.version_info.minor}-{platform.machine()}"


def python_for(version: str | None) -> str:
    """The interpreter whose environment holds rknn-toolkit2 ``version`` (made now if missing)."""
    if not uses_own_environment(version):
        return sys.executable
    target = environment_dir(version)
    python = target / "bin" / "python"
    if (target / READY).is_file():
        return str(python)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another build making the same environment: wait for it
        if not (target / READY).is_file():
            _create(version, target)
    return str(python)


def _uv() -> str:
    found = shutil.which("uv")
    if found:
        return found
    try:
        from uv import find_uv_bin  # the uv package from PyPI ships its binary

        return find_uv_bin()
    except ImportError:
        raise ToolkitEnvError("uv is needed to make toolkit environments and was not found on PATH; install "
                              "it (https://docs.astral.sh/uv/) or remove the model's `toolkit:`") from None


def _create(version: str, target: Path) -> None:
    import time

    shutil.rmtree(target, ignore_errors=True)  # an earlier attempt that did not finish
    wanted = requirements(version)
    print(f"toolkit environment: creating rknn-toolkit2 {version} in {target} (once)", file=sys.stderr, flush=True)
    started = time.monotonic()
    uv = _uv()
    steps = [[uv, "venv", "--quiet", "--python", sys.executable, str(target)],
             [uv, "pip", "install", "--quiet", "--python", str(target / "bin" / "python"), *wanted]]
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(target, ignore_errors=True)
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise ToolkitEnvError(f"could not make the rknn-toolkit2 {version} environment "
                                  f"({' '.join(step[:3])} failed):\n{tail}\nCheck the network to PyPI, or set "
                                  f"{ENV_VAR} to a writable directory")
    versions = json.loads(subprocess.run(
        [str(target / "bin" / "python"), "-c", _VERSIONS_SCRIPT], capture_output=True, text=True, check=True).stdout)
    (target / READY).write_text(json.dumps({"requirements": wanted, "versions": versions,
                                            "seconds": round(time.monotonic() - started, 1)}, indent=2))
    print(f"toolkit environment: rknn-toolkit2 {version} ready in {time.monotonic() - started:.0f} s",
          file=sys.stderr, flush=True)


_VERSIONS_SCRIPT = """
import json, platform
from importlib import metadata
found = {}
for dist in ("rknn-toolkit2", "onnx", "onnxruntime", "numpy", "torch"):
    try:
        found[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        found[dist] = None
found["python"] = platform.python_version()
print(json.dumps(found))
"""


def environment_versions(version: str) -> dict | None:
    """The library versions recorded when ``version``'s environment was made (None before that)."""
    try:
        return json.loads((environment_dir(version) / READY).read_text())["versions"]
    except (OSError, ValueError, KeyError):
        return None


def package_path() -> str:
    """A directory holding only a link named ``pipeline`` to this package, for the worker's PYTHONPATH."""
    link_dir = root() / "links" / _path_digest(PACKAGE)
    link = link_dir / "pipeline"
    if not link.exists():
        link_dir.mkdir(parents=True, exist_ok=True)
        temp = link_dir / f".pipeline.{os.getpid()}"
        temp.unlink(missing_ok=True)
        temp.symlink_to(PACKAGE, target_is_directory=True)
        os.replace(temp, link)
    return str(link_dir)


def _path_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(str(path).encode()).hexdigest()[:16]


def worker_environment(python: str) -> dict:
    """The process environment for a worker run by ``python``: this package importable in a toolkit
    environment of ours, nothing changed for the project's own interpreter."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if Path(os.path.abspath(python)).is_relative_to(os.path.abspath(root())):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_path(), env.get("PYTHONPATH")]))
    return env
