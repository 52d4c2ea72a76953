"""The convert and export stages as the tasks run them: cache, verdicts, policy, sidecars, lock.

:mod:`pipeline.conversion` knows how to run the toolkit; this module decides
*whether* to (a cache hit restores the outputs instead), turns the result into
the one-line verdict users read, applies the ``cpu_fallback`` policy, and
writes the deliverables in ``dist/`` with their provenance.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

from pipeline import files
from pipeline.errors import PipelineError
from pipeline.formats import SIDECAR_FORMAT
from pipeline.layout import CACHED_FILES, OPTIONAL_CACHED_FILES
from pipeline.records import ANALYSIS, CONVERT, RESOLUTION, SIDECAR


class StageFailed(PipelineError, RuntimeError):
    """A stage refused or failed; the message names model, target and cause."""


def versions(model: dict | None = None, target: str | None = None) -> dict:
    """Versions that ran a conversion (recorded in every sidecar), and this package's: the project's
    environment, or the environment of the toolkit version the model asked for."""
    from pipeline import toolkit_envs
    from pipeline.identity import versions as project_versions
    from pipeline.runtime_gate import toolkit_for

    version = toolkit_for(model, target, None) if model else None
    found = (toolkit_envs.uses_own_environment(version) and toolkit_envs.environment_versions(version)) or \
        project_versions()
    try:
        found["rknn-pipeline"] = metadata.version("rknn-pipeline")
    except metadata.PackageNotFoundError:
        found["rknn-pipeline"] = None
    return found


def _rel(manifest, path: str | Path | None) -> str | None:
    if not path:
        return None
    path = Path(path)
    try:
        return str(path.resolve().relative_to(manifest.directory.resolve()))
    except ValueError:
        return str(path)


def input_hashes(manifest, model: dict, resolved: dict) -> dict:
    """sha256 of every file that went into a conversion (the provenance the sidecar records)."""
    from pipeline.cache import file_sha256
    from pipeline.conversion import dataset_file, sample_files

    quant = model.get("quantization") or {}
    doc = {"source": {"path": _rel(manifest, model["source"]), "sha256": file_sha256(model["source"])},
           "converted_onnx": None, "dataset": None}
    if resolved.get("converted_onnx"):
        doc["converted_onnx"] = {"path": _rel(manifest, resolved["converted_onnx"]),
                                 "sha256": file_sha256(resolved["converted_onnx"])}
    if quant.get("dataset"):
        samples = sample_files(model)
        listing = dataset_file(model)
        doc["dataset"] = {"path": _rel(manifest, listing), "sha256": listing and file_sha256(listing),
                          "samples": [{"path": _rel(manifest, p), "sha256": file_sha256(p)} for p in samples]}
    return doc


def conversion_key(manifest, layout, model: dict, target: str, resolved: dict) -> str:
    """The cache key of one conversion (its document is :func:`pipeline.identity.key_document`)."""
    from pipeline.cache import cache_key
    from pipeline.identity import key_document

    analysis = ANALYSIS.read(layout.analysis(model["name"], target), missing_ok=True) or {}
    return cache_key(key_document(model, target, resolved, base=manifest.directory,
                                  external_data=analysis.get("external_data") or []))


def repair_choice(manifest, layout, model: dict, target: str, resolved: dict) -> tuple[dict, str, str]:
    """resolved.json as the conversion should see it, its cache key, and the key of a search.

    A repair records its choice in resolved.json under ``repair``, with the key
    of the conversion it searched for (everything but the choice). The choice
    is used, and becomes part of the key, only while that key still matches:
    the same inputs rebuild with the same float layers without searching again;
    any change to them (source, dataset, settings, overrides) searches anew.
    """
    plain = {key: value for key, value in resolved.items() if key != "repair"}
    search_key = conversion_key(manifest, layout, model, target, plain)
    choice = resolved.get("repair")
    if not (model.get("quantization") or {}).get("repair") or not choice or choice.get("key") != search_key:
        return plain, search_key, search_key
    chosen = {**plain, "repair": choice}
    return chosen, conversion_key(manifest, layout, model, target, chosen), search_key


def _record_repair(layout, name: str, target: str, resolved: dict, record: dict, search_key: str) -> None:
    """Write a successful repair's choice into resolved.json (for the next build of the same inputs)."""
    repair = record.get("repair") or {}
    if not repair.get("ok") or not repair.get("float_tensors"):
        return
    choice = {"key": search_key, "float_layers": repair["float_layers"], "float_tensors": repair["float_tensors"],
              "cosine_before": repair.get("cosine_before"), "cosine_after": repair.get("cosine_after")}
    current = RESOLUTION.read(layout.resolved(name, target), missing_ok=True) or resolved
    if current.get("repair") != choice:
        RESOLUTION.write(layout.resolved(name, target), {**current, "repair": choice})


