"""``docs/placement-agreement.md`` against the rules and the real rknn-toolkit2.

The doc is rendered by ``benchmarks/placement_agreement.py`` from
``tests/placement_probe.py`` (single-op builds, prediction against layer table)
and the example models' builds. Two things keep it from going stale:

- without the toolkit: the doc names the digest of the rules it measured, which
  must be the digest of today's ``pipeline/data/op_rules.yaml``, and its table
  has a cell for every case and target the probe defines;
- with the toolkit: a handful of cases on one float and one int8 target are
  probed again, and each outcome must be the doc's cell for it.

After a deliberate change of the rules, the cases or the toolkit, regenerate
the doc with ``uv run python benchmarks/placement_agreement.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import placement_probe

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "placement-agreement.md"
REGENERATE = "regenerate it with `uv run python benchmarks/placement_agreement.py`"

# A float and an int8 target, and cases that cover NPU, CPU, rewritten and constraint-driven placements.
SUBSET_TARGETS = ("rk3588", "rv1106")
SUBSET_CASES = ("Exp/plain", "Pow/exponent 2", "AveragePool/count_include_pad 0",
                "AveragePool/count_include_pad 1", "AveragePool/ceil_mode 1 cip 0", "Transpose/perm 0,2,3,1",
                "Resize/linear x1.5", "GRU/hidden 16", "Div/const")


@pytest.fixture(scope="module")
def doc_text() -> str:
    assert DOC.exists(), f"{DOC.relative_to(REPO)} is missing: {REGENERATE}"
    return DOC.read_text()


def test_doc_measured_the_current_rules(doc_text):
    assert placement_probe.doc_digest(doc_text) == placement_probe.rules_digest(), (
        f"pipeline/data/op_rules.yaml changed since {DOC.relative_to(REPO)} was measured: {REGENERATE}")


def test_doc_has_every_case_on_every_target(doc_text):
    cells = placement_probe.doc_cells(doc_text)
    expected = {(case.op, case.variant, target) for case in placement_probe.CASES for target in placement_probe.TARGETS}
    assert set(cells) == expected, f"the probe's cases and the doc's table differ: {REGENERATE}"
    assert all(cells.values())


def test_subset_is_made_of_known_cases():
    known = {case.key for case in placement_probe.CASES}
    assert set(SUBSET_CASES) <= known
    assert set(SUBSET_TARGETS) <= set(placement_probe.TARGETS)


@pytest.mark.toolkit
def test_toolkit_still_places_the_subset_as_the_doc_says(doc_text, tmp_path):
    out, log = tmp_path / "probe.json", tmp_path / "probe.log"
    with log.open("wb") as sink:
        proc = subprocess.run([sys.executable, str(REPO / "tests" / "placement_probe.py"), str(out),
                               *(arg for case in SUBSET_CASES for arg in ("--case", case)),
                               "--targets", ",".join(SUBSET_TARGETS)],
                              cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, timeout=600)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"placement probe failed ({proc.returncode}):\n{log.read_bytes()[-4000:].decode(errors='replace')}")
    probe = json.loads(out.read_text())
    assert len(probe["results"]) == len(SUBSET_CASES) * len(SUBSET_TARGETS)
    cells = placement_probe.doc_cells(doc_text)
    stale = []
    for result in probe["results"]:
        key = (result["op"], result["variant"], result["target"])
        if placement_probe.cell(result) != cells.get(key):
            stale.append(f"{'/'.join(key)}: measured {placement_probe.cell(result)!r}, doc says {cells.get(key)!r}")
    assert not stale, f"{DOC.relative_to(REPO)} no longer matches the toolkit ({REGENERATE}):\n" + "\n".join(stale)
    # the comparison is the pipeline's: a disagreement here is a rules fact, shown in the doc
    assert any(result["agree"] for result in probe["results"])
