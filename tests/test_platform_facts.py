"""``pipeline/platforms.py`` against the real rknn-toolkit2.

``tests/platform_probe.py`` runs every target x option combination through the
toolkit once (in a subprocess: the toolkit prints from C++ to fd 1) and records
whether it was accepted, refused or crashed the toolkit. Each combination is
then checked against what ``platforms.check_target_options`` and
``platforms.check_model_options`` predict for the same manifest model:

- a fact marked ``MEASURED`` must hold: no predicted refusal the toolkit
  accepts, and no toolkit refusal that nothing predicts;
- a ``Rockchip docs`` fact may be stricter than the toolkit, but only where
  ``EXPECTED_DOCS_LENIENT`` says so;
- crashes of the toolkit's native code must be exactly ``platforms.ABORTS``
  (which the loader refuses, citing the crash) plus ``platforms.UNSTABLE`` ones,
  which may go either way (the conversion retries them).

The expected sets are written out so that a toolkit upgrade that changes any
of this fails loudly. ``docs/platform-facts.md`` is rendered from the same
measurements; after a deliberate change, rewrite it with
``RKNN_PLATFORM_FACTS_WRITE=1 uv run pytest tests/test_platform_facts.py``.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import platforms

pytestmark = pytest.mark.toolkit

REPO = Path(__file__).resolve().parent.parent
PROBE = REPO / "tests" / "platform_probe.py"
DOC = REPO / "docs" / "platform-facts.md"
WRITE_DOC = "RKNN_PLATFORM_FACTS_WRITE"

# The columns of the matrix, in order; the probe runs each on every target.
MATRIX_CASES = ("float", "w8a8", "w8a16", "w16a16i_dfp", "w4a16", "gdq w8a8", "gdq w4a16", "single_core_mode")
# Rejected dtype spellings the probe tries on one target.
SPELLING_TARGET = "rk3588"

# Rockchip's docs limit single_core_mode to rk3588/rk3576; 2.5.0 builds with it everywhere.
EXPECTED_DOCS_LENIENT = {
    (target, "single_core_mode")
    for target in ("rk3562", "rk3566", "rk3568", "rv1103", "rv1103b", "rv1106", "rv1106b", "rv1126b", "rk2118")
}

# The toolkit's compiler aborts the process during build() ("Meet unsupported conv, input tensor
# name: x input type: N"), with this probe model whatever its channel count: the loader refuses them.
EXPECTED_CRASHES = set(platforms.ABORTS)

# Builds that crash only some of the time (SIGSEGV or std::bad_alloc in build(), about 4 runs in 10):
# allowed, and retried by the conversion.
UNSTABLE = set(platforms.UNSTABLE)

# Words a refusal message must contain to be about the option a case probes.
_SUBJECTS = {"float": ("do_quantization",), "single_core_mode": ("single_core",)}


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    """The probe's report; the toolkit is imported once, in its process."""
    work = tmp_path_factory.mktemp("platform-probe")
    out, log = work / "results.json", work / "probe.log"
    with log.open("wb") as sink:
        proc = subprocess.run([sys.executable, str(PROBE), str(out)], cwd=REPO, stdout=sink,
                              stderr=subprocess.STDOUT, timeout=900)
    if proc.returncode != 0 or not out.exists():
        tail = log.read_bytes()[-4000:].decode(errors="replace")
        pytest.fail(f"platform probe failed ({proc.returncode}), log tail:\n{tail}")
    return json.loads(out.read_text())


def _results(probe: dict, cases=MATRIX_CASES) -> dict[tuple[str, str], dict]:
    return {(r["target"], r["case"]): r for r in probe["results"] if r["case"] in cases}


def predicted(result: dict) -> list[str]:
    """What platforms.py says is wrong with the combination (empty: it is allowed)."""
    model = result["model"]
    return platforms.check_target_options(result["target"], model) + platforms.check_model_options(model)


def is_docs(problem: str) -> bool:
    """True for a problem that rests on a Rockchip-docs fact; anything else is held to the toolkit."""
    return f"({platforms.DOCS})" in problem


def about_case(result: dict) -> bool:
    """True when the toolkit's refusal message names the option the case probes."""
    subjects = _SUBJECTS.get(result["case"], tuple(result["case"].split()))
    return any(subject in (result["message"] or "") for subject in subjects)


