"""Sharding without the toolkit: shard specs, the split, pair keys, the stored plan, and doit's bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from pipeline import shard
from pipeline.cache import LocalStore
from pipeline.manifest import load_manifest
from tests.conftest import REPO

MANIFEST = """\
version: 1
models:
  - name: tiny
    source: m/tiny.onnx
    targets: [rk3588, rk3576, rk3566]
    inputs: { x: [1, 3, 32, 32] }
  - name: shuffle
    source: m/shuffle.onnx
    targets: [rk3588]
    inputs: { gpu_0/data_0: [1, 3, 224, 224] }
"""


def checkout(root, manifest: str = MANIFEST):
    """A minimal project: dodo.py, two example models, a manifest."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "m").mkdir(exist_ok=True)
    shutil.copy(REPO / "dodo.py", root / "dodo.py")
    shutil.copy(REPO / "examples/models/tiny_pool_identity.onnx", root / "m/tiny.onnx")
    shutil.copy(REPO / "examples/models/light_shufflenet.onnx", root / "m/shuffle.onnx")
    (root / "models.yaml").write_text(manifest)
    return root


# -- specs -------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [("1/3", (1, 3)), ("3/3", (3, 3)), (" 2 / 5 ", (2, 5)), ("1/1", (1, 1))])
def test_parse_shard(text, expected):
    parsed = shard.parse_shard(text)
    assert (parsed.index, parsed.total) == expected


@pytest.mark.parametrize("text, words", [
    ("0/3", "counted from 1: use 1/3 to 3/3"),
    ("4/3", "shard 4 does not exist when there are 3"),
    ("a/b", "expected I/N with whole numbers"),
    ("1/0", "at least 1"),
    ("", "expected I/N"),
    ("-1/3", "expected I/N"),
])
def test_bad_shard_is_one_clear_line(text, words):
    with pytest.raises(shard.ShardError) as caught:
        shard.parse_shard(text)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_shard_from_gitlab_variables():
    assert shard.shard_from(None, {"CI_NODE_INDEX": "2", "CI_NODE_TOTAL": "4"}) == shard.Shard(2, 4)
    assert shard.shard_from("1/2", {"CI_NODE_INDEX": "2", "CI_NODE_TOTAL": "4"}) == shard.Shard(1, 2)
    assert shard.shard_from(None, {}) is None
    with pytest.raises(shard.ShardError, match="set together"):
        shard.shard_from(None, {"CI_NODE_INDEX": "2"})
    with pytest.raises(shard.ShardError, match="CI_NODE_INDEX/CI_NODE_TOTAL=5/4"):
        shard.shard_from(None, {"CI_NODE_INDEX": "5", "CI_NODE_TOTAL": "4"})


def test_fanin_switch():
    assert shard.fanin_from("1", {}) and shard.fanin_from(None, {shard.FANIN_ENV: "true"})
    assert not shard.fanin_from(None, {}) and not shard.fanin_from("0", {shard.FANIN_ENV: "1"})
    with pytest.raises(shard.ShardError):
        shard.fanin_from("maybe", {})


def test_run_id_from_ci():
    assert shard.run_id({"GITHUB_RUN_ID": "7", "GITHUB_RUN_ATTEMPT": "2"}) == "github-7-2"
    assert shard.run_id({"CI_PIPELINE_ID": "9"}) == "gitlab-9"
    assert shard.run_id({shard.RUN_ENV: "mine", "CI_PIPELINE_ID": "9"}) == "mine"
    assert shard.run_id({}) == ""


# -- the split ---------------------------------------------------------------

def test_split_balances_by_cost_not_count():
    costs = {"big@rk3588": 90.0, "a@rk3588": 30.0, "b@rk3588": 30.0, "c@rk3588": 30.0}
    assignments = shard.split(costs, 2)
    loads = {i: sum(c for p, c in costs.items() if assignments[p] == i) for i in (1, 2)}
    assert sorted(loads.values()) == [90.0, 90.0]
    assert assignments["big@rk3588"] != assignments["a@rk3588"]


def test_split_is_deterministic_and_total():
    costs = {f"m{i}@rk3588": float((i * 37) % 11 + 1) for i in range(40)}
    first = shard.split(costs, 3)
    again = shard.split(dict(reversed(list(costs.items()))), 3)
    assert first == again
    assert set(first) == set(costs) and set(first.values()) == {1, 2, 3}
    loads = [sum(c for p, c in costs.items() if first[p] == i) for i in (1, 2, 3)]
    assert max(loads) / (sum(loads) / 3) <= 1.1


def test_more_shards_than_pairs_leaves_extra_shards_empty():
    assignments = shard.split({"a@rk3588": 2.0, "b@rk3588": 1.0}, 5)
    assert sorted(assignments.values()) == [1, 2]


