"""Zygote: a process that imports the toolkit once and forks a fresh child for each conversion.

Importing rknn-toolkit2 takes seconds (it pulls in torch); building a small
model takes a fraction of one. A fresh process per conversion pays the import
every time. The zygote pays it once per build slot: it is started as
``python -m pipeline.zygote BUILD_DIR`` (one per worker interpreter, per build,
per doit task process), imports ``rknn.api`` and then, for each job, forks a
child that is exactly what a fresh worker would be after its import: it gets
its own session (so a timeout kills its whole group), dies with the zygote
(which dies with the build), points fds 1 and 2 at the job's ``convert.log``
(the toolkit's C++ layer table included), runs :func:`pipeline.worker.run` and
writes the result atomically before ``os._exit``. The child's memory is the
zygote's, copy-on-write, so a crash or leak in one conversion cannot reach the
next one.

Protocol on the zygote's stdin/stdout, one JSON object per line::

    zygote -> parent   {"ready": PID}            after the import (or {"error": ...} and exit)
    parent -> zygote   {"job": "/path/job.json", "id": N}
    zygote -> parent   {"child": PID, "id": N}   right after the fork
    zygote -> parent   {"exit": PID, "id": N, "returncode": C}   negative C: killed by signal -C

Several jobs may be running at once; ``id`` pairs each answer with its request.

The parent side is :class:`Zygote`; the policy (when to fall back to a fresh
process per conversion) is in :mod:`pipeline.conversion`.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (run in the child, before exec or work).

    Workers run in their own session (so a timeout can kill their whole group),
    which hides them from a Ctrl-C sent to doit's process group; this keeps an
    orphan from converting on with nobody listening.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux/glibc: the parent's own cleanup still applies
        pass


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


IMPORT_TIMEOUT = 600.0  # seconds; the import takes 2-4 s on two cores, far longer only if something is wrong


class ZygoteLost(RuntimeError):
    """The zygote exited or stopped answering: the caller falls back to a fresh process."""


class ChildTimeout(Exception):
    """The deadline passed; the child's group (or a zygote still importing) was killed."""


