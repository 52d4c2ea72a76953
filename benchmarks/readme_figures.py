"""Write every benchmark figure quoted in README.md from docs/benchmarks.md.

    uv run python benchmarks/readme_figures.py          # rewrite the marked figures in README.md
    uv run python benchmarks/readme_figures.py --check  # exit 1 (and show the differences) if any is stale

A figure in the README is a marked span, ``<!--bench:noop.pipeline-->0.37<!--/bench-->``: the
key names an entry of ``FIGURES`` below, which says which row of docs/benchmarks.md it comes
from and how many significant digits the README shows. The README never holds a hand-copied
number, so a benchmark rerun (``benchmarks/run.py``, also with ``--only``) followed by this
script keeps the two in step, and tests/test_benchmarks.py fails when they are not.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs" / "benchmarks.md"
SPAN = re.compile(r"<!--bench:(?P<key>[\w.-]+)-->(?P<value>.*?)<!--/bench-->")
COLUMNS = ("section", "measurement", "unit", "median", "min", "max", "runs")


@dataclass(frozen=True)
class Figure:
    """One quoted number: the docs row whose measurement starts with ``prefix``, its median, rounded."""

    section: str
    prefix: str
    digits: int  # significant digits shown in the README


FIGURES: dict[str, Figure] = {
    "cold.pipeline": Figure("1 cold build", "pipeline: `doit` in a fresh workspace", 3),
    "cold.hand": Figure("1 cold build", "hand-written loop", 3),
    "cold.ratio": Figure("1 cold build", "ratio pipeline / hand loop", 3),
    "cold.import": Figure("1 cold build", "toolkit import in a fresh process", 1),
    "noop.pipeline": Figure("2 no-op rebuild", "pipeline: second `doit`", 2),
    "noop.hand": Figure("2 no-op rebuild", "hand-written loop", 3),
    "noop.convert": Figure("2 no-op rebuild", "`python -m rknn.api.rknn_convert`", 3),
    "noop.ratio_hand": Figure("2 no-op rebuild", "ratio hand loop / pipeline no-op", 2),
    "noop.ratio_convert": Figure("2 no-op rebuild", "ratio rknn_convert / pipeline no-op", 3),
    "changed.densenet": Figure("3 one changed", "pipeline: `doit` after re-saving light_densenet121.onnx", 3),
    "changed.densenet_ratio": Figure("3 one changed", "ratio light_densenet121.onnx re-saved", 2),
    "changed.inception": Figure("3 one changed", "pipeline: `doit` after re-saving light_inception_v2.onnx", 3),
    "changed.inception_ratio": Figure("3 one changed", "ratio light_inception_v2.onnx re-saved", 2),
    "parallel.serial": Figure("4 parallel", "plain `doit`, densenet121", 3),
    "parallel.n2": Figure("4 parallel", "`doit -n 2 -P process`", 3),
    "parallel.floor": Figure("4 parallel", "2-core floor", 3),
    "parallel.ratio": Figure("4 parallel", "ratio `-n 2` / floor", 2),
    "parallel.plain_ratio": Figure("4 parallel", "ratio plain `doit` / floor", 2),
    "worker.rss_densenet": Figure("4 parallel", "peak RSS of the conversion worker, densenet121@rk3588", 2),
    "worker.rss_shufflenet": Figure("4 parallel", "peak RSS of the conversion worker, shufflenet@rk3588", 2),
    "cache.warm": Figure("5 cache restore", "fresh workspace, warm", 2),
    "cache.ratio": Figure("5 cache restore", "ratio warm cache / cold build", 1),
    "shared.warm_local": Figure("5 cache restore", "fresh workspace, warm", 2),
    "shared.warm_local_ratio": Figure("5 cache restore", "ratio warm cache / cold build", 2),
    "shared.warm_s3": Figure("12 shared cache", "fresh checkout, warm S3 store", 2),
    "shared.warm_s3_ratio": Figure("12 shared cache", "ratio warm S3 build / cold build", 2),
    "shared.upload": Figure("12 shared cache", "uploading", 2),
    "shared.upload_ratio": Figure("12 shared cache", "ratio upload alone / cold build", 2),
    "scale.load50": Figure("6 scale", "load_manifest, 50 pairs", 2),
    "scale.load200": Figure("6 scale", "load_manifest, 200 pairs", 2),
    "scale.load1000": Figure("6 scale", "load_manifest, 1000 pairs", 2),
    "scale.list50": Figure("6 scale", "`doit list --all`, 50 pairs", 2),
    "scale.list200": Figure("6 scale", "`doit list --all`, 200 pairs", 2),
    "scale.list1000": Figure("6 scale", "`doit list --all`, 1000 pairs", 2),
    "scale.floor200": Figure("6 scale", "doit floor: no-op `doit`, 200 trivial", 2),
    "scale.floor800": Figure("6 scale", "doit floor: no-op `doit`, 800 trivial", 2),
    "scale.floor4000": Figure("6 scale", "doit floor: no-op `doit`, 4000 trivial", 2),
    "large.analyze": Figure("7 large model", "`analyze()`", 2),
    "large.rss": Figure("7 large model", "peak RSS of the analysing process", 2),
    "large.onnx_load": Figure("7 large model", "reference: peak RSS of `onnx.load()`", 3),
    "zygote.ratio_bench": Figure("8 worker model", "benchmark manifest: ratio forked / hand loop", 3),
    "zygote.ratio_small": Figure("8 worker model", "8 small pairs: ratio forked / hand loop", 3),
    "zygote.fresh_bench": Figure("8 worker model", "benchmark manifest: ratio fresh / hand loop", 3),
    "zygote.fresh_small": Figure("8 worker model", "8 small pairs: ratio fresh / hand loop", 3),
    "zygote.n2_bench": Figure("8 worker model", "benchmark manifest: ratio `-n 2` / CPU floor", 3),
    "zygote.n2_small": Figure("8 worker model", "8 small pairs: ratio `-n 2` / CPU floor", 3),
    "zygote.plain_floor_bench": Figure("8 worker model", "benchmark manifest: ratio plain `doit`", 3),
    "zygote.plain_floor_small": Figure("8 worker model", "8 small pairs: ratio plain `doit`", 3),
    "zygote.one_slot_bench": Figure("8 worker model", "benchmark manifest: ratio one conversion at a time", 3),
    "zygote.one_slot_small": Figure("8 worker model", "8 small pairs: ratio one conversion at a time", 3),
    "zygote.uss": Figure("8 worker model", "peak USS of each zygote", 3),
    "zygote.child_uss": Figure("8 worker model", "peak USS of each forked child", 3),
    "repair.cos_int8": Figure("10 repair", "outlier_repaired (rk3588): cosine, plain int8", 4),
    "repair.cos_repaired": Figure("10 repair", "outlier_repaired (rk3588): cosine, repaired", 4),
    "repair.cos_float16": Figure("10 repair", "outlier_repaired (rk3588): cosine, float16", 5),
    "repair.layers": Figure("10 repair", "outlier_repaired (rk3588): float16 layers", 1),
    "repair.time": Figure("10 repair", "outlier_repaired (rk3588): repair's conversion time", 2),
    "repair.size_int8": Figure("10 repair", "outlier_repaired (rk3588): .rknn size, repaired / int8", 3),
    "repair.size_float16": Figure("10 repair", "outlier_repaired (rk3588): .rknn size, repaired / float16", 3),
    "repair.cycles_int8": Figure("10 repair", "outlier_repaired (rk3588): estimated cycles, repaired / int8", 2),
    "repair.cycles_float16": Figure("10 repair", "outlier_repaired (rk3588): estimated cycles, repaired / float16",
                                    2),
    "repair.inception_size": Figure("10 repair", "inception_v2 (rk3588): .rknn size, repaired / float16", 2),
    "repair.inception_cycles": Figure("10 repair", "inception_v2 (rk3588): estimated cycles, repaired / float16",
                                      2),
    "toolkits.sync": Figure("13 toolkit versions", "fresh machine: `uv sync --locked`", 2),
    "toolkits.cold": Figure("13 toolkit versions", "fresh machine: create the 2.3.2", 2),
    "toolkits.download": Figure("13 toolkit versions", "uv cache growth for the 2.3.2", 2),
    "toolkits.warm": Figure("13 toolkit versions", "create the", 2),
    "toolkits.disk": Figure("13 toolkit versions", "disk of the", 1),
    "toolkits.build_cpu": Figure("13 toolkit versions", "extra CPU seconds", 2),
    "toolkits.own_torch": Figure("13 toolkit versions", "fresh machine: create the 2.2.0", 2),
    "toolkits.own_torch_download": Figure("13 toolkit versions", "uv cache growth for the 2.2.0", 2),
}


class FigureError(ValueError):
    pass


def table(document: str) -> list[dict[str, str]]:
    """The rows of the benchmark table in docs/benchmarks.md, as column -> cell."""
    lines = [line for line in document.splitlines() if line.startswith("|")]
    if not lines or [cell.strip() for cell in lines[0].strip().strip("|").split("|")] != list(COLUMNS):
        raise FigureError("docs/benchmarks.md has no benchmark table with the expected header")
    return [dict(zip(COLUMNS, (cell.strip() for cell in line.strip().strip("|").split("|"))))
            for line in lines[2:]]


def significant(value: float, digits: int) -> str:
    """``value`` to ``digits`` significant digits, never in exponent form (497, 1 -> "500")."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = digits - 1 - math.floor(math.log10(abs(value)))
    rounded = round(value, decimals)
    return f"{rounded:.{max(decimals, 0)}f}"


