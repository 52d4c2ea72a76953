"""Nearest-name suggestions ("did you mean"), one implementation for every message that offers them."""

from __future__ import annotations

import difflib
from typing import Iterable


def nearest(name: str, candidates: Iterable[str], limit: int = 1, cutoff: float = 0.6,
            fallback: bool = False) -> list[str]:
    """Up to ``limit`` of ``candidates`` that resemble ``name``, best first.

    With ``fallback``, the first ``limit`` candidates when none resembles it
    (a list to choose from beats an empty hint).
    """
    pool = list(candidates)
    close = difflib.get_close_matches(name or "", pool, n=limit, cutoff=cutoff)
    return close or (pool[:limit] if fallback else [])
