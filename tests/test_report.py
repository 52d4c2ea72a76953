"""Tests for the build report: summary data, Markdown, HTML, and a real browser.

The unit tests use synthetic sidecars, including failed and half-written ones,
hostile model names and an empty build. The browser test loads the written
report in headless Chromium (installed by ``.ci/install-browser``), checks the
rendered DOM, that the page logs no console errors, and that a screenshot is
produced; it skips when Chromium is not installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipeline.report import build_report, human_size, render_html, render_markdown, write_report

# --- synthetic sidecars ------------------------------------------------------------



def _paths(directory):
    return directory / "report.html", directory / "report.md"

def _ok_record(model: str = "inception_v2", target: str = "rk3588", cpu: int = 7) -> dict:
    return {
        "format": 1, "model": model, "target": target, "status": "ok", "error": None,
        "rknn": {"file": f"{model}.rknn", "sha256": "ab" * 32, "size": 123456},
        "convert_seconds": 8.4, "cache": {"key": "cd" * 32, "hit": False},
        "placement": {
            "layers": 97 + cpu, "npu": 97, "cpu": cpu,
            "cpu_layers": [{"id": 6 + i, "op_type": "AveragePool", "name": f"AveragePool:n{65 + i}"}
                           for i in range(cpu)],
            "cpu_by_op": {"AveragePool": cpu} if cpu else {},
            "total_cycles": 1234567,
        },
        "overrides": [{"override": 0, "action": "npu", "nodes": ["n65"], "targets": None},
                      {"override": 1, "action": "cpu", "nodes": ["n70"], "targets": ["rk3588"]}],
        "rewrites": [{"node": "n65", "output": "301"}],
        "op_target": {"301": "npu"},
        "predicted_vs_actual": [{"node": "n65", "op_type": "AveragePool", "predicted": "cpu", "actual": "npu"}],
        "verify": {"samples": 4, "min_cosine": 0.99, "passed": True,
                   "outputs": [{"name": "prob_1", "cosine": 0.9998, "max_abs_error": 0.0012},
                               {"name": "aux", "cosine": 0.9991, "max_abs_error": 0.01}]},
        "versions": {"rknn-toolkit2": "2.5.0"},
    }


def _records() -> list[dict]:
    return [
        _ok_record("resnet", "rk3566", cpu=0),
        {"format": 1, "model": "resnet", "target": "rk3588", "status": "failed",
         "error": "E RKNN: unsupported op 'Foo' <at> node n3", "rknn": None, "placement": None,
         "verify": None, "cache": None, "overrides": None},
        _ok_record("inception_v2", "rk3588"),
        {"model": "mobilenet", "target": "rv1106", "status": "not built"},
        _ok_record("a<b>|c&d", "rk3588", cpu=2),
    ]


class _Structure(HTMLParser):
    """Collects tags, attributes and text so tests can inspect the rendered page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def count(self, tag: str, **attrs) -> int:
        return sum(1 for name, found in self.tags
                   if name == tag and all(found.get(key) == value for key, value in attrs.items()))


def _parse(page: str) -> _Structure:
    parser = _Structure()
    parser.feed(page)
    parser.close()
    return parser


def _body_rows(doc: _Structure) -> int:
    """Table rows other than the header and the totals row."""
    return doc.count("tr") - 2


# --- summary -----------------------------------------------------------------------


def test_rows_are_sorted_and_totalled():
    summary = build_report(_records())
    assert [(row["model"], row["target"]) for row in summary["rows"]] == [
        ("a<b>|c&d", "rk3588"), ("inception_v2", "rk3588"), ("mobilenet", "rv1106"),
        ("resnet", "rk3566"), ("resnet", "rk3588"),
    ]
    totals = summary["totals"]
    assert totals["conversions"] == 5
    assert totals["status"] == {"failed": 1, "not built": 1, "ok": 3}
    assert totals["npu"] == 3 * 97 and totals["cpu"] == 9
    assert totals["cpu_by_op"] == {"AveragePool": 9}
    assert totals["rknn_size"] == 3 * 123456
    assert totals["overrides"] == 6 and totals["rewrites"] == 3 and totals["disagreements"] == 3
    assert totals["verify_passed"] == 3 and totals["verify_failed"] == 0
    assert totals["convert_seconds"] == pytest.approx(3 * 8.4)
    json.dumps(summary, allow_nan=False)  # serialisable as strict JSON


