"""doit's console output for model x target builds: quiet when nothing happens, progress while it works.

doit's own console reporter prints a line per task, so a no-op build of 200
pairs is 800 lines of ``-- analyze:...``. This reporter (``rknn``, the default
in ``DOIT_CONFIG``; registered through the ``doit.REPORTER`` entry point, see
pyproject.toml) prints:

- nothing for an up-to-date task, and one line for a build that did nothing:
  ``200 model x target pairs up to date``;
- a start line per conversion with its place in the queue and an estimate from
  the duration recorded in that pair's last convert.json (else the median of the
  recorded ones): ``[3/11] convert det@rk3588 (about 40 s)``;
- the tasks' own result lines (analyze, resolve, convert verdict, export, ...),
  as doit shows task output at verbosity 2; at ``-v 0``/``-v 1``, where doit
  captures that output, a ``.  task`` line as doit's reporter does;
- failures as doit's reporter does, then a final line with the totals:
  ``11 conversions: 8 converted, 2 restored from the cache, 1 failed; 189 pairs up to date; 2 min 3 s``.

``doit --reporter console`` gives doit's own output back.
"""

from __future__ import annotations

import statistics
import sys
import time

from doit.reporter import ConsoleReporter

STAGES = ("analyze", "resolve", "convert")  # a pair whose any of these is stale will convert


def _pair(task_name: str) -> tuple[str, str] | None:
    stage, _, pair = task_name.partition(":")
    if stage != "convert" or "@" not in pair:
        return None
    name, _, target = pair.rpartition("@")
    return name, target


def planned(tasks, selected: list[str]) -> set[str]:
    """The tasks doit will consider for ``selected``: the selection and, transitively, its task
    dependencies and the tasks whose targets it has as file dependencies (doit's own rule)."""
    producers = {target: task.name for task in tasks.values() for target in task.targets}
    seen: set[str] = set()
    stack = list(selected)
    while stack:
        name = stack.pop()
        task = tasks.get(name)
        if task is None or name in seen:
            continue
        seen.add(name)
        stack.extend(task.task_dep)
        stack.extend(task.setup_tasks)
        stack.extend(producers[path] for path in task.file_dep if path in producers)
    return seen


def shown_verbosity(argv: list[str], default: int = 2) -> int:
    """The ``-v``/``--verbosity`` doit was given (doit hands its reporter no verbosity of its own)."""
    value = None
    for index, arg in enumerate(argv):
        if arg in ("-v", "--verbosity") and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith("--verbosity="):
            value = arg.partition("=")[2]
        elif arg.startswith("-v") and arg[2:].isdigit():
            value = arg[2:]
    return int(value) if value is not None and value.isdigit() else default


