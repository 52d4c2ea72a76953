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


_LAUNCHER: tuple[int, object] | None = None


def _launch(start, *args):
    """``start(*args)`` in the main thread, or in one thread that lives as long as this process.

    A zygote dies with the *thread* that started it (``PR_SET_PDEATHSIG`` follows
    the parent thread, not the process), and conversions started ahead run in
    short-lived threads; a zygote started from one of them would be killed the
    moment that job's thread ended, under every other job.
    """
    global _LAUNCHER
    if threading.current_thread() is threading.main_thread():
        return start(*args)
    from concurrent.futures import ThreadPoolExecutor

    with _Zygotes.lock:
        if _LAUNCHER is None or _LAUNCHER[0] != os.getpid():
            _LAUNCHER = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="zygote-launcher"))
        launcher = _LAUNCHER[1]
    return launcher.submit(start, *args).result()


class _Zygotes:
    """The zygotes of this process: one per (interpreter, build directory), started on first use.

    A process forked by doit (``-n N``) inherits the table but not the right to
    use it: two processes writing jobs into one zygote would mix up answers, so
    the owner pid is checked and an inherited table is dropped. Interpreters for
    which forking failed are remembered in ``refused`` and get a fresh process
    per conversion for the rest of the build (said once, on stderr).
    """

    owner: int | None = None
    live: dict = {}
    refused: dict[str, str] = {}
    lock = threading.RLock()
    stopping = False  # set while the build stops: a lost zygote then means "interrupted", not "fall back"

    @classmethod
    def _mine(cls) -> None:
        if cls.owner != os.getpid():
            from multiprocessing import util

            for zygote in cls.live.values():
                zygote.close()  # inherited: only closes this process's copy of its pipes
            cls.owner, cls.live, cls.refused, cls.stopping = os.getpid(), {}, {}, False
            # doit's task processes (-n N) end with os._exit, skipping atexit but not multiprocessing's
            # finalizers: stop (and reap) the zygotes there too, rather than leave them to notice EOF.
            util.Finalize(None, cls.close_all, exitpriority=0)

    @classmethod
    def get(cls, python: str, build_dir: Path):
        """The zygote for ``python`` (started now if needed, without waiting for its import), or None
        when this interpreter falls back to fresh processes. Threads share it: it forks a child per job."""
        from pipeline.zygote import Zygote

        with cls.lock:
            cls._mine()
            if python in cls.refused:
                return None
            key = (python, str(build_dir))
            zygote = cls.live.get(key)
            if zygote is not None and not zygote.alive():
                del cls.live[key]
                cls.fall_back(python, zygote.lost or zygote.obituary())
                return None
            if zygote is None:
                zygote = cls.live[key] = _launch(Zygote, python, build_dir)
            return zygote

    @classmethod
    def forget(cls, zygote) -> None:
        """Drop a zygote that was stopped on purpose (a timeout while it imported)."""
        cls.live = {key: value for key, value in cls.live.items() if value is not zygote}

    @classmethod
    def fall_back(cls, python: str, why: str) -> None:
        if python in cls.refused or cls.stopping:
            return
        cls.refused[python] = why
        for key in [key for key in cls.live if key[0] == python]:
            cls.live.pop(key).close()
        print(f"warning: {why}; falling back to a fresh worker process per conversion for the rest of this "
              f"build (RKNN_PIPELINE_WORKER=fresh does so from the start)", file=sys.stderr, flush=True)

    @classmethod
    def close_all(cls, stopping: bool = False) -> None:
        """Stop every zygote of this process (and so their children); ``stopping``: the build is being
        interrupted, so conversions that lose their zygote now must not fall back to fresh processes."""
        cls.stopping = cls.stopping or stopping
        with cls.lock:
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
    lock = threading.Lock()  # conversions started ahead run in threads

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
        with cls.lock:
            return cls._take(python, build_dir, prewarm)

    @classmethod
    def _take(cls, python: str, build_dir: Path, prewarm: bool) -> subprocess.Popen:
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


