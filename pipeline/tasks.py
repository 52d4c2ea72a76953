"""doit wiring: the one place where stages become tasks.

Per model x target: ``analyze`` -> ``resolve`` -> ``convert`` -> ``export``
(subtasks named ``<name>@<target>``), plus the aggregate ``lock`` and ``report``.
Each task declares exactly its inputs: ``file_dep`` on the files it reads, and a
``config_changed`` key over the canonical JSON of only the manifest fields it
uses, so an edit of one model's override reruns that model's tasks for the
targets the override applies to and nothing else. Actions are module-level
functions with plain arguments, so ``doit -n N`` (process mode) can ship them
to worker processes.

A user's ``dodo.py`` only does ``from pipeline.tasks import *`` (see the repo's
``dodo.py``); the manifest is ``models.yaml`` beside it or ``doit manifest=PATH``.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from functools import lru_cache
from pathlib import Path

from doit import get_var
from doit.exceptions import TaskFailed
from doit.tools import config_changed

from pipeline import __version__
from pipeline.errors import as_task_failure
from pipeline.formats import PIPELINE_FORMAT
from pipeline.layout import Layout
from pipeline.records import ANALYSIS, RESOLUTION

DOIT_CONFIG = {
    # dbm cannot be shared between processes; sqlite3 can (doit -n N, concurrent readers). This one
    # creates .doit.db on first use, so a refused manifest leaves nothing (pipeline/doit_backend.py).
    "backend": "rknn-sqlite3",
    "dep_file": ".doit.db",
    "default_tasks": ["analyze", "resolve", "convert", "export", "lock", "report"],
    "verbosity": 2,
    # one line per conversion with progress, one summary line; `--reporter console` is doit's own
    "reporter": "rknn",
}


def _fail_and_exit(message: str) -> None:
    print(message, file=sys.stderr)
    raise SystemExit(1)


@lru_cache(maxsize=1)
def context():
    """The loaded manifest and its layout, once per process; bad input exits with PATH:LINE:COL lines."""
    from pipeline.manifest import ManifestError, load_manifest
    from pipeline.toolkit import installed_version

    path = _manifest_path()
    try:
        manifest = load_manifest(path)
    except ManifestError as exc:
        _fail_and_exit(str(exc))
    installed = installed_version()
    if manifest.toolkit and manifest.toolkit != installed:
        _fail_and_exit(f"{manifest.location('toolkit')}: the manifest expects rknn-toolkit2 {manifest.toolkit}, "
                       f"but {installed or 'none'} is installed; install rknn-toolkit2=={manifest.toolkit} "
                       f"(uv sync) or update `toolkit:`")
    _hold_tree_lock(manifest.directory)
    # Children started by spawn (doit -n N where fork is not the start method) inherit the environment
    # only, not this process's memory: tell them which manifest, and that the tree is already locked.
    os.environ[MANIFEST_ENV] = str(path.resolve())
    os.environ[LOCK_ENV] = f"{os.getpid()}:{manifest.directory.resolve()}"
    return manifest, Layout(manifest.directory)


MANIFEST_ENV = "RKNN_PIPELINE_MANIFEST"  # set by the process that loaded it, read by its spawned children
LOCK_ENV = "RKNN_PIPELINE_TREE_LOCKED"  # "<pid>:<directory>" of the process holding the tree lock


def _manifest_path() -> Path:
    """``doit manifest=...``; in a spawned child, where doit's variables are not set, the parent's choice."""
    chosen = get_var("manifest", "models.yaml")  # None only where doit never parsed a command line
    if chosen is None and _parent_holds_lock(None):
        chosen = os.environ.get(MANIFEST_ENV)
    return Path(chosen or "models.yaml")


def _parent_holds_lock(directory: Path | None) -> bool:
    """True in a child of the process that holds the tree lock (for ``directory``, when given)."""
    holder, _, locked = os.environ.get(LOCK_ENV, "").partition(":")
    if not holder.isdigit() or int(holder) != os.getppid():
        return False
    return directory is None or Path(locked) == Path(directory).resolve()


_LOCK_HANDLE = None


def _hold_tree_lock(directory: Path) -> None:
    """Serialise doit runs in one tree: a second run waits for the first instead of racing it.

    The lock is an flock on ``.doit.lock`` held for the life of the process (the
    kernel releases it when the process dies, even on SIGKILL, so a killed run
    never leaves a stale lock). ``RKNN_PIPELINE_LOCK_WAIT`` caps the wait in seconds.
    """
    global _LOCK_HANDLE
    if _LOCK_HANDLE is not None or _parent_holds_lock(directory):
        return  # held by this process, or by the doit run that started this worker process
    handle = open(directory / ".doit.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        limit = float(os.environ.get("RKNN_PIPELINE_LOCK_WAIT", "3600"))
        print(f"another doit run is building in {directory}; waiting up to {limit:g} s for it to finish",
              file=sys.stderr, flush=True)
        deadline = time.monotonic() + limit
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    _fail_and_exit(f"another doit run still holds {directory / '.doit.lock'} after {limit:g} s; "
                                   f"stop it or raise RKNN_PIPELINE_LOCK_WAIT")
                time.sleep(0.2)
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _LOCK_HANDLE = handle


def pairs():
    manifest, layout = context()
    chosen = _selection()
    for model in manifest.models:
        for target in model["targets"]:
            if chosen is None or (model["name"], target) in chosen:
                yield model, target, layout


@lru_cache(maxsize=1)
def _selection():
    """``doit shard=I/N`` builds its share only; ``doit fanin=1`` first checks the cache holds every pair."""
    from pipeline import shard

    manifest, _ = context()
    try:
        return shard.selection(manifest, *shard.current(get_var("shard"), get_var("fanin")))
    except shard.ShardError as exc:
        _fail_and_exit(str(exc))


def _rewritten(model: dict, target: str, layout) -> list[str]:
    """``rewritten.onnx`` when an override rewrites nodes on this target (resolve makes it, convert reads it)."""
    from pipeline.actions import ACTIONS
    from pipeline.resolution import override_applies

    if any(ACTIONS[o["action"]].rewrites and override_applies(o, target) for o in model.get("overrides") or []):
        return [str(layout.rewritten_onnx(model["name"], target))]
    return []


def _sid(model: dict, target: str) -> str:
    return f"{model['name']}@{target}"


def _samples(model: dict) -> list[str]:
    """The dataset list and every sample: a changed sample reruns the conversion."""
    from pipeline.conversion import dataset_file, sample_files

    listing = dataset_file(model)
    return ([listing] if listing else []) + sample_files(model)


# -- keys: only the manifest fields each task uses ---------------------------

def analyze_key(model: dict, target: str) -> dict:
    # the rules table is a file_dep, so its content is not repeated here
    return {"format": PIPELINE_FORMAT, "target": target, "inputs": model.get("inputs"),
            "outputs": model.get("outputs"), "options": model.get("options")}


def resolve_key(model: dict, target: str) -> dict:
    from pipeline.resolution import override_applies

    return {"format": PIPELINE_FORMAT, "target": target, "inputs": model.get("inputs"),
            "overrides": [o for o in model.get("overrides") or [] if override_applies(o, target)]}


def convert_key(model: dict, target: str, base: Path) -> dict:
    from pipeline.conversion import recorded_arguments
    from pipeline.identity import code_digest, versions

    # The file inputs are file_deps; what else enters the conversion's identity is here: a new
    # library version or a change to the conversion code reruns it.
    args = recorded_arguments(model, target, base)
    quant = model.get("quantization") or {}
    return {"format": PIPELINE_FORMAT, "versions": versions(), "code": code_digest(), "arguments": args,
            "toolkit": model.get("toolkit"),
            "hybrid": quant.get("hybrid"), "repair": quant.get("repair"), "verify": model.get("verify")}


def export_key(model: dict, target: str) -> dict:
    return {"format": PIPELINE_FORMAT, "cpu_fallback": model.get("cpu_fallback", "warn"),
            "verify": model.get("verify"), "runtime": model.get("runtime"),
            "allow_newer_toolkit": model.get("allow_newer_toolkit")}


# -- actions (module level: picklable for doit -n N) --------------------------

def run_analyze(name: str, target: str) -> TaskFailed | None:
    from pipeline import analysis, stages
    from pipeline.placement_rules import Rules

    manifest, layout = context()
    model = manifest.model(name)

    def action():
        from pipeline import plan_cache

        store = stages.open_cache(manifest)
        key = plan_cache.analysis_key(manifest, model, target) if store is not None else None
        doc = plan_cache.restore_analysis(store, key, layout, name, target)
        hit = doc is not None
        if not hit:
            doc = analysis.analyze(model, target, Rules.load())
            ANALYSIS.write(layout.analysis(name, target), doc)
            plan_cache.store_analysis(store, key, layout, name, target)
        stages.prestart_conversion(manifest, layout, model, target)
        print(f"analyze {name}@{target}  {analysis.summary_line(doc)}{'  (from cache)' if hit else ''}")

    return as_task_failure(action, f"{manifest.location('models', model['index'], 'source')}: {name}@{target}: ")


def run_resolve(name: str, target: str) -> TaskFailed | None:
    from pipeline import resolution, stages
    from pipeline.placement_rules import Rules

    manifest, layout = context()
    model = manifest.model(name)
    locations = {i: manifest.location("models", model["index"], "overrides", i)
                 for i in range(len(model.get("overrides") or []))}

    def action():
        from pipeline import plan_cache

        store = stages.open_cache(manifest)
        key = plan_cache.resolution_key(manifest, layout, model, target) if store is not None else None
        resolved = plan_cache.restore_resolution(store, key, layout, name, target)
        hit = resolved is not None
        if not hit:
            doc = ANALYSIS.read(layout.analysis(name, target))
            resolved = resolution.resolve(model, target, doc, Rules.load(), locations=locations,
                                          workdir=layout.pair(name, target))
            resolved = RESOLUTION.write(layout.resolved(name, target), resolved)
            plan_cache.store_resolution(store, key, layout, name, target, resolved)
        stages.prestart_conversion(manifest, layout, model, target, resolved)
        print(f"resolve {name}@{target}  {resolution.summary_line(resolved)}{'  (from cache)' if hit else ''}")
        for note in resolved["notes"]:
            print(f"  note: {note}")
        for warning in resolved["warnings"]:
            print(f"  warning: {warning}")

    return as_task_failure(action)


def run_convert(name: str, target: str) -> TaskFailed | None:
    from pipeline import stages

    manifest, layout = context()

    def action():
        line, details = stages.convert_with_cache(manifest, layout, manifest.model(name), target)
        print(line)
        for detail in details:
            print(f"  {detail}")

    return as_task_failure(action)


def run_export(name: str, target: str) -> TaskFailed | None:
    from pipeline import stages

    manifest, layout = context()

    def action():
        for line in stages.export(manifest, layout, manifest.model(name), target):
            print(line)

    return as_task_failure(action)


def run_lock() -> TaskFailed | None:
    from pipeline import stages

    manifest, layout = context()

    def action():
        path = stages.write_lock(manifest, layout)
        print(f"lock  {path.relative_to(manifest.directory)}")

    return as_task_failure(action)


def run_report() -> TaskFailed | None:
    from pipeline import stages

    manifest, layout = context()

    def action():
        html, md = stages.write_report(manifest, layout)
        print(f"report  {html.relative_to(manifest.directory)}  {md.relative_to(manifest.directory)}")

    return as_task_failure(action)


# -- task generators ---------------------------------------------------------

def task_analyze():
    """Graph analysis and predicted placement per model x target (no toolkit)."""
    from pipeline.placement_rules import DEFAULT_RULES_PATH

    for model, target, layout in pairs():
        yield {
            "name": _sid(model, target),
            "actions": [(run_analyze, [model["name"], target])],
            "file_dep": [model["source"], str(DEFAULT_RULES_PATH)],
            "targets": [str(layout.analysis(model["name"], target))],
            "uptodate": [config_changed(analyze_key(model, target))],
            "clean": True,
        }


def task_resolve():
    """Overrides -> the op_target dict the toolkit gets, and exact rewrites."""
    from pipeline.placement_rules import DEFAULT_RULES_PATH

    for model, target, layout in pairs():
        name = model["name"]
        yield {
            "name": _sid(model, target),
            "actions": [(run_resolve, [name, target])],
            # the source too: a rewrite copies its weights into rewritten.onnx
            "file_dep": [str(layout.analysis(name, target)), str(DEFAULT_RULES_PATH), model["source"]],
            "targets": [str(layout.resolved(name, target)), *_rewritten(model, target, layout)],
            "uptodate": [config_changed(resolve_key(model, target))],
            "clean": True,
        }


def task_convert():
    """The toolkit run (or a cache restore): build/<name>/<target>/model.rknn and placement.json."""
    for model, target, layout in pairs():
        name = model["name"]
        yield {
            "name": _sid(model, target),
            "actions": [(run_convert, [name, target])],
            "file_dep": [str(layout.resolved(name, target)), model["source"], *_rewritten(model, target, layout),
                         *_samples(model)],
            "targets": [str(layout.rknn(name, target)), str(layout.convert_record(name, target)),
                        str(layout.placement(name, target))],
            "uptodate": [config_changed(convert_key(model, target, layout.root))],
            "clean": True,
        }


def task_export():
    """dist/<target>/<name>.rknn and its sidecar, after the CPU-fallback policy."""
    for model, target, layout in pairs():
        name = model["name"]
        yield {
            "name": _sid(model, target),
            "actions": [(run_export, [name, target])],
            "file_dep": [str(layout.rknn(name, target)), str(layout.convert_record(name, target)),
                         str(layout.analysis(name, target)), str(layout.resolved(name, target))],
            "targets": [str(layout.dist_rknn(name, target)), str(layout.sidecar(name, target))],
            "uptodate": [config_changed(export_key(model, target))],
            "clean": True,
        }


def task_lock():
    """dist/models.lock.json: every artifact with the hashes of what produced it."""
    sidecars = [str(layout.sidecar(m["name"], t)) for m, t, layout in pairs()]
    _, layout = context()
    return {"actions": [(run_lock, [])], "file_dep": sidecars, "targets": [str(layout.lock_file())],
            "uptodate": [config_changed({"format": PIPELINE_FORMAT, "version": __version__})], "clean": True}


def task_report():
    """build/report.html and build/report.md: what runs where, per model x target.

    After a build where some conversions failed, `doit rknn-report` writes the
    same report from whatever exists, without running any task.
    """
    sidecars = [str(layout.sidecar(m["name"], t)) for m, t, layout in pairs()]
    _, layout = context()
    return {"actions": [(run_report, [])], "file_dep": sidecars,
            "targets": [str(layout.report_html()), str(layout.report_md())],
            "uptodate": [config_changed({"format": PIPELINE_FORMAT, "version": __version__})], "clean": True}


__all__ = ["DOIT_CONFIG", "task_analyze", "task_resolve", "task_convert", "task_export", "task_lock",
           "task_report"]