def test_row_fields():
    row = build_report([_ok_record()])["rows"][0]
    assert row["cache_hit"] is False
    assert row["overrides"] == {"count": 2, "actions": {"cpu": 1, "npu": 1}}
    assert row["rewrites"] == 1
    assert row["disagreements"] == [{"node": "n65", "op_type": "AveragePool", "predicted": "cpu", "actual": "npu"}]
    # The achieved cosine is the worst output; the sidecar's min_cosine is the threshold.
    assert row["accuracy"] == {"min_cosine": 0.9991, "threshold": 0.99, "samples": 4, "passed": True}
    assert row["cpu_by_op"] == {"AveragePool": 7} and len(row["cpu_layers"]) == 7
    assert row["total_cycles"] == 1234567


@pytest.mark.parametrize("record", [
    {},
    {"model": None, "target": None, "status": None},
    {"model": "m", "rknn": "oops", "placement": [], "verify": {"outputs": "x"}, "cache": {"hit": "yes"}},
    {"model": "m", "placement": {"npu": "97", "cpu": float("nan"), "cpu_layers": [None, 3],
                                 "cpu_by_op": {"Add": None}}},
    {"model": "m", "convert_seconds": True, "overrides": [None], "predicted_vs_actual": [1],
     "verify": {"outputs": [{"cosine": None}, None]}},
])
def test_malformed_records_do_not_crash(record):
    summary = build_report([record])
    row = summary["rows"][0]
    assert row["npu"] is None and row["cache_hit"] is None and row["convert_seconds"] is None
    json.dumps(summary, allow_nan=False)
    assert "<tr" in render_html(summary)
    assert "CPU fallbacks" in render_markdown(summary)


def test_empty_build():
    summary = build_report([])
    assert summary["rows"] == [] and summary["totals"]["conversions"] == 0
    page = render_html(summary)
    assert "No conversions to report." in page and "<svg" not in page
    assert "No conversions to report." in render_markdown(summary)


@pytest.mark.parametrize("size, text", [
    (None, "\u2014"), (0, "0 B"), (1023, "1023 B"), (123456, "120.6 KiB"),
    (5 * 1024**2, "5.0 MiB"), (3 * 1024**4, "3072.0 GiB"),
])
def test_human_size(size, text):
    assert human_size(size) == text


# --- Markdown ----------------------------------------------------------------------


def test_markdown_table_and_fallbacks():
    text = render_markdown(build_report(_records()))
    lines = text.splitlines()
    assert lines[0] == "# RKNN build report"
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + 5 + 1  # header, rule, rows, totals
    # Every table line has the same number of unescaped pipes as the header.
    columns = {len(re.findall(r"(?<!\\)\|", line)) for line in table}
    assert len(columns) == 1
    assert r"a\<b\>\|c&d" in text
    assert "120.6 KiB" in text and "0.9991" in text and "1,234,567" in text
    fallbacks = text.split("## CPU fallbacks", 1)[1]
    assert "**inception\\_v2" not in fallbacks  # underscores are left readable
    assert "**inception_v2 / rk3588**: 7 CPU layers" in fallbacks
    assert "#6 AveragePool (AveragePool:n65)" in fallbacks
    assert "resnet / rk3566" not in fallbacks  # no CPU layers, not listed
    assert "## Failures" in text and r"unsupported op 'Foo' \<at\> node n3" in text


# --- HTML --------------------------------------------------------------------------


def test_html_structure_and_escaping():
    page = render_html(build_report(_records()))
    assert page.startswith("<!DOCTYPE html>")
    doc = _parse(page)
    assert doc.count("meta", charset="utf-8") == 1
    assert _body_rows(doc) == 5
    assert doc.count("tr", **{"class": "cpu"}) == 2  # inception_v2 and a<b>|c&d
    assert doc.count("svg") == 1 and doc.count("g", **{"class": "bar"}) == 5
    assert doc.count("details") >= 3
    # The hostile name is text, never markup.
    assert "a<b>|c&d" in "".join(doc.text)
    assert "<b>" not in page and "a&lt;b&gt;|c&amp;d" in page
    assert "unsupported op &#x27;Foo&#x27; &lt;at&gt; node n3" in page


