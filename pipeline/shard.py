"""Sharding: split one manifest's conversions over several CI runners, and put them back together.

Nothing runs between machines but the CI system and the shared cache. Every runner
computes the same thing from the same checkout:

* a **pair key** per model x target: the hash of everything that decides its
  conversion (source and sample bytes, the effective model without its name or
  paths, the target, this package's code and data, the installed versions). It
  is known from the inputs alone, before analysis, so a plan over a thousand
  pairs never opens an ONNX file;
* a **pair marker** in the cache under that key, written after the conversion's
  own entry, saying which conversion key, shard and duration built it. A pair
  whose marker is there is cached: it costs nothing and is not split;
* a **plan**: the missing pairs sorted by expected cost and dealt greedily to the
  least loaded shard (longest first). The plan is stored in the cache under the
  hash of all pair keys, the shard count and the CI run; the first runner to
  store it wins and every runner uses the stored one, so a shard that started
  late, after others already filled the cache, still gets the same share.

Expected cost is the duration recorded for the same graph on the same target by
an earlier conversion (a *duration hint* in the cache), else an estimate from the
source's size, its calibration samples and its verify samples.

``doit shard=I/N`` (or GitLab's ``CI_NODE_INDEX``/``CI_NODE_TOTAL``) builds one share;
``doit fanin=1`` (or ``RKNN_PIPELINE_FANIN=1``) builds everything from the cache and
fails, naming them, if any pair is missing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from pipeline.errors import PipelineError

PLAN_FORMAT = 1
MARKER_FILE = "pair.json"
PLAN_FILE = "plan.json"
HINT_FILE = "duration.json"
FANIN_ENV = "RKNN_PIPELINE_FANIN"
SHARD_ENV = "RKNN_PIPELINE_SHARD"
RUN_ENV = "RKNN_PIPELINE_RUN"
MAX_MATRIX = 256  # GitHub Actions' limit of jobs per matrix


class ShardError(PipelineError, ValueError):
    """Bad shard input or a sharding mode without what it needs; the message is one line for the user."""


# -- which shard am I --------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """One runner's place in the split: ``index`` counts from 1, as GitLab's CI_NODE_INDEX does."""

    index: int
    total: int

    @property
    def label(self) -> str:
        return f"{self.index}/{self.total}"


_SPEC = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


def parse_shard(text: str, origin: str = "shard") -> Shard:
    """``"2/3"`` -> Shard(2, 3); anything else is a ShardError that says what to write."""
    match = _SPEC.fullmatch(text or "")
    if not match:
        raise ShardError(f"{origin}={text}: expected I/N with whole numbers, shard I of N counted from 1 "
                         f"(e.g. shard=2/3)")
    index, total = int(match.group(1)), int(match.group(2))
    if total < 1:
        raise ShardError(f"{origin}={text}: the shard count N must be at least 1")
    if index < 1:
        raise ShardError(f"{origin}={text}: shards are counted from 1: use 1/{total} to {total}/{total}")
    if index > total:
        raise ShardError(f"{origin}={text}: shard {index} does not exist when there are {total}: "
                         f"use 1/{total} to {total}/{total}")
    return Shard(index, total)


def shard_from(var: str | None, environ=os.environ) -> Shard | None:
    """``doit shard=I/N`` first, else GitLab's CI_NODE_INDEX and CI_NODE_TOTAL, else not sharded."""
    if var is not None and var != "":
        return parse_shard(var)
    if environ.get(SHARD_ENV):
        return parse_shard(environ[SHARD_ENV], origin=SHARD_ENV)
    index, total = environ.get("CI_NODE_INDEX"), environ.get("CI_NODE_TOTAL")
    if index or total:
        if not (index and total):
            raise ShardError("CI_NODE_INDEX and CI_NODE_TOTAL must be set together "
                             f"(got CI_NODE_INDEX={index!r}, CI_NODE_TOTAL={total!r})")
        return parse_shard(f"{index}/{total}", origin="CI_NODE_INDEX/CI_NODE_TOTAL")
    return None


def current(var: str | None = None, fanin_var: str | None = None) -> tuple[Shard | None, bool]:
    """This process's mode, from doit's ``shard=``/``fanin=`` or the environment.

    The doit variables are copied into the environment, so the conversion
    actions (in doit's worker processes too) record the same shard.
    """
    shard, fanin = shard_from(var), fanin_from(fanin_var)
    if shard is not None:
        os.environ[SHARD_ENV] = shard.label
    if fanin:
        os.environ[FANIN_ENV] = "1"
    return shard, fanin


