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
    parent -> zygote   {"job": "/path/job.json"}
    zygote -> parent   {"child": PID}            right after the fork
    zygote -> parent   {"exit": PID, "returncode": N}   negative N: killed by signal -N

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


class ZygoteLost(RuntimeError):
    """The zygote exited or stopped answering: the caller falls back to a fresh process."""


class ChildTimeout(Exception):
    """The deadline passed; the child's group (or a zygote still importing) was killed."""


class Zygote:
    """The parent's handle on one zygote process (one job at a time; not shared across processes).

    ``owner`` is the pid that started it: a process forked from the owner (doit's
    task processes) must start its own instead of writing into the same pipe.
    """

    def __init__(self, python: str, build_dir: Path):
        self.python = python
        self.build_dir = str(build_dir)
        self.owner = os.getpid()
        self.ready = False
        self._buffer = b""
        from pipeline.toolkit_envs import worker_environment

        env = worker_environment(python)
        self.proc = subprocess.Popen([python, "-m", "pipeline.zygote", self.build_dir],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, start_new_session=True, preexec_fn=die_with_parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, job_path: Path, deadline: float) -> int:
        """Fork a child for ``job_path`` and wait for it; its return code (negative: a signal).

        Raises :class:`ChildTimeout` at ``deadline`` (after killing the child's
        group, or the zygote if it was still importing) and :class:`ZygoteLost`
        if the zygote died. On any other exception (Ctrl-C) the child's group is
        killed before it propagates.
        """
        if not self.ready:
            message = self._read(deadline, on_timeout=self.close)
            if "ready" not in message:
                self.close()
                raise ZygoteLost(f"the conversion zygote (pid {self.pid}) did not start: "
                                 f"{message.get('error') or message}")
            self.ready = True
        try:
            self.proc.stdin.write(json.dumps({"job": str(job_path)}).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as exc:
            self.close()
            raise ZygoteLost(f"the conversion zygote (pid {self.pid}) stopped reading ({exc})") from exc
        child = self._read(deadline, on_timeout=self.close).get("child")
        if not child:
            self.close()
            raise ZygoteLost(f"the conversion zygote (pid {self.pid}) did not fork")
        try:
            answer = self._read(deadline, on_timeout=lambda: kill_group(child))
        except ChildTimeout:
            try:  # the zygote reaps it and says so; if it does not, it is of no further use
                self._read(time.monotonic() + 10, on_timeout=self.close)
            except (ChildTimeout, ZygoteLost):
                self.close()
            raise
        except BaseException:  # Ctrl-C, or the zygote died (the child dies with it; make sure)
            kill_group(child)
            raise
        return int(answer["returncode"])

    def _read(self, deadline: float, on_timeout) -> dict:
        """The next protocol line before ``deadline``; ``on_timeout`` runs before ChildTimeout is raised."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                on_timeout()
                raise ChildTimeout()
            readable, _, _ = select.select([fd], [], [], left)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise ZygoteLost(self.obituary())
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def obituary(self) -> str:
        """Why this zygote is gone, in a few words: its own last message if it sent one, else its exit status."""
        code = self.proc.wait()
        try:
            lines = (self._buffer + self.proc.stdout.read()).splitlines()
        except (OSError, ValueError):
            lines = []
        errors = [json.loads(line).get("error") for line in lines if line.startswith(b"{")]
        how = (f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}")
        when = "" if self.ready else " before it was ready"
        last = f": {errors[-1]}" if errors and errors[-1] else ""
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
        self.proc.stdout.close()
        self.proc.wait()


# -- the zygote process ----------------------------------------------------------------------------


def _reply(fd: int, message: dict) -> None:
    os.write(fd, json.dumps(message).encode() + b"\n")


def _child(job_path: str, zygote: int, channel: tuple[int, int]) -> None:
    """In the forked child: become a worker of its own, run the job, never return into the zygote's loop."""
    code = 70
    try:
        os.setsid()
        die_with_parent()
        if os.getppid() != zygote:  # the zygote died between fork and prctl
            os._exit(code)
        for fd in channel:
            os.close(fd)
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
    me = os.getpid()
    with os.fdopen(requests, "rb", buffering=0) as stream:
        for line in iter(stream.readline, b""):
            job_path = json.loads(line)["job"]
            pid = os.fork()
            if pid == 0:
                _child(job_path, me, (requests, replies))
            _reply(replies, {"child": pid})
            _, status = os.waitpid(pid, 0)
            _reply(replies, {"exit": pid, "returncode": os.waitstatus_to_exitcode(status)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