def test_html_is_self_contained():
    page = render_html(build_report(_records()))
    assert "http://" not in page and "https://" not in page
    assert "xmlns" not in page  # inline <svg> in HTML5 needs no namespace URL
    assert "<script" not in page and "@import" not in page and "url(" not in page
    for _, attrs in _parse(page).tags:
        assert not {"src", "href", "srcset", "action"} & attrs.keys(), attrs


def test_write_report_is_atomic(tmp_path):
    html_path, md_path = write_report(_records(), *_paths(tmp_path / "out"))
    assert html_path == tmp_path / "out" / "report.html" and md_path == tmp_path / "out" / "report.md"
    assert html_path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert md_path.read_text(encoding="utf-8").startswith("# RKNN build report")
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["report.html", "report.md"]
    write_report([], *_paths(tmp_path / "out"))  # overwrites in place
    assert "No conversions" in md_path.read_text(encoding="utf-8")


# --- real browser ------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0",
]


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )


# Page console output in Chromium's log: "INFO:CONSOLE(1)" in older builds,
# "INFO:CONSOLE:1]" in newer ones. The report has no script, so any is a fault.
PAGE_MESSAGE = re.compile(r"\bCONSOLE[(:]|Uncaught")


def _page_errors(stderr: str) -> list[str]:
    """Console messages and uncaught errors that the page itself logged."""
    return [line for line in stderr.splitlines() if PAGE_MESSAGE.search(line)]


@pytest.fixture
def chromium() -> str:
    """The browser; missing, it skips the test locally but fails it under CI=true (CI installs it)."""
    if CHROMIUM is None:
        why = "chromium not installed (run .ci/install-browser as root)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{why}; under CI=true a missing browser is a failure, not a skip")
        pytest.skip(why)
    return CHROMIUM


def test_report_renders_in_headless_chromium(tmp_path, chromium):
    html_path, _ = write_report(_records(), *_paths(tmp_path / "report"))
    url = html_path.resolve().as_uri()

    dump = _chromium(tmp_path / "profile-dom", "--dump-dom", url)
    assert dump.returncode == 0, dump.stderr[-2000:]
    dom = _parse(dump.stdout)
    assert _body_rows(dom) == 5
    assert dom.count("svg") == 1 and dom.count("g", **{"class": "bar"}) == 5
    assert "a<b>|c&d" in "".join(dom.text)
    assert not _page_errors(dump.stderr), _page_errors(dump.stderr)

    screenshot = tmp_path / "report.png"
    shot = _chromium(tmp_path / "profile-shot", f"--screenshot={screenshot}", "--window-size=1600,1000", url)
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert not _page_errors(shot.stderr), _page_errors(shot.stderr)
    data = screenshot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5 * 1024


def test_console_errors_are_detected(tmp_path, chromium):
    """Guards the check above: a page that logs and throws must be caught."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><meta charset="utf-8"><p>x</p>'
                    '<script>console.error("boom"); missing();</script>', encoding="utf-8")
    errors = _page_errors(_chromium(tmp_path / "profile", "--dump-dom", page.as_uri()).stderr)
    assert any("boom" in line for line in errors) and any("Uncaught" in line for line in errors), errors


@pytest.mark.parametrize(("ci", "code"), [("true", 1), ("", 0)])
def test_install_browser_fails_under_ci_when_it_cannot_install(tmp_path, ci, code):
    """.ci/run no longer hides this script's failure; under CI=true a missing browser stops the job."""
    script = Path(__file__).resolve().parent.parent / ".ci" / "install-browser"
    bash = shutil.which("bash")
    env = {"PATH": str(tmp_path), "CI": ci, "CHROMIUM_PATH": str(tmp_path / "no-chromium")}  # no apt-get
    proc = subprocess.run([bash, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    assert "apt-get not found" in proc.stderr
