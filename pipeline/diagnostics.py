"""Explain toolkit log lines (initial version; to be replaced by the data-driven table)."""

from __future__ import annotations

import re

_ERROR = re.compile(r"^(?:\x1b\[[0-9;]*m)?E(?:\x1b\[[0-9;]*m)? ")


def error_lines(log_text: str) -> list[str]:
    return [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in log_text.splitlines() if _ERROR.match(line)]


def explain_log(log_text: str) -> list[dict]:
    return []