def _show(result: dict) -> str:
    where = f" in {result['step']}" if result["step"] else ""
    return f"{result['target']} {result['case']}: toolkit {result['outcome']}{where}: {result['message']}"


def test_probe_covered_every_combination(probe):
    expected = {(target, case) for target in platforms.TARGETS for case in MATRIX_CASES}
    expected |= {(SPELLING_TARGET, spelling) for spelling in platforms.REJECTED_DTYPES}
    assert {(r["target"], r["case"]) for r in probe["results"]} == expected
    assert probe["toolkit"] == "2.5.0"


def test_measured_facts_hold(probe):
    """A refusal predicted from a measured fact must be a refusal by the toolkit, for that reason."""
    wrong = []
    for result in _results(probe).values():
        measured = [problem for problem in predicted(result) if not is_docs(problem)]
        if not measured:
            continue
        if result["outcome"] == "accepted":
            wrong.append(f"{_show(result)}; platforms.py predicts: {'; '.join(measured)}")
        elif result["outcome"] == "refused" and not about_case(result):
            wrong.append(f"{_show(result)}; refused for another reason than: {'; '.join(measured)}")
    assert not wrong, "platforms.py is wrong about measured facts:\n" + "\n".join(wrong)


def test_every_toolkit_refusal_is_predicted(probe):
    """What the toolkit refuses, the manifest loader must refuse first (measured or docs fact)."""
    unpredicted = [_show(r) for r in _results(probe).values() if r["outcome"] == "refused" and not predicted(r)]
    assert not unpredicted, "the toolkit refuses what platforms.py allows:\n" + "\n".join(unpredicted)


def docs_only(result: dict) -> bool:
    """True when platforms.py refuses the combination on Rockchip-docs facts alone."""
    problems = predicted(result)
    return bool(problems) and all(is_docs(problem) for problem in problems)


def test_docs_refusals_the_toolkit_shares_are_for_the_same_reason(probe):
    mismatched = [f"{_show(r)}; platforms.py: {'; '.join(predicted(r))}" for r in _results(probe).values()
                  if r["outcome"] == "refused" and docs_only(r) and not about_case(r)]
    assert not mismatched, "\n".join(mismatched)


def docs_lenient(probe: dict) -> set[tuple[str, str]]:
    """Combinations a docs fact forbids and the toolkit accepts."""
    return {key for key, r in _results(probe).items() if r["outcome"] == "accepted" and docs_only(r)}


def test_docs_facts_the_toolkit_does_not_enforce(probe):
    assert docs_lenient(probe) == EXPECTED_DOCS_LENIENT


def test_toolkit_crashes_are_the_known_ones(probe):
    results = _results(probe)
    crashed = {key for key, r in results.items() if r["outcome"] == "crashed"}
    assert crashed - UNSTABLE == EXPECTED_CRASHES, "\n".join(_show(results[key]) for key in sorted(crashed))
    for key in EXPECTED_CRASHES:  # refused at load, citing the crash
        assert any("aborts the whole process" in problem for problem in predicted(results[key])), key
    for key in UNSTABLE:
        assert results[key]["outcome"] in ("accepted", "crashed"), _show(results[key])
        assert not predicted(results[key])


def test_every_target_is_a_valid_target_platform(probe):
    accepted = {r["target"] for r in probe["results"] if r["outcome"] == "accepted"}
    assert accepted == set(platforms.TARGETS)


def test_dtype_list_and_rejected_spellings(probe):
    """config() names the dtypes it accepts when it rejects a spelling: they must be QUANTIZED_DTYPES."""
    results = _results(probe, cases=(*MATRIX_CASES, *platforms.REJECTED_DTYPES))
    for spelling, fact in platforms.REJECTED_DTYPES.items():
        rejected, replacement = results[SPELLING_TARGET, spelling], results[SPELLING_TARGET, fact["use"]]
        assert (rejected["outcome"], rejected["step"]) == ("refused", "config"), _show(rejected)
        assert replacement["outcome"] == "accepted", _show(replacement)
        listed = re.search(r"expect in (\[.*?\])", rejected["message"])
        assert listed, _show(rejected)
        assert ast.literal_eval(listed.group(1)) == list(platforms.QUANTIZED_DTYPES)
    for dtype in platforms.QUANTIZED_DTYPES:  # config() takes each dtype on some target
        assert any(results[target, dtype]["step"] != "config" for target in platforms.TARGETS), dtype


