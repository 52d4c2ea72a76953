"""Conversion: turn a model x target (plus its resolution) into a toolkit job, run it, read the verdict.

The parent side of :mod:`pipeline.worker`. It builds the exact keyword arguments
for ``rknn.config`` / ``load_onnx`` / ``build`` from the manifest (so the same
arguments are recorded in the sidecar and in the cache key), has the worker run
with its stdout/stderr on ``convert.log`` (a child forked from the build's
:mod:`pipeline.zygote`, or a fresh process as the fallback), enforces the
model's timeout by killing the worker's whole process group, and parses the
layer table from the log into ``placement.json``.

Outputs in ``build/<name>/<target>/``: ``model.rknn``, ``convert.log``,
``placement.json`` and ``convert.json`` (the worker's result, the placement
summary and the explained diagnostics). ``model.rknn`` appears only when every
step succeeded: the worker writes a ``.partial`` name that is renamed last.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline import files
from pipeline.layer_table import parse_layer_table, summarize
from pipeline.formats import CONVERT_FORMAT
from pipeline.layout import PairLayout
from pipeline.records import CONVERT
from pipeline.errors import PipelineError

# rknn.config() keys fed from the manifest's quantization block.
_QUANT_CONFIG_KEYS = {
    "dtype": "quantized_dtype",
    "algorithm": "quantized_algorithm",
    "method": "quantized_method",
    "hybrid_level": "quantized_hybrid_level",
    "auto_hybrid_cos_thresh": "auto_hybrid_cos_thresh",
    "auto_hybrid_euc_thresh": "auto_hybrid_euc_thresh",
}


class ConversionFailed(PipelineError, RuntimeError):
    """The toolkit did not produce a model; the message quotes its own error line."""


def toolkit_arguments(model: dict, target: str, source: str) -> dict:
    """The exact ``config`` / ``load_onnx`` / ``build`` keyword arguments for one conversion.

    ``op_target`` is not included: it comes from resolution and may be remapped
    by the worker. Unset manifest keys are left out so the toolkit's own
    defaults apply (and are not frozen into the record).
    """
    config: dict = {"target_platform": target}
    for key in ("mean_values", "std_values"):
        if model.get(key) is not None:
            config[key] = model[key]
    quant = model.get("quantization")
    if quant:
        for manifest_key, config_key in _QUANT_CONFIG_KEYS.items():
            if quant.get(manifest_key) is not None:
                config[config_key] = quant[manifest_key]
    config.update(model.get("options") or {})
    from pipeline.shapes import dynamic_input

    dynamic = dynamic_input(model)
    if dynamic:
        config["dynamic_input"] = dynamic  # the toolkit refuses input_size_list beside it (measured)

    load: dict = {}
    if model.get("inputs") and not dynamic:
        load["inputs"] = list(model["inputs"])
        load["input_size_list"] = [list(shape) for shape in model["inputs"].values()]
    if model.get("outputs"):
        load["outputs"] = list(model["outputs"])

    build: dict = {"do_quantization": bool(quant)}
    if quant:
        build["dataset"] = quant["dataset"]
        if quant.get("auto_hybrid"):
            build["auto_hybrid"] = True
    build.update(model.get("build") or {})
    return {"config": config, "load_onnx": load, "build": build, "source": source}


def portable(value, base: Path):
    """``value`` with absolute paths under ``base`` made relative (records and keys must not
    depend on where the project is checked out: a CI clone must hit a cache filled elsewhere)."""
    def relative(text: str):
        path = Path(text)
        return path.relative_to(base).as_posix() if text.startswith("/") and path.is_relative_to(base) else text

    return files.map_strings(value, relative)


def recorded_arguments(model: dict, target: str, base: Path) -> dict:
    """The toolkit arguments as keys and records hold them: no source path, paths relative to ``base``
    (an absolute, resolved directory)."""
    args = portable(toolkit_arguments(model, target, ""), Path(base))
    del args["source"]
    return args


def sample_files(model: dict) -> list[str]:
    """Every calibration sample file of a model (a calibration step names one per input)."""
    quant = model.get("quantization") or {}
    return [path for row in quant.get("samples") or [] for path in row]


def dataset_file(model: dict) -> str | None:
    """The manifest's dataset file, when the samples are given as one (not as a mapping by input)."""
    dataset = (model.get("quantization") or {}).get("dataset")
    return dataset if isinstance(dataset, str) else None


