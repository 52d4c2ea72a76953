"""Benchmarks: rknn-pipeline against hand-written toolkit scripts, and its own overheads.

    uv run python benchmarks/run.py              # full run: prints the table, writes docs/benchmarks.md
    uv run python benchmarks/run.py --repeat 5   # more runs per figure (default 3)
    uv run python benchmarks/run.py --tiny --out b.md  # smoke configuration (seconds, not minutes)
    uv run python benchmarks/run.py --only "4 parallel,7 large model"  # refresh just these rows and notes

Everything happens in a scratch directory (deleted afterwards unless ``--keep``):
each measured build gets a fresh copy of ``dodo.py``, ``examples/`` and a manifest,
and every doit run is ``python -m doit`` in its own process, timed from outside
with ``time.perf_counter``. Each figure is the median of ``--repeat`` runs, with
min and max; ratios are taken run by run (run i of one side against run i of the
other) and summarised the same way. Progress goes to stderr, the table to stdout.

A generated Conv+AveragePool model (1x3x16x16) serves the parallel figure. ``--tiny``
uses it for every figure instead of the example models (float16 and int8), runs each
figure once, measures scale at 10 pairs only and makes the "large" model 5 MB; it
never writes docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
DOCS_OUT = REPO / "docs" / "benchmarks.md"
CACHE_ENV = "RKNN_PIPELINE_CACHE"
WORKER_ENV = "RKNN_PIPELINE_WORKER_PYTHON"
GNU_TIME = Path("/usr/bin/time")
# The models.yaml entries the benchmark builds: the three float16 example models and the int8 one.
# Other entries are left out to keep a full run near 15 minutes (and a hybrid-quantized build is
# two toolkit steps, not the config/load_onnx/build loop the peers run).
BENCH_MODELS = ("inception_v2", "inception_v2_int8", "densenet121", "shufflenet")
PARALLEL_TARGETS = ("rk3588", "rk3576", "rk3566", "rk3562")  # all convert float16 models
SECTIONS = ("1 cold build", "2 no-op rebuild", "3 one changed", "4 parallel", "5 cache restore",
            "6 scale", "7 large model", "8 worker model", "9 shapes", "10 repair", "11 shards",
            "12 shared cache", "13 toolkit versions")
# sections measured on section 1's build (see Benchmark.run)
NEEDS_BUILD = ("1 cold build", "2 no-op rebuild", "3 one changed", "5 cache restore", "6 scale", "12 shared cache")
SHAPE_MODELS = ("rec", "rec_dynamic")
EXTRA_TOOLKIT = "2.3.2"  # the second rknn-toolkit2 version section 13 builds with, in its own environment
OWN_TORCH_TOOLKIT = "2.2.0"  # a version whose torch range excludes the project's torch: it gets its own
TOOLKITS_ENV = "RKNN_PIPELINE_TOOLKITS"
# what `uv sync --locked` needs of a checkout (section 13 syncs a copy into a fresh uv cache, as CI does)
PROJECT_FILES = ("pyproject.toml", "uv.lock", "README.md", "pipeline", "schema")
# models.yaml entries measured by "10 repair": the generated outlier case, and a bigger example model
# (constant-fill weights) quantized for rk3588 with the int8 entry's dataset
REPAIR_MODELS = ("outlier_repaired", "inception_v2")  # models.yaml entries: one recogniser as buckets and as one dynamic model


@dataclass(frozen=True)
class Config:
    tiny: bool
    repeat: int
    scales: tuple[int, ...]
    noop_scales: tuple[int, ...]  # scales at which a real build is made for a no-op doit
    large_layers: int
    large_dim: int  # each layer's weight is large_dim x large_dim float32


def full_config(repeat: int) -> Config:
    # 5 x 5000 x 5000 float32 = 500 MB of external weights
    return Config(tiny=False, repeat=repeat, scales=(50, 200, 1000), noop_scales=(50,),
                  large_layers=5, large_dim=5000)


def tiny_config() -> Config:
    return Config(tiny=True, repeat=1, scales=(10,), noop_scales=(10,), large_layers=5, large_dim=512)


# -- rows and the table ---------------------------------------------------------------------


@dataclass
class Row:
    section: str
    measurement: str
    unit: str
    samples: list[float]

    def cells(self) -> list[str]:
        show = (lambda v: f"{v:.5f}") if self.unit == "cos" else number  # cosines differ in the 4th decimal
        return [self.section, self.measurement, self.unit, show(statistics.median(self.samples)),
                show(min(self.samples)), show(max(self.samples)), str(len(self.samples))]


def number(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    """Run-by-run ratios; the shorter list is cycled when the counts differ."""
    count = max(len(numerators), len(denominators))
    return [numerators[i % len(numerators)] / denominators[i % len(denominators)] for i in range(count)]


def render_table(rows: list[Row]) -> str:
    header = ["section", "measurement", "unit", "median", "min", "max", "runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


# -- scratch workspaces and processes ------------------------------------------------------


class BenchmarkError(RuntimeError):
    pass


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class Scratch:
    """The scratch tree: assets, workspaces, logs, and the subprocess environment."""

    def __init__(self, root: Path):
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir()
        self._count = 0
        self.env = {k: v for k, v in os.environ.items()
                    if k not in (CACHE_ENV, WORKER_ENV, "PYTHONDONTWRITEBYTECODE") and not k.startswith("AWS_")}
        # Bytecode is written and reused, as a user's Python does by default; in the scratch tree, so the
        # benchmark leaves nothing in the environment it runs in.
        self.env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")

    def path(self, label: str) -> Path:
        self._count += 1
        return self.root / f"{self._count:03d}-{label}"

    def workspace(self, label: str, manifest: dict) -> Path:
        """A fresh project: the repo's dodo.py, examples/, the tiny assets, and ``manifest``."""
        ws = self.path(label)
        ws.mkdir()
        shutil.copy(REPO / "dodo.py", ws / "dodo.py")
        shutil.copytree(REPO / "examples", ws / "examples")
        shutil.copytree(self.root / "assets" / "tiny", ws / "tiny")
        write_manifest(ws / "models.yaml", manifest)
        return ws

    def run(self, cmd: list[str], cwd: Path, label: str, env: dict | None = None) -> tuple[float, str]:
        """Run ``cmd`` with its output in a log file; return (seconds, output)."""
        log = self.logs / f"{self.path(label).name}.log"
        with open(log, "wb") as out:
            started = time.perf_counter()
            proc = subprocess.run(cmd, cwd=cwd, env=env or self.env, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)
            seconds = time.perf_counter() - started
        text = log.read_text(errors="replace")
        if proc.returncode != 0:
            tail = "\n".join(text.splitlines()[-30:])
            raise BenchmarkError(f"{shlex.join(cmd)} failed with code {proc.returncode} in {cwd}:\n{tail}")
        return seconds, text

    def doit(self, ws: Path, *args: str, env: dict | None = None) -> tuple[float, str]:
        return self.run([sys.executable, "-m", "doit", *args], ws, "doit", env)

    def python(self, code: str, *args: str, cwd: Path, env: dict | None = None) -> dict:
        """Run a Python snippet that prints one JSON object; return it."""
        _, text = self.run([sys.executable, "-c", code, *args], cwd, "python", env)
        return json.loads(text.strip().splitlines()[-1])


def write_manifest(path: Path, manifest: dict) -> None:
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))


def converted(output: str) -> list[str]:
    """model@target of every convert task doit ran (not the up-to-date ones), from the pipeline's
    reporter (``[3/11] convert det@rk3588 ...``) or doit's console one (``.  convert:det@rk3588``)."""
    return re.findall(r"^(?:\.  convert:|\[\d+/\d+\] convert )(\S+?)(?: \(about .*\))?$", output, flags=re.M)


def cache_hits(output: str) -> int:
    return len(re.findall(r"^convert \S+ .*\(cache hit\)$", output, flags=re.M))


# -- models and manifests ------------------------------------------------------------------


def example_manifest() -> dict:
    """The BENCH_MODELS entries of models.yaml, without ``verify`` (the peers do no accuracy check)."""
    manifest = yaml.safe_load((REPO / "models.yaml").read_text())
    by_name = {model["name"]: model for model in manifest["models"]}
    missing = [name for name in BENCH_MODELS if name not in by_name]
    if missing:
        raise BenchmarkError(f"models.yaml has no model named {', '.join(missing)}; update BENCH_MODELS")
    manifest["models"] = [by_name[name] for name in BENCH_MODELS]
    manifest.get("defaults", {}).pop("verify", None)
    for model in manifest["models"]:
        model.pop("verify", None)
    return manifest


def tiny_manifest() -> dict:
    shape = {"x": [1, 3, 16, 16]}
    return {
        "version": 1,
        "defaults": {"mean_values": [[0, 0, 0]], "std_values": [[1, 1, 1]]},
        "models": [
            {"name": "tiny", "source": "tiny/tiny.onnx", "targets": ["rk3588"], "inputs": shape},
            {"name": "tiny_int8", "source": "tiny/tiny_int8.onnx", "targets": ["rv1106"], "inputs": shape,
             "quantization": {"dataset": "tiny/calib/dataset.txt", "dtype": "w8a8"}},
        ],
    }