def conversion_slots() -> int:
    """How many conversions one doit process runs at once: ``RKNN_PIPELINE_JOBS``, else one per core it
    may use. A build keeps about one core busy (benchmarks, section 8), so a second conversion beside it
    uses the core a one-at-a-time loop leaves idle."""
    value = os.environ.get("RKNN_PIPELINE_JOBS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ConversionFailed(f"RKNN_PIPELINE_JOBS={value!r} is not a whole number of conversions (1 or more)")
        return int(value)
    return len(os.sched_getaffinity(0))


class _Abandoned(Exception):
    """A job cancelled while it waited for a slot."""


class _Slots:
    """At most N conversions at once in this process; a free slot goes to the longest waiting job first.

    Longest first keeps the cores busy to the end (a long conversion started
    last would run alone); a convert task that waits for a slot itself is
    served before any job started ahead, since doit can do nothing else meanwhile.
    """

    def __init__(self, count: int):
        self.free = count
        self.waiting: list[float] = []
        self.changed = threading.Condition()

    @contextmanager
    def held(self, seconds: float = float("inf"), until=None, abandoned=lambda: False):
        """Hold a slot for the block. ``until`` (a blocking call) runs first, while this job already
        counts as waiting, so jobs queued meanwhile are ranked against it; ``abandoned()`` true while
        waiting raises :class:`_Abandoned` instead (see :meth:`wake`)."""
        with self.changed:
            self.waiting.append(seconds)
        try:
            if until is not None:
                until()
            with self.changed:
                while not (self.free and seconds >= max(self.waiting)):
                    if abandoned():
                        raise _Abandoned()
                    self.changed.wait()
                if abandoned():
                    raise _Abandoned()
                self.free -= 1
        finally:
            with self.changed:
                self.waiting.remove(seconds)
                self.changed.notify_all()
        try:
            yield
        finally:
            with self.changed:
                self.free += 1
                self.changed.notify_all()

    def wake(self) -> None:
        """Let waiting jobs look again whether they were abandoned."""
        with self.changed:
            self.changed.notify_all()


class _AheadJob:
    """One conversion started at resolve time, in a thread that waits for its forked child."""

    def __init__(self, job: dict, log_path: Path, timeout: float, python: str, calibration, seconds: float):
        self.job, self.log_path, self.timeout, self.python = job, Path(log_path), timeout, python
        self.calibration, self.seconds = calibration, seconds
        self.result: dict | None = None  # None: not run, cancelled or failed; the convert task runs it
        self.child: int | None = None
        self.cancelled = False
        self.done = threading.Event()
        threading.Thread(target=self._run, name=f"ahead-{job['model']}@{job['target']}", daemon=True).start()

    def _run(self) -> None:
        try:
            # Queue for a slot only once the toolkit is imported: by then the resolutions have all
            # started their jobs, so the longest of them can go first.
            with _Ahead.slots().held(self.seconds, self._wait_for_import, lambda: self.cancelled):
                if not self.cancelled:
                    self.result = run_worker(self.job, self.log_path, self.timeout, self.python, self._started)
        except BaseException:  # cancelled while queued, or failed: the convert task runs it and reports
            self.result = None
        finally:
            self.done.set()

    def _wait_for_import(self) -> None:
        from pipeline.zygote import IMPORT_TIMEOUT

        zygote = _Zygotes.get(self.python, Path(self.job["workdir"]).parents[2])
        deadline = time.monotonic() + IMPORT_TIMEOUT
        while zygote is not None and not self.cancelled and time.monotonic() < deadline:
            if zygote.wait_ready(time.monotonic() + 1) or not zygote.alive():
                return

    def _started(self, pid: int) -> None:
        self.child = pid
        if self.cancelled:
            from pipeline.zygote import kill_group

            kill_group(pid)

    def cancel(self, wait: float = 10.0) -> None:
        """Kill the child if it runs, wait for the thread, and remove what the job wrote."""
        from pipeline.zygote import kill_group

        self.cancelled = True
        if self.child is not None:
            kill_group(self.child)
        _Ahead.slots().wake()
        self.done.wait(wait)
        for leftover in (Path(self.job["rknn_path"]), Path(self.job["result_path"]), self.log_path):
            leftover.unlink(missing_ok=True)


class _Ahead:
    """Conversions started as soon as their resolution is written, before doit reaches their convert task.

    doit runs a plain build's tasks one at a time, stage by stage (every
    analysis, every resolution, then every conversion), and its convert task
    waits for the toolkit. Started ahead, the conversions run from the zygote
    up to :func:`conversion_slots` at once while doit goes on with the
    resolutions, and the convert task collects its own result (waiting if it
    must) and records it exactly as if it had run the worker itself: same job
    document, same log, same checks.

    Only pairs doit will convert in this run are started: the reporter passes
    them (:func:`expect_conversions`) from doit's own plan and dependency
    state, and only to the process that runs the tasks (not to ``-n N``'s task
    processes, where another process may run the convert task). A job is
    collected only if the convert task builds the identical job document;
    anything left uncollected (the build stopped early) is killed and its
    files removed at exit.
    """

    owner: int | None = None
    expected: frozenset = frozenset()
    jobs: dict[str, _AheadJob] = {}
    lock = threading.Lock()
    _slots: tuple[int, _Slots] | None = None

    @classmethod
    def expect(cls, pairs) -> None:
        cls.discard_all()
        cls.owner, cls.expected, cls.jobs = os.getpid(), frozenset(pairs), {}

    @classmethod
    def wanted(cls, name: str, target: str) -> bool | None:
        """Whether doit will convert this pair in this process; None where no plan was given."""
        return (name, target) in cls.expected if cls.owner == os.getpid() else None

    @classmethod
    def slots(cls) -> _Slots:
        """The process's conversion slots, made on first use in this process."""
        with cls.lock:
            if cls._slots is None or cls._slots[0] != os.getpid():
                cls._slots = (os.getpid(), _Slots(conversion_slots()))
            return cls._slots[1]

    @classmethod
    def start(cls, job: dict, log_path: Path, timeout: float, python: str, calibration, seconds: float) -> None:
        with cls.lock:
            earlier = cls.jobs.pop(job["job_path"], None)
        if earlier is not None:
            earlier.cancel()
        started = _AheadJob(job, log_path, timeout, python, calibration, seconds)
        with cls.lock:
            cls.jobs[job["job_path"]] = started

    @classmethod
    def find(cls, job_path: str) -> _AheadJob | None:
        with cls.lock:
            return cls.jobs.get(job_path) if cls.owner == os.getpid() else None

    @classmethod
    def collect(cls, job: dict) -> _AheadJob | None:
        """The finished job started ahead for this very job document (waiting for it), else None."""
        with cls.lock:
            ahead = cls.jobs.pop(job["job_path"], None) if cls.owner == os.getpid() else None
        if ahead is None:
            return None
        if ahead.job != job:  # its inputs changed since: it is of no use
            ahead.cancel()
            return None
        try:
            while not ahead.done.wait(0.5):
                pass
        except BaseException:  # Ctrl-C while waiting: stop every conversion of the build, leave nothing
            with _shielded():
                _Zygotes.close_all(stopping=True)
                ahead.cancel()
                cls.discard_all()
            raise
        if ahead.result is None or not ahead.log_path.exists():
            return None
        return ahead

    @classmethod
    def discard(cls, job_path: str) -> None:
        with cls.lock:
            ahead = cls.jobs.pop(job_path, None)
        if ahead is not None:
            ahead.cancel()

    @classmethod
    def discard_all(cls) -> None:
        """Kill and clean up every uncollected job (at exit: the build stopped before their tasks)."""
        with cls.lock:
            left, cls.jobs = (list(cls.jobs.values()) if cls.owner == os.getpid() else []), {}
        if not left:
            return
        for ahead in left:
            ahead.cancelled = True
        _Zygotes.close_all(stopping=True)  # its children die with it; jobs waiting for its import stop
        for ahead in left:
            ahead.cancel()


atexit.register(_Ahead.discard_all)


def expect_conversions(pairs) -> None:
    """Tell this process which (model, target) pairs doit will convert in this run (see :class:`_Ahead`)."""
    _Ahead.expect(pairs)


def expects_conversion(name: str, target: str) -> bool | None:
    """Whether :func:`expect_conversions` named this pair (None where no plan was given: another
    reporter, or one of ``doit -n N``'s task processes)."""
    return _Ahead.wanted(name, target)


def start_ahead(model: dict, target: str, resolved: dict, pair: PairLayout | Path, calibration=None,
                seconds: float = 0.0) -> bool:
    """Start this pair's conversion now, in the background, if doit will run its convert task in this
    process; the task then collects it (:func:`convert`). ``seconds`` is its expected duration (longer
    jobs get a free slot first). False when it was not started."""
    pair = PairLayout.of(pair)
    try:
        if worker_mode() != "fork" or not _Ahead.wanted(model["name"], target):
            return False
        job = make_job(model, target, resolved, pair, calibration)
        python = worker_python(job)
    except ConversionFailed:  # the convert task reports it
        return False
    pair.work.mkdir(parents=True, exist_ok=True)
    files.remove_partials(pair.dir)
    _Ahead.start(job, pair.ahead_log, float(model.get("timeout") or 1800), python, calibration, seconds)
    return True


def started_ahead(pair: PairLayout | Path) -> tuple[bool, object]:
    """Whether a conversion was started ahead for ``pair``, and the calibration it was given (the convert
    task must not lay out the calibration files again while that conversion reads them)."""
    ahead = _Ahead.find(str(PairLayout.of(pair).job))
    return (ahead is not None, ahead.calibration if ahead is not None else None)


def cancel_ahead(pair: PairLayout | Path) -> None:
    """Stop the conversion started ahead for ``pair`` (a cache hit made it moot)."""
    _Ahead.discard(str(PairLayout.of(pair).job))


def run_worker(job: dict, log_path: Path, timeout: float, python: str | None = None, on_child=None) -> dict:
    """Run the conversion worker on ``job`` with ``python`` (default :func:`worker_python`); return its
    result plus ``returncode``.

    By default the worker is a child forked from this build's zygote for that
    interpreter; with ``RKNN_PIPELINE_WORKER=fresh``, or once the zygote has
    failed, a fresh process. Either way it has its own session (a timeout kills
    its whole group), and a worker that dies without writing a result (signal,
    OOM kill) yields a result that says how it died. ``on_child(pid)`` learns a
    forked child's pid (to cancel it).
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
            result = _forked(zygote, job_path, result_path, timeout, started, on_child)
            crash = _crash_signal(result)
            if crash is None and result is not None:
                return result
            if _Zygotes.stopping:  # the build is being interrupted: no fallback, no retry
                return {"ok": False, "step": "worker", "returncode": None, "error": "the build was interrupted"}
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


def _forked(zygote, job_path: Path, result_path: Path, timeout: float, started: float,
            on_child=None) -> dict | None:
    """The job's result from a child of ``zygote``; None if the zygote died (the caller falls back)."""
    from pipeline.zygote import ChildTimeout, ZygoteLost

    try:
        returncode = zygote.run(job_path, timeout, on_child)  # counted from the fork, not the import
    except ZygoteLost as exc:
        _Zygotes.fall_back(zygote.python, str(exc))
        return None
    except ChildTimeout:
        if not zygote.alive():
            _Zygotes.forget(zygote)
        return _timed_out(started, timeout)
    except BaseException:
        with _shielded():  # Ctrl-C or doit stopping: the child's group is dead; stop the zygote too
            _Zygotes.close_all(stopping=True)
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

    A conversion started ahead for the same job (:func:`start_ahead`) is
    collected instead of run again. Raises :class:`ConversionFailed` (after
    writing convert.json with the failure) when the toolkit did not produce a model.
    """
    pair = PairLayout.of(pair)
    pair.dir.mkdir(parents=True, exist_ok=True)
    job = make_job(model, target, resolved, pair, calibration)
    partial = Path(job["rknn_path"])
    with _terminate_as_interrupt():
        try:
            ahead = _Ahead.collect(job)
            pair.rknn.unlink(missing_ok=True)
            pair.accuracy.unlink(missing_ok=True)  # an analysis from an earlier build would mislead
            if ahead is None:
                files.remove_partials(pair.dir)  # left by a worker killed with its parent in an earlier run
            else:
                os.replace(ahead.log_path, pair.log)
            return _run_and_record(model, target, job, pair, ahead.result if ahead else None)
        except BaseException:
            # Interrupted or failed anywhere, even after the worker finished: no partial model stays.
            with _shielded():
                partial.unlink(missing_ok=True)
            raise


def _run_and_record(model: dict, target: str, job: dict, pair: PairLayout, first: dict | None = None) -> dict:
    """Run the worker (unless ``first`` is its result already), then turn its result and log into
    convert.json (and model.rknn, last)."""
    from pipeline import diagnostics

    log_path = pair.log
    result, tries = _run_with_retries(model, target, job, log_path, first)
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


def _run_with_retries(model: dict, target: str, job: dict, log_path: Path,
                      first: dict | None = None) -> tuple[dict, int]:
    """The worker's result, tried again after a crash where the toolkit is known to crash intermittently.

    ``platforms.UNSTABLE`` lists those builds (w8a16 on rk3562); anywhere else a crash is final,
    since retrying a deterministic abort only wastes minutes.
    """
    from pipeline import platforms

    allowed = platforms.attempts(target, model)
    for attempt in range(1, allowed + 1):
        if attempt == 1 and first is not None:
            result = first  # run ahead, already
        else:
            with _Ahead.slots().held():
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