def duration_text(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


class PairReporter(ConsoleReporter):
    """Counts conversions instead of listing tasks; see the module docstring for what it prints."""

    desc = "rknn-pipeline: one line per conversion with progress, a summary line, quiet when up to date"

    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        self.started = time.monotonic()
        self.expected = 0  # conversions expected to run (stale pairs), adjusted as doit decides
        self.pending: set[str] = set()
        self.index = 0
        self.estimates: dict[str, float] = {}
        self.converted = self.restored = self.failed = self.up_to_date = 0
        self.executed = 0
        from pipeline.tasks import DOIT_CONFIG

        self.verbosity = shown_verbosity(sys.argv[1:], DOIT_CONFIG.get("verbosity", 2))

    # -- before the run ------------------------------------------------------------------
    def initialize(self, tasks, selected_tasks):
        converts = [name for name in planned(tasks, selected_tasks or []) if _pair(name)]
        self.pending = {name for name in converts if self._stale(tasks, name)}
        self.expected = len(self.pending)
        if self.pending:
            self.estimates = self._recorded_seconds(converts)
        # The pairs this run will convert, for the conversions started ahead (pipeline.conversion).
        from pipeline.conversion import expect_conversions

        expect_conversions(_pair(name) for name in self.pending)

    @staticmethod
    def _stale(tasks, convert_name: str) -> bool:
        """Whether any stage of the pair is out of date, asked of doit's own dependency manager."""
        from doit.globals import Globals

        manager = Globals.dep_manager
        if manager is None:
            return True
        pair = convert_name.partition(":")[2]
        for stage in STAGES:
            task = tasks.get(f"{stage}:{pair}")
            if task is not None and manager.get_status(task, tasks).status != "up-to-date":
                return True
        return False

    @staticmethod
    def _recorded_seconds(converts: list[str]) -> dict[str, float]:
        """Each pair's last recorded conversion time, from the convert.json files already there."""
        try:
            from pipeline import files
            from pipeline.tasks import context

            _, layout = context()
        except (Exception, SystemExit):  # no manifest: no estimates, the build reports why
            return {}
        found = {}
        for name in converts:
            model, target = _pair(name)
            record = files.read_json(layout.convert_record(model, target)) or {}
            seconds = record.get("seconds")
            if isinstance(seconds, (int, float)) and not (record.get("cache") or {}).get("hit"):
                found[name] = float(seconds)
        return found

    def _estimate(self, name: str) -> str:
        seconds = self.estimates.get(name)
        if seconds is None and self.estimates:
            seconds = statistics.median(self.estimates.values())
        return f" (about {duration_text(seconds)})" if seconds is not None else ""

    # -- during the run ------------------------------------------------------------------
    def execute_task(self, task):
        if not task.actions or task.name.startswith("_"):
            return  # group tasks (analyze, convert, ...) "run" without doing anything
        if _pair(task.name):
            self.index += 1
            self.expected = max(self.expected, self.index)
            name, target = _pair(task.name)
            self.write(f"[{self.index}/{self.expected}] convert {name}@{target}{self._estimate(task.name)}\n")
        else:
            self.executed += 1
            if self.verbosity < 2:
                self.write(f".  {task.title()}\n")  # doit captures the task's own line at this verbosity
        self.outstream.flush()

    def skip_uptodate(self, task):
        if _pair(task.name):
            self.up_to_date += 1
            if task.name in self.pending:  # an upstream rerun produced the same inputs
                self.pending.discard(task.name)
                self.expected = max(self.expected - 1, self.index)

    def add_success(self, task):
        if _pair(task.name):
            if self._restored(task.name):
                self.restored += 1
            else:
                self.converted += 1

    def add_failure(self, task, fail):
        if _pair(task.name):
            self.failed += 1
        super().add_failure(task, fail)

    @staticmethod
    def _restored(name: str) -> bool:
        try:
            from pipeline import files
            from pipeline.tasks import context

            _, layout = context()
        except (Exception, SystemExit):
            return False
        record = files.read_json(layout.convert_record(*_pair(name))) or {}
        return bool((record.get("cache") or {}).get("hit"))

    # -- after the run -------------------------------------------------------------------
    def complete_run(self):
        super().complete_run()
        self.write(self.summary() + "\n")

    def summary(self) -> str:
        ran = self.converted + self.restored + self.failed
        pairs = ran + self.up_to_date
        if not ran and not self.failures and not self.runtime_errors:
            text = f"{pairs} model x target pair{'s' if pairs != 1 else ''} up to date" if pairs else "no conversion"
            if self.executed:  # an export, lock or report redone without any conversion
                text += f"; {self.executed} other task{'s' if self.executed != 1 else ''} run"
            return text
        parts = [f"{self.converted} converted", f"{self.restored} restored from the cache", f"{self.failed} failed"]
        text = f"{ran} conversion{'s' if ran != 1 else ''}: {', '.join(parts)}"
        if self.up_to_date:
            text += f"; {self.up_to_date} pair{'s' if self.up_to_date != 1 else ''} up to date"
        return f"{text}; {duration_text(time.monotonic() - self.started)}"