def _toolkit_version(model: dict, target: str) -> str | None:
    """The rknn-toolkit2 version this conversion asks for (None: the installed one)."""
    from pipeline.runtime_gate import toolkit_for

    return toolkit_for(model, target, None)


def make_job(model: dict, target: str, resolved: dict, pair: PairLayout | Path, calibration=None) -> dict:
    """The worker's job document (plain JSON); ``pair`` says where its files go.

    ``calibration`` is ``{"dataset", "rows", "verify_rows"}``: the dataset file and rows
    :func:`pipeline.calibration.write_dataset` laid out (the toolkit and verify read those, not
    the manifest's paths), and for a dynamic model the rows that fit each shape set.
    """
    from pipeline.shapes import dynamic_input

    pair = PairLayout.of(pair)
    onnx_path = resolved.get("converted_onnx") or model["source"]
    args = toolkit_arguments(model, target, onnx_path)
    quant = model.get("quantization") or {}
    samples = quant.get("samples") or []
    if calibration is not None:
        args["build"]["dataset"], samples = str(calibration["dataset"]), calibration["rows"]
    return {
        "model": model["name"],
        "toolkit_version": _toolkit_version(model, target),
        "target": target,
        "onnx": onnx_path,
        "config": args["config"],
        "load_onnx": args["load_onnx"],
        "build": args["build"],
        "hybrid": quant.get("hybrid"),
        "repair": _repair_job(quant.get("repair"), resolved.get("repair")),
        "op_target": resolved.get("op_target") or {},
        "op_target_nodes": {key: [item["node"], item.get("output_index", 0)]
                            for key, item in (resolved.get("explanations") or {}).items()},
        "verify": model.get("verify"),
        "verify_source": model["source"],
        "verify_shapes": model.get("shape_sets") if dynamic_input(model) else None,
        "verify_rows": (calibration or {}).get("verify_rows"),
        "samples": samples,
        "workdir": str(pair.work),
        "job_path": str(pair.job),
        "rknn_path": str(pair.partial_rknn),
        "result_path": str(pair.worker_result),
    }


def _repair_job(settings: dict | None, choice: dict | None) -> dict | None:
    """The worker's repair settings, with an earlier search's choice to start from (``reuse``).

    ``choice`` is what resolved.json records after a repair; the caller passes
    it only when it was made for these same inputs (see :mod:`pipeline.stages`).
    """
    if not settings:
        return None
    job = {"min_cosine": settings["min_cosine"], "max_float_layers": settings["max_float_layers"]}
    if choice and choice.get("float_tensors"):
        job.update(reuse=choice["float_tensors"], cosine_before=choice.get("cosine_before"))
    return job


def worker_python(job: dict | None = None) -> str:
    """The interpreter that runs the conversion worker for ``job``.

    ``RKNN_PIPELINE_WORKER_PYTHON`` selects another one, e.g. a wrapper that
    runs the toolkit under a memory limit or in another environment that has
    this package installed; by default the worker uses this process's Python.
    The job is passed so that a job can name its own toolkit environment; a
    zygote is kept per interpreter.
    """
    override = os.environ.get("RKNN_PIPELINE_WORKER_PYTHON")
    if override:
        return override
    from pipeline.toolkit_envs import ToolkitEnvError, python_for

    try:
        return python_for((job or {}).get("toolkit_version"))
    except ToolkitEnvError as exc:
        raise ConversionFailed(str(exc)) from exc


WORKER_MODES = ("fork", "fresh")
# Deaths that a fork-unsafe toolkit could cause (a SIGKILL comes from outside: a user, the OOM killer).
_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE}


def worker_mode() -> str:
    """``fork`` (default: a child of the per-build zygote) or ``fresh`` (a new process per conversion),
    from ``RKNN_PIPELINE_WORKER``."""
    mode = os.environ.get("RKNN_PIPELINE_WORKER") or "fork"
    if mode not in WORKER_MODES:
        raise ConversionFailed(f"RKNN_PIPELINE_WORKER={mode!r} is not one of {', '.join(WORKER_MODES)}")
    return mode