def make_tiny_assets(directory: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from model_makers import make_npy_dataset, make_tiny_model  # the tests' generators, not a copy

    directory.mkdir(parents=True, exist_ok=True)
    make_tiny_model(directory / "tiny.onnx", seed=0)
    make_tiny_model(directory / "tiny_int8.onnx", seed=1)
    make_npy_dataset(directory / "calib")


def resave_with_doc_string(path: Path, text: str) -> None:
    """Change a model's bytes but not its graph (what an exporter's re-run often does)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    model.doc_string = text
    onnx.save(model, str(path))


def pairs_of(manifest: dict) -> list[tuple[dict, str]]:
    return [(model, target) for model in manifest["models"] for target in model["targets"]]


def scaled_manifest(manifest: dict, count: int) -> dict:
    """``count`` model x target pairs: the manifest's pairs again and again under new names."""
    base = pairs_of(manifest)
    models = []
    for index in range(count):
        model, target = base[index % len(base)]
        clone = copy.deepcopy(model)
        clone["name"] = f"{model['name']}-{index:04d}"
        clone["targets"] = [target]
        models.append(clone)
    return {**manifest, "models": models}


def parallel_manifest() -> dict:
    """The tiny float model converted for four targets: four independent conversions."""
    manifest = tiny_manifest()
    model = manifest["models"][0]
    model["targets"] = list(PARALLEL_TARGETS)
    return {**manifest, "models": [model]}


def changed_sources(manifest: dict) -> dict[str, list[str]]:
    """Each source file of ``manifest`` -> the model x target pairs built from it, in manifest order."""
    users: dict[str, list[str]] = {}
    for model, target in pairs_of(manifest):
        users.setdefault(model["source"], []).append(f"{model['name']}@{target}")
    return users


# -- the peers: a hand-written loop and the toolkit's rknn_convert ---------------------------


HAND_LOOP = '''"""A user's convert.py: every model, one after another, in one process."""
import json
import sys
from pathlib import Path

from rknn.api import RKNN

jobs = json.loads(Path(sys.argv[1]).read_text())
out = Path(sys.argv[2])


def check(job, step, ret):
    if ret != 0:
        sys.exit(f"{job['name']}@{job['target']}: {step} returned {ret}")


for job in jobs:
    rknn = RKNN(verbose=True)
    check(job, "config", rknn.config(**job["config"]))
    check(job, "load_onnx", rknn.load_onnx(model=job["source"], **job["load_onnx"]))
    check(job, "build", rknn.build(**job["build"]))
    path = out / job["target"] / (job["name"] + ".rknn")
    path.parent.mkdir(parents=True, exist_ok=True)
    check(job, "export_rknn", rknn.export_rknn(str(path)))
    rknn.release()
'''


@dataclass
class Peers:
    """Inputs for the peers, prepared once from a pipeline build (op_target names, rewritten models)."""

    directory: Path
    jobs: list[dict] = field(default_factory=list)
    without_op_target: list[str] = field(default_factory=list)  # pairs whose op_target rknn_convert cannot take


def prepare_peers(scratch: Scratch, built: Path, manifest: dict) -> Peers:
    """Jobs with exactly the pipeline's toolkit arguments, as a user would have written them by hand.

    ``op_target`` and rewritten models come from the pipeline's build in ``built``:
    a hand-written script would carry the same dict and the same edited ONNX file.
    """
    from pipeline.conversion import toolkit_arguments
    from pipeline.manifest import load_manifest

    peers = Peers(scratch.workspace("peers", manifest))
    (peers.directory / "convert.py").write_text(HAND_LOOP)
    (peers.directory / "inputs").mkdir()
    loaded = load_manifest(peers.directory / "models.yaml")
    for model in loaded.models:
        for target in model["targets"]:
            name = model["name"]
            record = json.loads((built / "build" / name / target / "convert.json").read_text())
            source = model["source"]
            if record.get("converted_onnx") and Path(record["converted_onnx"]).name == "rewritten.onnx":
                source = str(peers.directory / "inputs" / f"{name}@{target}.onnx")
                shutil.copy(built / record["converted_onnx"], source)  # recorded relative to the checkout
            args = toolkit_arguments(model, target, source)
            if record.get("op_target"):
                args["config"]["op_target"] = record["op_target"]
            peers.jobs.append({"name": name, "target": target, **args})
    (peers.directory / "jobs.json").write_text(json.dumps(peers.jobs, indent=2))
    write_rknn_convert_configs(peers)
    return peers


def write_rknn_convert_configs(peers: Peers) -> None:
    """One model_config.yml per job, in the format rknn.api.rknn_convert's convert_model() reads."""
    for job in peers.jobs:
        directory = peers.directory / "rknn_convert" / f"{job['name']}@{job['target']}"
        directory.mkdir(parents=True)
        configs = {k: v for k, v in job["config"].items() if k not in ("target_platform", "op_target")}
        configs.setdefault("mean_values", None)
        configs.setdefault("std_values", None)
        model = {"name": job["name"], "platform": "onnx", "model_file_path": job["source"],
                 "quantize": bool(job["build"].get("do_quantization")), "configs": configs}
        if job["build"].get("dataset"):
            model["dataset"] = job["build"]["dataset"]
        load = job["load_onnx"]
        subgraphs = {}
        if load.get("inputs"):
            subgraphs["inputs"] = load["inputs"]
            subgraphs["input_size_list"] = [",".join(str(d) for d in shape) for shape in load["input_size_list"]]
        if load.get("outputs"):
            subgraphs["outputs"] = load["outputs"]
        if subgraphs:
            model["subgraphs"] = subgraphs
        (directory / "model_config.yml").write_text(yaml.safe_dump({"models": model}, sort_keys=False))
        if job["config"].get("op_target"):
            peers.without_op_target.append(f"{job['name']}@{job['target']}")


def run_hand_loop(scratch: Scratch, peers: Peers, run: int) -> float:
    out = peers.directory / f"out-hand-{run}"
    seconds, _ = scratch.run([sys.executable, "convert.py", "jobs.json", str(out)], peers.directory, "hand-loop")
    missing = [job for job in peers.jobs if not (out / job["target"] / f"{job['name']}.rknn").exists()]
    if missing:
        raise BenchmarkError(f"the hand-written loop produced no model for {missing[0]['name']} "
                             "(rerun with --keep to read its log)")
    return seconds


def run_rknn_convert(scratch: Scratch, peers: Peers, run: int) -> float:
    """``python -m rknn.api.rknn_convert`` once per model x target (its YAML holds one model)."""
    total = 0.0
    for job in peers.jobs:
        directory = peers.directory / "rknn_convert" / f"{job['name']}@{job['target']}"
        out = directory / f"out-{run}"
        cmd = [sys.executable, "-m", "rknn.api.rknn_convert", "-t", job["target"], "-i", "model_config.yml",
               "-o", str(out), "-v"]
        seconds, _ = scratch.run(cmd, directory, "rknn-convert")
        if not (out / f"{job['name']}.rknn").exists():  # it reports failures on stdout with exit code 0
            raise BenchmarkError(f"rknn_convert produced no model for {job['name']}@{job['target']} "
                                 "(rerun with --keep to read its log)")
        total += seconds
    return total


def seed_cache(cache_dir: Path, ws: Path) -> None:
    """Store a finished build's conversions, analyses and resolutions in a cache directory."""
    from pipeline import cache

    store_build(cache.LocalStore(cache_dir), ws)


def store_build(store, ws: Path) -> list[str]:
    """Store the finished build in ``ws`` as a build with that store would have: each conversion, its
    analysis and its resolution. Returns the conversion keys (also run in a fresh process, to time an
    upload from import to the last PUT)."""
    from pipeline import files, plan_cache, stages
    from pipeline.layout import CACHED_FILES, Layout
    from pipeline.manifest import load_manifest

    manifest = load_manifest(ws / "models.yaml")
    layout = Layout(manifest.directory)
    keys = []
    for model in manifest.models:
        for target in model["targets"]:
            name = model["name"]
            workdir = layout.workdir(name, target)
            resolved = files.read_json(layout.resolved(name, target))
            key = stages.conversion_key(manifest, layout, model, target, resolved)
            store.put(key, {f: workdir / f for f in CACHED_FILES}, meta={"model": name, "target": target})
            plan_cache.store_analysis(store, plan_cache.analysis_key(manifest, model, target), layout, name, target)
            plan_cache.store_resolution(store, plan_cache.resolution_key(manifest, layout, model, target), layout,
                                        name, target, resolved)
            keys.append(key)
    return keys


# -- peak RSS of conversion workers -----------------------------------------------------------


def rss_wrapper(scratch: Scratch, log: Path) -> Path:
    """An interpreter for RKNN_PIPELINE_WORKER_PYTHON that appends each worker's peak RSS (kB) to ``log``."""
    path = scratch.path("rss-python")
    if os.access(GNU_TIME, os.X_OK):
        path.write_text(f"#!/bin/sh\nexec {GNU_TIME} -a -o {shlex.quote(str(log))} -f %M "
                        f"{shlex.quote(sys.executable)} \"$@\"\n")
    else:
        path.write_text(f"#!{sys.executable}\n"
                        "import resource, subprocess, sys\n"
                        f"code = subprocess.call([{sys.executable!r}, *sys.argv[1:]])\n"
                        f"with open({str(log)!r}, 'a') as handle:\n"
                        "    handle.write(f'{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\\n')\n"
                        "sys.exit(code)\n")
    path.chmod(0o755)
    return path


def read_rss_mib(log: Path) -> list[float]:
    if not log.exists():
        return []
    return [int(line) / 1024 for line in log.read_text().split() if line.isdigit()]


# -- the worker model: CPU seconds and unique memory ----------------------------------------------


def children_cpu() -> float:
    """User + system CPU seconds of every finished, reaped descendant of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def worker_manifest() -> dict:
    """Eight small float16 pairs: the kind of manifest where the toolkit's import dominates a build."""
    return {
        "version": 1,
        "defaults": {"mean_values": [[0, 0, 0]], "std_values": [[1, 1, 1]]},
        "models": [
            {"name": "pool", "source": "examples/models/tiny_pool_identity.onnx", "inputs": {"x": [1, 3, 32, 32]},
             "targets": ["rk3588", "rk3566", "rk3576", "rk3562"]},
            {"name": "stem", "source": "examples/models/light_densenet121.onnx",
             "inputs": {"data_0": [1, 3, 224, 224]}, "outputs": ["r7"], "targets": ["rk3588", "rk3576"]},
            {"name": "shufflenet", "source": "examples/models/light_shufflenet.onnx",
             "inputs": {"gpu_0/data_0": [1, 3, 224, 224]}, "targets": ["rk3588", "rk3576"]},
        ],
    }


class MemorySampler:
    """Polls /proc while a build runs for the peak unique memory of its zygotes and their forked children.

    PSS (shared pages split among the processes sharing them) and USS (pages no
    other process maps) from ``/proc/<pid>/smaps_rollup``, not RSS: a child shares
    the zygote's pages copy-on-write, and RSS would count them once per child.
    A zygote is a process whose command line is ``pipeline.zygote <build dir of
    this workspace>``; its children have the same command line and a zygote as parent.
    """

    def __init__(self, workspace: Path, interval: float = 0.05):
        self.marker = str(workspace).encode()
        self.interval = interval
        self.peaks: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    self._sample(entry)
            self._stop.wait(self.interval)

    def _sample(self, entry: Path) -> None:
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            if b"pipeline.zygote" not in cmdline or not any(self.marker in part for part in cmdline):
                return
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            fields = {}
            for line in (entry / "smaps_rollup").read_text().splitlines()[1:]:
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0])
        except (OSError, ValueError, IndexError):
            return  # it exited meanwhile
        pid = int(entry.name)
        peak = self.peaks.setdefault(pid, {"parent": parent, "pss": 0, "uss": 0})
        peak["pss"] = max(peak["pss"], fields.get("Pss", 0))
        peak["uss"] = max(peak["uss"], fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0))

    def mib(self, role: str, key: str) -> list[float]:
        """Peak ``key`` (pss/uss) in MiB of every zygote (role "zygote") or forked child (role "child")."""
        zygotes = {pid for pid, peak in self.peaks.items() if peak["parent"] not in self.peaks}
        chosen = zygotes if role == "zygote" else set(self.peaks) - zygotes
        return [self.peaks[pid][key] / 1024 for pid in sorted(chosen)]