def fanin_from(var: str | None, environ=os.environ) -> bool:
    value = var if var not in (None, "") else environ.get(FANIN_ENV, "")
    if value.strip().lower() in ("", "0", "false", "no", "off"):
        return False
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    raise ShardError(f"fanin={value!r}: expected 1 or 0")


def run_id(environ=os.environ) -> str:
    """The CI run every shard of one build shares, so a plan stored by yesterday's run is not reused."""
    if environ.get(RUN_ENV):
        return environ[RUN_ENV]
    if environ.get("GITHUB_RUN_ID"):
        return f"github-{environ['GITHUB_RUN_ID']}-{environ.get('GITHUB_RUN_ATTEMPT', '1')}"
    if environ.get("CI_PIPELINE_ID"):
        return f"gitlab-{environ['CI_PIPELINE_ID']}"
    if environ.get("BUILDKITE_BUILD_ID"):
        return f"buildkite-{environ['BUILDKITE_BUILD_ID']}"
    return ""


# -- pair keys ---------------------------------------------------------------

def pair_id(model: dict, target: str) -> str:
    return f"{model['name']}@{target}"


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    from pipeline.cache import file_sha256

    return file_sha256(path)


def file_digest(path: str) -> str:
    stat = os.stat(path)
    return _file_digest(path, stat.st_mtime_ns, stat.st_size)


# Code that decides a conversion before the toolkit runs (its effect reaches the conversion key
# through analysis.json and resolved.json, which a plan does not compute).
PLANNING_CODE = ("analysis.py", "resolution.py", "rewrite.py", "placement_rules.py", "manifest.py",
                 "platforms.py", "shapes.py", "inputs.py", "calibration.py", "identity.py", "stages.py")


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """The conversion code's digest (pipeline.identity) plus the code that plans a conversion."""
    from pipeline.identity import code_digest as conversion_code, source_digest

    return source_digest(PLANNING_CODE, hashlib.sha256(conversion_code().encode()))


def _portable(value, directory: str):
    """Every file path in an effective model becomes its content hash; nothing machine-local stays."""
    from pipeline.files import map_strings

    def portable(text: str):
        if os.path.isabs(text):
            if os.path.isfile(text):
                return {"sha256": file_digest(text)}
            if text.startswith(directory):
                return os.path.relpath(text, directory)
        return text

    return map_strings(value, portable)


def pair_document(manifest, model: dict, target: str) -> dict:
    """Everything that decides a pair's conversion, known before analysis; no name, no path."""
    from pipeline.identity import versions

    settings = {k: v for k, v in model.items() if k not in ("name", "index")}
    return {"kind": "rknn-pipeline pair", "target": target, "model": _portable(settings, str(manifest.directory)),
            "code": code_digest(), "versions": versions()}


def pair_key(manifest, model: dict, target: str) -> str:
    from pipeline.cache import cache_key

    return cache_key(pair_document(manifest, model, target))


def hint_key(manifest, model: dict, target: str) -> str:
    """The same graph on the same target, however configured: its last recorded duration is a fair guess."""
    from pipeline.cache import cache_key

    quant = model.get("quantization") or {}
    return cache_key({"kind": "rknn-pipeline duration", "target": target, "source": file_digest(model["source"]),
                      "inputs": model.get("inputs"), "quantized": bool(quant)})


# -- cost --------------------------------------------------------------------

def estimate_seconds(model: dict, target: str) -> float:
    """A duration guess for a pair never converted: worker start, graph compilation, calibration, verify.

    Compilation and the simulator scale with the number of nodes (from the
    memoised graph facts, so no ONNX parse on a warm machine) more than with
    weight bytes. The coefficients are rough; they only need to rank pairs, and
    a recorded duration replaces them after one build (docs/scaling.md).
    """
    from pipeline.manifest import node_count

    size_mb = os.path.getsize(model["source"]) / 1e6
    nodes = node_count(model["source"]) or 0
    quant = model.get("quantization") or {}
    samples = len(quant.get("samples") or ()) if quant else 0
    verify = model.get("verify") or {}
    checks = verify.get("samples", 0) if isinstance(verify, dict) else 0
    graph = 0.005 * nodes + 0.4 * size_mb                # load, optimise, compile, export
    seconds = 0.3 + graph + 0.2 * graph * checks          # simulator runs for verify
    if quant:
        seconds += graph * (0.5 + 0.1 * max(samples, 1))  # calibration passes
    return round(seconds, 3)


# -- the store, through today's has/get/put API --------------------------------

def cache_location(manifest) -> str | None:
    from pipeline.cache import ENV_VAR

    return os.environ.get(ENV_VAR) or manifest.cache_url


