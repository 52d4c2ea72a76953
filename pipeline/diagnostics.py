"""Explain rknn-toolkit2 log lines in plain language, with the manifest key that fixes them.

Why: a conversion log runs to thousands of lines. The one line that matters is
easy to miss, and some lines look fatal without being so (the compiler prints
``E RKNN: ... Unkown op target: 0`` during successful builds). What each
message means is kept as data in ``pipeline/data/diagnostics.yaml``, so
covering a new toolkit message is one table entry, not code.

What this module relies on in the toolkit's (2.5.0) output:

* Python-side messages are coloured, ``ESC[1;31mE ESC[0m ESC[1;31mbuild: text ESC[0m``,
  and may run over several lines (a traceback, a note) until the colour is reset.
* Compiler messages are plain single lines, ``E RKNN: [hh:mm:ss.mmm] text``.
* After a failed step the toolkit repeats its error as a traceback whose last
  line is ``ValueError: text``; that repeat is not counted twice.

Only warning and error messages are explained; progress bars, the layer table
and the worker's own traceback are ignored.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

DEFAULT_TABLE = Path(__file__).parent / "data" / "diagnostics.yaml"
LEVELS = ("info", "warning", "error")
UNKNOWN_ID = "unknown-error"

# Entry key -> required type; every key is required and no other is allowed.
_FIELDS: dict[str, type] = {
    "id": str,
    "pattern": str,
    "level": str,
    "benign": bool,
    "explanation": str,
    "fix": str,
    "manifest_keys": list,
}
_ID = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RESETS = ("\x1b[0m", "\x1b[m")
_PREFIX = re.compile(r"(?P<level>[DIWE]) (?:RKNN: )?(?:\[\d\d:\d\d:\d\d\.\d+\] )?")
_COLOURED_START = re.compile(r"(?<=.)(?=\x1b\[[0-9;]*m[DIWE]\x1b\[0m )")  # not at line start
_TIMESTAMP = re.compile(r"\[\d\d:\d\d:\d\d\.\d+\] ")
_LEADING_NAME = re.compile(r"[\w.]+: ")  # a step ("build: ") or an exception ("ValueError: ")
_TRACEBACK = "Traceback (most recent call last):"
_EXPLAINED_LEVELS = ("W", "E")


# --- the table ---------------------------------------------------------------------------


def load_table(path: str | Path | None = None) -> list[dict]:
    """The diagnostics table (validated, cached per file); a copy the caller may change."""
    return [copy.deepcopy(entry) for entry, _ in _compiled_table(_table_path(path))]


def _table_path(path: str | Path | None) -> str:
    return str(Path(path or DEFAULT_TABLE).resolve())


@functools.cache
def _compiled_table(path: str) -> tuple[tuple[dict, re.Pattern], ...]:
    try:
        entries = yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise ValueError(f"diagnostics table {path}: not valid YAML: {exc}") from exc
    if not isinstance(entries, list):
        raise ValueError(f"diagnostics table {path}: expected a list of entries")
    ids: set[str] = set()
    return tuple((entry, _validate(entry, f"diagnostics table {path}: entry {index}", ids))
                 for index, entry in enumerate(entries, start=1))


def _validate(entry, where: str, ids: set[str]) -> re.Pattern:
    """Check one entry (``ids`` collects the ids seen so far); return its compiled pattern."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(entry).__name__}")
    if isinstance(entry.get("id"), str):
        where = f"{where} ({entry['id']!r})"
    unknown = sorted(set(entry) - set(_FIELDS), key=str)
    missing = [key for key in _FIELDS if key not in entry]
    if unknown or missing:
        raise ValueError(f"{where}: unknown keys {unknown}, missing keys {missing}")
    for key, kind in _FIELDS.items():
        if not isinstance(entry[key], kind):
            raise ValueError(f"{where}: '{key}' must be a {kind.__name__}")
    _check_values(entry, where, ids)
    try:
        return re.compile(entry["pattern"])
    except re.error as exc:
        raise ValueError(f"{where}: bad pattern {entry['pattern']!r}: {exc}") from exc


def _check_values(entry: dict, where: str, ids: set[str]) -> None:
    if not _ID.fullmatch(entry["id"]) or entry["id"] == UNKNOWN_ID:
        raise ValueError(f"{where}: id must be lower-case words joined by '-' and not '{UNKNOWN_ID}'")
    if entry["id"] in ids:
        raise ValueError(f"{where}: duplicate id")
    ids.add(entry["id"])
    if entry["level"] not in LEVELS:
        raise ValueError(f"{where}: level must be one of {list(LEVELS)}")
    if entry["benign"] and entry["level"] == "error":
        raise ValueError(f"{where}: a benign entry cannot have level error")
    if not entry["explanation"].strip() or not entry["fix"].strip():
        raise ValueError(f"{where}: explanation and fix must not be empty")
    if not all(isinstance(key, str) and key for key in entry["manifest_keys"]):
        raise ValueError(f"{where}: manifest_keys must be non-empty strings")