# -- the large model ----------------------------------------------------------------------------


def make_large_model(directory: Path, layers: int, dim: int) -> tuple[Path, int]:
    """MatMul/Relu chain whose weights (layers x dim x dim float32) live in one external file.

    Weights are streamed to the file and referenced by offset, so generating the
    model never holds more than one layer in memory. Returns (model path, weight bytes).
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    directory.mkdir(parents=True)
    blob_name = "weights.bin"
    rng = np.random.default_rng(0)
    initializers, nodes, offset = [], [], 0
    previous = "x"
    with open(directory / blob_name, "wb") as blob:
        for index in range(layers):
            weight = rng.standard_normal((dim, dim), dtype=np.float32)
            weight.tofile(blob)
            tensor = TensorProto(name=f"w{index}", data_type=TensorProto.FLOAT, dims=[dim, dim],
                                 data_location=TensorProto.EXTERNAL)
            for key, value in (("location", blob_name), ("offset", offset), ("length", weight.nbytes)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            initializers.append(tensor)
            offset += weight.nbytes
            out = f"h{index}"
            nodes.append(helper.make_node("MatMul", [previous, tensor.name], [out], name=f"matmul{index}"))
            previous = out
            if index < layers - 1:
                nodes.append(helper.make_node("Relu", [out], [f"r{index}"], name=f"relu{index}"))
                previous = f"r{index}"
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dim])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [1, dim])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = directory / "large.onnx"
    onnx.save(model, str(path))
    return path, offset


# Peak RSS of the snippet's own process. ru_maxrss is not used on Linux: exec carries the
# parent's high-water mark into the child's (subprocess uses vfork), so a child started by a
# big parent would report the parent's peak. VmHWM belongs to the process's own memory map.
PEAK_RSS = """
import resource
def peak_kb():
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""

ANALYZE_SNIPPET = PEAK_RSS + """
import json, sys, time
import onnx
from pipeline.analysis import analyze
from pipeline.placement_rules import Rules
rules = Rules.load()
before = peak_kb()
started = time.perf_counter()
doc = analyze({"name": "large", "source": sys.argv[1]}, sys.argv[2], rules)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "before_kb": before, "peak_kb": peak_kb(), "nodes": doc["node_count"]}))
"""

ONNX_LOAD_SNIPPET = PEAK_RSS + """
import json, sys, time
import onnx
started = time.perf_counter()
model = onnx.load(sys.argv[1])
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "peak_kb": peak_kb()}))
"""

IMPORT_SNIPPET = """
import json, time
started = time.perf_counter()
from rknn.api import RKNN
print(json.dumps({"seconds": time.perf_counter() - started}))
"""

UPLOAD_SNIPPET = """
import json, sys, time
from pathlib import Path
started = time.perf_counter()
from pipeline import cache
sys.path.insert(0, sys.argv[2])
from run import store_build  # benchmarks/run.py: the same code that seeds section 5's cache

store = cache.open_store(sys.argv[1])
keys = store_build(store, Path("."))
assert all(store.has(key) for key in keys), "the upload did not happen"
print(json.dumps({"seconds": time.perf_counter() - started}))
"""

LOAD_MANIFEST_SNIPPET = """
import json, sys, time
from pipeline.manifest import load_manifest
started = time.perf_counter()
manifest = load_manifest(sys.argv[1])
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "pairs": sum(len(m["targets"]) for m in manifest.models)}))
"""


def floor_dodo(pairs: int) -> str:
    """A dodo.py with 4 chained trivial tasks per pair (file_dep + targets), doit's own floor."""
    return f'''import shutil

DOIT_CONFIG = {{"backend": "sqlite3", "dep_file": ".doit.db", "verbosity": 2}}
STAGES = ("a", "b", "c", "d")


def task_step():
    for pair in range({pairs}):
        previous = f"src/{{pair}}.txt"
        for stage in STAGES:
            target = f"out/{{stage}}/{{pair}}.txt"
            yield {{"name": f"{{stage}}{{pair}}", "actions": [(shutil.copyfile, [previous, target])],
                   "file_dep": [previous], "targets": [target]}}
            previous = target
'''


# -- the benchmark ---------------------------------------------------------------------------------


