"""benchmarks/run.py end to end in its --tiny configuration: every section, numbers that parse.

Timings are never asserted: they belong in the benchmark's output, not in pass/fail.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "run.py"
DOCS = REPO / "docs" / "benchmarks.md"
SECTIONS = ("1 cold build", "2 no-op rebuild", "3 one changed", "4 parallel", "5 cache restore", "6 scale",
            "7 large model", "8 worker model")
HEADER = ["section", "measurement", "unit", "median", "min", "max", "runs"]


def table_rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row after the header and separator lines."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]
    assert rows[0] == HEADER
    assert set("".join(rows[1])) <= set("- ")
    return rows[2:]


@pytest.mark.toolkit
def test_tiny_benchmark_reports_every_section(tmp_path):
    out = tmp_path / "b.md"
    docs_before = DOCS.read_bytes() if DOCS.exists() else None
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    document = out.read_text()
    rows = table_rows(document)
    assert table_rows(proc.stdout) == rows  # the printed table is the written one
    assert {row[0] for row in rows} == set(SECTIONS)
    for row in rows:
        assert len(row) == len(HEADER), row
        assert row[1] and row[2] in ("s", "x", "MiB"), row
        values = [float(cell) for cell in row[3:6]]
        assert all(math.isfinite(value) for value in values), row
        assert int(row[6]) >= 1, row
    for section in SECTIONS:
        assert f"**{section}**" in document  # each section says what it measured
    for needle in ("rknn-toolkit2", "onnxruntime", "doit", "python", "cores"):
        assert needle in document

    assert (DOCS.read_bytes() if DOCS.exists() else None) == docs_before  # --tiny never rewrites the docs