def store_for(manifest):
    """The shared cache (chosen by pipeline.cache from its URL), or None; a store that cannot open is an error."""
    from pipeline.cache import CacheError, store_from

    try:
        return store_from(manifest.cache_url)
    except (CacheError, ValueError) as exc:
        raise ShardError(f"sharding needs the shared cache, and it cannot be opened: {exc}") from None


def _read_json_entry(store, key: str, name: str) -> dict | None:
    with tempfile.TemporaryDirectory(prefix="rknn-shard-") as temp:
        restored = store.get(key, Path(temp))
        if not restored or name not in restored:
            return None
        try:
            return json.loads(Path(restored[name]).read_text(encoding="utf-8"))
        except ValueError:
            return None


def _put_json_entry(store, key: str, name: str, doc: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="rknn-shard-") as temp:
        path = Path(temp) / name
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        store.put(key, {name: path})


def record_built(store, manifest, model: dict, target: str, conversion_key: str, record: dict,
                 converted: bool) -> None:
    """After a conversion entry is in the cache: its pair marker, and (when it ran here) its duration hint.

    Both are written after the entry they point to, so a marker never announces
    a conversion that a reader cannot restore.
    """
    key = pair_key(manifest, model, target)
    if not store.has(key):
        _put_json_entry(store, key, MARKER_FILE, {
            "format": PLAN_FORMAT, "pair": pair_id(model, target), "conversion_key": conversion_key,
            "seconds": record.get("seconds"), "shard": record.get("shard"), "run": record.get("run")})
    if converted and isinstance(record.get("seconds"), (int, float)):
        hint = hint_key(manifest, model, target)
        if not store.has(hint):
            _put_json_entry(store, hint, HINT_FILE, {"format": PLAN_FORMAT, "seconds": record["seconds"]})


# -- the split ---------------------------------------------------------------

@dataclass
class Plan:
    """Who converts what: ``assignments`` maps each missing pair to its shard (1-based)."""

    shards: int
    run: str
    cached: list[str]
    costs: dict[str, float]
    basis: dict[str, str]          # "recorded" or "estimate", per missing pair
    assignments: dict[str, int] = field(default_factory=dict)

    @property
    def missing(self) -> list[str]:
        return list(self.costs)

    def share(self, index: int) -> list[str]:
        return [pair for pair, shard in self.assignments.items() if shard == index]

    def load(self, index: int) -> float:
        return round(sum(self.costs[pair] for pair in self.share(index)), 3)

    def to_json(self) -> dict:
        return {"format": PLAN_FORMAT, "shards": self.shards, "run": self.run, "cached": self.cached,
                "costs": self.costs, "basis": self.basis, "assignments": self.assignments}

    @classmethod
    def from_json(cls, doc: dict) -> Plan:
        if doc.get("format") != PLAN_FORMAT:
            raise ValueError(f"plan format {doc.get('format')!r}, expected {PLAN_FORMAT}")
        return cls(doc["shards"], doc["run"], list(doc["cached"]), dict(doc["costs"]), dict(doc["basis"]),
                   {k: int(v) for k, v in doc["assignments"].items()})


def split(costs: dict[str, float], shards: int) -> dict[str, int]:
    """Longest first, each to the least loaded shard; ties broken by name and index so every machine agrees."""
    loads = [0.0] * shards
    assignments = {}
    for pair in sorted(costs, key=lambda p: (-costs[p], p)):
        index = min(range(shards), key=lambda i: (loads[i], i))
        loads[index] += costs[pair]
        assignments[pair] = index + 1
    return dict(sorted(assignments.items()))


def shard_count(costs: dict[str, float], max_shards: int = MAX_MATRIX, shard_seconds: float = 300.0) -> int:
    """How many runners are worth starting: about ``shard_seconds`` of work each, never more than pairs."""
    if not costs:
        return 0
    wanted = math.ceil(sum(costs.values()) / max(shard_seconds, 1e-9))
    longest = max(costs.values())
    # the longest pair bounds any shard: more shards than total/longest cannot finish sooner
    useful = max(1, math.ceil(sum(costs.values()) / longest)) if longest > 0 else len(costs)
    return max(1, min(max_shards, len(costs), wanted, useful))