class Benchmark:
    def __init__(self, scratch: Scratch, config: Config):
        self.scratch = scratch
        self.config = config
        self.rows: list[Row] = []
        self.notes: dict[str, list[str]] = {section: [] for section in SECTIONS}
        self.manifest = tiny_manifest() if config.tiny else example_manifest()
        self.cold: list[float] = []
        self.hand: list[float] = []
        self.cache_dir = scratch.root / "cache"

    def add(self, section: str, measurement: str, unit: str, samples: list[float]) -> None:
        self.rows.append(Row(section, measurement, unit, list(samples)))

    def note(self, section: str, text: str) -> None:
        self.notes[section].append(text)

    def with_cache(self) -> dict:
        return dict(self.scratch.env, **{CACHE_ENV: str(self.cache_dir)})

    def run(self, only: set[str] | None = None) -> None:
        """Every section, or only those in ``only``.

        Sections 2, 3, 5 and 6 start from section 1's build (its peers, its cache, its
        timings), so section 1 runs whenever one of them is asked for; ``main`` reports
        only the sections asked for.
        """
        wanted = (lambda section: not only or section in only)
        if any(wanted(section) for section in NEEDS_BUILD):
            built = self.timed(self.cold_build)
            if wanted(SECTIONS[1]):
                self.timed(self.noop_rebuild, built)
            if wanted(SECTIONS[2]):
                self.timed(self.one_changed, built)
        figures = (self.parallel, self.cache_restore, self.scale, self.large_model, self.worker_model, self.shapes,
                   self.repair, self.shards, self.shared_cache,
                   self.toolkit_versions)
        for section, figure in zip(SECTIONS[3:], figures):
            if wanted(section):
                self.timed(figure)

    @staticmethod
    def timed(figure, *args):
        started = time.perf_counter()
        result = figure(*args)
        progress(f"{figure.__name__} took {time.perf_counter() - started:.0f} s")
        return result

    # 1 -------------------------------------------------------------------------------------------
    def cold_build(self) -> Path:
        section = SECTIONS[0]
        count = len(pairs_of(self.manifest))
        built = None
        for run in range(self.config.repeat):
            progress(f"{section}: run {run + 1}/{self.config.repeat}")
            ws = self.scratch.workspace("cold", self.manifest)
            seconds, output = self.scratch.doit(ws)
            if len(converted(output)) != count:
                raise BenchmarkError(f"a cold build converted {converted(output)}, expected {count} pairs")
            self.cold.append(seconds)
            built = ws
            if run == 0:  # untimed: inputs for the peers and for section 5, before section 3 edits a source
                self.peers = prepare_peers(self.scratch, ws, self.manifest)
                seed_cache(self.cache_dir, ws)
            self.hand.append(run_hand_loop(self.scratch, self.peers, run))
        imports = [self.scratch.python(IMPORT_SNIPPET, cwd=self.scratch.root)["seconds"]
                   for _ in range(self.config.repeat)]
        names = ", ".join(f"{m['name']}@{t}" for m, t in pairs_of(self.manifest))
        self.add(section, f"pipeline: `doit` in a fresh workspace, {count} model x target", "s", self.cold)
        self.add(section, "hand-written loop: one process, same toolkit arguments", "s", self.hand)
        self.add(section, "ratio pipeline / hand loop (goal <= 1.10)", "x", ratios(self.cold, self.hand))
        self.add(section, "toolkit import in a fresh process (pipeline: once, in its zygote; loop: once)", "s",
                 imports)
        origin = "generated" if self.config.tiny else "from models.yaml; its other entries are left out for time"
        self.note(section, f"Models: {names} ({origin}), without `verify` (the peers do no accuracy check). "
                           "The hand loop gets its `config`/`load_onnx`/`build` arguments from "
                           "`pipeline.conversion.toolkit_arguments`, plus the `op_target` dict and rewritten ONNX "
                           "file the pipeline resolved, and runs `RKNN(verbose=True)` -> config -> load_onnx -> "
                           "build -> export_rknn for each model in one Python process, its output in a log file "
                           "like the pipeline's `convert.log`. The pipeline's time includes analysis, resolution, "
                           "one toolkit import (in the zygote that forks a worker per conversion), export, lock and report.")
        gap = statistics.median(self.cold) - statistics.median(self.hand)
        self.note(section, f"Both import the toolkit once (about {statistics.median(imports):.1f} s); the pipeline "
                           f"starts that import when the first analysis is done, so doit's own start-up comes "
                           f"first. The pipeline is {abs(gap):.1f} s {'faster' if gap < 0 else 'slower'}: it starts "
                           f"each conversion as soon as its resolution is written, up to one per core at once, "
                           f"while the loop converts one model at a time; section 8 compares one conversion at a "
                           f"time, and forked and fresh workers.")
        return built

    # 2 -------------------------------------------------------------------------------------------
    def noop_rebuild(self, built: Path) -> None:
        section = SECTIONS[1]
        noop = []
        for _ in range(self.config.repeat):
            seconds, output = self.scratch.doit(built)
            if converted(output):
                raise BenchmarkError(f"a no-op build converted {converted(output)}")
            noop.append(seconds)
        convert_runs = []
        for run in range(self.config.repeat):
            progress(f"{section}: rknn_convert run {run + 1}/{self.config.repeat}")
            convert_runs.append(run_rknn_convert(self.scratch, self.peers, run))
        self.add(section, "pipeline: second `doit`, nothing to do", "s", noop)
        self.add(section, "hand-written loop, rebuilds everything (runs of section 1)", "s", self.hand)
        self.add(section, "`python -m rknn.api.rknn_convert`, one process per model", "s", convert_runs)
        self.add(section, "ratio hand loop / pipeline no-op", "x", ratios(self.hand, noop))
        self.add(section, "ratio rknn_convert / pipeline no-op", "x", ratios(convert_runs, noop))
        text = ("rknn_convert gets a `model_config.yml` per model (the `models:` mapping its `convert_model()` "
                "reads: `platform`, `model_file_path`, `quantize`, `dataset`, `configs`, `subgraphs`) with the "
                "same mean/std, dtype, inputs and sizes, and `-v` for the same verbose logging.")
        if self.peers.without_op_target:
            text += (f" Its YAML has no `op_target`, so {', '.join(self.peers.without_op_target)} converts "
                     "without the NPU override (same graph and toolkit steps).")
        self.note(section, text)

    # 3 -------------------------------------------------------------------------------------------
    def one_changed(self, built: Path) -> None:
        """Each source of the benchmark manifest re-saved in turn: what one edit costs, per real model."""
        section = SECTIONS[2]
        count = len(pairs_of(self.manifest))
        described = []
        for source, expected in changed_sources(self.manifest).items():
            changed = []
            for run in range(self.config.repeat):
                progress(f"{section}: {Path(source).name}, run {run + 1}/{self.config.repeat}")
                resave_with_doc_string(built / source, f"benchmark edit {run}")
                seconds, output = self.scratch.doit(built)
                if sorted(converted(output)) != sorted(expected):
                    raise BenchmarkError(f"after editing {source} doit converted {converted(output)}, "
                                         f"expected {expected}")
                changed.append(seconds)
            name = Path(source).name
            self.add(section, f"pipeline: `doit` after re-saving {name} ({len(expected)} of {count} rebuilt)",
                     "s", changed)
            self.add(section, f"ratio {name} re-saved / hand loop rebuilding all (section 1)", "x",
                     ratios(changed, self.hand))
            described.append(f"`{name}` ({', '.join(expected)})")
        self.note(section, "Each source of the benchmark's models is re-saved in turn with a new `doc_string` "
                           "(new bytes, same graph): " + "; ".join(described) + ". doit reruns "
                           "analyze/resolve/convert/export of the pairs built from it only, then lock and report.")

    # 4 -------------------------------------------------------------------------------------------
    def parallel(self) -> None:
        """A real-sized model on four targets, -n 1 against -n 2 and the 2-core floor; then each example
        model's peak worker RSS, one fresh worker process per conversion."""
        section = SECTIONS[3]
        manifest = self.parallel_manifest()
        model = manifest["models"][0]
        timings: dict[str, list[float]] = {"serial": [], "parallel": [], "floor": []}
        modes = {"serial": [], "parallel": ["-n", "2", "-P", "process"]}
        cores = os.cpu_count() or 1
        for run in range(self.config.repeat):
            for mode, args in modes.items():
                progress(f"{section}: {mode} run {run + 1}/{self.config.repeat}")
                ws = self.scratch.workspace(f"parallel-{mode}", manifest)
                cpu = children_cpu()
                seconds, output = self.scratch.doit(ws, *args)
                if len(converted(output)) != len(PARALLEL_TARGETS):
                    raise BenchmarkError(f"the parallel build converted {converted(output)}")
                timings[mode].append(seconds)
                if mode == "serial":
                    timings["floor"].append((children_cpu() - cpu) / cores)
        pairs = f"{model['name']} @ {', '.join(PARALLEL_TARGETS)}"
        self.add(section, f"plain `doit`, {pairs}", "s", timings["serial"])
        self.add(section, "`doit -n 2 -P process`", "s", timings["parallel"])
        self.add(section, f"{cores}-core floor: CPU seconds of the plain run / {cores}", "s", timings["floor"])
        self.add(section, "ratio `-n 2` / floor", "x", ratios(timings["parallel"], timings["floor"]))
        self.add(section, "ratio plain `doit` / floor", "x", ratios(timings["serial"], timings["floor"]))
        self.add(section, "speed-up plain / -n 2", "x", ratios(timings["serial"], timings["parallel"]))
        for name, rss in self.worker_rss().items():
            self.add(section, f"peak RSS of the conversion worker, {name}", "MiB", rss)
        how = "GNU time's %M" if os.access(GNU_TIME, os.X_OK) else "getrusage(RUSAGE_CHILDREN).ru_maxrss"
        self.note(section, f"Conversions: {pairs} (float16, a model that takes longer to build than the toolkit "
                           f"takes to import), each workspace fresh. The floor is the physical limit on this "
                           f"machine: all the CPU time the plain build's processes used (user + system, "
                           f"the toolkit's own threads included), divided by the {cores} cores; no schedule can "
                           "beat it, and a ratio near 1 means the cores were kept busy. Plain `doit` runs doit's "
                           "tasks one at a time in its own process, but starts each conversion when its "
                           "resolution is written, up to one per core at once (docs/architecture.md, worker "
                           "model); `-n 2 -P process` runs tasks in two processes, each with its own toolkit "
                           "import and no conversion started ahead (so does `-n 1`: doit's `-n 1` is one task "
                           "process, not doit's own). "
                           "Both cores are shared "
                           "with other work while measuring. Peak RSS: each benchmark model built alone with "
                           f"RKNN_PIPELINE_WORKER=fresh (one worker process per conversion), measured by {how} "
                           f"through a wrapper given as {WORKER_ENV}; with forked workers each child shares "
                           "the zygote's pages (section 8 gives unique memory).")

    def parallel_manifest(self) -> dict:
        """The benchmark's largest float16 model (the tiny one under --tiny) on PARALLEL_TARGETS."""
        if self.config.tiny:
            return parallel_manifest()
        floats = [model for model in self.manifest["models"] if not model.get("quantization")]
        biggest = max(floats, key=lambda model: (REPO / model["source"]).stat().st_size)
        return {**self.manifest, "models": [{**biggest, "targets": list(PARALLEL_TARGETS)}]}

    def worker_rss(self) -> dict[str, list[float]]:
        """model@target -> peak RSS (MiB) of its fresh conversion worker, each model of the manifest alone."""
        found = {}
        for model, target in pairs_of(self.manifest):
            name = f"{model['name']}@{target}"
            progress(f"{SECTIONS[3]}: peak RSS, {name}")
            log = self.scratch.path("rss-model.txt")
            env = dict(self.scratch.env, RKNN_PIPELINE_WORKER="fresh", RKNN_PIPELINE_PREWARM="0",
                       **{WORKER_ENV: str(rss_wrapper(self.scratch, log))})
            alone = {**self.manifest, "models": [{**model, "targets": [target]}]}
            _, output = self.scratch.doit(self.scratch.workspace("rss", alone), env=env)
            if len(converted(output)) != 1:
                raise BenchmarkError(f"the RSS build of {name} converted {converted(output)}")
            found[name] = read_rss_mib(log)
        return found

    # 5 -------------------------------------------------------------------------------------------
    def cache_restore(self) -> None:
        section = SECTIONS[4]
        count = len(pairs_of(self.manifest))
        warm = []
        for run in range(self.config.repeat):
            ws = self.scratch.workspace("cache-warm", self.manifest)
            seconds, output = self.scratch.doit(ws, env=self.with_cache())
            if cache_hits(output) != count:
                raise BenchmarkError(f"a warm-cache build restored {cache_hits(output)} of {count} conversions")
            warm.append(seconds)
        self.add(section, f"fresh workspace, warm {CACHE_ENV} (all {count} restored)", "s", warm)
        self.add(section, "ratio warm cache / cold build (section 1)", "x", ratios(warm, self.cold))
        self.note(section, "The cache is filled with the outputs of section 1's first build, under the keys "
                           "the pipeline computes (`pipeline.stages.conversion_key`), to spare one more cold "
                           "build, with their analyses and resolutions as a build with that cache stores them; a "
                           "warm build that does not restore every conversion fails the benchmark. A warm build "
                           "restores analysis.json, resolved.json (and a rewritten ONNX), model.rknn, convert.json, "
                           "placement.json and convert.log after re-hashing them, and writes dist/, the lock and "
                           "the report; it imports neither the toolkit nor onnx.")

    # 6 -------------------------------------------------------------------------------------------
    def scale(self) -> None:
        section = SECTIONS[5]
        growth: dict[str, dict[int, float]] = {"load_manifest": {}, "doit list": {}, "doit floor": {}}
        noop_notes = []
        for count in self.config.scales:
            progress(f"{section}: {count} pairs")
            manifest = scaled_manifest(self.manifest, count)
            ws = self.scratch.workspace(f"scale-{count}", manifest)
            self.scratch.python(LOAD_MANIFEST_SNIPPET, "models.yaml", cwd=ws)  # fills the graph-facts memo
            loads, lists, floors = [], [], []
            for _ in range(self.config.repeat):
                loads.append(self.scratch.python(LOAD_MANIFEST_SNIPPET, "models.yaml", cwd=ws)["seconds"])
                lists.append(self.scratch.doit(ws, "list", "--all")[0])
            floor = self.scratch.path(f"floor-{count}")
            for sub in ("src", "out/a", "out/b", "out/c", "out/d"):
                (floor / sub).mkdir(parents=True)
            for pair in range(count):
                (floor / "src" / f"{pair}.txt").write_text(f"{pair}\n")
            (floor / "dodo.py").write_text(floor_dodo(count))
            self.scratch.doit(floor)
            for _ in range(self.config.repeat):
                floors.append(self.scratch.doit(floor)[0])
            self.add(section, f"load_manifest, {count} pairs", "s", loads)
            self.add(section, f"`doit list --all`, {count} pairs ({4 * count + 2} tasks generated)", "s", lists)
            self.add(section, f"doit floor: no-op `doit`, {4 * count} trivial up-to-date tasks", "s", floors)
            growth["load_manifest"][count] = statistics.median(loads)
            growth["doit list"][count] = statistics.median(lists)
            growth["doit floor"][count] = statistics.median(floors)
            if count in self.config.noop_scales:
                noop_notes.append(self.scale_noop(section, ws, count))
        self.note(section, "Synthetic manifests repeat the benchmark's model x target pairs under new names. "
                           "load_manifest is timed inside a fresh Python process (imports excluded, on-disk "
                           "graph-facts memo warm, as on every run after the first); `doit list --all` and the "
                           "no-op `doit` are whole processes (start-up, imports, manifest, task generation, "
                           "dependency checks). The floor dodo has 4 chained copy tasks per pair with file_dep "
                           "and targets and the same sqlite3 backend, built once before timing.")
        if len(self.config.scales) > 1:
            low, high = self.config.scales[0], self.config.scales[-1]
            parts = [f"{name} x{values[high] / values[low]:.1f}" for name, values in growth.items()]
            self.note(section, f"From {low} to {high} pairs (x{high / low:.0f}): {', '.join(parts)}.")
        for text in noop_notes:
            self.note(section, text)

    def scale_noop(self, section: str, ws: Path, count: int) -> str:
        """A real build of ``count`` pairs (conversions from the cache), then no-op runs; returns the note."""
        seconds, output = self.scratch.doit(ws, env=self.with_cache())
        self.add(section, f"real build of {count} pairs, conversions restored from the cache", "s", [seconds])
        noop = [self.scratch.doit(ws, env=self.with_cache())[0] for _ in range(self.config.repeat)]
        self.add(section, f"no-op `doit` after that build, {count} pairs ({4 * count + 2} tasks)", "s", noop)
        return (f"The no-op `doit` is measured at {count} pairs only: a real build is needed first. It ran every "
                f"analyze/resolve/export task and restored {cache_hits(output)} of {count} conversions from the "
                f"section 5 cache (the key holds no model name), converting "
                f"{len(converted(output)) - cache_hits(output)}.")

    # 7 -------------------------------------------------------------------------------------------
    def large_model(self) -> None:
        section = SECTIONS[6]
        progress(f"{section}: generating the model")
        directory = self.scratch.path("large")
        path, size = make_large_model(directory, self.config.large_layers, self.config.large_dim)
        runs = [self.scratch.python(ANALYZE_SNIPPET, str(path), "rk3588", cwd=directory)
                for _ in range(self.config.repeat)]
        loads = [self.scratch.python(ONNX_LOAD_SNIPPET, str(path), cwd=directory) for _ in range(self.config.repeat)]
        weights = f"{size / 1e6:.0f} MB ({size / 2**20:.0f} MiB) of external weights"
        self.add(section, f"`analyze()`, {weights}, {runs[0]['nodes']} nodes", "s", [r["seconds"] for r in runs])
        self.add(section, "peak RSS of the analysing process", "MiB", [r["peak_kb"] / 1024 for r in runs])
        self.add(section, "same process before analyze() (Python, onnx, pipeline imported)", "MiB",
                 [r["before_kb"] / 1024 for r in runs])
        self.add(section, "reference: peak RSS of `onnx.load()` with the weights", "MiB",
                 [r["peak_kb"] / 1024 for r in loads])
        self.note(section, f"{self.config.large_layers} MatMul layers ({self.config.large_dim} x "
                           f"{self.config.large_dim} float32 each, with Relu between) in one external-data file; "
                           "`analyze()` runs in its own process; peaks are that process's VmHWM.")

    # 8 -------------------------------------------------------------------------------------------
    def worker_model(self) -> None:
        """Forked workers (the default) against fresh ones and the hand-written loop, on two manifests;
        `-n 2` against the 2-core CPU floor; unique memory of the zygote and its children."""
        section = SECTIONS[7]
        load_before = os.getloadavg()
        manifests = {"benchmark manifest": self.manifest, "8 small pairs": worker_manifest()}
        if self.config.tiny:
            manifests = {"tiny manifest": self.manifest, "4 tiny pairs": parallel_manifest()}
        fresh_env = dict(self.scratch.env, RKNN_PIPELINE_WORKER="fresh")
        one_slot_env = dict(self.scratch.env, RKNN_PIPELINE_JOBS="1")
        memory: dict[tuple[str, str], list[float]] = {}
        for label, manifest in manifests.items():
            count = len(pairs_of(manifest))
            times: dict[str, list[float]] = {"fork": [], "fresh": [], "hand": [], "serial_cpu": [], "parallel": [],
                                             "one_slot": []}
            peers = None
            for run in range(self.config.repeat):
                progress(f"{section}: {label}, run {run + 1}/{self.config.repeat}")
                ws = self.scratch.workspace("worker-fork", manifest)
                cpu = children_cpu()
                with MemorySampler(ws) as sampler:
                    seconds, output = self.scratch.doit(ws)
                cpu = children_cpu() - cpu
                if len(converted(output)) != count or "falling back to a fresh worker" in output:
                    raise BenchmarkError(f"the forked build converted {converted(output)} or fell back")
                times["fork"].append(seconds)
                for role in ("zygote", "child"):
                    for key in ("pss", "uss"):
                        memory.setdefault((role, key), []).extend(sampler.mib(role, key))
                if peers is None:
                    peers = prepare_peers(self.scratch, ws, manifest)
                times["hand"].append(run_hand_loop(self.scratch, peers, run))
                seconds, _ = self.scratch.doit(self.scratch.workspace("worker-fresh", manifest), env=fresh_env)
                times["fresh"].append(seconds)
                seconds, output = self.scratch.doit(self.scratch.workspace("worker-one-slot", manifest),
                                                    env=one_slot_env)
                if len(converted(output)) != count:
                    raise BenchmarkError(f"the one-slot build converted {converted(output)}")
                times["one_slot"].append(seconds)
                times["serial_cpu"].append(cpu)
                seconds, output = self.scratch.doit(self.scratch.workspace("worker-n2", manifest),
                                                    "-n", "2", "-P", "process")
                if len(converted(output)) != count:
                    raise BenchmarkError(f"the -n 2 build converted {converted(output)}")
                times["parallel"].append(seconds)
            self.add(section, f"{label} ({count} pairs): `doit`, forked workers (default)", "s", times["fork"])
            self.add(section, f"{label}: `doit` with RKNN_PIPELINE_WORKER=fresh", "s", times["fresh"])
            self.add(section, f"{label}: hand-written loop", "s", times["hand"])
            self.add(section, f"{label}: ratio forked / hand loop (goal <= 1.0)", "x",
                     ratios(times["fork"], times["hand"]))
            self.add(section, f"{label}: ratio fresh / hand loop", "x", ratios(times["fresh"], times["hand"]))
            self.add(section, f"{label}: `doit` with RKNN_PIPELINE_JOBS=1 (one conversion at a time, still "
                              f"started ahead)", "s", times["one_slot"])
            self.add(section, f"{label}: ratio one conversion at a time / hand loop", "x",
                     ratios(times["one_slot"], times["hand"]))
            cpu_floor = [cpu / 2 for cpu in times["serial_cpu"]]
            self.add(section, f"{label}: ratio plain `doit` (forked workers) / CPU floor", "x",
                     ratios(times["fork"], cpu_floor))
            self.add(section, f"{label}: `doit -n 2 -P process`, forked workers", "s", times["parallel"])
            self.add(section, f"{label}: 2-core CPU floor (CPU seconds of the serial run / 2)", "s", cpu_floor)
            self.add(section, f"{label}: ratio `-n 2` / CPU floor (goal <= 1.1)", "x",
                     ratios(times["parallel"], cpu_floor))
        names = {"zygote": "each zygote", "child": "each forked child (one per conversion)"}
        for (role, key), samples in memory.items():
            if samples:
                self.add(section, f"peak {key.upper()} of {names[role]}, serial runs", "MiB", samples)
        load_after = os.getloadavg()
        described = {label: ", ".join(f"{m['name']}@{t}" for m, t in pairs_of(manifest))
                     for label, manifest in manifests.items()}
        self.note(section, "Conversions: " + "; ".join(f"{label}: {text}" for label, text in described.items())
                  + ". Each build is a fresh workspace; the forked and fresh builds and the hand loop (the same "
                    "loop as section 1, with the pipeline's toolkit arguments) alternate run by run, so the "
                    "ratios compare runs made under the same load. Serial means plain `doit` (tasks run in doit's "
                    "own process, one at a time; with the pipeline's reporter each conversion starts in the "
                    "background when its resolution is written, up to one per core at once, longest first, "
                    "and its convert task collects it: the hand loop converts one model at a time). "
                    "RKNN_PIPELINE_JOBS=1 keeps the start ahead but runs one conversion at a time. `-n 2 -P "
                    "process` runs tasks in two doit processes, each with its own zygote and no conversion "
                    "ahead. The CPU floor is the user + system time of "
                    "the serial build and every process it started (zygote and children included: each is "
                    "reaped), halved: no 2-core schedule can finish sooner. Memory is sampled every 50 ms from "
                    "`/proc/<pid>/smaps_rollup`; USS counts pages no other process maps, so a child's USS is "
                    "what it added to the zygote, and the zygote's USS depends on which other processes on the "
                    "machine map the same toolkit libraries.")
        self.note(section, f"Load average (1/5/15 min) before this section: "
                           f"{' / '.join(f'{v:.1f}' for v in load_before)}, after: "
                           f"{' / '.join(f'{v:.1f}' for v in load_after)} on {os.cpu_count()} cores shared with "
                           "other work.")


    # 8 -------------------------------------------------------------------------------------------
    def shapes(self) -> None:
        """Buckets against one dynamic model for the same shape sets: time, cosine per shape, size."""
        section = SECTIONS[8]
        manifest = yaml.safe_load((REPO / "models.yaml").read_text())
        models = {m["name"]: m for m in manifest["models"] if m["name"] in SHAPE_MODELS}
        manifest["models"] = [models[name] for name in SHAPE_MODELS]
        widths = [shape[3] for shape in models["rec"]["inputs"]["x"]]
        buckets = [f"rec.1x3x48x{width}" for width in widths]
        walls: dict[str, list[float]] = {"buckets": [], "dynamic": []}
        workers: dict[str, list[float]] = {"buckets": [], "dynamic": []}
        cosines: dict[str, list[float]] = {}
        sizes: dict[str, list[float]] = {}
        cpu_layers: dict[str, list[float]] = {"buckets": [], "dynamic": []}
        for run in range(self.config.repeat):
            progress(f"{section}: run {run + 1}/{self.config.repeat}")
            ws = self.scratch.workspace("shapes", manifest)
            for way, names in (("buckets", buckets), ("dynamic", ["rec_dynamic"])):
                seconds, output = self.scratch.doit(ws, *(f"export:{name}@rk3588" for name in names))
                if sorted(converted(output)) != sorted(f"{name}@rk3588" for name in names):
                    raise BenchmarkError(f"the {way} build converted {converted(output)}")
                walls[way].append(seconds)
                records = [json.loads((ws / "build" / name / "rk3588" / "convert.json").read_text())
                           for name in names]
                workers[way].append(sum(record["seconds"] for record in records))
            for width, name in zip(widths, buckets):
                sidecar = json.loads((ws / "dist" / "rk3588" / f"{name}.json").read_text())
                cosines.setdefault(f"buckets, width {width}", []).append(sidecar["verify"]["outputs"][0]["cosine"])
                sizes.setdefault(f"bucket {name}.rknn", []).append(sidecar["rknn"]["size"] / 1000)
                cpu_layers["buckets"].append(sidecar["placement"]["cpu"])
            dynamic = json.loads((ws / "dist" / "rk3588" / "rec_dynamic.json").read_text())
            for per_shape in dynamic["verify"]["shapes"]:
                label = f"dynamic, width {per_shape['inputs']['x'][3]}"
                cosines.setdefault(label, []).append(per_shape["outputs"][0]["cosine"])
            sizes.setdefault("dynamic rec_dynamic.rknn", []).append(dynamic["rknn"]["size"] / 1000)
            cpu_layers["dynamic"].append(dynamic["placement"]["cpu"])
        self.add(section, f"buckets: `doit` for {len(buckets)} static models (one per width)", "s", walls["buckets"])
        self.add(section, "dynamic: `doit` for one model with dynamic_input", "s", walls["dynamic"])
        self.add(section, "ratio buckets / dynamic, whole `doit` run", "x", ratios(walls["buckets"], walls["dynamic"]))
        self.add(section, "buckets: conversion workers, summed", "s", workers["buckets"])
        self.add(section, "dynamic: conversion worker", "s", workers["dynamic"])
        self.add(section, "ratio buckets / dynamic, conversion workers", "x",
                 ratios(workers["buckets"], workers["dynamic"]))
        for label, values in cosines.items():
            self.add(section, f"simulator cosine vs onnxruntime, {label}", "cos", values)
        for label, values in sizes.items():
            self.add(section, f"size of {label}", "KB", values)
        self.add(section, "layers on the CPU, each bucket (the toolkit's layer table)", "layers", cpu_layers["buckets"])
        self.add(section, "layers on the CPU, the dynamic model", "layers", cpu_layers["dynamic"])
        self.add(section, "size of the buckets together", "KB",
                 [sum(values[run] for label, values in sizes.items() if label.startswith("bucket "))
                  for run in range(self.config.repeat)])
        self.note(section, f"The recogniser of models.yaml (`examples/models/tiny_recogniser.onnx`, input "
                           f"[1, 3, 48, W]) at widths {', '.join(map(str, widths))}, w8a8 on rk3588 from the "
                           "same two calibration images, built both ways in one fresh workspace per run: "
                           "`shapes: buckets` (one static .rknn per width) and `shapes: dynamic` (one .rknn "
                           "through `dynamic_input`). Times are whole `doit export:...` runs (analysis, "
                           "resolution, conversion with verify at each width, export) and the conversion workers' "
                           "own times from convert.json. Cosine is the first output's, "
                           "over the verify samples: the two calibration images, resized to each width (for the "
                           "dynamic model too, although the toolkit calibrates it at the largest width only).")

    # 11 ------------------------------------------------------------------------------------------
    def shards(self) -> None:
        """Shard balance on real graphs (first from size estimates, then from recorded durations), and the
        cost of a plan that finds everything cached."""
        section = SECTIONS[10]
        cache = self.scratch.path("shard-cache")
        balance: dict[str, list[float]] = {}
        rounds = (("estimates", 0.5), ("recorded durations", 0.6))
        for round_, (basis, min_cosine) in enumerate(rounds[:1] if self.config.tiny else rounds):
            manifest = shard_manifest(min_cosine, self.config.tiny)
            env = dict(self.scratch.env, **{CACHE_ENV: str(cache), "RKNN_PIPELINE_RUN": f"bench-{round_}"})
            ws = self.scratch.workspace("shard-plan", manifest)
            _, output = self.scratch.run([sys.executable, "-m", "pipeline.ci", "plan", "--shards", "3"], ws,
                                         "plan", env)
            matrix = json.loads(output.strip().splitlines()[-1])["include"]
            work, walls = [], []
            for entry in matrix:  # one after the other: the shards of a CI run do not share 2 cores
                ws = self.scratch.workspace("shard", manifest)
                progress(f"{section}: {basis}, shard {entry['shard']} ({entry['pairs']} pairs)")
                seconds, output = self.scratch.doit(ws, f"shard={entry['shard']}", env=env)
                if len(converted(output)) != entry["pairs"]:
                    raise BenchmarkError(f"shard {entry['shard']} converted {converted(output)}")
                walls.append(seconds)
                work.append(sum(json.loads(p.read_text())["seconds"] for p in ws.glob("build/*/*/convert.json")))
            pairs = sum(entry["pairs"] for entry in matrix)
            balance.setdefault(f"conversions, plan from {basis}", []).append(max(work) / (sum(work) / 3))
            balance.setdefault(f"whole `doit shard=I/3` runs, plan from {basis}", []).append(
                max(walls) / (sum(walls) / 3))
            self.add(section, f"{pairs} pairs, plan from {basis}: conversion time per shard, longest", "s",
                     [max(work)])
            self.add(section, f"{pairs} pairs, plan from {basis}: conversion time per shard, shortest", "s",
                     [min(work)])
        for label, values in balance.items():
            self.add(section, f"balance N=3 (longest / (total / 3)), {label}", "x", values)
        ws = self.scratch.workspace("shard-noop", noop_plan_manifest(25 if self.config.tiny else 250))
        warm = self.scratch.path("shard-noop-cache")
        env = dict(self.scratch.env, **{CACHE_ENV: str(warm)})
        self.scratch.run([sys.executable, "-c", MARK_ALL], ws, "mark", env)
        times = []
        for _ in range(self.config.repeat):
            seconds, output = self.scratch.run([sys.executable, "-m", "pipeline.ci", "plan"], ws, "plan", env)
            if json.loads(output.strip().splitlines()[-1]) != {"include": []}:
                raise BenchmarkError(f"the warm plan was not empty: {output[-500:]}")
            times.append(seconds)
        self.add(section, f"`python -m pipeline.ci plan`, {100 if self.config.tiny else 1000} pairs, all cached "
                          "(local cache dir)", "s", times)
        self.note(section, "Balance: a manifest of the example graphs (inception_v2, densenet121, shufflenet "
                           "for rk3588, rk3576 and rk3566, and inception_v2 in int8 for two targets: 11 pairs), "
                           "`python -m pipeline.ci plan --shards 3` against an empty cache, then each "
                           "`doit shard=I/3` in its own fresh workspace, one after another (on this shared "
                           "2-core machine concurrent shards would time each other). A shard's time is the sum of "
                           "its conversions' own times (convert.json); the whole-run ratio adds each shard's "
                           "toolkit import and analysis. The second round changes verify's threshold, so every "
                           "pair is missing again while the durations the first round recorded in the cache "
                           "drive the split. One run per round. No-op plan: 250 copies of the tiny model for 4 "
                           "targets, every pair marked as built in a local cache; the figure is the whole "
                           "process (interpreter start, manifest load, hashing, 1000 cache lookups).")


    # 10 ------------------------------------------------------------------------------------------
    def repair(self) -> None:
        """quantization.repair against plain int8 and float16: accuracy, cost of the search, speed and size."""
        section = SECTIONS[9]
        manifest = yaml.safe_load((REPO / "models.yaml").read_text())
        by_name = {m["name"]: m for m in manifest["models"]}
        repair = by_name["outlier_repaired"]["quantization"]["repair"]
        for base in REPAIR_MODELS:
            model = copy.deepcopy(by_name[base])
            if not model.get("quantization"):
                model["quantization"] = copy.deepcopy(by_name["inception_v2_int8"]["quantization"])
            model["targets"] = ["rk3588"]
            quant = {k: v for k, v in model["quantization"].items() if k != "repair"}
            variants = {  # verify min_cosine -1: the plain builds must finish so their cosine can be read
                "int8": {**model, "name": f"{base}-int8", "quantization": quant, "verify": {"min_cosine": -1}},
                "float16": {**model, "name": f"{base}-float16", "quantization": None, "verify": {"min_cosine": -1}},
                "repair": {**model, "name": f"{base}-repair", "quantization": {**quant, "repair": repair}},
            }
            figures: dict[str, dict[str, list[float]]] = {way: {} for way in variants}
            for run in range(self.config.repeat):
                progress(f"{section}: {base}, run {run + 1}/{self.config.repeat}")
                ws = self.scratch.workspace(f"repair-{base}", {**manifest, "models": list(variants.values())})
                for way, entry in variants.items():
                    self.scratch.doit(ws, f"export:{entry['name']}@rk3588")
                    sidecar = json.loads((ws / "dist" / "rk3588" / f"{entry['name']}.json").read_text())
                    record = json.loads((ws / "build" / entry["name"] / "rk3588" / "convert.json").read_text())
                    found = figures[way]
                    found.setdefault("cos", []).append(min(o["cosine"] for o in sidecar["verify"]["outputs"]))
                    found.setdefault("seconds", []).append(record["seconds"])
                    found.setdefault("size", []).append(sidecar["rknn"]["size"])
                    found.setdefault("cycles", []).append(sidecar["placement"]["total_cycles"])
                    found.setdefault("float", []).append(len((sidecar.get("repair") or {}).get("float_layers") or []))
            label = f"{base} (rk3588)"
            self.add(section, f"{label}: cosine, plain int8", "cos", figures["int8"]["cos"])
            self.add(section, f"{label}: cosine, repaired", "cos", figures["repair"]["cos"])
            self.add(section, f"{label}: cosine, float16", "cos", figures["float16"]["cos"])
            self.add(section, f"{label}: float16 layers the repair chose", "layers", figures["repair"]["float"])
            self.add(section, f"{label}: repair's conversion time / one plain int8 conversion", "x",
                     ratios(figures["repair"]["seconds"], figures["int8"]["seconds"]))
            for other in ("int8", "float16"):
                self.add(section, f"{label}: .rknn size, repaired / {other}", "x",
                         ratios(figures["repair"]["size"], figures[other]["size"]))
                self.add(section, f"{label}: estimated cycles, repaired / {other}", "x",
                         ratios(figures["repair"]["cycles"], figures[other]["cycles"]))
        self.note(section, f"Each model of {', '.join(REPAIR_MODELS)} built three ways for rk3588 in one fresh "
                           f"workspace per run: plain int8 (w8a8), float16, and int8 with `quantization: {{repair: "
                           f"{{min_cosine: {repair['min_cosine']}, max_float_layers: {repair['max_float_layers']}}}}}`. "
                           "Cosine is the worst output's, simulator against onnxruntime on the verify samples. "
                           "Conversion times are the workers' own (convert.json: build, export, verify, and for the "
                           "repair its analyses and rebuilds). Cycles are the compiler's estimate summed over the "
                           "layer table, not a measurement on a board. inception_v2's weights are constant fills "
                           "(examples/models/README.md), so plain int8 already passes there: the figures show what "
                           "repair costs when nothing needs repairing.")


    # 10 ------------------------------------------------------------------------------------------
    def shared_cache(self) -> None:
        """Section 1's cold build with an S3 store (every conversion uploaded), then a fresh checkout
        restoring everything from that store; both against section 1's cold build without a cache."""
        section = "12 shared cache"
        sys.path.insert(0, str(REPO / "tests"))
        from s3_server import S3Server  # the tests' moto server on 127.0.0.1

        count = len(pairs_of(self.manifest))
        cold_s3, uploads, warm_s3 = [], [], []
        server = S3Server()
        try:
            for run in range(self.config.repeat):
                progress(f"{section}: run {run + 1}/{self.config.repeat}")
                bucket = f"bench-{run}"
                server.make_bucket(bucket)
                env = dict(self.scratch.env, **server.environment(), **{CACHE_ENV: f"s3://{bucket}/cache"})
                ws = self.scratch.workspace("s3-cold", self.manifest)
                seconds, output = self.scratch.doit(ws, env=env)
                if len(converted(output)) != count or cache_hits(output):
                    raise BenchmarkError(f"a cold build with an empty S3 store converted {converted(output)} "
                                         f"and restored {cache_hits(output)}")
                cold_s3.append(seconds)
                uploads.append(self.scratch.python(UPLOAD_SNIPPET, f"s3://{bucket}/again", str(REPO / "benchmarks"), cwd=ws,
                                                   env=env)["seconds"])
                ws = self.scratch.workspace("s3-warm", self.manifest)
                seconds, output = self.scratch.doit(ws, env=env)
                if cache_hits(output) != count:
                    raise BenchmarkError(f"a warm build from S3 restored {cache_hits(output)} of {count}")
                warm_s3.append(seconds)
        finally:
            server.stop()
        self.add(section, f"cold build, {count} conversions, each uploaded to an empty S3 store", "s", cold_s3)
        self.add(section, "ratio cold build with S3 store / without a cache (section 1)", "x",
                 ratios(cold_s3, self.cold))
        self.add(section, f"uploading what that build stores alone: {count} conversions, their analyses and "
                          "resolutions (fresh process: s3fs import, hashing, PUTs)", "s", uploads)
        self.add(section, "ratio upload alone / cold build without a cache (section 1)", "x",
                 ratios(uploads, self.cold))
        self.add(section, f"fresh checkout, warm S3 store (all {count} restored)", "s", warm_s3)
        self.add(section, "ratio warm S3 build / cold build without a cache (section 1; goal <= 0.03)", "x",
                 ratios(warm_s3, self.cold))
        self.note(section, "The S3 store is moto's server (the one the tests use) on 127.0.0.1, reached through "
                           "the standard AWS_* variables and `RKNN_PIPELINE_CACHE=s3://bucket/cache`; a new "
                           "bucket per run, so every conversion of the cold build is uploaded (blobs first, entry "
                           "last). Loopback has no network latency: against a remote endpoint, add the transfer "
                           "of the .rknn files. The whole-build ratio compares two different cold builds and "
                           "carries their noise; the upload-alone figure stores the same entries into a new prefix "
                           "in a fresh process, from `import` to the last PUT. The warm build is a fresh workspace "
                           "restoring every analysis, resolution and conversion from that bucket, importing "
                           "neither the toolkit nor onnx (the manifest's graph facts come from this machine's memo, "
                           "found by content).")

    # 13 ------------------------------------------------------------------------------------------
    def toolkit_versions(self) -> None:
        """What a second rknn-toolkit2 version costs: its environment cold (a fresh machine, as CI) and
        warm, its disk, and a build of one model with both versions against one with the installed one."""
        section = SECTIONS[12]
        uv_cache = self.scratch.path("uv-cache")
        env = {k: v for k, v in self.scratch.env.items() if k not in ("VIRTUAL_ENV", TOOLKITS_ENV)}
        env["UV_CACHE_DIR"] = str(uv_cache)
        python = sys.executable
        if self.config.tiny:
            # a smoke run: no fresh machine (that downloads gigabytes); the user's uv cache, warmed first
            env.pop("UV_CACHE_DIR")
            self.make_toolkit_env(python, self.scratch.path("toolkits-warm-up"), env)
        else:
            progress(f"{section}: `uv sync --locked` of a copy of the project into an empty uv cache (CI's install)")
            project = self.scratch.path("ci-project")
            copy_project(project)
            seconds, _ = self.scratch.run(["uv", "sync", "--locked", "--quiet"], project, "uv-sync", env)
            self.add(section, "fresh machine: `uv sync --locked` of the project, empty uv cache (CI's install)",
                     "s", [seconds])
            python = str(project / ".venv" / "bin" / "python")
            before = disk_mib([uv_cache])
            progress(f"{section}: the {EXTRA_TOOLKIT} environment on that machine (cold)")
            created = self.make_toolkit_env(python, self.scratch.path("toolkits-cold"), env)
            self.add(section, f"fresh machine: create the {EXTRA_TOOLKIT} environment after that sync (cold)",
                     "s", [created["create"]])
            self.add(section, f"ratio cold {EXTRA_TOOLKIT} environment / project sync", "x",
                     ratios([created["create"]], [seconds]))
            self.add(section, f"uv cache growth for the {EXTRA_TOOLKIT} environment", "MiB",
                     [disk_mib([uv_cache]) - before])
            before = disk_mib([uv_cache])
            progress(f"{section}: the {OWN_TORCH_TOOLKIT} environment on that machine (cold, its own torch)")
            own = self.make_toolkit_env(python, self.scratch.path("toolkits-cold"), env, OWN_TORCH_TOOLKIT)
            self.add(section, f"fresh machine: create the {OWN_TORCH_TOOLKIT} environment after that sync "
                              "(cold; its torch range excludes the project's, so it downloads its own)",
                     "s", [own["create"]])
            self.add(section, f"uv cache growth for the {OWN_TORCH_TOOLKIT} environment", "MiB",
                     [disk_mib([uv_cache]) - before])
        warm, reuse, unshared = [], [], []
        for run in range(self.config.repeat):
            progress(f"{section}: the {EXTRA_TOOLKIT} environment from a warm uv cache, run {run + 1}/"
                     f"{self.config.repeat}")
            toolkits = self.scratch.path("toolkits-warm")
            created = self.make_toolkit_env(python, toolkits, env)
            warm.append(created["create"])
            reuse.append(created["reuse"])
            unshared.append(unshared_mib(toolkits))
        self.add(section, f"create the {EXTRA_TOOLKIT} environment, warm uv cache", "s", warm)
        self.add(section, f"ask for the {EXTRA_TOOLKIT} environment again (exists: reused)", "s", reuse)
        self.add(section, f"disk of the {EXTRA_TOOLKIT} environment not shared with the uv cache", "MiB", unshared)

        both = {"version": 1, "defaults": {"mean_values": [[0, 0, 0]], "std_values": [[1, 1, 1]]},
                "models": [{"name": name, "source": "tiny/tiny.onnx", "targets": ["rk3588"],
                            "inputs": {"x": [1, 3, 16, 16]}, **extra}
                           for name, extra in (("tiny", {}), ("tiny_old", {"toolkit": EXTRA_TOOLKIT}))]}
        one = dict(both, models=both["models"][:1])
        build_env = dict(env, **{TOOLKITS_ENV: str(toolkits)})
        walls: dict[str, list[float]] = {"one": [], "both": []}
        cpus: dict[str, list[float]] = {"one": [], "both": []}
        for run in range(self.config.repeat):
            progress(f"{section}: build with one and with two toolkit versions, run {run + 1}/{self.config.repeat}")
            for label, manifest in (("one", one), ("both", both)):
                ws = self.scratch.workspace(f"toolkits-{label}", manifest)
                cpu = children_cpu()
                seconds, output = self.scratch.doit(ws, env=build_env)
                cpus[label].append(children_cpu() - cpu)
                names = [model["name"] for model in manifest["models"]]
                if sorted(converted(output)) != sorted(f"{name}@rk3588" for name in names):
                    raise BenchmarkError(f"the {label}-version build converted {converted(output)}")
                walls[label].append(seconds)
            built = self.scratch.python(READ_TOOLKITS, str(ws / "dist" / "rk3588"), cwd=REPO)
            if built != {"tiny": installed_toolkit(), "tiny_old": EXTRA_TOOLKIT}:
                raise BenchmarkError(f"the two-version build's files say they were built by {built}")
        self.add(section, "`doit`, one tiny model for rk3588 with the installed toolkit", "s", walls["one"])
        self.add(section, f"`doit`, the same model twice: installed toolkit and {EXTRA_TOOLKIT} (environment exists)",
                 "s", walls["both"])
        self.add(section, f"extra seconds for the {EXTRA_TOOLKIT} model", "s",
                 [b - o for b, o in zip(walls["both"], walls["one"])])
        self.add(section, f"extra CPU seconds for the {EXTRA_TOOLKIT} model (all processes of the build)", "s",
                 [b - o for b, o in zip(cpus["both"], cpus["one"])])
        cold = ("On a fresh machine (full run only, once: it downloads gigabytes) a copy of the project is "
                "synced with `uv sync --locked` into an empty `UV_CACHE_DIR`, as `.ci/run` does, then "
                f"`python_for(\"{EXTRA_TOOLKIT}\")` creates that version's environment in an empty "
                f"`{TOOLKITS_ENV}` directory from what the sync left in the uv cache; the growth of the cache is "
                f"what that version added; {OWN_TORCH_TOOLKIT} follows the same way, after it. "
                if not self.config.tiny else "")
        self.note(section, cold + f"Warm: `python_for(\"{EXTRA_TOOLKIT}\")` in an empty `{TOOLKITS_ENV}` "
                  "directory each run, from a uv cache that has everything; \"again\" is a second call in the "
                  "same process, which finds the environment. Unshared disk counts the environment's files "
                  "with one link only (uv hardlinks the rest from its cache). The builds are whole cold `doit` "
                  "runs in fresh workspaces with the environment already made (the extra wall time is noisy on a "
                  "shared machine; the extra CPU time, mostly the second toolkit's import in its own zygote, "
                  "much less); each run's two-version files "
                  "are read back with `pipeline.rknn_file` and must name the toolkit asked for.")

    def make_toolkit_env(self, python: str, toolkits: Path, env: dict, version: str = EXTRA_TOOLKIT) -> dict:
        """Time ``python_for(version)`` where ``toolkits`` lacks it, and a second call."""
        _, text = self.scratch.run([python, "-c", CREATE_TOOLKIT_ENV, version], REPO, "toolkit-env",
                                   dict(env, **{TOOLKITS_ENV: str(toolkits)}))
        return json.loads(text.strip().splitlines()[-1])