class _Zygotes:
    """The zygotes of this process: one per (interpreter, build directory, thread), started on first use.

    A process forked by doit (``-n N``) inherits the table but not the right to
    use it: two processes writing jobs into one zygote would mix up answers, so
    the owner pid is checked and an inherited table is dropped. Interpreters for
    which forking failed are remembered in ``refused`` and get a fresh process
    per conversion for the rest of the build (said once, on stderr).
    """

    owner: int | None = None
    live: dict = {}
    refused: dict[str, str] = {}

    @classmethod
    def _mine(cls) -> None:
        if cls.owner != os.getpid():
            from multiprocessing import util

            for zygote in cls.live.values():
                zygote.close()  # inherited: only closes this process's copy of its pipes
            cls.owner, cls.live, cls.refused = os.getpid(), {}, {}
            # doit's task processes (-n N) end with os._exit, skipping atexit but not multiprocessing's
            # finalizers: stop (and reap) the zygotes there too, rather than leave them to notice EOF.
            util.Finalize(None, cls.close_all, exitpriority=0)

    @classmethod
    def get(cls, python: str, build_dir: Path):
        """The zygote for ``python`` (started now if needed, without waiting for its import), or None
        when this interpreter falls back to fresh processes."""
        from pipeline.zygote import Zygote

        cls._mine()
        if python in cls.refused:
            return None
        key = (python, str(build_dir), threading.get_ident())
        zygote = cls.live.get(key)
        if zygote is not None and not zygote.alive():
            del cls.live[key]
            cls.fall_back(python, zygote.obituary())
            return None
        if zygote is None:
            zygote = cls.live[key] = Zygote(python, build_dir)
        return zygote

    @classmethod
    def forget(cls, zygote) -> None:
        """Drop a zygote that was stopped on purpose (a timeout while it imported)."""
        cls.live = {key: value for key, value in cls.live.items() if value is not zygote}

    @classmethod
    def fall_back(cls, python: str, why: str) -> None:
        if python in cls.refused:
            return
        cls.refused[python] = why
        for key in [key for key in cls.live if key[0] == python]:
            cls.live.pop(key).close()
        print(f"warning: {why}; falling back to a fresh worker process per conversion for the rest of this "
              f"build (RKNN_PIPELINE_WORKER=fresh does so from the start)", file=sys.stderr, flush=True)

    @classmethod
    def close_all(cls) -> None:
        if cls.owner == os.getpid():
            for zygote in cls.live.values():
                zygote.close()
        cls.live = {}


atexit.register(_Zygotes.close_all)


def prestart_worker(job: dict) -> None:
    """Start the zygote for ``job``'s interpreter now, so the toolkit's import overlaps the tasks that
    run before the first conversion (analysis, resolution). No-op in ``fresh`` mode or when running."""
    if (os.environ.get("RKNN_PIPELINE_WORKER") or "fork") != "fork":
        return
    try:
        python = worker_python(job)
    except ConversionFailed:  # best effort: the conversion itself reports it
        return
    _Zygotes.get(python, Path(job["workdir"]).parents[2])


class _Standby:
    """At most one pre-started fresh worker per process, already past the toolkit's import.

    Used when conversions run in fresh processes (``RKNN_PIPELINE_WORKER=fresh``
    or after a fallback from the zygote): its ~4 s import need not be waited
    for, since while one conversion runs the next worker imports on the other
    core. An unused standby gets EOF on stdin at exit, or dies with its parent.
    """

    proc: subprocess.Popen | None = None

    @classmethod
    def spawn(cls, python: str, build_dir: Path) -> subprocess.Popen:
        from pipeline.zygote import die_with_parent

        from pipeline.toolkit_envs import worker_environment

        env = worker_environment(python)
        return subprocess.Popen([python, "-m", "pipeline.worker", "--standby", str(build_dir)],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env, start_new_session=True, preexec_fn=die_with_parent)

    @classmethod
    def take(cls, python: str, build_dir: Path, prewarm: bool = True) -> subprocess.Popen:
        """A live standby worker (the pre-started one if still alive and for the same interpreter and
        build), and start the next one unless ``prewarm`` is off."""
        proc, cls.proc = cls.proc, None
        if proc is None or proc.poll() is not None or proc.args[0] != python or proc.args[-1] != str(build_dir):
            cls.release(proc)
            proc = cls.spawn(python, build_dir)
        if prewarm and os.environ.get("RKNN_PIPELINE_PREWARM", "1") != "0":
            cls.proc = cls.spawn(python, build_dir)
        return proc

    @staticmethod
    def release(proc: subprocess.Popen | None) -> None:
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()  # EOF: exit without a job
            except OSError:
                pass

    @classmethod
    def release_current(cls) -> None:
        cls.release(cls.proc)
        cls.proc = None