class Zygote:
    """The parent's handle on one zygote process, shared by the threads of the process that started it.

    Several conversions may run from one zygote at once (see
    :mod:`pipeline.conversion`: conversions started ahead of their task): each
    request carries an id, and a reader thread hands every answer to the
    request it belongs to. ``owner`` is the pid that started it: a process
    forked from the owner (doit's task processes) must start its own instead of
    writing into the same pipe.
    """

    def __init__(self, python: str, build_dir: Path):
        self.python = python
        self.build_dir = str(build_dir)
        self.owner = os.getpid()
        self.ready = False
        self.lost: str | None = None  # why the zygote is gone, once it is
        self._answers: dict[int, list[dict]] = {}
        self._next_id = 0
        self._changed = threading.Condition()
        from pipeline.toolkit_envs import worker_environment

        env = worker_environment(python)
        self.proc = subprocess.Popen([python, "-m", "pipeline.zygote", self.build_dir],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, start_new_session=True, preexec_fn=die_with_parent)
        self._error: str | None = None
        threading.Thread(target=self._read_answers, name=f"zygote-{self.pid}", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None and self.lost is None

    def wait_ready(self, deadline: float) -> bool:
        """Wait until the toolkit is imported; False if it died or the deadline passed first."""
        with self._changed:
            try:
                return self._wait(lambda: self.ready, deadline)
            except ZygoteLost:
                return False

    def run(self, job_path: Path, timeout: float, on_child=None) -> int:
        """Fork a child for ``job_path`` and wait for it; its return code (negative: a signal).

        ``timeout`` counts from the fork: the toolkit's import is the build's
        cost, not the job's (other jobs may be waiting on the same import). An
        import still running after ``timeout`` (or :data:`IMPORT_TIMEOUT`) is
        hung: the zygote is stopped and the job times out. ``on_child(pid)`` is
        called once the child exists (so a caller can kill it). Raises
        :class:`ChildTimeout` after killing the child's group (or the zygote),
        and :class:`ZygoteLost` if the zygote died. On any other exception
        (Ctrl-C) the child's group is killed before it propagates.
        """
        with self._changed:
            if not self._wait(lambda: self.ready, time.monotonic() + min(timeout, IMPORT_TIMEOUT)):
                self.close()
                raise ChildTimeout()
            deadline = time.monotonic() + timeout
            request = self._next_id = self._next_id + 1
            self._answers[request] = []
            try:
                self.proc.stdin.write(json.dumps({"job": str(job_path), "id": request}).encode() + b"\n")
                self.proc.stdin.flush()
            except (OSError, ValueError) as exc:
                self._lose(f"the conversion zygote (pid {self.pid}) stopped reading ({exc})")
                raise ZygoteLost(self.lost) from exc
            try:
                if not self._wait(lambda: self._answers[request], deadline):
                    self.close()  # it did not even fork in time: of no further use
                    raise ChildTimeout()
                child = self._answers[request].pop(0)["child"]
                if on_child is not None:
                    on_child(child)
                try:
                    if not self._wait(lambda: self._answers[request], deadline):
                        kill_group(child)
                        # the zygote reaps it and says so; if it does not, it is of no further use
                        if not self._wait(lambda: self._answers[request], time.monotonic() + 10):
                            self.close()
                        raise ChildTimeout()
                except ZygoteLost:
                    raise
                except BaseException:  # Ctrl-C: the child's group goes first
                    kill_group(child)
                    raise
                return int(self._answers[request].pop(0)["returncode"])
            finally:
                self._answers.pop(request, None)

    def _wait(self, answered, deadline: float) -> bool:
        """Wait (holding the condition) until ``answered()``; False at the deadline, ZygoteLost if it died."""
        while not answered():
            if self.lost is not None:
                raise ZygoteLost(self.lost)
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.wait(min(left, 1.0))
        return True

    def _read_answers(self) -> None:
        """The reader thread: route each protocol line to its request; on EOF, record why the zygote died."""
        stream = self.proc.stdout
        try:
            for line in iter(stream.readline, b""):
                message = json.loads(line)
                with self._changed:
                    if "ready" in message:
                        self.ready = True
                    elif "error" in message:
                        self._error = message["error"]
                    elif message.get("id") in self._answers:
                        self._answers[message["id"]].append(message)
                    self._changed.notify_all()
        except (OSError, ValueError):  # closed under us by close()
            pass
        self._lose(self.obituary())

    def _lose(self, why: str) -> None:
        with self._changed:
            if self.lost is None:
                self.lost = why
            self._changed.notify_all()

    def obituary(self) -> str:
        """Why this zygote is gone, in a few words: its own last message if it sent one, else its exit status."""
        code = self.proc.wait()
        how = (f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}")
        when = "" if self.ready else " before it was ready"
        last = f": {self._error}" if self._error else ""
        return f"the conversion zygote (pid {self.pid}) {how}{when}{last}"

    def close(self) -> None:
        """Stop the zygote and anything it forked (they die with it)."""
        if self.owner != os.getpid():  # an inherited handle: the owner process stops it
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            return
        kill_group(self.proc.pid)
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait()
        self._lose(f"the conversion zygote (pid {self.pid}) was stopped")


# -- the zygote process ----------------------------------------------------------------------------


def _reply(fd: int, message: dict) -> None:
    os.write(fd, json.dumps(message).encode() + b"\n")


def _child(job_path: str, zygote: int, inherited: tuple[int, ...]) -> None:
    """In the forked child: become a worker of its own, run the job, never return into the zygote's loop."""
    code = 70
    try:
        os.setsid()
        die_with_parent()
        if os.getppid() != zygote:  # the zygote died between fork and prctl
            os._exit(code)
        signal.set_wakeup_fd(-1)
        for fd in inherited:
            os.close(fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        from pipeline import worker

        code = worker.main([job_path])
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


# What a conversion imports on first use, beyond ``rknn.api``: a child starts from the zygote's
# memory, so whatever it imports it imports again, every time. Measured with rknn-toolkit2 2.5.0: the
# first build in a process imports onnxruntime and pkg_resources (0.16 s for a tiny model, against
# 0.03 s once they are loaded); verify adds onnx.utils and onnxruntime; the worker's own modules follow.
WARM_MODULES = ("onnxruntime", "pkg_resources", "onnx.utils", "numpy", "yaml",
                "pipeline.toolkit", "pipeline.worker", "pipeline.verify")


def _warm_up() -> None:
    """Import :data:`WARM_MODULES` (imports only: nothing that starts a thread or touches the toolkit's
    state runs before a fork). A module that is missing in this environment is skipped."""
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pkg_resources announces its deprecation
        for name in WARM_MODULES:
            try:
                importlib.import_module(name)
            except Exception:  # an older toolkit's environment may lack one: the child imports what it needs
                pass


def main(argv: list[str]) -> int:
    # The protocol moves off fds 0/1 first, so nothing the toolkit prints can corrupt it.
    requests, replies = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the build stops us (EOF, kill, or its death)
    try:
        import rknn.api  # noqa: F401  (the point of the zygote: paid once)
    except BaseException as exc:
        _reply(replies, {"error": f"cannot import the toolkit: {type(exc).__name__}: {exc}"})
        return 1
    _warm_up()
    # Every object imported so far is shared with the children copy-on-write. A garbage collection in a
    # child would walk them all and write to each one's header, copying the whole heap page by page;
    # frozen, the collector ignores them (gc.freeze exists for exactly this).
    gc.collect()
    gc.freeze()
    _reply(replies, {"ready": os.getpid()})
    _serve(requests, replies)
    return 0


def _serve(requests: int, replies: int) -> None:
    """Fork a child per request line, several at once, and report each exit as it happens.

    SIGCHLD wakes the loop through a pipe (``signal.set_wakeup_fd``), so the
    zygote sleeps in ``select`` between events instead of polling. EOF on the
    requests means the build is over: the zygote returns, and any child still
    running dies with it (``die_with_parent``).
    """
    wake_read, wake_write = os.pipe()
    for fd in (wake_read, wake_write):
        os.set_blocking(fd, False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # a handler, so the wakeup fd is written
    signal.set_wakeup_fd(wake_write)
    me = os.getpid()
    children: dict[int, int] = {}  # pid -> request id
    pending = b""
    while True:
        readable, _, _ = select.select([requests, wake_read], [], [])
        if wake_read in readable:
            try:
                while os.read(wake_read, 512):
                    pass
            except BlockingIOError:
                pass
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            request = children.pop(pid, None)
            _reply(replies, {"exit": pid, "id": request, "returncode": os.waitstatus_to_exitcode(status)})
        if requests in readable:
            chunk = os.read(requests, 65536)
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                message = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(message["job"], me, (requests, replies, wake_read, wake_write))
                children[pid] = message.get("id")
                _reply(replies, {"child": pid, "id": message.get("id")})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