SHARD_TARGETS = ["rk3588", "rk3576", "rk3566"]

# Marks every pair of ./models.yaml as built in the cache, as shards would after converting them.
MARK_ALL = """
from pipeline import shard
from pipeline.manifest import load_manifest
manifest = load_manifest("models.yaml")
store = shard.store_for(manifest)
for model in manifest.models:
    for target in model["targets"]:
        shard.record_built(store, manifest, model, target, "0" * 64, {"seconds": 1.0}, True)
"""


def shard_manifest(min_cosine: float, tiny: bool = False) -> dict:
    defaults = {"mean_values": [[0, 0, 0]], "std_values": [[1, 1, 1]], "verify": {"samples": 1, "min_cosine": min_cosine}}
    if tiny:
        return {"version": 1, "defaults": defaults, "models": [
            {"name": "t", "source": "examples/models/tiny_pool_identity.onnx", "targets": SHARD_TARGETS,
             "inputs": {"x": [1, 3, 32, 32]}}]}
    graphs = (("inception_v2", "light_inception_v2.onnx", "data_0"), ("densenet121", "light_densenet121.onnx", "data_0"),
              ("shufflenet", "light_shufflenet.onnx", "gpu_0/data_0"))
    models = [{"name": name, "source": f"examples/models/{file}", "targets": SHARD_TARGETS,
               "inputs": {tensor: [1, 3, 224, 224]}} for name, file, tensor in graphs]
    models.append({"name": "inception_v2_int8", "source": "examples/models/light_inception_v2.onnx",
                   "targets": SHARD_TARGETS[:2], "inputs": {"data_0": [1, 3, 224, 224]},
                   "quantization": {"dataset": "examples/calib/inception_v2.txt", "dtype": "w8a8"}})
    return {"version": 1, "defaults": defaults, "models": models}


