"""Conversion: turn a model x target (plus its resolution) into a toolkit job, run it, read the verdict.

The parent side of :mod:`pipeline.worker`. It builds the exact keyword arguments
for ``rknn.config`` / ``load_onnx`` / ``build`` from the manifest (so the same
arguments are recorded in the sidecar and in the cache key), starts the worker
with its stdout/stderr on ``convert.log``, enforces the model's timeout by
killing the worker's whole process group, and parses the layer table from the
log into ``placement.json``.

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

# rknn.config() keys fed from the manifest's quantization block.
_QUANT_CONFIG_KEYS = {
    "dtype": "quantized_dtype",
    "algorithm": "quantized_algorithm",
    "method": "quantized_method",
    "hybrid_level": "quantized_hybrid_level",
    "auto_hybrid_cos_thresh": "auto_hybrid_cos_thresh",
    "auto_hybrid_euc_thresh": "auto_hybrid_euc_thresh",
}


class ConversionFailed(RuntimeError):
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
    if isinstance(value, dict):
        return {key: portable(item, base) for key, item in value.items()}
    if isinstance(value, list):
        return [portable(item, base) for item in value]
    if isinstance(value, str) and value.startswith("/"):
        path = Path(value)
        if path.is_relative_to(base):
            return path.relative_to(base).as_posix()
    return value


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


def make_job(model: dict, target: str, resolved: dict, workdir: Path, calibration=None) -> dict:
    """The worker's job document (plain JSON).

    ``calibration`` is ``{"dataset", "rows", "verify_rows"}``: the dataset file and rows
    :func:`pipeline.calibration.write_dataset` laid out (the toolkit and verify read those, not
    the manifest's paths), and for a dynamic model the rows that fit each shape set.
    """
    from pipeline.shapes import dynamic_input

    onnx_path = resolved.get("converted_onnx") or model["source"]
    args = toolkit_arguments(model, target, onnx_path)
    quant = model.get("quantization") or {}
    samples = quant.get("samples") or []
    if calibration is not None:
        args["build"]["dataset"], samples = str(calibration["dataset"]), calibration["rows"]
    return {
        "model": model["name"],
        "target": target,
        "onnx": onnx_path,
        "config": args["config"],
        "load_onnx": args["load_onnx"],
        "build": args["build"],
        "hybrid": quant.get("hybrid"),
        "op_target": resolved.get("op_target") or {},
        "op_target_nodes": {key: [item["node"], item.get("output_index", 0)]
                            for key, item in (resolved.get("explanations") or {}).items()},
        "verify": model.get("verify"),
        "verify_source": model["source"],
        "verify_shapes": model.get("shape_sets") if dynamic_input(model) else None,
        "verify_rows": (calibration or {}).get("verify_rows"),
        "samples": samples,
        "workdir": str(workdir / "work"),
        "rknn_path": str(workdir / ("model.rknn" + files.PARTIAL_SUFFIX)),
        "result_path": str(workdir / "worker-result.json"),
    }


def worker_python() -> str:
    """The interpreter that runs conversion workers.

    ``RKNN_PIPELINE_WORKER_PYTHON`` selects another one, e.g. a wrapper that
    runs the toolkit under a memory limit or in another environment that has
    this package installed; by default the worker uses this process's Python.
    """
    return os.environ.get("RKNN_PIPELINE_WORKER_PYTHON") or sys.executable


class _Standby:
    """At most one pre-started worker per process, already past the toolkit's import.

    A worker is started per conversion (isolation: the toolkit keeps global
    state and may crash), but its ~4 s import need not be waited for: while
    one conversion runs, the next worker imports on the other core. An unused
    standby gets EOF on stdin at exit, or dies with its parent.
    """

    proc: subprocess.Popen | None = None

    @classmethod
    def spawn(cls, build_dir: Path) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        return subprocess.Popen([worker_python(), "-m", "pipeline.worker", "--standby", str(build_dir)],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env, start_new_session=True, preexec_fn=_die_with_parent)

    @classmethod
    def take(cls, build_dir: Path) -> subprocess.Popen:
        """A live standby worker (the pre-started one if still alive), and start the next."""
        proc, cls.proc = cls.proc, None
        if proc is None or proc.poll() is not None or proc.args[-1] != str(build_dir):
            cls.release(proc)
            proc = cls.spawn(build_dir)
        if os.environ.get("RKNN_PIPELINE_PREWARM", "1") != "0":
            cls.proc = cls.spawn(build_dir)
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


def run_worker(job: dict, log_path: Path, timeout: float) -> dict:
    """Run a conversion worker on ``job``; return its result plus ``returncode``.

    The worker gets its own session (process group) so a timeout kills the
    toolkit's helper processes too; a worker that dies without writing a
    result (signal, OOM kill) yields a result that says how it died.
    """
    workdir = Path(job["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    job_path = workdir / "job.json"
    Path(log_path).write_bytes(b"")  # a fresh log, even if the worker dies before opening it
    files.atomic_write_json(job_path, {**job, "log_path": str(log_path)})
    result_path = Path(job["result_path"])
    result_path.unlink(missing_ok=True)
    return _supervise(job, job_path, result_path, timeout, time.monotonic())


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


def _supervise(job: dict, job_path: Path, result_path: Path, timeout: float, started: float) -> dict:
    workdir = Path(job["workdir"])
    proc = _Standby.take(workdir.parents[2])
    try:
        proc.stdin.write(f"{job_path}\n".encode())
        proc.stdin.close()
    except OSError:  # it died already: its exit status says how
        pass
    try:
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        elapsed = time.monotonic() - started
        return {"ok": False, "step": "timeout", "returncode": None, "seconds": round(elapsed, 1),
                "error": f"conversion timed out after {elapsed:.0f} s (timeout: {timeout:g} s); "
                         f"raise the model's `timeout` in the manifest if the model is just big"}
    except BaseException:
        with _shielded():  # Ctrl-C or doit stopping: never leave a toolkit running
            _kill_group(proc)
            _Standby.release_current()
        raise
    result = files.read_json(result_path)
    if result is None:
        how = (f"killed by signal {signal.Signals(-returncode).name}" if returncode < 0
               else f"exited with code {returncode} without a result")
        result = {"ok": False, "step": "worker", "error": f"conversion worker {how}"}
    result["returncode"] = returncode
    result.setdefault("seconds", round(time.monotonic() - started, 3))
    return result


def _die_with_parent() -> None:
    """In the worker, before exec: ask Linux to SIGKILL it if its parent dies.

    The worker runs in its own session (so a timeout can kill its whole group),
    which also hides it from a Ctrl-C sent to doit's process group. If doit's
    process-mode children are killed before their cleanup runs, this keeps
    orphaned toolkit processes from converting on with nobody listening.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except OSError:  # not Linux/glibc: the parent's own cleanup still applies
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def convert(model: dict, target: str, resolved: dict, workdir: Path, calibration=None) -> dict:
    """Run one conversion and leave its outputs in ``workdir``; return the ``convert.json`` record.

    Raises :class:`ConversionFailed` (after writing convert.json with the failure)
    when the toolkit did not produce a model.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    final_rknn = workdir / "model.rknn"
    final_rknn.unlink(missing_ok=True)
    files.remove_partials(workdir)  # left by a worker killed with its parent in an earlier run
    job = make_job(model, target, resolved, workdir, calibration)
    partial = Path(job["rknn_path"])
    with _terminate_as_interrupt():
        try:
            return _run_and_record(model, target, job, workdir, final_rknn)
        except BaseException:
            # Interrupted or failed anywhere, even after the worker finished: no partial model stays.
            with _shielded():
                partial.unlink(missing_ok=True)
            raise


def _run_and_record(model: dict, target: str, job: dict, workdir: Path, final_rknn: Path) -> dict:
    """Run the worker, then turn its result and log into convert.json (and model.rknn, last)."""
    from pipeline import diagnostics

    log_path = workdir / "convert.log"
    result = run_worker(job, log_path, float(model.get("timeout") or 1800))
    log_text = log_path.read_text(errors="replace")
    layers = parse_layer_table(log_text)
    record = {
        "model": model["name"],
        "target": target,
        "ok": bool(result.get("ok")),
        "arguments": {"config": job["config"], "load_onnx": job["load_onnx"], "build": job["build"]},
        "converted_onnx": job["onnx"],
        "op_target": result.get("op_target", job["op_target"]),
        "remaps": result.get("remaps", []),
        "seconds": result.get("seconds"),
        "verify": result.get("verify"),
        "placement": summarize(layers) if layers else None,
        "diagnostics": reconcile(diagnostics.explain_log(log_text), result, layers),
    }
    partial = Path(job["rknn_path"])
    verify = result.get("verify")
    if result.get("ok") and verify and not verify.get("passed"):
        worst = min(verify.get("outputs") or [{"cosine": float("nan")}], key=lambda o: o["cosine"])
        result.update(ok=False, step="verify",
                      error=f"accuracy check failed: cosine {worst['cosine']:.4f} on output "
                            f"'{worst.get('name')}' is below min_cosine {verify.get('min_cosine')}")
    if not result.get("ok") or not partial.exists():
        partial.unlink(missing_ok=True)
        record["error"] = result.get("error") or "the toolkit produced no model"
        record["step"] = result.get("step")
        record["toolkit_error_lines"] = diagnostics.error_lines(log_text)
        files.atomic_write_json(workdir / "convert.json", record)
        raise ConversionFailed(failure_message(record, log_path))
    files.atomic_write_json(workdir / "placement.json", layers)
    files.atomic_write_json(workdir / "convert.json", record)
    os.replace(partial, final_rknn)
    return record


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
