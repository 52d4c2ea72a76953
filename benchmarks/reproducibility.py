"""Regenerate the measured part of docs/reproducibility.md: one example model converted twice, compared.

    uv run python benchmarks/reproducibility.py           # measure, rewrite the marked section of the doc
    uv run python benchmarks/reproducibility.py --print   # measure, print the section only

In a scratch copy of the repository's ``dodo.py`` and ``examples/``, ``doit`` builds one model of
``models.yaml`` (``MODEL`` for ``TARGET``, without the accuracy check), the outputs are kept,
``build/``, ``dist/`` and ``.doit.db`` are removed, and ``doit`` builds it again in the same
directory (same absolute paths). The two ``.rknn`` files are compared byte by byte, and the two
``placement.json`` files and lock entries as documents.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "reproducibility.md"
MODEL, TARGET = "inception_v2", "rk3588"
BEGIN = "<!-- measured by benchmarks/reproducibility.py: do not edit by hand -->"
END = "<!-- end of measured -->"


def build_once(ws: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RKNN_PIPELINE_CACHE"}
    proc = subprocess.run([sys.executable, "-m", "doit", "--reporter", "console"], cwd=ws, env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"doit failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    lock = json.loads((ws / "dist" / "models.lock.json").read_text())
    return {"rknn": (ws / "dist" / TARGET / f"{MODEL}.rknn").read_bytes(),
            "placement": json.loads((ws / "build" / MODEL / TARGET / "placement.json").read_text()),
            "entry": lock["entries"][f"{TARGET}/{MODEL}"]}


def measure() -> dict:
    manifest = yaml.safe_load((REPO / "models.yaml").read_text())
    model = next(m for m in manifest["models"] if m["name"] == MODEL)
    model = {**model, "targets": [TARGET], "verify": None}
    manifest = {**{k: v for k, v in manifest.items() if k != "models"}, "models": [model]}
    root = Path(tempfile.mkdtemp(prefix="rknn-repro-"))
    try:
        ws = root / "ws"
        ws.mkdir()
        shutil.copy(REPO / "dodo.py", ws / "dodo.py")
        shutil.copytree(REPO / "examples", ws / "examples")
        (ws / "models.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
        first = build_once(ws)
        for name in ("build", "dist"):
            shutil.rmtree(ws / name)
        (ws / ".doit.db").unlink()
        second = build_once(ws)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    import numpy as np

    a, b = first["rknn"], second["rknn"]
    common = min(len(a), len(b))
    positions = np.flatnonzero(np.frombuffer(a[:common], np.uint8) != np.frombuffer(b[:common], np.uint8))
    differing = len(positions) + abs(len(a) - len(b))
    last = max(len(a), len(b)) if len(a) != len(b) else (int(positions[-1]) + 1 if len(positions) else 0)
    return {"source": model["source"], "sizes": (len(a), len(b)), "differing": differing, "last": last,
            "placement_same": first["placement"] == second["placement"],
            "entry_same": first["entry"] == second["entry"],
            "toolkit": metadata.version("rknn-toolkit2")}


def render(facts: dict) -> str:
    sizes = " | ".join(f"{size:,} bytes" for size in facts["sizes"])
    where = (f"{facts['differing']:,}, all within the first {facts['last'] / 1024:,.0f} KiB"
             if facts["differing"] else "none")
    same = {True: "identical", False: "different"}
    return "\n".join([
        BEGIN,
        f"rknn-toolkit2 {facts['toolkit']}, `{facts['source']}` for {TARGET} (float16), converted twice by",
        "`doit` in the same directory, the tree cleaned in between:",
        "",
        "| | first build | second build |",
        "| --- | --- | --- |",
        f"| size | {sizes} |",
        f"| bytes that differ | {where} | |",
        f"| layer table (`placement.json`) | {same[facts['placement_same']]} | |",
        f"| lock entry (`dist/models.lock.json`) | {same[facts['entry_same']]} | |",
        END,
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the section; leave the doc alone")
    args = parser.parse_args(argv)
    section = render(measure())
    if args.print:
        print(section)
        return 0
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        print(f"{DOC.relative_to(REPO)} has no {BEGIN!r} ... {END!r} section", file=sys.stderr)
        return 2
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(head + section + tail)
    print(f"wrote {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