def value_of(key: str, rows: list[dict[str, str]]) -> str:
    figure = FIGURES.get(key)
    if figure is None:
        raise FigureError(f"README.md quotes unknown figure {key!r}; add it to FIGURES in {Path(__file__).name}")
    found = [row for row in rows if row["section"] == figure.section and row["measurement"].startswith(figure.prefix)]
    if len(found) != 1:
        raise FigureError(f"figure {key!r}: {len(found)} rows of section {figure.section!r} in docs/benchmarks.md "
                          f"start with {figure.prefix!r} (need exactly one)")
    return significant(float(found[0]["median"]), figure.digits)


def render(readme: str, document: str) -> str:
    """``readme`` with every marked figure rewritten from ``document``; every FIGURES key must be quoted."""
    rows = table(document)
    used = {match["key"] for match in SPAN.finditer(readme)}
    unused = sorted(set(FIGURES) - used)
    if unused:
        raise FigureError(f"FIGURES entries not quoted in README.md: {', '.join(unused)}")
    return SPAN.sub(lambda m: f"<!--bench:{m['key']}-->{value_of(m['key'], rows)}<!--/bench-->", readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any figure is stale")
    args = parser.parse_args(argv)
    readme = README.read_text()
    try:
        fresh = render(readme, DOCS.read_text())
    except FigureError as exc:
        print(f"readme_figures: {exc}", file=sys.stderr)
        return 2
    if fresh == readme:
        print("README.md figures match docs/benchmarks.md")
        return 0
    stale = [(old["key"], old["value"], new["value"])
             for old, new in zip(SPAN.finditer(readme), SPAN.finditer(fresh)) if old["value"] != new["value"]]
    for key, old, new in stale:
        print(f"{key}: README {old!r}, docs/benchmarks.md {new!r}", file=sys.stderr)
    if args.check:
        return 1
    README.write_text(fresh)
    print(f"README.md: {len(stale)} figure(s) rewritten from docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