atexit.register(_Standby.release_current)


def run_worker(job: dict, log_path: Path, timeout: float, python: str | None = None) -> dict:
    """Run the conversion worker on ``job`` with ``python`` (default :func:`worker_python`); return its
    result plus ``returncode``.

    By default the worker is a child forked from this build's zygote for that
    interpreter; with ``RKNN_PIPELINE_WORKER=fresh``, or once the zygote has
    failed, a fresh process. Either way it has its own session (a timeout kills
    its whole group), and a worker that dies without writing a result (signal,
    OOM kill) yields a result that says how it died.
    """
    python = python or worker_python(job)
    workdir = Path(job["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    job_path = Path(job["job_path"])
    files.atomic_write_json(job_path, {**job, "log_path": str(log_path)})
    result_path = Path(job["result_path"])
    started = time.monotonic()

    def fresh_start():
        Path(log_path).write_bytes(b"")  # a fresh log, even if the worker dies before opening it
        result_path.unlink(missing_ok=True)

    fresh_start()
    if worker_mode() == "fork":
        zygote = _Zygotes.get(python, workdir.parents[2])
        if zygote is not None:
            result = _forked(zygote, job_path, result_path, timeout, started)
            crash = _crash_signal(result)
            if crash is None and result is not None:
                return result
            fresh_start()
            if crash is None:  # the zygote is gone: this job, and the rest, in fresh processes
                return _supervise(python, job, job_path, result_path, timeout, time.monotonic())
            # A crash in a forked child: the toolkit's own, or fork-unsafety? A fresh process decides.
            fresh = _supervise(python, job, job_path, result_path, timeout, time.monotonic(), prewarm=False)
            if _crash_signal(fresh) is None:
                _Zygotes.fall_back(python, f"{job['model']}@{job['target']} crashed in a forked worker "
                                           f"({crash.name}) but not in a fresh process, so the toolkit is not "
                                           f"fork-safe for it")
            else:
                fresh["error"] += f" (also in a forked worker: {crash.name})"
            return fresh
    return _supervise(python, job, job_path, result_path, timeout, started)


def _forked(zygote, job_path: Path, result_path: Path, timeout: float, started: float) -> dict | None:
    """The job's result from a child of ``zygote``; None if the zygote died (the caller falls back)."""
    from pipeline.zygote import ChildTimeout, ZygoteLost

    try:
        returncode = zygote.run(job_path, started + timeout)
    except ZygoteLost as exc:
        _Zygotes.fall_back(zygote.python, str(exc))
        return None
    except ChildTimeout:
        if not zygote.alive():
            _Zygotes.forget(zygote)
        return _timed_out(started, timeout)
    except BaseException:
        with _shielded():  # Ctrl-C or doit stopping: the child's group is dead; stop the zygote too
            _Zygotes.close_all()
        raise
    return _finish(result_path, returncode, started)


def _crash_signal(result: dict | None) -> signal.Signals | None:
    """The signal that killed a worker which wrote no result, if it is one a crash sends."""
    code = (result or {}).get("returncode")
    if result is None or result.get("step") != "worker" or code is None or code >= 0:
        return None
    return signal.Signals(-code) if -code in _CRASH_SIGNALS else None


def _timed_out(started: float, timeout: float) -> dict:
    elapsed = time.monotonic() - started
    return {"ok": False, "step": "timeout", "returncode": None, "seconds": round(elapsed, 1),
            "error": f"conversion timed out after {elapsed:.0f} s (timeout: {timeout:g} s); "
                     f"raise the model's `timeout` in the manifest if the model is just big"}


def _finish(result_path: Path, returncode: int, started: float) -> dict:
    result = files.read_json(result_path)
    if result is None:
        how = (f"killed by signal {signal.Signals(-returncode).name}" if returncode < 0
               else f"exited with code {returncode} without a result")
        result = {"ok": False, "step": "worker", "error": f"conversion worker {how}"}
    result["returncode"] = returncode
    result.setdefault("seconds", round(time.monotonic() - started, 3))
    return result


@contextmanager
def _terminate_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt while a worker runs.

    ``doit -n N`` stops its task processes with SIGTERM on Ctrl-C; without this
    they would die before killing their worker and removing its partial output.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _shielded():
    """Ignore SIGINT and SIGTERM while cleaning up after one (a second Ctrl-C must not cut it short)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _supervise(python: str, job: dict, job_path: Path, result_path: Path, timeout: float, started: float,
               prewarm: bool = True) -> dict:
    """Run ``job`` in a fresh worker process (a pre-started standby one when available)."""
    workdir = Path(job["workdir"])
    proc = _Standby.take(python, workdir.parents[2], prewarm)
    try:
        proc.stdin.write(f"{job_path}\n".encode())
        proc.stdin.close()
    except OSError:  # it died already: its exit status says how
        pass
    try:
        returncode = proc.wait(timeout=max(started + timeout - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return _timed_out(started, timeout)
    except BaseException:
        with _shielded():  # Ctrl-C or doit stopping: never leave a toolkit running
            _kill_group(proc)
            _Standby.release_current()
        raise
    return _finish(result_path, returncode, started)


def _kill_group(proc: subprocess.Popen) -> None:
    from pipeline.zygote import kill_group

    kill_group(proc.pid)
    proc.wait()


def convert(model: dict, target: str, resolved: dict, pair: PairLayout | Path, calibration=None) -> dict:
    """Run one conversion and leave its outputs in ``pair`` (a :class:`PairLayout`); return the
    ``convert.json`` record.

    Raises :class:`ConversionFailed` (after writing convert.json with the failure)
    when the toolkit did not produce a model.
    """
    pair = PairLayout.of(pair)
    pair.dir.mkdir(parents=True, exist_ok=True)
    pair.rknn.unlink(missing_ok=True)
    pair.accuracy.unlink(missing_ok=True)  # an analysis from an earlier build would mislead
    files.remove_partials(pair.dir)  # left by a worker killed with its parent in an earlier run
    job = make_job(model, target, resolved, pair, calibration)
    partial = Path(job["rknn_path"])
    with _terminate_as_interrupt():
        try:
            return _run_and_record(model, target, job, pair)
        except BaseException:
            # Interrupted or failed anywhere, even after the worker finished: no partial model stays.
            with _shielded():
                partial.unlink(missing_ok=True)
            raise


def _run_and_record(model: dict, target: str, job: dict, pair: PairLayout) -> dict:
    """Run the worker, then turn its result and log into convert.json (and model.rknn, last)."""
    from pipeline import diagnostics

    log_path = pair.log
    result, tries = _run_with_retries(model, target, job, log_path)
    log_text = log_path.read_text(errors="replace")
    layers = parse_layer_table(log_text)
    record = {
        "format": CONVERT_FORMAT,
        "model": model["name"],
        "target": target,
        "ok": bool(result.get("ok")),
        "arguments": {"config": job["config"], "load_onnx": job["load_onnx"], "build": job["build"]},
        "converted_onnx": job["onnx"],
        "op_target": result.get("op_target", job["op_target"]),
        "remaps": result.get("remaps", []),
        "seconds": result.get("seconds"),
        "verify": result.get("verify"),
        "repair": result.get("repair"),
        "placement": summarize(layers) if layers else None,
        "diagnostics": reconcile(diagnostics.explain_log(log_text), result, layers),
    }
    if tries > 1:
        record["attempts"] = tries
    partial = Path(job["rknn_path"])
    verify = result.get("verify")
    analysis = _record_accuracy(result.get("accuracy"), pair, record, layers)
    if result.get("ok"):
        _check_float_layers(result, layers)
    if result.get("ok") and verify and not verify.get("passed"):
        from pipeline.accuracy import failure_lines

        worst = min(verify.get("outputs") or [{"cosine": float("nan")}], key=lambda o: o["cosine"])
        message = (f"accuracy check failed: cosine {worst['cosine']:.4f} on output "
                   f"'{worst.get('name')}' is below min_cosine {verify.get('min_cosine')}")
        result.update(ok=False, step="verify",
                      error="\n  ".join([message, *failure_lines(analysis)]))
    if not result.get("ok") or not partial.exists():
        partial.unlink(missing_ok=True)
        record["error"] = result.get("error") or "the toolkit produced no model"
        record["step"] = result.get("step")
        record["toolkit_error_lines"] = diagnostics.error_lines(log_text)
        CONVERT.write(pair.convert_record, record)
        raise ConversionFailed(failure_message(record, log_path))
    files.atomic_write_json(pair.placement, layers)
    CONVERT.write(pair.convert_record, record)
    os.replace(partial, pair.rknn)
    return record


def _check_float_layers(result: dict, layers: list[dict]) -> None:
    """Fail the result if a layer asked to stay in float16 (by hand or by the repair) was built in int8.

    The toolkit's layer table is the judge, not our own log line: a name in
    ``custom_quantize_layers`` that the toolkit accepts and then ignores (e.g.
    the input's int8 conversion) would otherwise pass silently.
    """
    from pipeline.repair import unfloated_layers

    asked = result.get("float_asked") or {}
    if not asked:
        return
    if not layers:
        result.update(ok=False, step="hybrid", error="hybrid quantization: the build log has no layer table, so "
                                                     "the layers kept in float cannot be checked")
        return
    wrong = unfloated_layers(asked, layers)
    if wrong:
        listing = "; ".join(f"tensor '{item['tensor']}' -> layer {item['layer']} ({item['op_type']}) is "
                            f"{item['dtype']}" for item in wrong)
        result.update(ok=False, step="hybrid",
                      error=f"hybrid quantization: {len(wrong)} layer(s) asked to stay in float16 were built in "
                            f"int8: {listing}. Keep other tensors in float (the table shows each layer's type)")


def _run_with_retries(model: dict, target: str, job: dict, log_path: Path) -> tuple[dict, int]:
    """The worker's result, tried again after a crash where the toolkit is known to crash intermittently.

    ``platforms.UNSTABLE`` lists those builds (w8a16 on rk3562); anywhere else a crash is final,
    since retrying a deterministic abort only wastes minutes.
    """
    from pipeline import platforms

    allowed = platforms.attempts(target, model)
    for attempt in range(1, allowed + 1):
        result = run_worker(job, log_path, float(model.get("timeout") or 1800), worker_python(job))
        crash = _crash_signal(result)
        if crash is None or attempt == allowed:
            return result, attempt
        print(f"{model['name']}@{target}: the toolkit crashed ({crash.name}), which this build does in some "
              f"runs (pipeline/platforms.py UNSTABLE); try {attempt + 1} of {allowed}", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


def _record_accuracy(analysis: dict | None, pair: PairLayout, record: dict, table: list[dict]) -> dict | None:
    """Write the worker's per-layer analysis to accuracy.json (each layer placed in the layer table)
    and its summary into ``record``."""
    from pipeline.accuracy import place_layers

    if not analysis:
        return None
    if analysis.get("layers"):
        analysis = {**analysis, "layers": place_layers(analysis["layers"], table)}
    if analysis.get("error"):
        record["accuracy"] = {"error": analysis["error"], "why": analysis.get("why")}
    else:
        files.atomic_write_json(pair.accuracy, analysis)
        record["accuracy"] = {"file": pair.accuracy.name, "why": analysis.get("why"), "worst": analysis.get("worst")}
    return analysis


def reconcile(items: list[dict], result: dict, layers: list[dict]) -> list[dict]:
    """Drop log diagnostics that the final build proved moot.

    The toolkit prints ``Invalid key ... in 'op_target'`` for a first attempt
    the worker then remapped, and ``AveragePool count_include_pad=0, fallback
    to cpu`` even when op_target moved every pool to the NPU; repeating those
    after a good build would send users chasing problems they do not have.
    """
    on_cpu = {layer.get("origin_op") or layer["op_type"] for layer in layers if layer["target"] == "CPU"}
    kept = []
    for item in items:
        if item["id"] == "op-target-key-invalid" and result.get("ok") and result.get("remaps"):
            continue
        if item["id"] == "averagepool-count-include-pad" and layers and "AveragePool" not in on_cpu:
            continue
        kept.append(item)
    return kept


def failure_message(record: dict, log_path: Path) -> str:
    quoted = record.get("toolkit_error_lines") or []
    lines = [f"{record['model']}@{record['target']}: conversion failed at "
             f"{record.get('step') or 'an unknown step'}: {record['error']}"]
    lines += [f"  toolkit: {line}" for line in quoted[:5]]
    lines += [f"  {item['explanation']} Fix: {item['fix']}" for item in record["diagnostics"]
              if item.get("level") == "error"]
    lines.append(f"  full log: {log_path}")
    return "\n".join(lines)