def test_shard_count_bundles_small_pairs():
    small = {f"m{i}@rk3588": 2.0 for i in range(100)}
    assert shard.shard_count(small, shard_seconds=50) == 4
    assert shard.shard_count({f"m{i}@rk3588": 1000.0 for i in range(400)}) == shard.MAX_MATRIX
    assert shard.shard_count({"only@rk3588": 5000.0}) == 1
    assert shard.shard_count({}) == 0
    # one pair of 100 s among tiny ones: more than total/longest shards cannot finish sooner
    assert shard.shard_count({"big@rk3588": 100.0, **{f"s{i}@rk3588": 1.0 for i in range(20)}},
                             shard_seconds=10) == 2


def test_estimate_ranks_by_size_and_quantization(tmp_path):
    root = checkout(tmp_path / "a")
    manifest = load_manifest(root / "models.yaml")
    tiny, shuffle = manifest.models
    assert shard.estimate_seconds(shuffle, "rk3588") > shard.estimate_seconds(tiny, "rk3588") > 0
    quantized = {**tiny, "quantization": {"samples": [["a"], ["b"]]}}
    assert shard.estimate_seconds(quantized, "rk3588") > shard.estimate_seconds(tiny, "rk3588")


# -- pair keys and the stored plan -------------------------------------------

def test_pair_key_ignores_name_and_checkout_path(tmp_path):
    one = load_manifest(checkout(tmp_path / "one") / "models.yaml")
    two = load_manifest(checkout(tmp_path / "elsewhere/two", MANIFEST.replace("name: tiny", "name: renamed"))
                        / "models.yaml")
    assert shard.pair_key(one, one.models[0], "rk3588") == shard.pair_key(two, two.models[0], "rk3588")
    assert shard.pair_key(one, one.models[0], "rk3588") != shard.pair_key(one, one.models[0], "rk3576")
    changed = load_manifest(checkout(tmp_path / "three", MANIFEST.replace("[1, 3, 32, 32]", "[1, 3, 16, 16]"))
                            / "models.yaml")
    assert shard.pair_key(one, one.models[0], "rk3588") != shard.pair_key(changed, changed.models[0], "rk3588")


def test_planner_skips_cached_pairs_and_uses_recorded_durations(tmp_path):
    manifest = load_manifest(checkout(tmp_path / "a") / "models.yaml")
    store = LocalStore(tmp_path / "cache")
    planner = shard.Planner(manifest, store, environ={})
    plan = planner.compute(shards=2)
    assert plan.missing == ["tiny@rk3588", "tiny@rk3576", "tiny@rk3566", "shuffle@rk3588"]
    assert set(plan.basis.values()) == {"estimate"}
    tiny = manifest.models[0]
    shard.record_built(store, manifest, tiny, "rk3588", "0" * 64, {"seconds": 42.0, "shard": "1/2"}, True)
    again = shard.Planner(manifest, store, environ={}).compute(shards=2)
    assert again.cached == ["tiny@rk3588"] and "tiny@rk3588" not in again.costs
    # rk3576 has no recorded duration of its own; the hint is per graph and target
    assert again.basis == {"tiny@rk3576": "estimate", "tiny@rk3566": "estimate", "shuffle@rk3588": "estimate"}
    shard.record_built(store, manifest, tiny, "rk3576", "1" * 64, {"seconds": 7.5}, True)
    # a restore (converted=False) records no duration
    third = shard.Planner(manifest, store, environ={}).compute(shards=2)
    assert "tiny@rk3576" not in third.costs


def test_recorded_duration_drives_the_cost(tmp_path):
    manifest = load_manifest(checkout(tmp_path / "a") / "models.yaml")
    store = LocalStore(tmp_path / "cache")
    other = load_manifest(checkout(tmp_path / "b", MANIFEST.replace("targets: [rk3588, rk3576, rk3566]",
                                                                     "targets: [rk3566]\n    verify: null"))
                          / "models.yaml")
    # the same graph on the same target, built before with other settings: its duration is the hint
    shard.record_built(store, other, other.models[0], "rk3566", "2" * 64, {"seconds": 99.0}, True)
    plan = shard.Planner(manifest, store, environ={}).compute(shards=2)
    assert plan.costs["tiny@rk3566"] == 99.0 and plan.basis["tiny@rk3566"] == "recorded"
    assert plan.share(1) == ["tiny@rk3566"]


def test_every_shard_gets_the_stored_plan_even_after_the_cache_changed(tmp_path):
    manifest = load_manifest(checkout(tmp_path / "a") / "models.yaml")
    store = LocalStore(tmp_path / "cache")
    first = shard.Planner(manifest, store, environ={"CI_PIPELINE_ID": "5"}).shared(3)
    # shard 1 finishes a pair before shard 3 starts: a fresh computation would now differ
    done = first.share(1)[0]
    name, target = done.split("@")
    model = manifest.model(name)
    shard.record_built(store, manifest, model, target, "3" * 64, {"seconds": 1.0}, True)
    late = shard.Planner(manifest, store, environ={"CI_PIPELINE_ID": "5"}).shared(3)
    assert late.assignments == first.assignments
    # another CI run plans afresh
    fresh = shard.Planner(manifest, store, environ={"CI_PIPELINE_ID": "6"}).shared(3)
    assert done not in fresh.assignments
    union = [p for i in (1, 2, 3) for p in first.share(i)]
    assert sorted(union) == sorted(first.missing) and len(union) == len(set(union))