def _repaired_key(manifest, layout, model: dict, target: str, name: str, search_key: str) -> list[str]:
    """The key the next build will use when this one recorded a repair choice (else nothing)."""
    current = RESOLUTION.read(layout.resolved(name, target), missing_ok=True) or {}
    if (current.get("repair") or {}).get("key") != search_key:
        return []
    return [repair_choice(manifest, layout, model, target, current)[1]]


def verdict_line(record: dict, seconds: float | None, hit: bool) -> str:
    placement = record.get("placement") or {}
    parts = [f"convert {record['model']}@{record['target']}",
             f"{seconds:.1f} s" if seconds is not None else "- s",
             f"NPU {placement.get('npu', '?')} / CPU {placement.get('cpu', '?')}"]
    verify = record.get("verify")
    if verify and verify.get("outputs"):
        parts.append(f"cos {min(o['cosine'] for o in verify['outputs']):.4f}")
    if (record.get("repair") or {}).get("float_layers"):
        from pipeline.repair import summary_line

        parts.append(summary_line(record["repair"]))
    if hit:
        parts.append("(cache hit)")
    return "  ".join(parts)


def detail_lines(record: dict) -> list[str]:
    lines = [f"op_target remap: '{r['from']}' -> '{r['to']}' (node {r['node']}, {r['reason']})"
             for r in record.get("remaps") or []]
    for item in record.get("diagnostics") or []:
        if item.get("benign"):
            continue
        count = f" (x{item['count']})" if item.get("count", 1) > 1 else ""
        lines.append(f"{item['level']}: {item['explanation']}{count} Fix: {item['fix']}"
                     if item["id"] != "unknown-error" else f"toolkit error: {item['example']}")
    return lines


def prestart_conversion(manifest, layout, model: dict, target: str, resolved: dict | None = None) -> None:
    """Get this pair's conversion going as early as its inputs allow, if it will be converted.

    After ``analyze`` (``resolved`` None) that means starting the toolkit's
    import in the zygote, so it overlaps the analyses and resolutions still to
    run; after ``resolve``, starting the conversion itself in the background
    (:func:`pipeline.conversion.start_ahead`), which its convert task collects.
    Neither happens for a pair the cache holds, or whose last conversion had the
    same key and left its model (doit will not rerun it), or which doit will not
    convert in this run. Without a cache an analysis that runs means the pair
    changed, so the import starts at ``analyze``; with one, at ``resolve``, where
    the conversion's key is known.
    """
    from pipeline import conversion

    if fanin_mode():
        return  # the fan-in restores or fails; it never starts the toolkit
    name = model["name"]
    pair = layout.pair(name, target)
    planned = conversion.expects_conversion(name, target)
    if planned is False:
        return  # doit will not convert it in this run (`doit resolve`, a selection, an unchanged result)
    if resolved is None:
        from pipeline import cache

        if os.environ.get(cache.ENV_VAR) or manifest.cache_url:
            return
        conversion.prestart_worker(conversion.make_job(model, target, {}, pair))
        return
    resolved, key, _ = repair_choice(manifest, layout, model, target, resolved)
    store = open_cache(manifest)
    if store is not None and (store.has(key) or key in _AHEAD_KEYS):
        return  # cached, or about to be: an earlier pair with the same key stores it before this task runs
    last = CONVERT.read(pair.convert_record, missing_ok=True) or {}
    if pair.rknn.exists() and (last.get("cache") or {}).get("key") == key:
        return
    if planned and conversion.start_ahead(model, target, resolved, pair, _calibration(layout, model, target),
                                          _expected_seconds(model, target, last)):
        _AHEAD_KEYS.add(key)
    else:
        conversion.prestart_worker(conversion.make_job(model, target, resolved, pair))


