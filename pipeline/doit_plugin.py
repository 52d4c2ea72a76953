"""doit commands this package adds: ``doit rknn-status`` and ``doit rknn-report``.

Registered through the ``doit.COMMAND`` entry point (see pyproject.toml), so they
are available in any project whose dodo.py uses this package.

``rknn-status`` asks doit's own dependency manager, exactly as ``doit`` would
before running, and prints one row per model x target with the first stage
that would run and its reason in plain words. Exit code 0 when everything is
up to date, 1 otherwise.

``rknn-report`` writes build/report.html and build/report.md from whatever the
last build left, failures included, without running any task (the ``report``
task only runs once every model x target has exported).
"""

from __future__ import annotations

from doit.cmd_base import DoitCmdBase

STAGES = ("analyze", "resolve", "convert", "export")


def _reason(reasons: dict) -> str:
    """The first reason doit gives, in a few words."""
    if reasons.get("missing_target"):
        return f"missing {_short(reasons['missing_target'][0])}"
    if reasons.get("changed_file_dep"):
        return f"changed {_short(reasons['changed_file_dep'][0])}"
    if reasons.get("missing_file_dep"):
        return f"input missing: {_short(reasons['missing_file_dep'][0])}"
    if reasons.get("added_file_dep") or reasons.get("removed_file_dep"):
        return "inputs list changed"
    if reasons.get("uptodate_false"):
        return "manifest settings or toolkit version changed"
    if reasons.get("checker_changed"):
        return "file checker changed"
    return "never built"


def _short(path: str) -> str:
    parts = str(path).split("/")
    return "/".join(parts[-3:])


class StatusCommand(DoitCmdBase):
    """A table of every model x target: up to date, or the stage that would run and why."""

    name = "rknn-status"
    doc_purpose = "show which model x target pairs are up to date or stale, and why"
    doc_usage = ""
    doc_description = None
    cmd_options = ()

    def _execute(self, pos_args=None):
        tasks = {task.name: task for task in self.task_list}
        pairs = sorted({name.split(":", 1)[1] for name in tasks if name.startswith("convert:")})
        rows, stale = [], 0
        for pair in pairs:
            state, why = "up to date", ""
            for stage in STAGES:
                task = tasks.get(f"{stage}:{pair}")
                if task is None:
                    continue
                status = self.dep_manager.get_status(task, tasks)
                if status.status != "up-to-date":
                    state, why = f"stale ({stage})", _reason(status.reasons)
                    stale += 1
                    break
            rows.append((pair, state, why))
        width = max([len("model@target")] + [len(r[0]) for r in rows])
        self.outstream.write(f"{'model@target':{width}}  {'status':18}  reason\n")
        for pair, state, why in rows:
            self.outstream.write(f"{pair:{width}}  {state:18}  {why}\n")
        self.outstream.write(f"{len(rows) - stale} of {len(rows)} up to date\n")
        return 1 if stale else 0


class ReportCommand(DoitCmdBase):
    """Write the build report from what exists now, failed conversions included."""

    name = "rknn-report"
    doc_purpose = "write build/report.html and build/report.md from what exists, failures included"
    doc_usage = ""
    doc_description = None
    cmd_options = ()

    def _execute(self, pos_args=None):
        from pipeline import stages
        from pipeline.tasks import context

        from pipeline.errors import PipelineError

        manifest, layout = context()
        try:
            records = stages.report_records(manifest, layout)
            html, md = stages.write_report(manifest, layout)
        except PipelineError as exc:  # e.g. a record from another version: say so, no traceback
            self.outstream.write(f"rknn-report: {exc}\n")
            return 1
        failed = sum(1 for record in records if record.get("status") != "ok")
        self.outstream.write(f"report  {html}  {md}  ({len(records) - failed} ok, {failed} failed or not built)\n")
        return 0
