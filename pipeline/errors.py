"""The one exception base of the package, and its one translation into a doit failure.

Every error a user can act on (a bad manifest, a refused model, a failed
conversion, a broken cache entry) derives from :class:`PipelineError`, so the
doit actions need a single ``except`` and a new stage needs no new handler.
Programming errors (``KeyError``, ``TypeError``) are deliberately not caught:
they should surface with their traceback.
"""

from __future__ import annotations

from typing import Callable


class PipelineError(Exception):
    """An error whose message is written for the user (it names the model, target or manifest line)."""


class StaleRecord(PipelineError):
    """A record on disk was written by another version of the pipeline: rebuild instead of guessing."""


def as_task_failure(action: Callable[[], None], prefix: str = ""):
    """Run ``action``; a :class:`PipelineError` becomes doit's ``TaskFailed`` (message kept, ``prefix`` first).

    Returns ``None`` on success, which doit counts as success too.
    """
    from doit.exceptions import TaskFailed

    try:
        action()
    except PipelineError as exc:
        return TaskFailed(f"{prefix}{exc}")
    return None