# Keys of the conversions this process started ahead: with a cache, a second pair with the same key
# (the key holds no model name) is restored by its task from what the first one stored.
_AHEAD_KEYS: set[str] = set()


def _expected_seconds(model: dict, target: str, last: dict) -> float:
    """How long this conversion should take: its last recorded time, else the shard planner's estimate."""
    from pipeline.shard import estimate_seconds

    seconds = last.get("seconds")
    if isinstance(seconds, (int, float)) and not (last.get("cache") or {}).get("hit"):
        return float(seconds)
    try:
        return estimate_seconds(model, target)
    except OSError:
        return 0.0


def _calibration(layout, model: dict, target: str) -> dict | None:
    """Lay out the calibration samples as the toolkit reads them (see :func:`pipeline.conversion.make_job`)."""
    if not (model.get("quantization") or {}).get("samples"):
        return None
    from pipeline.calibration import rows_per_shape, write_dataset
    from pipeline.shapes import dynamic_input

    name = model["name"]
    listing = layout.calibration_list(name, target)
    calibration = {"dataset": listing, "verify_rows": None,
                   "rows": write_dataset(model["quantization"], layout.calibration_dir(name, target), listing)}
    if dynamic_input(model):
        calibration["verify_rows"] = rows_per_shape(model["quantization"], model["shape_sets"],
                                                    layout.verify_samples_dir(name, target))
    return calibration


def open_cache(manifest):
    """The configured artifact store, or None; a store that cannot even be opened is a warning, not a failure."""
    from pipeline import cache

    try:
        return cache.store_from(manifest.cache_url)
    except (cache.CacheError, ValueError) as exc:
        print(f"  warning: cache not used: {exc}")
        return None


def convert_with_cache(manifest, layout, model: dict, target: str) -> tuple[str, list[str]]:
    """Restore from the artifact cache, or convert and store; return the verdict and detail lines."""
    import time

    from pipeline import conversion

    name = model["name"]
    pair = layout.pair(name, target)
    on_disk = RESOLUTION.read(pair.resolved)
    resolved, key, search_key = repair_choice(manifest, layout, model, target, on_disk)
    store = open_cache(manifest)
    started = time.monotonic()
    if store is not None:
        layout.accuracy(name, target).unlink(missing_ok=True)  # only a restored entry's own analysis may stay
        if conversion.started_ahead(pair)[0] and store.has(key):
            conversion.cancel_ahead(pair)  # stored by another build meanwhile: its conversion is moot
        restored = store.get(key, pair.dir)
        if restored is not None and set(CACHED_FILES) <= set(restored):
            # The entry may come from another model with the same settings, in another checkout.
            record = portable_record(CONVERT.read(layout.convert_record(name, target)), model, target,
                                     resolved, layout)
            record["cache"] = {"key": key, "hit": True, "stored_by": (store.meta(key) or {}).get("model")}
            CONVERT.write(layout.convert_record(name, target), record)
            _record_remaps(layout, name, target, on_disk, record)
            _record_repair(layout, name, target, on_disk, record, search_key)
            _mark_built(store, manifest, model, target, key, record, converted=False)
            return verdict_line(record, time.monotonic() - started, True), detail_lines(record)
    if fanin_mode():
        from pipeline.shard import cache_location

        where = f"the cache at {cache_location(manifest)}" if store is not None else "any cache (none is configured)"
        raise StageFailed(f"{name}@{target}: fan-in: this conversion is not in {where}; the shard that owned it "
                          f"failed or did not run. Rerun that shard; the fan-in never converts")
    running, calibration = conversion.started_ahead(pair)
    if not running:  # else the conversion started ahead reads the calibration it was given: leave it be
        calibration = _calibration(layout, model, target)
    try:
        record = conversion.convert(model, target, resolved, pair, calibration)
    except conversion.ConversionFailed as exc:
        raise StageFailed(str(exc)) from exc
    record = portable_record(record, model, target, resolved, layout)
    record["cache"] = {"key": key, "hit": False}
    record.update(built_by())
    CONVERT.write(layout.convert_record(name, target), record)
    _portable_log(layout.log(name, target), layout.root)
    _record_remaps(layout, name, target, on_disk, record)
    _record_repair(layout, name, target, on_disk, record, search_key)
    if store is not None:
        try:
            optional = [f for f in OPTIONAL_CACHED_FILES if (pair.dir / f).exists()]
            for entry_key in dict.fromkeys([key, *_repaired_key(manifest, layout, model, target, name, search_key)]):
                # a search is stored under its own key and under the key with its choice (the next build's)
                store.put(entry_key, {f: pair.dir / f for f in (*CACHED_FILES, *optional)},
                          meta={"model": name, "target": target, "seconds": record.get("seconds")})
        except OSError as exc:  # a full or read-only cache must not fail a good build
            print(f"  warning: could not store {name}@{target} in the cache: {exc}")
        else:
            _mark_built(store, manifest, model, target, key, record, converted=True)
    return verdict_line(record, record.get("seconds"), False), detail_lines(record)


