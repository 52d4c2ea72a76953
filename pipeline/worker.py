"""Conversion worker: one model x target, in its own process.

Usually a child forked by :mod:`pipeline.zygote`, which calls :func:`main` with
the job's path; as a fresh process (the fallback) it runs as
``python -m pipeline.worker --standby BUILD_DIR`` (the job path then arrives on
stdin) or ``python -m pipeline.worker JOB.json``. The worker points
its stdout and stderr at the job's ``convert.log``, so the toolkit's
C++ output (including the layer table, which ``verbose_file=`` does not capture)
lands in the log with everything else. A crash, a hang or a kill of this
process cannot corrupt the parent's state, and the toolkit's global state dies
with it.

The job is plain JSON (see :func:`pipeline.conversion.make_job`); the result is
plain JSON written to ``job["result_path"]``: ``ok``, the failing ``step`` and
``error``, the ``op_target`` actually used, ``remaps`` applied, ``verify``
results and timings; after a quantized build that misses its accuracy, the
per-layer analysis (``accuracy``, :mod:`pipeline.accuracy`) and the repair's
search (``repair``, :mod:`pipeline.repair`), both run here with the session
that built the model; and ``float_asked``, the tensors a hybrid build was
asked to keep in float, which the parent checks against the layer table.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path


def _log(message: str) -> None:
    print(f"[rknn-pipeline] {message}", flush=True)


def _config_kwargs(job: dict, op_target: dict) -> dict:
    config = dict(job["config"])
    if op_target:
        config["op_target"] = dict(op_target)
    return config


def _build_once(session, job: dict, op_target: dict, workdir: Path, extra_float: list[str] = ()):
    """config -> load_onnx -> build (or the two hybrid steps) on a fresh ``session``.

    Returns the session holding the built model (hybrid step2 needs a new one)
    and the ``custom_quantize_layers`` it was built with (empty for a plain
    build). ``extra_float`` are tensors the repair keeps in float16, added to
    the manifest's own ranges (never replacing them). On failure the given
    session is left as the failed build left it, so its optimised graph can
    still be read.
    """
    from pipeline.toolkit import Session

    session.config(**_config_kwargs(job, op_target))
    session.load_onnx(job["onnx"], **job["load_onnx"])
    build = dict(job["build"])
    hybrid = job.get("hybrid")
    if not hybrid and not extra_float:
        session.build(**build)
        return session, {}
    # step1 writes <stem>.model/.data/.quantization.cfg into the cwd (the workdir); we add the
    # manifest's float ranges to the .cfg, then step2 builds from those three files.
    session.hybrid_step1(dataset=build["dataset"], rknn_batch_size=build.get("rknn_batch_size"))
    session.release()
    stem = Path(job["onnx"]).stem
    cfg = workdir / f"{stem}.quantization.cfg"
    custom = _add_custom_hybrid_layers(cfg, (hybrid or {}).get("custom_layers") or [], extra_float)
    session = Session(verbose=True)
    session.config(**_config_kwargs(job, op_target))
    session.hybrid_step2(str(workdir / f"{stem}.model"), str(workdir / f"{stem}.data"), str(cfg))
    return session, custom


def _add_custom_hybrid_layers(cfg: Path, ranges: list[dict], extra_float: list[str] = ()) -> dict:
    """Write the manifest's ``quantization.hybrid.custom_layers`` ranges into the step1 .cfg.

    Each range ``{start, end}`` names two tensors; every tensor from start to end
    in the order the toolkit lists them (its own topological order, in
    ``quantize_parameters``) is kept in float16 via ``custom_quantize_layers``.
    Writing it here means nobody edits the generated file by hand.
    ``extra_float`` (the repair's choice) is added in float16 where the
    manifest's ranges did not already say otherwise; names the toolkit does
    not quantize are skipped. Returns the ``custom_quantize_layers`` written.
    """
    import yaml

    from pipeline.names import nearest

    data = yaml.safe_load(cfg.read_text()) or {}
    order = list((data.get("quantize_parameters") or {}).keys())
    custom = dict(data.get("custom_quantize_layers") or {})
    for item in ranges:
        ends = [item.get("start"), item.get("end") or item.get("start")]
        for name in ends:
            if name not in order:
                near = ", ".join(nearest(name, order, 5, 0.3, fallback=True))
                raise ValueError(f"quantization.hybrid.custom_layers: '{name}' is not a tensor the toolkit "
                                 f"quantizes (nearest: {near})")
        first, last = sorted(order.index(name) for name in ends)
        for name in order[first:last + 1]:
            custom[name] = item.get("dtype", "float16")
    for name in extra_float:
        if name in order:
            custom.setdefault(name, "float16")
        else:
            _log(f"repair: '{name}' is not a tensor the toolkit quantizes here; skipped")
    data["custom_quantize_layers"] = custom
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    _log(f"hybrid: {len(custom)} tensors kept in float ({', '.join(list(custom)[:6])}"
         f"{', ...' if len(custom) > 6 else ''}) written to {cfg.name}")
    return custom


def _remap_op_target(session, op_target: dict, tensor_nodes: dict) -> tuple[dict, list[dict]]:
    """Map keys that the optimised graph no longer has to the same node's new output.

    ``tensor_nodes`` maps each original key to ``[node name, output index]``.
    """
    outputs_by_node = session.optimized_node_outputs()
    known = {name for outs in outputs_by_node.values() for name in outs}
    remapped: dict = {}
    remaps: list[dict] = []
    for key, where in op_target.items():
        if key in known:
            remapped[key] = where
            continue
        node, index = (tensor_nodes.get(key) or [None, 0])
        new_outputs = outputs_by_node.get(node) if node else None
        if not new_outputs:
            raise RuntimeError(
                f"op_target key '{key}' is not a tensor of the toolkit's optimised graph and its node "
                f"'{node}' did not survive optimisation; remove the override or target another node")
        new_key = new_outputs[min(index, len(new_outputs) - 1)]
        remapped[new_key] = where
        remaps.append({"from": key, "to": new_key, "node": node,
                       "reason": "renamed by the toolkit's graph optimisation"})
    return remapped, remaps


def _analyse(session, job: dict, workdir: Path, producers: dict, why: str) -> dict:
    """The toolkit's per-layer analysis of the built model, as the ``accuracy.json`` document.

    Runs in this worker on the simulator with the accuracy check's first sample.
    If the toolkit cannot run it, the document holds its message under
    ``error``: the caller still fails on the accuracy check, never on this.
    The toolkit's snapshot (every tensor dumped as text) is removed once read.
    """
    import shutil

    from pipeline import accuracy
    from pipeline.verify import analysis_inputs

    snapshot = workdir / "analysis"
    shutil.rmtree(snapshot, ignore_errors=True)
    try:
        inputs = analysis_inputs(job, snapshot / "inputs")
        _log(f"per-layer accuracy analysis ({why}) on {', '.join(Path(p).name for p in inputs)}")
        text = session.accuracy_analysis(inputs, str(snapshot / "snapshot"))
    except Exception as exc:  # the toolkit's own error, quoted; the verify verdict stands
        _log(f"per-layer accuracy analysis failed: {exc}")
        return {"format": accuracy.ACCURACY_FORMAT, "why": why, "error": f"{exc}"}
    finally:
        shutil.rmtree(snapshot / "snapshot", ignore_errors=True)
    return accuracy.record(accuracy.name_layers(accuracy.parse_error_analysis(text), producers), inputs, why)


def _worst_cosine(verify: dict) -> float:
    return min((output["cosine"] for output in verify.get("outputs") or []), default=float("nan"))


def _analysis_reason(job: dict, verify: dict | None) -> str | None:
    """Why the per-layer analysis runs for this build, or None: only quantized models have one."""
    if not job["build"].get("do_quantization") or verify is None:
        return None
    if not verify.get("passed"):
        return "the accuracy check failed"
    repair = job.get("repair")
    if repair and not _worst_cosine(verify) >= repair["min_cosine"]:
        return "below the repair's min_cosine"
    if (job.get("verify") or {}).get("layers"):
        return "verify.layers is set"
    return None


class RepairFailed(RuntimeError):
    """The repair's budget ran out (or no layer was left) before every output met its min_cosine."""

    step = "repair"


def _repair(session, job: dict, workdir: Path, op_target: dict, result: dict, producers: dict, custom: dict):
    """Keep the worst layers in float16, rebuild and re-verify, until every output meets min_cosine.

    Starts from this build's analysis (``result["accuracy"]``) and, after each
    rebuild that still fails, analyses the new build, since the worst layer
    moves. Returns the session, custom layers and producers of the last build;
    records ``result["repair"]``; raises :class:`RepairFailed` with the best
    cosine reached and the layers tried when the budget is spent.
    """
    from pipeline import repair as choose
    from pipeline.toolkit import Session
    from pipeline.verify import verify_all_shapes

    settings = job["repair"]
    goal, budget = float(settings["min_cosine"]), int(settings["max_float_layers"])
    kept = {anchor: list(tensors) for anchor, tensors in (settings.get("reuse") or {}).items()}
    cosine = _worst_cosine(result["verify"])
    record = {"min_cosine": goal, "max_float_layers": budget, "reused": bool(kept),
              "cosine_before": settings.get("cosine_before") if kept else cosine, "attempts": []}
    result["repair"] = record
    best = {"cosine": cosine, "float_layers": list(kept)}
    analysis = result.get("accuracy") or {}
    layers = analysis.get("layers") or []
    stop = None
    while not cosine >= goal:
        if not layers:
            stop = f"no per-layer analysis to choose from ({analysis.get('error') or 'none ran'})"
            break
        step = choose.next_step(layers, producers, kept)
        if step is None:
            stop = "no layer is left to keep in float"
            break
        chosen, new = step
        candidate = choose.merge(kept, new)
        if len(candidate) > budget:
            stop = (f"keeping {chosen['node']} ({chosen['op_type']}) would take {len(candidate)} float layers, "
                    f"over max_float_layers {budget}")
            break
        kept = candidate
        _log(f"repair: keeping {', '.join(new)} in float16 (worst layer {chosen['node']}, single cos "
             f"{chosen['single']['cosine']:.4f}); rebuilding with {len(kept)} float layers")
        session.release()
        session, custom = _build_once(Session(verbose=True), job, op_target, workdir, choose.float_tensors(kept))
        producers = session.tensor_producers()
        session.export(job["rknn_path"])
        result["verify"] = verify_all_shapes(session, job)
        cosine = _worst_cosine(result["verify"])
        record["attempts"].append({"added": list(new), "worst_layer": chosen["node"], "float_layers": len(kept),
                                   "cosine": cosine})
        _log(f"repair: cos {cosine:.4f} with {len(kept)} float layers")
        if cosine > best["cosine"] or best["cosine"] != best["cosine"]:
            best = {"cosine": cosine, "float_layers": list(kept)}
        if not cosine >= goal:
            analysis = _analyse(session, job, workdir, producers, "repair: the rebuilt model is still below min_cosine")
            layers = analysis.get("layers") or layers  # the toolkit refused: keep the last ranking
    record.update(float_layers=list(kept), float_tensors=kept, cosine_after=cosine, ok=cosine >= goal)
    if not record["ok"]:
        tried = ", ".join(kept) or "none"
        raise RepairFailed(f"repair did not reach min_cosine {goal}: {stop}. Best cosine {best['cosine']:.4f} "
                           f"with {len(best['float_layers'])} float layers; layers tried: {tried}")
    return session, custom, producers


def _float_asked(custom: dict, producers: dict) -> dict:
    """Each tensor asked to stay float16, with the node that writes it and that node's anchor
    (the op it is fused into), for the check against the layer table."""
    from pipeline.accuracy import BOOKKEEPING
    from pipeline.repair import chain

    asked = {}
    for tensor, dtype in custom.items():
        if str(dtype).startswith("float") and tensor in producers:
            producer = producers[tensor]
            anchor, _ = chain(tensor, producers)
            asked[tensor] = {"node": producer["node"], "anchor": anchor,
                             # a data conversion has no row: the layer it converts for (an input) has
                             "via": producer["inputs"] if producer["op_type"] in BOOKKEEPING else []}
    return asked


def run(job: dict) -> dict:
    workdir = Path(job["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # hybrid step1 and the toolkit's temporary files land in cwd
    result: dict = {"ok": False, "remaps": [], "op_target": dict(job.get("op_target") or {})}
    started = time.monotonic()
    op_target = dict(job.get("op_target") or {})
    try:
        from pipeline.toolkit import Session, ToolkitError, rejected_op_target_key

        repair = job.get("repair")
        reuse = (repair or {}).get("reuse") or {}
        extra = [t for tensors in reuse.values() for t in tensors]
        session = Session(verbose=True)
        try:
            session, custom = _build_once(session, job, op_target, workdir, extra)
        except ToolkitError as exc:
            key = rejected_op_target_key(str(exc))
            if exc.step != "build" or key is None or not op_target or job.get("hybrid") or extra:
                raise
            _log(f"toolkit rejected op_target key '{key}'; remapping through its optimised graph")
            op_target, remaps = _remap_op_target(session, op_target, job.get("op_target_nodes") or {})
            session.release()
            for remap in remaps:
                _log(f"op_target remap: '{remap['from']}' -> '{remap['to']}' (node {remap['node']})")
            result["remaps"] = remaps
            result["op_target"] = op_target
            session, custom = _build_once(Session(verbose=True), job, op_target, workdir)
        result["build_seconds"] = round(time.monotonic() - started, 3)
        producers = session.tensor_producers() if job["build"].get("do_quantization") else {}
        session.export(job["rknn_path"])
        if job.get("verify"):
            from pipeline.verify import verify_all_shapes

            result["verify"] = verify_all_shapes(session, job)
            why = _analysis_reason(job, result["verify"])
            if why:
                result["accuracy"] = _analyse(session, job, workdir, producers, why)
            if repair:
                session, custom, producers = _repair(session, job, workdir, op_target, result, producers, custom)
        result["float_asked"] = _float_asked(custom, producers)
        session.release()
        result["ok"] = True
    except Exception as exc:  # reported to the parent, which fails the task with it
        result["step"] = getattr(exc, "step", None)
        result["error"] = f"{exc}"
        result["traceback"] = traceback.format_exc()
        print(result["traceback"], file=sys.stderr, flush=True)
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


def _take_job_from_stdin() -> str | None:
    """Standby mode: import the toolkit now, then wait for a job path on stdin.

    The parent starts the next worker while the current conversion runs, so
    the toolkit's import (about 4 s, mostly torch) overlaps work instead of
    adding to it. Until a job arrives the output goes nowhere; then fds 1 and 2
    are pointed at the job's convert.log, as for a worker started per job.
    EOF without a job (the build ended) exits quietly.
    """
    import rknn.api  # noqa: F401  (the point of standing by)

    line = sys.stdin.readline().strip()
    return line or None


def _log_to(path: str) -> None:
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--standby":
        job_path = _take_job_from_stdin()
        if job_path is None:
            return 0
    else:
        job_path = argv[0]
    job = json.loads(Path(job_path).read_text())
    if job.get("log_path"):
        _log_to(job["log_path"])
    result = run(job)
    tmp = Path(job["result_path"] + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, job["result_path"])
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