class Planner:
    """Asks the cache about every pair of one manifest, once, and makes or fetches the plan."""

    def __init__(self, manifest, store, environ=os.environ):
        if store is None:
            raise ShardError(no_cache_message(manifest))
        self.manifest = manifest
        self.store = store
        self.run = run_id(environ)
        self.pairs = [(model, target) for model in manifest.models for target in model["targets"]]
        self.keys = {pair_id(m, t): pair_key(manifest, m, t) for m, t in self.pairs}

    def status(self) -> tuple[list[str], list[str]]:
        """(cached, missing) pair ids, in manifest order."""
        cached, missing = [], []
        for pair, key in self.keys.items():
            (cached if self.store.has(key) else missing).append(pair)
        return cached, missing

    def costs(self, missing: list[str]) -> tuple[dict[str, float], dict[str, str]]:
        by_id = {pair_id(m, t): (m, t) for m, t in self.pairs}
        costs, basis = {}, {}
        for pair in missing:
            model, target = by_id[pair]
            hint = _read_json_entry(self.store, hint_key(self.manifest, model, target), HINT_FILE)
            if hint and isinstance(hint.get("seconds"), (int, float)):
                costs[pair], basis[pair] = round(float(hint["seconds"]), 3), "recorded"
            else:
                costs[pair], basis[pair] = estimate_seconds(model, target), "estimate"
        return costs, basis

    def plan_key(self, shards: int) -> str:
        from pipeline.cache import cache_key

        return cache_key({"kind": "rknn-pipeline shard plan", "format": PLAN_FORMAT, "pairs": self.keys,
                          "shards": shards, "run": self.run})

    def compute(self, shards: int | None = None, max_shards: int = MAX_MATRIX,
                shard_seconds: float = 300.0) -> Plan:
        cached, missing = self.status()
        costs, basis = self.costs(missing)
        count = shards if shards is not None else shard_count(costs, max_shards, shard_seconds)
        plan = Plan(count, self.run, cached, costs, basis)
        plan.assignments = split(costs, count) if count else {}
        return plan

    def shared(self, shards: int) -> Plan:
        """The plan every runner of this CI run uses: the stored one, else this one stored first."""
        key = self.plan_key(shards)
        stored = self._stored(key)
        if stored is not None:
            return stored
        plan = self.compute(shards)
        self.store_plan(plan)
        return self._stored(key) or plan  # a runner that stored first wins

    def store_plan(self, plan: Plan) -> None:
        if plan.shards:
            _put_json_entry(self.store, self.plan_key(plan.shards), PLAN_FILE, plan.to_json())

    def _stored(self, key: str) -> Plan | None:
        doc = _read_json_entry(self.store, key, PLAN_FILE)
        try:
            return Plan.from_json(doc) if doc else None
        except (KeyError, TypeError, ValueError):
            return None


def no_cache_message(manifest) -> str:
    from pipeline.cache import ENV_VAR

    return (f"sharding needs a shared cache, and {manifest.path} configures none: set {ENV_VAR} to a URL every "
            f"runner reaches, s3://bucket/prefix (with the AWS_* variables) or a shared directory, or give "
            f"`cache: {{url: ...}}` in the manifest. The shards write their "
            f"conversions there and the fan-in reads them")


# -- what the doit wiring asks -----------------------------------------------

def selection(manifest, shard: Shard | None, fanin: bool, out=sys.stderr) -> set[tuple[str, str]] | None:
    """The (name, target) pairs this doit run builds, or None for all of them.

    Sharded: this shard's share of the stored plan. Fan-in: all pairs, after
    checking that every one is in the cache (else a ShardError naming them).
    """
    if shard is None and not fanin:
        return None
    if shard is not None and fanin:
        raise ShardError("shard=I/N and fanin=1 exclude each other: shards convert, the fan-in only restores")
    planner = Planner(manifest, store_for(manifest))
    if fanin:
        cached, missing = planner.status()
        if missing:
            raise ShardError(missing_message(manifest, missing, len(planner.keys)))
        print(f"fan-in: all {len(cached)} conversions are in the cache; restoring them", file=out, flush=True)
        return None
    plan = planner.shared(shard.total)
    mine = plan.share(shard.index)
    by_id = {pair_id(m, t): (m["name"], t) for m, t in planner.pairs}
    others = len(plan.missing) - len(mine)
    if not mine:
        reason = (f"{len(plan.missing)} pair(s) need converting and {shard.total} shards were asked for"
                  if len(plan.missing) < shard.total else "the plan gave this shard nothing")
        print(f"shard {shard.label}: nothing to convert here ({reason}; {len(plan.cached)} already cached)",
              file=out, flush=True)
    else:
        print(f"shard {shard.label}: converting {len(mine)} of {len(planner.keys)} pair(s) here "
              f"(~{plan.load(shard.index):.0f} s expected); {others} on other shards, "
              f"{len(plan.cached)} already cached", file=out, flush=True)
    return {by_id[pair] for pair in mine}


def missing_message(manifest, missing: list[str], total: int) -> str:
    shown = ", ".join(missing[:50]) + (f", ... ({len(missing) - 50} more)" if len(missing) > 50 else "")
    return (f"fan-in: {len(missing)} of {total} conversion(s) are not in the shared cache: {shown}. "
            f"The shard that owned them failed or did not run; rerun it (the fan-in never converts)")