def noop_plan_manifest(models: int) -> dict:
    return {"version": 1, "models": [
        {"name": f"m{i}", "source": "examples/models/tiny_pool_identity.onnx",
         "targets": ["rk3588", "rk3576", "rk3566", "rk3562"], "inputs": {"x": [1, 3, 32, 32]}}
        for i in range(models)]}


# Run with the project's python: times the creation of one toolkit version's environment, then a reuse.
CREATE_TOOLKIT_ENV = """
import json, sys, time
from pipeline.toolkit_envs import python_for
started = time.perf_counter()
python_for(sys.argv[1])
created = time.perf_counter() - started
started = time.perf_counter()
python_for(sys.argv[1])
print(json.dumps({"create": created, "reuse": time.perf_counter() - started}))
"""

# The toolkit version in the header of each .rknn in a directory, by model name.
READ_TOOLKITS = """
import json, sys
from pathlib import Path
from pipeline.rknn_file import read
print(json.dumps({path.stem: read(path).toolkit for path in sorted(Path(sys.argv[1]).glob("*.rknn"))}))
"""


def installed_toolkit() -> str:
    return metadata.version("rknn-toolkit2")


def copy_project(destination: Path) -> None:
    """The files ``uv sync --locked`` installs the project from (no caches, no .venv)."""
    destination.mkdir()
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, destination / name)


