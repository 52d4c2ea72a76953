"""The manifest's JSON Schema as data: where it is and its parsed document.

A leaf module, so that modules the manifest check calls (the runtime gate, the
override actions) can read the schema without importing the manifest.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path


def schema_file() -> Path:
    here = Path(__file__).resolve().parent
    installed = here / "_schema" / "models.schema.json"
    return installed if installed.exists() else here.parent / "schema" / "models.schema.json"


@functools.lru_cache(maxsize=1)
def load() -> dict:
    return json.loads(schema_file().read_text(encoding="utf-8"))