# --- reading the log ---------------------------------------------------------------------


@dataclass
class _Message:
    level: str
    line: str  # first line, colours removed, prefix kept: how error_lines quotes it
    lines: list[str]  # colours and prefix removed
    open: bool  # its colour is still on, so the next lines belong to it


def _messages(log_text: str) -> list[_Message]:
    """The toolkit's messages, in order, each with its continuation lines."""
    messages: list[_Message] = []
    current: _Message | None = None
    for raw in _raw_lines(log_text):
        line = _ANSI.sub("", raw)
        start = _PREFIX.match(line)
        starts_coloured = bool(start) and raw.startswith("\x1b")
        if current is not None and current.open and not starts_coloured:
            current.lines.append(line)
            current.open = _colour_open(raw, current.open)
        elif start:
            current = _Message(start["level"], line.strip(), [line[start.end():].strip()],
                               _colour_open(raw, False))
            messages.append(current)
        else:
            current = None
    return messages


def _raw_lines(log_text: str) -> list[str]:
    """Log lines, with a coloured message glued to a progress bar split off onto its own line."""
    return [piece for line in log_text.splitlines() for piece in _COLOURED_START.split(line)]


def _colour_open(raw: str, before: bool) -> bool:
    """Whether a colour is still on at the end of ``raw`` (``before``: on at its start)."""
    codes = _ANSI.findall(raw)
    return codes[-1] not in _RESETS if codes else before


def _texts(message: _Message, seen: set[str]) -> list[str]:
    """The lines of ``message`` the table is matched against.

    A traceback message contributes its exception lines, minus the ones that
    repeat a message already printed (``seen`` holds those, normalised).
    """
    head, *rest = message.lines
    texts = [line.strip() for line in rest if line.strip() and not line[0].isspace()]
    if head.endswith(_TRACEBACK):
        return [text for text in texts if _normalised(text) not in seen]
    return [head, *texts]


def _normalised(text: str) -> str:
    return _LEADING_NAME.sub("", _TIMESTAMP.sub("", text), count=1)


# --- the two entry points ----------------------------------------------------------------


def error_lines(log_text: str) -> list[str]:
    """Every toolkit error line, colours removed, otherwise verbatim; repeats dropped, in order."""
    lines: dict[str, str] = {}
    for message in _messages(log_text):
        if message.level == "E":
            lines.setdefault(_TIMESTAMP.sub("", message.line), message.line)
    return list(lines.values())


def explain_log(log_text: str, table: str | Path | None = None) -> list[dict]:
    """One item per table entry the log matches, plus one per unexplained error, in log order.

    Table items carry the entry's ``id``, ``level``, ``benign``, ``explanation`` and
    ``fix``, the ``count`` of messages it matched and the first matching line as
    ``example``; unexplained errors are quoted verbatim under ``id`` "unknown-error".
    """
    rows = _compiled_table(_table_path(table))
    items: dict[str, dict] = {}
    seen: set[str] = set()
    for message in _messages(log_text):
        if message.level not in _EXPLAINED_LEVELS:
            continue
        texts = _texts(message, seen)
        seen.update(_normalised(text) for text in texts)
        hits = _hits(rows, texts)
        for entry, text in hits:
            items.setdefault(entry["id"], _table_item(entry, text))["count"] += 1
        if message.level == "E" and texts and not hits:
            example = message.line if texts[0] == message.lines[0] else texts[-1]
            items.setdefault(f"{UNKNOWN_ID}:{_normalised(example)}", _unknown_item(example))["count"] += 1
    return list(items.values())


def _hits(rows: tuple[tuple[dict, re.Pattern], ...], texts: list[str]) -> list[tuple[dict, str]]:
    """(entry, line) for the first entry matching each line; each entry once."""
    hits: dict[str, tuple[dict, str]] = {}
    for text in texts:
        entry = next((entry for entry, pattern in rows if pattern.search(text)), None)
        if entry is not None:
            hits.setdefault(entry["id"], (entry, text))
    return list(hits.values())


def _table_item(entry: dict, example: str) -> dict:
    return {"id": entry["id"], "level": entry["level"], "benign": entry["benign"],
            "explanation": entry["explanation"].strip(), "fix": entry["fix"].strip(),
            "count": 0, "example": example}


def _unknown_item(example: str) -> dict:
    return {"id": UNKNOWN_ID, "level": "error", "benign": False,
            "explanation": "unexplained toolkit error", "fix": "see convert.log",
            "count": 0, "example": example}