# -- docs/platform-facts.md -------------------------------------------------------


def _cell(result: dict) -> str:
    key = (result["target"], result["case"])
    if key in UNSTABLE:
        text = "accepted, or crashed in build (not every run)"
    elif result["outcome"] == "accepted":
        text = "accepted"
    else:
        text = f"{result['outcome']} in {result['step']}: {result['message']}"
    quant = result["model"].get("quantization")
    if result["case"] == "single_core_mode" and quant:
        text += f" (with {quant['dtype']})"
    return text.replace("|", "\\|")


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def render(probe: dict) -> str:
    results = _results(probe)
    spellings = _results(probe, cases=tuple(platforms.REJECTED_DTYPES))
    docs_confirmed = {case: [target for target in platforms.TARGETS
                             if results[target, case]["outcome"] == "refused" and docs_only(results[target, case])]
                      for case in MATRIX_CASES}
    lines = [
        f"# Platform facts measured with rknn-toolkit2 {probe['toolkit']}",
        "",
        "What the real toolkit does with each target platform and option, measured by",
        "`tests/platform_probe.py` and checked against `pipeline/platforms.py` by",
        "`tests/test_platform_facts.py`. Each cell is one `config -> load_onnx -> build` on a",
        "fresh `RKNN` object, for a Conv (1x3x8x8) -> Relu model with a two-sample `.npy`",
        "dataset. *refused* means a toolkit step returned an error (the message is the",
        "toolkit's); *crashed* means the toolkit's native code killed the process (the message",
        "is its last error line). `single_core_mode` is tried unquantized, or with w8a8 where",
        "the toolkit refuses unquantized builds.",
        "",
        "This file is generated; after a deliberate change, regenerate it with",
        f"`{WRITE_DOC}=1 uv run pytest tests/test_platform_facts.py`.",
        "",
        _row(("platform", *MATRIX_CASES)),
        _row(["---"] * (len(MATRIX_CASES) + 1)),
    ]
    lines += [_row((target, *(_cell(results[target, case]) for case in MATRIX_CASES)))
              for target in platforms.TARGETS]
    lines += ["", "Rejected dtype spellings:", ""]
    lines += [f"- `{case}` on {target}: {_cell(result)}" for (target, case), result in sorted(spellings.items())]
    lines += ["", "## Where the toolkit and `platforms.py` differ", "",
              "Rockchip-docs facts the toolkit does not enforce (it accepts what they forbid):", ""]
    lines += [f"- {case} on {target}" for target, case in sorted(EXPECTED_DOCS_LENIENT)]
    lines += ["", "Combinations that crash the toolkit's native code in build(), refused at load",
              "(`platforms.ABORTS`):", ""]
    lines += [f"- {case} on {target}" for target, case in sorted(EXPECTED_CRASHES)]
    lines += ["", "Combinations that crash in some runs only, allowed and retried by the conversion up to",
              "`attempts` times (`platforms.UNSTABLE`; rk3562 is the one platform with w8a16, so refusing",
              "would take the dtype away):", ""]
    lines += [f"- {case} on {target} ({platforms.UNSTABLE[target, case]['attempts']} attempts)"
              for target, case in sorted(UNSTABLE)]
    lines += ["", "Combinations refused on Rockchip-docs facts alone that the toolkit refuses too:", ""]
    lines += [f"- {case}: {', '.join(targets)}" for case, targets in docs_confirmed.items() if targets]
    return "\n".join(lines) + "\n"


# Sections after this line are rendered by other probes' tests (tests/test_input_facts.py).
OTHER_SECTIONS = "\n<!-- input facts -->\n"


def test_platform_facts_doc_is_current(probe):
    text = render(probe)
    current = DOC.read_text() if DOC.exists() else ""
    _, marker, rest = current.partition(OTHER_SECTIONS)
    if os.environ.get(WRITE_DOC):
        DOC.write_text(text + marker + rest)
    assert current.partition(OTHER_SECTIONS)[0] == text, (
        f"{DOC.relative_to(REPO)} is out of date: regenerate it with {WRITE_DOC}=1 "
        "uv run pytest tests/test_platform_facts.py")