def test_planner_without_cache_says_how_to_set_one(tmp_path):
    manifest = load_manifest(checkout(tmp_path / "a") / "models.yaml")
    with pytest.raises(shard.ShardError, match="sharding needs a shared cache.*RKNN_PIPELINE_CACHE"):
        shard.Planner(manifest, None)


# -- through doit ------------------------------------------------------------

def doit(root, *args, env=None):
    import os

    environ = {k: v for k, v in os.environ.items() if not k.startswith(("RKNN_PIPELINE", "CI_NODE"))}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "doit", *args], cwd=root, env=environ, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("spec, words", [("0/3", "counted from 1"), ("4/3", "does not exist"),
                                         ("a/b", "expected I/N")])
def test_doit_bad_shard_fails_with_one_line_and_builds_nothing(tmp_path, spec, words):
    root = checkout(tmp_path / "a")
    proc = doit(root, f"shard={spec}", env={"RKNN_PIPELINE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and words in proc.stderr and f"shard={spec}" in proc.stderr
    assert not (root / "build").exists()


def test_doit_shard_without_cache(tmp_path):
    root = checkout(tmp_path / "a")
    proc = doit(root, "shard=1/2")
    assert proc.returncode == 1 and "sharding needs a shared cache" in proc.stderr
    proc = doit(root, env={"CI_NODE_INDEX": "1", "CI_NODE_TOTAL": "2"})
    assert proc.returncode == 1 and "sharding needs a shared cache" in proc.stderr


def test_doit_extra_shard_does_nothing_and_says_so(tmp_path):
    root = checkout(tmp_path / "a", MANIFEST.split("  - name: shuffle")[0].replace(", rk3576, rk3566", ""))
    proc = doit(root, "shard=2/2", env={"RKNN_PIPELINE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "shard 2/2: nothing to convert here (1 pair(s) need converting and 2 shards were asked for" in proc.stderr
    assert not (root / "build" / "tiny").exists()


def test_doit_fanin_names_missing_pairs_before_any_work(tmp_path):
    root = checkout(tmp_path / "a")
    proc = doit(root, "fanin=1", env={"RKNN_PIPELINE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 1
    assert ("fan-in: 4 of 4 conversion(s) are not in the shared cache: tiny@rk3588, tiny@rk3576, tiny@rk3566, "
            "shuffle@rk3588") in proc.stderr
    assert not (root / "build").exists()
    proc = doit(root, env={"RKNN_PIPELINE_FANIN": "1", "RKNN_PIPELINE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 1 and "fan-in: 4 of 4" in proc.stderr
    proc = doit(root, "fanin=1", "shard=1/2", env={"RKNN_PIPELINE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 1 and "exclude each other" in proc.stderr


# -- python -m pipeline.ci plan ----------------------------------------------

def plan(root, *args, env=None):
    import os

    environ = {k: v for k, v in os.environ.items() if not k.startswith(("RKNN_PIPELINE", "CI_NODE"))}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "pipeline.ci", "plan", *args], cwd=root, env=environ,
                          capture_output=True, text=True, timeout=300)


def test_plan_without_cache_explains(tmp_path):
    proc = plan(checkout(tmp_path / "a"))
    assert proc.returncode == 1 and proc.stdout == ""
    assert "sharding needs a shared cache" in proc.stderr and "RKNN_PIPELINE_CACHE" in proc.stderr


def test_plan_matrix_and_empty_matrix_when_all_cached(tmp_path):
    root = checkout(tmp_path / "a")
    env = {"RKNN_PIPELINE_CACHE": str(tmp_path / "cache")}
    proc = plan(root, "--shards", "2", env=env)
    assert proc.returncode == 0, proc.stderr
    matrix = json.loads(proc.stdout)
    assert [e["shard"] for e in matrix["include"]] == ["1/2", "2/2"]
    assert sum(e["pairs"] for e in matrix["include"]) == 4
    bundled = json.loads(plan(root, env=env).stdout)["include"]
    assert len(bundled) == 1 and bundled[0]["pairs"] == 4  # four small pairs: one runner is enough
    manifest = load_manifest(root / "models.yaml")
    store = LocalStore(tmp_path / "cache")
    for model in manifest.models:
        for target in model["targets"]:
            shard.record_built(store, manifest, model, target, "4" * 64, {"seconds": 1.0}, True)
    proc = plan(root, env=env)
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"include": []}
    assert "all 4 pair(s) are cached; no shard to run" in proc.stderr


def test_plan_never_exceeds_the_matrix_limit(tmp_path):
    models = "".join(f"  - name: m{i}\n    source: m/shuffle.onnx\n    targets: [rk3588, rk3576, rk3566]\n"
                     f"    inputs: {{ gpu_0/data_0: [1, 3, 224, 224] }}\n" for i in range(100))
    root = checkout(tmp_path / "a", "version: 1\nmodels:\n" + models)
    proc = plan(root, "--shard-seconds", "0.01", env={"RKNN_PIPELINE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    matrix = json.loads(proc.stdout)["include"]
    assert len(matrix) == 256 and sum(e["pairs"] for e in matrix) == 300
