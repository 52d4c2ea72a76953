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
            "7 large model", "8 worker model", "9 shapes", "10 repair", "11 shards",
            "12 shared cache", "13 toolkit versions")
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
        assert row[1] and row[2] in ("s", "x", "MiB", "KB", "cos", "layers"), row
        values = [float(cell) for cell in row[3:6]]
        assert all(math.isfinite(value) for value in values), row
        assert int(row[6]) >= 1, row
    for section in SECTIONS:
        assert f"**{section}**" in document  # each section says what it measured
    for needle in ("rknn-toolkit2", "onnxruntime", "doit", "python", "cores"):
        assert needle in document

    assert (DOCS.read_bytes() if DOCS.exists() else None) == docs_before  # --tiny never rewrites the docs


def test_only_refreshes_its_sections_rows_and_notes():
    sys.path.insert(0, str(SCRIPT.parent))
    import run

    def document(rows: list[tuple[str, str]], notes: list[str]) -> str:
        table = run.render_table([run.Row(section, name, "s", [value]) for section, name, value in rows])
        return "# Benchmarks\n\nheader\n\n" + table + "\n\n## What each section measures\n\n" + \
            "".join(f"- **{note}**: about it\n" for note in notes)

    full = document([("1 cold build", "a", 1.0), ("7 large model", "b", 2.0), ("9 shapes", "c", 3.0)],
                    ["1 cold build", "7 large model", "9 shapes"])
    only = document([("9 shapes", "c", 4.0), ("9 shapes", "d", 5.0)], ["9 shapes"])
    merged = run.merge_document(full, only, {"9 shapes"})
    rows = table_rows(merged)
    assert [(row[0], row[1], row[3]) for row in rows] == [("1 cold build", "a", "1"), ("7 large model", "b", "2"),
                                                          ("9 shapes", "c", "4"), ("9 shapes", "d", "5")]
    assert merged.count("- **9 shapes**") == 1 and "`9 shapes`" in merged.splitlines()[-1]
    assert run.merge_document(merged, only, {"9 shapes"}) == merged


def test_only_takes_a_comma_separated_list_and_refuses_unknown_sections():
    sys.path.insert(0, str(SCRIPT.parent))
    import run

    assert run.selected_sections(["4 parallel, 7 large model", "9 shapes"]) == {"4 parallel", "7 large model",
                                                                                 "9 shapes"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--only", "4 parallel,7 larg model"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "'7 larg model'" in proc.stderr, proc.stderr
    assert set(run.NEEDS_BUILD) <= set(run.SECTIONS)


def test_readme_figures_are_the_ones_in_docs_benchmarks():
    """Every benchmark number in README.md is a marked span written from docs/benchmarks.md."""
    sys.path.insert(0, str(SCRIPT.parent))
    import readme_figures

    readme = (REPO / "README.md").read_text()
    fresh = readme_figures.render(readme, DOCS.read_text())
    stale = [(old["key"], old["value"], new["value"]) for old, new in
             zip(readme_figures.SPAN.finditer(readme), readme_figures.SPAN.finditer(fresh)) if old["value"] != new["value"]]
    assert not stale, f"run `uv run python benchmarks/readme_figures.py`: {stale}"
    assert len(list(readme_figures.SPAN.finditer(readme))) >= len(readme_figures.FIGURES)


def test_readme_figures_notice_a_changed_row():
    sys.path.insert(0, str(SCRIPT.parent))
    import readme_figures

    readme = (REPO / "README.md").read_text()
    docs = DOCS.read_text()
    row = next(line for line in docs.splitlines() if line.startswith("| 2 no-op rebuild | pipeline: second"))
    cells = row.split("|")
    cells[4] = " 0.912 "
    changed = readme_figures.render(readme, docs.replace(row, "|".join(cells)))
    assert "<!--bench:noop.pipeline-->0.91<!--/bench-->" in changed and changed != readme
    assert readme_figures.significant(497, 1) == "500" and readme_figures.significant(0.0198, 2) == "0.020"
    with pytest.raises(readme_figures.FigureError, match="unknown figure 'nope'"):
        readme_figures.render(readme + "<!--bench:nope-->1<!--/bench-->", docs)
