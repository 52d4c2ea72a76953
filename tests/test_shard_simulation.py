"""The multi-runner flow on one machine: plan, three shards at once in their own checkouts against a
real S3 server, then the fan-in in a fourth checkout where the toolkit cannot be imported."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import Project, make_pool_identity_model
from test_shared_cache import block_toolkit

pytestmark = pytest.mark.toolkit

MANIFEST = """\
version: 1
defaults:
  mean_values: [[0, 0, 0]]
  std_values: [[1, 1, 1]]
  verify: { samples: 1, min_cosine: 0.9 }
models:
  - name: a
    source: m/a.onnx
    targets: [rk3588, rk3576]
  - name: b
    source: m/b.onnx
    targets: [rk3588, rk3566]
  - name: c
    source: m/c.onnx
    targets: [rk3562]
"""
PAIRS = {"a@rk3588", "a@rk3576", "b@rk3588", "b@rk3566", "c@rk3562"}


def checkout(root, env: dict) -> Project:
    root.mkdir(parents=True)
    project = Project(root)
    (root / "m").mkdir()
    for seed, name in enumerate("abc"):
        make_pool_identity_model(root / "m" / f"{name}.onnx", seed=seed)
    project.write_manifest(MANIFEST)
    project.env.update(env)
    return project


def converted(stdout: str) -> list[str]:
    """Pairs a doit run converted with the toolkit (cache hits left out)."""
    return [m.group(1) for m in re.finditer(r"^convert (\S+)  .*$", stdout, flags=re.M)
            if "(cache hit)" not in m.group(0)]


def lock_entries(project: Project) -> dict:
    return json.loads((project.root / "dist" / "models.lock.json").read_text())["entries"]


def dist_files(project: Project) -> list[str]:
    return sorted(p.relative_to(project.root / "dist").as_posix() for p in (project.root / "dist").rglob("*")
                  if p.is_file())


def test_plan_three_shards_and_fan_in(s3_server, s3_bucket, tmp_path):
    single = checkout(tmp_path / "single", {})
    single.doit()

    env = {**s3_server.environment(), "RKNN_PIPELINE_CACHE": f"s3://{s3_bucket}/cache", "RKNN_PIPELINE_RUN": "sim-1"}
    planner = checkout(tmp_path / "plan", env)
    plan = subprocess.run([sys.executable, "-m", "pipeline.ci", "plan", "--shards", "3"], cwd=planner.root,
                          env=planner.env, capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr
    matrix = json.loads(plan.stdout)["include"]
    assert [entry["shard"] for entry in matrix] == ["1/3", "2/3", "3/3"]
    assert sum(entry["pairs"] for entry in matrix) == len(PAIRS)

    shards = [checkout(tmp_path / f"shard{i}", env) for i in (1, 2, 3)]
    running = [subprocess.Popen([sys.executable, "-m", "doit", f"shard={i}/3"], cwd=project.root, env=project.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i, project in zip((1, 2, 3), shards)]
    outputs = [proc.communicate(timeout=1200) for proc in running]
    for proc, (out, err) in zip(running, outputs):
        assert proc.returncode == 0, f"{out}\n{err}"
    built = [pair for out, _ in outputs for pair in converted(out)]
    assert sorted(built) == sorted(PAIRS), "every pair converted exactly once across the shards"
    for (out, err), entry in zip(outputs, matrix):
        assert len(converted(out)) == entry["pairs"], f"shard {entry['shard']} built what the plan said"
        assert f"shard {entry['shard']}: converting {entry['pairs']} of 5" in err

    fanin = checkout(tmp_path / "fanin", env)
    marker = tmp_path / "toolkit-imported"
    block_toolkit(fanin, marker)
    proc = fanin.doit("fanin=1")
    assert not marker.exists(), f"the fan-in imported the toolkit: {marker.read_text()}"
    assert converted(proc.stdout) == [] and proc.stdout.count("(cache hit)") == len(PAIRS)
    assert dist_files(fanin) == dist_files(single)
    assert lock_entries(fanin) == lock_entries(single)
    report = (fanin.root / "build" / "report.md").read_text()
    by_shard = {pair: entry["shard"] for entry, (out, _) in zip(matrix, outputs) for pair in converted(out)}
    for pair, label in by_shard.items():
        name, target = pair.split("@")
        assert re.search(rf"^\| {re.escape(name)} \| {target} \| .*\| ok \| .*\| hit, shard {label} \|", report, re.M)
        assert json.loads((fanin.root / "dist" / target / f"{name}.json").read_text())["shard"] == label

    # everything is cached now: the plan starts no runner
    again = subprocess.run([sys.executable, "-m", "pipeline.ci", "plan"], cwd=planner.root, env=planner.env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads(again.stdout) == {"include": []}
    assert "all 5 pair(s) are cached" in again.stderr
