"""Regenerate docs/placement-agreement.md: how often the placement rules predict what the toolkit does.

    uv run python benchmarks/placement_agreement.py            # probe + example builds, rewrite the doc
    uv run python benchmarks/placement_agreement.py --probe-json out.json --examples-json ex.json
                                                               # render from saved measurements

Two measurements, both with the installed rknn-toolkit2:

- ``tests/placement_probe.py`` (in a subprocess; its log goes to a file): every single-op case on
  every probed target, prediction against the layer table;
- the example manifest: ``doit`` builds ``models.yaml`` in a scratch copy of ``dodo.py`` and
  ``examples/`` (never in the checkout), then every exported model's ``analysis.json`` is compared
  with its ``placement.json`` by ``stages.placement_comparison`` (what the sidecar's
  ``predicted_vs_actual`` lists are the disagreements of).

Every figure of the doc is computed here from those two results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import placement_probe  # noqa: E402  (tests/placement_probe.py: the cases and the cell format)

DOC = REPO / "docs" / "placement-agreement.md"
COMMAND = "uv run python benchmarks/placement_agreement.py"
# Variables that would point the scratch build at a user's cache, worker or manifest.
_DROPPED_ENV = ("RKNN_PIPELINE_CACHE", "RKNN_PIPELINE_CACHE_MODE", "RKNN_PIPELINE_WORKER_PYTHON",
                "RKNN_PIPELINE_MANIFEST", "RKNN_PIPELINE_SHARD")


def progress(message: str) -> None:
    print(f"placement agreement: {message}", file=sys.stderr, flush=True)


def run_probe(work: Path) -> dict:
    out, log = work / "probe.json", work / "probe.log"
    progress(f"single-op probe (log: {log})")
    with log.open("wb") as sink:
        proc = subprocess.run([sys.executable, str(REPO / "tests" / "placement_probe.py"), str(out)], cwd=REPO,
                              stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"placement probe failed ({proc.returncode}); see {log}")
    return json.loads(out.read_text())


def build_examples(work: Path) -> dict:
    """Build models.yaml in a scratch project; the agreement per exported model x target."""
    ws = work / "examples-build"
    ws.mkdir()
    shutil.copy(REPO / "dodo.py", ws / "dodo.py")
    shutil.copy(REPO / "models.yaml", ws / "models.yaml")
    shutil.copytree(REPO / "examples", ws / "examples")
    env = {key: value for key, value in os.environ.items() if key not in _DROPPED_ENV}
    log = work / "doit.log"
    progress(f"doit on models.yaml in {ws} (log: {log})")
    with log.open("wb") as sink:
        proc = subprocess.run([sys.executable, "-m", "doit"], cwd=ws, env=env, stdout=sink,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return {"doit_returncode": proc.returncode, "models": example_agreement(ws)}


def example_agreement(ws: Path) -> list[dict]:
    from pipeline import files
    from pipeline.layout import Layout
    from pipeline.stages import placement_comparison

    layout = Layout(ws)
    rows = []
    for sidecar in sorted((ws / "dist").glob("*/*.json")):
        record = json.loads(sidecar.read_text())
        if not isinstance(record, dict) or "model" not in record or "target" not in record:
            continue  # the lock or another file that is not a sidecar
        name, target = record["model"], record["target"]
        analysis = files.read_json(layout.analysis(name, target), None)
        layers = files.read_json(layout.placement(name, target), [])
        resolved = files.read_json(layout.resolved(name, target), {})
        compared = placement_comparison(analysis, layers, resolved)
        steered = {item["node"] for item in (resolved.get("explanations") or {}).values()}
        steered |= {item["node"] for item in resolved.get("rewrites") or []}
        folded = [n for n in analysis["nodes"] if n["predicted"]["placement"] == "none"]
        rows.append({"model": name, "target": target, "nodes": len(analysis["nodes"]),
                     "folded": len(folded), "steered": len(steered & {n["name"] for n in analysis["nodes"]}),
                     "compared": len(compared), "agree": sum(item["agree"] for item in compared),
                     "disagree": [f"{item['node']} ({item['op_type']}): predicted {item['predicted']}, "
                                  f"built {item['actual']}" for item in compared if not item["agree"]]})
    return rows


# -- the document ----------------------------------------------------------------------------


def _row(cells) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def _table(header, rows) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(row) for row in rows)]


def render(probe: dict, examples: dict, date: str) -> str:
    results = probe["results"]
    targets = probe["targets"]
    by_target = {target: [r for r in results if r["target"] == target] for target in targets}

    def count(rows, **match):
        return sum(all(r[key] == value for key, value in match.items()) for r in rows)

    summary = []
    for target in [*targets, None]:
        rows = by_target[target] if target else results
        failed = sum(r["outcome"] in ("refused", "crashed") for r in rows)
        summary.append([target or "all", rows[0]["dtype"] if target else "", len(rows),
                        count(rows, agree=True), count(rows, agree=False),
                        count(rows, outcome="no_layer"), count(rows, outcome="not_compared"), failed])
    cases = list(dict.fromkeys((r["op"], r["variant"]) for r in results))
    cell = {(r["op"], r["variant"], r["target"]): placement_probe.cell(r) for r in results}
    lines = [
        f"# Placement rules against rknn-toolkit2 {probe['toolkit']}",
        "",
        f"Measured on {date} with rknn-toolkit2 {probe['toolkit']}, rules `pipeline/data/op_rules.yaml` "
        f"version {probe['rules_version']}.",
        f"Generated by `{COMMAND}` (do not edit by hand; rerun it).",
        "",
        placement_probe.digest_line(probe["rules_digest"]),
        "",
        "## Single-op builds",
        "",
        "`tests/placement_probe.py` builds one ONNX node per case (its other inputs constant) with",
        "`config -> load_onnx -> build`, float16, or w8a8 with a two-sample dataset where the target",
        "refuses float, and compares the layer table with the prediction of `pipeline.analysis.analyze`",
        "(the comparison of `pipeline.stages.placement_comparison`: NPU against off the NPU;",
        "*unsupported*, a CPU layer the target's CPU runtime cannot run, counts as off the NPU).",
        "Every layer named after the node counts, also those the toolkit renamed while rewriting it.",
        "*no layer*: the build emitted no layer for the node (agrees when the rules fold the op);",
        "*not compared*: the rules fold the op, but alone in a graph the toolkit keeps a layer;",
        "*build failed*: the toolkit refused the model or crashed.",
        "",
        *_table(["target", "dtype", "cases", "agree", "disagree", "no layer", "not compared", "build failed"],
                summary),
        "",
        "### Disagreements",
        "",
    ]
    wrong = [r for r in results if r["agree"] is False]
    lines += [f"- {r['op']} ({r['variant']}) on {r['target']}: predicted {r['predicted']}, built "
              f"{r['actual'] or 'no layer'} ({', '.join(r['layers']) or 'no layers'}); rule `{r['rule']}`: "
              f"{r['reason']}" for r in wrong] or ["None."]
    failures = [r for r in results if r["outcome"] in ("refused", "crashed")]
    lines += ["", "### Builds that failed", ""]
    lines += [f"- {r['op']} ({r['variant']}) on {r['target']}: {r['outcome']} in {r['step']}: {r['message']} "
              f"(predicted {r['predicted']})" for r in failures] or ["None."]
    lines += ["", "### Every case", "",
              "The layer table's placement; a disagreement shows the prediction after it.", ""]
    lines += _table(["op", "variant", *targets],
                    [[op, variant, *(cell.get((op, variant, t), "") for t in targets)] for op, variant in cases])
    lines += ["", f"Op types the rules mention that no case builds ({len(probe['unprobed'])}): "
              + ", ".join(probe["unprobed"]) + ".", ""]

    models = examples["models"]
    total = Counter()
    for row in models:
        total.update({key: row[key] for key in ("nodes", "folded", "steered", "compared", "agree")})

    def example_row(r):
        unnamed = r["nodes"] - r["folded"] - r["steered"] - r["compared"]
        return [r["nodes"], r["folded"], r["steered"], unnamed, r["compared"], r["agree"], r["compared"] - r["agree"]]

    lines += [
        "## The example models' real builds",
        "",
        "`doit` builds `models.yaml` in a scratch copy; for every exported model x target, the nodes of",
        "`analysis.json` are compared with the layer table (`placement.json`) by",
        "`stages.placement_comparison`, the comparison behind the sidecar's `predicted_vs_actual`.",
        "*folded*: the rules predict the toolkit removes the node; *steered*: an override placed or",
        "rewrote it (left out); *not in the table*: no layer carries the node's name (the toolkit",
        "fused, folded or renamed it), so nothing can be compared.",
        f"doit exit status: {examples['doit_returncode']}.",
        "",
        *_table(["model", "target", "nodes", "folded", "steered", "not in the table", "compared", "agree",
                 "disagree"],
                [[r["model"], r["target"], *example_row(r)] for r in models]
                + [["all", "", *example_row(total)]]),
        "",
    ]
    wrong_nodes = [f"- {r['model']}@{r['target']}: {item}" for r in models for item in r["disagree"]]
    if wrong_nodes:
        lines += ["Disagreements:", "", *wrong_nodes, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe-json", type=Path, help="a saved tests/placement_probe.py output")
    parser.add_argument("--examples-json", type=Path, help="saved example agreement (written by --save)")
    parser.add_argument("--save", type=Path, help="directory to keep both measurements in, as JSON")
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    from pipeline.toolkit import installed_version

    with tempfile.TemporaryDirectory(prefix="placement-agreement-") as scratch:
        work = Path(scratch)
        probe = json.loads(args.probe_json.read_text()) if args.probe_json else run_probe(work)
        examples = json.loads(args.examples_json.read_text()) if args.examples_json else build_examples(work)
    if probe["toolkit"] != installed_version():
        raise SystemExit(f"the probe ran toolkit {probe['toolkit']}, {installed_version()} is installed")
    if probe["rules_digest"] != placement_probe.rules_digest():
        raise SystemExit("the probe measured other rules than pipeline/data/op_rules.yaml: run it again")
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        (args.save / "probe.json").write_text(json.dumps(probe, indent=1) + "\n")
        (args.save / "examples.json").write_text(json.dumps(examples, indent=1) + "\n")
    args.doc.write_text(render(probe, examples, datetime.date.today().isoformat()))
    progress(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