def fanin_mode() -> bool:
    import os

    from pipeline.shard import FANIN_ENV

    return os.environ.get(FANIN_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def built_by() -> dict:
    """Which shard of which CI run made a conversion (None outside sharded builds); the report shows it."""
    import os

    from pipeline.shard import SHARD_ENV, run_id

    label = os.environ.get(SHARD_ENV) or None
    return {"shard": label, "run": (run_id() or None) if label else None}


def _mark_built(store, manifest, model: dict, target: str, key: str, record: dict, converted: bool) -> None:
    """Tell later plans that this pair is cached (see pipeline.shard); a failure only costs a rebuild there."""
    from pipeline.shard import record_built

    try:
        record_built(store, manifest, model, target, key, record, converted)
    except OSError as exc:
        print(f"  warning: could not mark {model['name']}@{target} as built in the cache: {exc}")


def portable_record(record: dict, model: dict, target: str, resolved: dict, layout) -> dict:
    """``convert.json`` as this model and checkout would have written it: its own name, paths relative to
    the project (a record restored from the cache may come from another model in another checkout)."""
    from pipeline.conversion import portable, recorded_arguments

    record = dict(record, model=model["name"], target=target)
    if record.get("arguments") is not None:
        record["arguments"] = recorded_arguments(model, target, layout.root)
    converted = resolved.get("converted_onnx")
    record["converted_onnx"] = portable(str(Path(converted).resolve()), layout.root) if converted else \
        portable(str(Path(model["source"]).resolve()), layout.root)
    return portable(record, layout.root)


def _portable_log(log: Path, root: Path) -> None:
    """Replace the checkout's absolute path in the toolkit's log by ``.`` before the log is shared."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return
    prefix = str(root)
    if prefix in text:
        files.atomic_write_text(log, text.replace(prefix + "/", "./").replace(prefix, "."))


def _record_remaps(layout, name: str, target: str, resolved: dict, record: dict) -> None:
    """Add the worker's op_target remaps to resolved.json, beside the keys they replaced.

    ``op_target`` stays as resolution computed it (it is part of the cache key);
    ``remaps`` and ``op_target_used`` say what the toolkit finally accepted.
    doit records file_dep checksums after the task, so this does not make
    convert stale.
    """
    remaps = record.get("remaps") or []
    if resolved.get("remaps", []) == remaps and resolved.get("op_target_used") == record.get("op_target"):
        return
    RESOLUTION.write(layout.resolved(name, target),
                             {**resolved, "remaps": remaps, "op_target_used": record.get("op_target")})


def placement_check(model: dict, target: str, record: dict, resolved: dict, rules) -> tuple[list[str], list[str]]:
    """Apply ``cpu_fallback`` to the actual placement: returns (warnings, errors).

    CPU layers that an override asked for are expected; any other CPU layer is
    listed. A CPU layer whose op the platform's CPU runtime cannot execute is a
    warning under every policy: the model builds but fails on the board.
    """
    policy = model.get("cpu_fallback", "warn")
    from pipeline.actions import ACTIONS

    requested = {item["node"] for item in (resolved.get("explanations") or {}).values()
                 if ACTIONS[item["action"]].expected_on == "cpu"}
    cpu_layers = (record.get("placement") or {}).get("cpu_layers") or []
    unexpected = [layer for layer in cpu_layers if layer.get("node") not in requested]
    warnings, errors = [], []
    not_runnable = [layer for layer in cpu_layers
                    if not rules.cpu_can_run(layer["name"].partition(":")[0] or layer["op_type"], target)]
    if not_runnable:
        names = ", ".join(layer["name"] for layer in not_runnable)
        warnings.append(f"{model['name']}@{target}: {len(not_runnable)} layer(s) fall back to the CPU, but the "
                        f"{target} CPU runtime cannot run them ({names}): expect 'rknn fallback cpu failed' on "
                        f"the board. Add an override with action: rewrite or npu for them.")
    if unexpected and policy != "allow":
        listing = ", ".join(layer["name"] for layer in unexpected)
        message = (f"{model['name']}@{target}: {len(unexpected)} layer(s) run on the CPU that no override asked "
                   f"for: {listing}")
        (errors if policy == "error" else warnings).append(
            message + (" (cpu_fallback: error)" if policy == "error" else ""))
    return warnings, errors


def actual_placements(layers: list[dict]) -> dict[str, str]:
    """ONNX node name -> ``npu`` or ``cpu`` as the layer table places it.

    A node split into several layers counts as CPU if any part is on the CPU.
    """
    actual: dict[str, str] = {}
    for layer in layers:
        if layer.get("node") and layer["target"] in ("CPU", "NPU") and actual.get(layer["node"]) != "cpu":
            actual[layer["node"]] = layer["target"].lower()
    return actual


def placement_comparison(analysis: dict, layers: list[dict], resolved: dict) -> list[dict]:
    """Every node both predicted and placed by the layer table, with ``agree``.

    Only NPU versus off the NPU is compared: ``unsupported`` (the target's CPU runtime
    cannot run it) agrees with a CPU layer, since the build still lists such layers.
    Nodes an override placed or rewrote are left out: they moved because the user asked.
    """
    steered = {item["node"] for item in (resolved.get("explanations") or {}).values()}
    steered |= {item["node"] for item in resolved.get("rewrites") or []}
    actual = actual_placements(layers)
    out = []
    for node in analysis["nodes"]:
        predicted = node["predicted"]["placement"]
        got = actual.get(node["name"])
        if got and node["name"] not in steered and predicted in ("npu", "cpu", "unsupported"):
            out.append({"node": node["name"], "op_type": node["op_type"], "predicted": predicted, "actual": got,
                        "reason": node["predicted"]["reason"], "agree": (predicted == "npu") == (got == "npu")})
    return out


def predicted_vs_actual(analysis: dict, layers: list[dict], resolved: dict) -> list[dict]:
    """Nodes whose predicted placement differs from the layer table's: the rules table's misses."""
    return [{key: value for key, value in item.items() if key != "agree"}
            for item in placement_comparison(analysis, layers, resolved) if not item["agree"]]


def export(manifest, layout, model: dict, target: str) -> list[str]:
    """Check the placement policy, then publish dist/<target>/<name>.rknn and its sidecar."""
    from pipeline.conversion import portable
    from pipeline.placement_rules import Rules

    name = model["name"]
    record = CONVERT.read(layout.convert_record(name, target))
    resolved = RESOLUTION.read(layout.resolved(name, target))
    analysis = ANALYSIS.read(layout.analysis(name, target))
    layers = files.read_json(layout.placement(name, target), [])
    warnings, errors = placement_check(model, target, record, resolved, Rules.load())
    built, runtime, problems = built_with(model, target, layout.rknn(name, target))
    errors += problems
    warnings += runtime.get("warnings", [])
    failure = layout.export_error(name, target)
    if errors:
        # What dist/ holds from an earlier build no longer matches the manifest: withdraw it.
        _withdraw(layout, name, target)
        files.atomic_write_json(failure, {"model": name, "target": target, "error": "\n".join(errors)})
        raise StageFailed("\n".join(errors + warnings))
    failure.unlink(missing_ok=True)
    from pipeline.cache import file_sha256

    rknn = layout.rknn(name, target)
    sidecar = {
        "format": SIDECAR_FORMAT,
        "model": name,
        "target": target,
        "status": "ok",
        "rknn": {"file": f"{name}.rknn", "sha256": file_sha256(rknn), "size": rknn.stat().st_size},
        "inputs": input_hashes(manifest, model, resolved),
        "versions": versions(model, target),
        "built_with": built,
        "runtime": runtime or None,
        "arguments": portable(record["arguments"], layout.root),
        "op_target": record.get("op_target"),
        "remaps": record.get("remaps") or [],
        "overrides": resolved.get("overrides_applied") or [],
        "rewrites": resolved.get("rewrites") or [],
        "placement": record.get("placement"),
        "predicted_vs_actual": predicted_vs_actual(analysis, layers, resolved),
        "verify": record.get("verify"),
        "accuracy": record.get("accuracy"),
        "repair": _sidecar_repair(record.get("repair")),
        "shapes": _shapes(model),
        "convert_seconds": record.get("seconds"),
        "cache": record.get("cache"),
        "shard": record.get("shard"),
        "diagnostics": [d for d in record.get("diagnostics") or [] if not d.get("benign")],
        "warnings": warnings + list(resolved.get("warnings") or []),
    }
    try:
        files.atomic_copy(rknn, layout.dist_rknn(name, target))
        SIDECAR.write(layout.sidecar(name, target), sidecar)
    except OSError as exc:
        # A new .rknn beside an old sidecar would lie: remove both so nothing looks finished.
        _withdraw(layout, name, target)
        raise StageFailed(f"{name}@{target}: cannot write to {layout.dist}: {exc.strerror or exc}. "
                          f"Free some space or fix the directory's permissions, then run doit again.") from exc
    lines = [f"export {name}@{target}  dist/{target}/{name}.rknn  {_size(sidecar['rknn']['size'])}"]
    lines += [f"  warning: {w}" for w in warnings]
    return lines


def _sidecar_repair(repair: dict | None) -> dict | None:
    """What a repair chose and reached (its attempts stay in convert.json)."""
    if not repair:
        return None
    return {key: repair.get(key) for key in ("min_cosine", "max_float_layers", "float_layers", "float_tensors",
                                             "cosine_before", "cosine_after", "reused")}


def _shapes(model: dict) -> dict | None:
    """Which shape set a bucket was built for, or every set of a dynamic model (None: one static shape)."""
    from pipeline.shapes import dynamic_input

    if model.get("bucket"):
        return {"mode": "buckets", "model": model["bucket"]["model"], "inputs": model["bucket"]["inputs"]}
    if dynamic_input(model):
        return {"mode": "dynamic", "sets": model["shape_sets"]}
    return None


def built_with(model: dict, target: str, rknn: Path) -> tuple[dict, dict, list[str]]:
    """What the built file says built it, the runtime gate's record, and any mismatch with what was asked.

    Read from the file itself (:mod:`pipeline.rknn_file`), so the sidecar and lock record the toolkit
    that actually built it, even one restored from a cache filled elsewhere.
    """
    from pipeline import rknn_file, runtime_gate
    from pipeline.toolkit import installed_version

    asked = runtime_gate.toolkit_for(model, target, installed_version())
    try:
        info = rknn_file.read(rknn)
    except (OSError, rknn_file.RknnFileError) as exc:
        return {}, {}, [f"{model['name']}@{target}: the built model cannot be read back: {exc}"]
    toolkit = info.toolkit or info.trailer_toolkit
    built = {"toolkit": toolkit, "file_format": info.file_format, "compiler": info.compiler,
             "target": info.target or (info.trailer_targets[0] if info.trailer_targets else None)}
    problems = [f"{model['name']}@{target}: {problem}" for problem in info.disagreements()]
    if built["target"] != target:
        problems.append(f"{model['name']}@{target}: the built file is for {built['target']}, not {target}; "
                        f"remove build/{model['name']}/{target} and build again")
    if asked and toolkit != asked:
        problems.append(f"{model['name']}@{target}: the built file was made by rknn-toolkit2 {toolkit}, but "
                        f"{asked} was asked for; remove build/{model['name']}/{target} and build again")
    runtime: dict = {}
    declared = runtime_gate.runtime_for(model, target)
    if declared and toolkit:
        verdict = runtime_gate.check(target, toolkit, declared, bool(model.get("allow_newer_toolkit")))
        runtime = {"declared": declared, "allow_newer_toolkit": bool(model.get("allow_newer_toolkit")),
                   "warnings": list(verdict.warnings)}
        problems += [f"{model['name']}@{target}: {error}" for error in verdict.errors]
    return built, runtime, problems


def _size(size: int) -> str:
    """The same binary units (KiB, MiB) as the report, so the two never disagree about a size."""
    from pipeline.report import human_size

    return human_size(size)


def _withdraw(layout, name: str, target: str) -> None:
    """Remove a model's published .rknn and sidecar (missing is fine)."""
    for published in (layout.dist_rknn(name, target), layout.sidecar(name, target)):
        try:
            published.unlink(missing_ok=True)
        except OSError:  # dist/ itself is unusable (not a directory): nothing is published there
            pass


LOCK_FIELDS = ("inputs", "versions", "built_with", "runtime", "arguments", "op_target", "remaps", "rewrites",
               "placement")


def lock_entry(sidecar: dict) -> dict:
    """The reproducible part of a sidecar: same inputs and versions give the same entry.

    The .rknn bytes are *not* part of it: the toolkit embeds a few hundred bytes
    that differ between two builds of the same input (see docs/reproducibility.md).
    """
    entry = {field: sidecar.get(field) for field in LOCK_FIELDS}
    verify = sidecar.get("verify")
    entry["verify"] = verify and {"samples": verify.get("samples"), "min_cosine": verify.get("min_cosine"),
                                  "passed": verify.get("passed")}
    repair = sidecar.get("repair")
    if repair:  # the float layers a repair chose are part of what was built
        entry["repair"] = {"float_layers": repair.get("float_layers"), "float_tensors": repair.get("float_tensors")}
    return entry


def _sidecars(manifest, layout):
    """(model, target, its sidecar or None) for every pair of the manifest, in manifest order."""
    for model in manifest.models:
        for target in model["targets"]:
            yield model, target, SIDECAR.read(layout.sidecar(model["name"], target), missing_ok=True)


def write_lock(manifest, layout) -> Path:
    entries, artifacts = {}, {}
    for model, target, sidecar in _sidecars(manifest, layout):
        if sidecar is not None:
            key = f"{target}/{model['name']}"
            entries[key] = lock_entry(sidecar)
            artifacts[key] = sidecar["rknn"]
    path = layout.lock_file()
    files.atomic_write_json(path, {"format": SIDECAR_FORMAT, "entries": entries, "artifacts": artifacts})
    return path


def report_records(manifest, layout) -> list[dict]:
    """One record per model x target: its sidecar, or the failure that stopped it."""
    records = []
    for model, target, sidecar in _sidecars(manifest, layout):
        if sidecar is None:
            converted = CONVERT.read(layout.convert_record(model["name"], target), missing_ok=True) or {}
            refused = files.read_json(layout.export_error(model["name"], target)) or {}
            error = converted.get("error") or refused.get("error")
            sidecar = {"model": model["name"], "target": target, "status": "failed" if error else "not built",
                       "error": error, "placement": converted.get("placement"), "repair": converted.get("repair")}
        analysis = files.read_json(layout.accuracy(model["name"], target))
        if analysis and analysis.get("layers"):  # drawn per layer by the report
            sidecar = {**sidecar, "accuracy_layers": analysis["layers"]}
        records.append(sidecar)
    return records


def write_report(manifest, layout) -> tuple[Path, Path]:
    from pipeline.report import write_report as render

    return render(report_records(manifest, layout), layout.report_html(), layout.report_md())