def disk_mib(paths: list[Path]) -> float:
    """Allocated disk under ``paths``, each hardlinked file once (what ``du`` reports)."""
    seen, total = set(), 0
    for root in paths:
        for directory, _, files in os.walk(root):
            for name in files:
                stat = os.lstat(os.path.join(directory, name))
                if (stat.st_dev, stat.st_ino) not in seen:
                    seen.add((stat.st_dev, stat.st_ino))
                    total += stat.st_blocks * 512
    return total / 2**20


def unshared_mib(root: Path) -> float:
    """Allocated disk of the files under ``root`` that have no other link (uv hardlinks from its cache)."""
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            stat = os.lstat(os.path.join(directory, name))
            if stat.st_nlink == 1:
                total += stat.st_blocks * 512
    return total / 2**20


# -- report --------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in ("rknn-toolkit2", "onnx", "onnxruntime", "doit"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    versions["python"] = platform.python_version()
    return {"cpu": cpu, "cores": os.cpu_count(), "versions": versions}


def render_document(bench: Benchmark, table: str, seconds: float) -> str:
    info = machine()
    versions = ", ".join(f"{name} {version}" for name, version in info["versions"].items())
    lines = [
        "# Benchmarks",
        "",
        "Generated by `uv run python benchmarks/run.py` (do not edit by hand; rerun it). Each figure is the "
        f"median of {bench.config.repeat} runs with min and max; ratios are taken run by run. Wall times come "
        "from `time.perf_counter` around whole `python -m doit` (or peer) processes.",
        "",
        f"- Machine: {info['cpu']}, {info['cores']} cores (shared with other work while measuring: "
        "expect noise of several percent)",
        f"- Versions: {versions}",
        "- Python writes and reuses bytecode in every measured process (as it does by default for users)",
        f"- Date: {datetime.date.today().isoformat()}; the whole benchmark took {seconds / 60:.1f} min",
        "",
        table,
        "",
        "## What each section measures",
        "",
    ]
    for section in SECTIONS:
        if bench.notes[section]:
            lines.append(f"- **{section}**: " + " ".join(bench.notes[section]))
    return "\n".join(lines) + "\n"


def merge_document(old: str, new: str, sections: set[str]) -> str:
    """``old`` with the table rows and notes of ``sections`` taken from ``new`` (an ``--only`` run).

    The header (machine, versions, date) stays the full run's; the rows keep
    SECTIONS order, so a refreshed section lands where a full run puts it.
    """
    def parts(text: str) -> tuple[list[str], list[str], list[str]]:
        lines = text.splitlines()
        first = next(i for i, line in enumerate(lines) if line.startswith("| section"))
        end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
        return lines[:first + 2], lines[first + 2:end], lines[end:]

    def section_of(line: str) -> str:
        return line.strip("|- *").split("|")[0].split("**")[0].strip().rstrip(":")

    head, old_rows, tail = parts(old)
    _, new_rows, new_tail = parts(new)
    rows = [row for row in old_rows if section_of(row) not in sections] + new_rows
    rows.sort(key=lambda row: SECTIONS.index(section_of(row)) if section_of(row) in SECTIONS else len(SECTIONS))
    before = next((line[len(_REFRESHED):] for line in tail if line.startswith(_REFRESHED)), "")
    notes = [line for line in tail if not line.startswith(_REFRESHED)
             and not (line.startswith("- **") and section_of(line) in sections)]
    notes += [line for line in new_tail if line.startswith("- **") and section_of(line) in sections]
    notes = [line for line in notes if line.strip()]  # notes are one bullet each; blank lines are re-added
    heading = notes.index("## What each section measures") if "## What each section measures" in notes else None
    if heading is not None:
        notes[heading:heading + 1] = ["", "## What each section measures", ""]
    notes.sort(key=lambda line: SECTIONS.index(section_of(line)) if line.startswith("- **")
               and section_of(line) in SECTIONS else -1)
    refreshed = sorted(sections | (set(re.findall(r"`([^`]+)`", before)) & set(SECTIONS)), key=SECTIONS.index)
    notes += ["", f"{_REFRESHED} {', '.join(f'`{name}`' for name in refreshed)} "
                  f"(last on {datetime.date.today().isoformat()}); the header describes the full run."]
    return "\n".join(head + rows + notes) + "\n"


_REFRESHED = "Sections measured again on their own with `--only`:"


def selected_sections(values: list[str]) -> set[str]:
    """``--only`` values, each one section or a comma-separated list of them."""
    return {name.strip() for value in values for name in value.split(",") if name.strip()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="fast smoke configuration; never writes the docs")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (default 3; --tiny uses 1)")
    parser.add_argument("--out", type=Path, help=f"write the markdown here (default without --tiny: "
                                                 f"{DOCS_OUT.relative_to(REPO)})")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory and print its path")
    parser.add_argument("--only", action="append", metavar="SECTION[,SECTION...]",
                        help="run only these sections (comma-separated or repeated), e.g. --only '4 parallel'; "
                             "the document keeps the other sections' rows and notes. Sections: "
                             + ", ".join(SECTIONS))
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    only = selected_sections(args.only or [])
    unknown = sorted(only - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(map(repr, unknown))}; choose from {', '.join(SECTIONS)}")
    config = tiny_config() if args.tiny else full_config(args.repeat)
    out = args.out or (None if args.tiny else DOCS_OUT)

    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="rknn-pipeline-bench-"))
    # manifest.py memoises ONNX graph facts under XDG_CACHE_HOME: keep them in the scratch tree,
    # for this process (prepare_peers, seed_cache) and every subprocess
    os.environ["XDG_CACHE_HOME"] = str(root / "xdg-cache")
    try:
        scratch = Scratch(root)
        make_tiny_assets(root / "assets" / "tiny")
        bench = Benchmark(scratch, config)
        bench.run(only)
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            progress(f"scratch directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if only:  # a dependency (section 1) may have measured more than was asked for
        bench.rows = [row for row in bench.rows if row.section in only]
    table = render_table(bench.rows)
    print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        document = render_document(bench, table, time.perf_counter() - started)
        if args.only and out.exists():
            document = merge_document(out.read_text(), document, only)
        out.write_text(document)
        progress(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
