"""Build report: one page that says how every model x target conversion went.

The sidecar JSON files are precise but scattered, one per model x target. This
module folds them into a single summary (plain JSON-serialisable data) and
renders it twice:

* ``report.html``: a single self-contained file (inline CSS and an inline SVG
  chart, no scripts, no URLs, no web fonts) so it can be attached to a CI run
  or mailed around and still open offline, exactly as built;
* ``report.md``: the same table for pull-request comments and terminals.

Sidecars of failed or not-yet-built conversions lack most fields, and older
ones may lack newer fields, so every value is read defensively: anything
missing, null or of the wrong type becomes ``None`` and renders as a dash.
Only the standard library is used; every piece of text from a sidecar is
escaped for the format it lands in.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from pathlib import Path

from pipeline.files import atomic_write_text

REPORT_FORMAT = 1
TITLE = "RKNN build report"
DASH = "\u2014"


# --- reading sidecars defensively ---------------------------------------------


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value) -> list:
    return value if isinstance(value, list) else []


def _number(value) -> float | int | None:
    """A finite int or float; bools, strings and NaN/inf (not valid JSON) become None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _int(value) -> int | None:
    number = _number(value)
    return int(number) if number is not None else None


def _text(value, default: str = "") -> str:
    return default if value is None else str(value)


def _row(record: dict) -> dict:
    record = _dict(record)
    rknn = _dict(record.get("rknn"))
    placement = _dict(record.get("placement"))
    verify = _dict(record.get("verify"))

    cpu_by_op = {
        _text(op): count
        for op, raw in _dict(placement.get("cpu_by_op")).items()
        if (count := _int(raw))
    }
    cpu_layers = [
        {"id": _int(layer.get("id")), "op_type": _text(layer.get("op_type")), "name": _text(layer.get("name"))}
        for layer in map(_dict, _list(placement.get("cpu_layers")))
    ]
    overrides = [_dict(item) for item in _list(record.get("overrides"))]
    disagreements = [
        {key: _text(item.get(key)) for key in ("node", "op_type", "predicted", "actual")}
        for item in map(_dict, _list(record.get("predicted_vs_actual")))
    ]
    cosines = [
        cosine for output in map(_dict, _list(verify.get("outputs")))
        if (cosine := _number(output.get("cosine"))) is not None
    ]
    passed = verify.get("passed")
    hit = _dict(record.get("cache")).get("hit")
    built = _dict(record.get("built_with"))
    runtime = _dict(record.get("runtime"))

    return {
        "model": _text(record.get("model"), "?"),
        "target": _text(record.get("target"), "?"),
        "status": _text(record.get("status"), "unknown"),
        "error": _text(record.get("error")) or None,
        "convert_seconds": _number(record.get("convert_seconds")),
        "toolkit": _text(built.get("toolkit")) or None,
        "runtime": _text(runtime.get("declared")) or None,
        "cache_hit": hit if isinstance(hit, bool) else None,
        "shard": _text(record.get("shard")) or None,
        "rknn_file": _text(rknn.get("file")) or None,
        "rknn_size": _int(rknn.get("size")),
        "layers": _int(placement.get("layers")),
        "npu": _int(placement.get("npu")),
        "cpu": _int(placement.get("cpu")),
        "cpu_by_op": dict(sorted(cpu_by_op.items())),
        "cpu_layers": cpu_layers,
        "overrides": {
            "count": len(overrides),
            "actions": dict(sorted(Counter(_text(item.get("action"), "?") for item in overrides).items())),
        },
        "rewrites": len(_list(record.get("rewrites"))),
        "disagreements": disagreements,
        "accuracy": {
            # The sidecar's ``min_cosine`` is the threshold; the achieved
            # value is the worst cosine over the model's outputs.
            "min_cosine": min(cosines) if cosines else None,
            "threshold": _number(verify.get("min_cosine")),
            "samples": _int(verify.get("samples")),
            "passed": passed if isinstance(passed, bool) else None,
        },
        "total_cycles": _int(placement.get("total_cycles")),
        "repair": _repair_text(_dict(record.get("repair"))),
        "layer_accuracy": _layer_accuracy(record.get("accuracy_layers")),
    }


def _repair_text(repair: dict) -> str | None:
    """``repaired: 2 float layers, cos 0.6121 -> 0.9999`` when a repair kept layers in float."""
    layers = len(_list(repair.get("float_layers")))
    if not layers or repair.get("ok") is False:  # a failed search says so in the error
        return None
    before, after = _number(repair.get("cosine_before")), _number(repair.get("cosine_after"))
    text = f"repaired: {layers} float layer{'s' if layers != 1 else ''}"
    return text + (f", cos {before:.4f} -> {after:.4f}" if before is not None and after is not None else "")


def _layer_accuracy(layers) -> list[dict]:
    """The per-layer analysis (accuracy.json's layers) that can be drawn: named, with a single-layer cosine."""
    from pipeline.accuracy import BOOKKEEPING  # standard library only, like this module

    found = []
    for layer in map(_dict, _list(layers)):
        single = _number(_dict(layer.get("single")).get("cosine"))
        if single is None or not layer.get("node") or {layer.get("toolkit_op"), layer.get("op_type")} & BOOKKEEPING:
            continue
        found.append({"label": f"{_text(layer.get('node'))} ({_text(layer.get('op_type'), '?')})",
                      "tensor": _text(layer.get("tensor")), "single": single,
                      "entire": _number(_dict(layer.get("entire")).get("cosine"))})
    return found


def _sum(rows: list[dict], key) -> int | float | None:
    """Sum of a row field over the rows that have it; None when no row does."""
    values = [value for row in rows if (value := key(row)) is not None]
    return sum(values) if values else None


def build_report(records: list[dict]) -> dict:
    """Summarise sidecar records into rows (sorted by model, then target) and totals."""
    rows = sorted((_row(record) for record in records or []), key=lambda row: (row["model"], row["target"]))
    verdicts = [row["accuracy"]["passed"] for row in rows]
    totals = {
        "conversions": len(rows),
        "status": dict(sorted(Counter(row["status"] for row in rows).items())),
        "convert_seconds": _sum(rows, lambda row: row["convert_seconds"]),
        "cache_hits": sum(1 for row in rows if row["cache_hit"] is True),
        "rknn_size": _sum(rows, lambda row: row["rknn_size"]),
        "npu": _sum(rows, lambda row: row["npu"]),
        "cpu": _sum(rows, lambda row: row["cpu"]),
        "cpu_by_op": dict(sorted(sum((Counter(row["cpu_by_op"]) for row in rows), Counter()).items())),
        "overrides": sum(row["overrides"]["count"] for row in rows),
        "rewrites": sum(row["rewrites"] for row in rows),
        "disagreements": sum(len(row["disagreements"]) for row in rows),
        "verify_passed": verdicts.count(True),
        "verify_failed": verdicts.count(False),
        "total_cycles": _sum(rows, lambda row: row["total_cycles"]),
    }
    return {"format": REPORT_FORMAT, "rows": rows, "totals": totals}


# --- formatting shared by both renderers --------------------------------------


def human_size(size: int | None) -> str:
    if size is None:
        return DASH
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _seconds(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def _count(value: int | None) -> str:
    return DASH if value is None else f"{value:,}"


def _cache(hit: bool | None, shard: str | None = None) -> str:
    verdict = {True: "hit", False: "miss"}.get(hit, DASH)
    return f"{verdict}, shard {shard}" if shard else verdict  # which CI shard converted it


def _cosine(value: float | None) -> str:
    return DASH if value is None else f"{value:.4f}"


def _verdict(passed: bool | None) -> str:
    return {True: "pass", False: "FAIL"}.get(passed, DASH)


def _tally(counts: dict[str, int]) -> str:
    """``{"AveragePool": 7, "Gather": 1}`` -> ``"AveragePool ×7, Gather ×1"``."""
    return ", ".join(f"{name} \u00d7{count}" for name, count in counts.items())


def _overrides(overrides: dict) -> str:
    if not overrides["count"]:
        return "0"
    return f"{overrides['count']} ({_tally(overrides['actions'])})"


def _status_line(totals: dict) -> str:
    parts = [f"{count} {status}" for status, count in totals["status"].items()]
    return f"{totals['conversions']} conversions" + (f" ({', '.join(parts)})" if parts else "")


def _totals_line(totals: dict) -> str:
    return (
        f"{_status_line(totals)}; "
        f"{_count(totals['npu'])} NPU / {_count(totals['cpu'])} CPU layers; "
        f"{totals['cache_hits']} cache hits; "
        f"convert time {_seconds(totals['convert_seconds'])}; "
        f".rknn total {human_size(totals['rknn_size'])}; "
        f"verify {totals['verify_passed']} passed, {totals['verify_failed']} failed"
    )


MISPREDICTED = "Predicted \u2260 actual"
COLUMNS = (
    "Model", "Target", "Toolkit / runtime", "Status", "Convert", "Cache", ".rknn size", "NPU", "CPU",
    "CPU layers by op", "Overrides", "Rewrites", MISPREDICTED,
    "Min cosine", "Accuracy", "Est. cycles",
)


def _cells(row: dict) -> list[str]:
    """Plain-text cells of one table row, in COLUMNS order."""
    accuracy = row["accuracy"]
    return [
        row["model"], row["target"], _versions(row), row["status"], _seconds(row["convert_seconds"]),
        _cache(row["cache_hit"], row["shard"]), human_size(row["rknn_size"]), _count(row["npu"]), _count(row["cpu"]),
        _tally(row["cpu_by_op"]) or DASH, _overrides(row["overrides"]), str(row["rewrites"]),
        str(len(row["disagreements"])), _cosine(accuracy["min_cosine"]),
        _verdict(accuracy["passed"]) + (f" ({row['repair']})" if row["repair"] else ""),
        _count(row["total_cycles"]),
    ]


def _versions(row: dict) -> str:
    """The toolkit that built the file (read from it) and the boards' declared runtime."""
    if not row["toolkit"]:
        return DASH
    return f"{row['toolkit']} / {row['runtime']}" if row["runtime"] else row["toolkit"]


def _total_cells(totals: dict) -> list[str]:
    return [
        "Total", f"{totals['conversions']} conversions", "", "", _seconds(totals["convert_seconds"]),
        f"{totals['cache_hits']} hits", human_size(totals["rknn_size"]), _count(totals["npu"]),
        _count(totals["cpu"]), _tally(totals["cpu_by_op"]) or DASH, str(totals["overrides"]),
        str(totals["rewrites"]), str(totals["disagreements"]), "",
        f"{totals['verify_passed']} pass / {totals['verify_failed']} fail", _count(totals["total_cycles"]),
    ]


def _layer_label(layer: dict) -> str:
    ident = DASH if layer["id"] is None else str(layer["id"])
    return f"#{ident} {layer['op_type'] or '?'}" + (f" ({layer['name']})" if layer["name"] else "")


def _disagreement_label(item: dict) -> str:
    op = f" ({item['op_type']})" if item["op_type"] else ""
    return f"{item['node'] or '?'}{op}: predicted {item['predicted'] or '?'}, actual {item['actual'] or '?'}"


# --- Markdown ------------------------------------------------------------------

_MD_SPECIAL = str.maketrans({char: "\\" + char for char in "\\`*[]<>|"})


def _md(text: str) -> str:
    """Escape text for a Markdown table cell or list item (pipes included, one line)."""
    return " ".join(str(text).split()).translate(_MD_SPECIAL)


def render_markdown(summary: dict) -> str:
    rows, totals = summary["rows"], summary["totals"]
    lines = [f"# {TITLE}", "", _md(_totals_line(totals)) + ".", ""]
    if rows:
        lines.append("| " + " | ".join(COLUMNS) + " |")
        lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
        for cells in [*map(_cells, rows), _total_cells(totals)]:
            lines.append("| " + " | ".join(_md(cell) for cell in cells) + " |")
    else:
        lines.append("No conversions to report.")

    lines += ["", "## CPU fallbacks", ""]
    fallbacks = [row for row in rows if row["cpu"] or row["cpu_layers"]]
    for row in fallbacks:
        count = row["cpu"] if row["cpu"] is not None else len(row["cpu_layers"])
        lines.append(f"- **{_md(row['model'])} / {_md(row['target'])}**: {count} CPU layers")
        lines += [f"  - {_md(_layer_label(layer))}" for layer in row["cpu_layers"]]
    if not fallbacks:
        lines.append("No layer falls back to the CPU.")

    analysed = [row for row in rows if row["layer_accuracy"]]
    if analysed:
        lines += ["", "## Per-layer accuracy", "",
                  "The toolkit's per-layer analysis (simulator): the layers that lose the most on their own."]
        for row in analysed:
            worst = sorted(row["layer_accuracy"], key=lambda layer: layer["single"])[:5]
            lines.append(f"- **{_md(row['model'])} / {_md(row['target'])}**")
            lines += [f"  - {_md(layer['label'])}: single cos {layer['single']:.4f}"
                      + (f", entire cos {layer['entire']:.4f}" if layer["entire"] is not None else "")
                      for layer in worst]

    failures = [row for row in rows if row["error"]]
    if failures:
        lines += ["", "## Failures", ""]
        lines += [f"- **{_md(row['model'])} / {_md(row['target'])}**: {_md(row['error'])}" for row in failures]
    return "\n".join(lines) + "\n"


# --- HTML ----------------------------------------------------------------------

NPU_COLOUR = "#2f7dbd"
CPU_COLOUR = "#e8743b"

CSS = f"""
:root {{ color-scheme: light; }}
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1d2329; background: #fff; }}
h1 {{ font-size: 1.5rem; margin: 0 0 .25rem; }}
h2 {{ font-size: 1.1rem; margin: 1.5rem 0 .5rem; }}
.totals {{ color: #4a5560; margin: 0 0 1rem; }}
table {{ border-collapse: collapse; font-variant-numeric: tabular-nums; }}
th, td {{ border: 1px solid #d5dbe1; padding: .3rem .5rem; text-align: left; vertical-align: top; }}
thead th {{ background: #eef2f6; position: sticky; top: 0; }}
td.num {{ text-align: right; white-space: nowrap; }}
tr.cpu td {{ background: #fff3eb; }}
tfoot td {{ font-weight: 600; background: #eef2f6; }}
.status-ok {{ color: #1f7a3a; font-weight: 600; }}
.status-failed, .fail {{ color: #b3261e; font-weight: 600; }}
.status-other {{ color: #6b7580; }}
details summary {{ cursor: pointer; }}
details ul {{ margin: .25rem 0 0; padding-left: 1.1rem; }}
pre {{ white-space: pre-wrap; margin: .25rem 0 0; max-width: 40rem; }}
svg {{ max-width: 100%; height: auto; }}
svg text {{ font: 12px system-ui, sans-serif; fill: #1d2329; }}
.npu {{ fill: {NPU_COLOUR}; }}
.cpu-bar {{ fill: {CPU_COLOUR}; }}
.empty {{ fill: #6b7580; font-style: italic; }}
"""

BAR_HEIGHT = 18
ROW_PITCH = 26
BAR_WIDTH = 480
LEGEND_HEIGHT = 28
LABEL_CHARS = 48


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _short(text: str, limit: int = LABEL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _chart(rows: list[dict]) -> str:
    """Horizontal stacked bars, NPU vs CPU layers, one ``<g class="bar">`` per row.

    Bars share one scale (the largest layer count) so both the split and the
    model sizes are comparable at a glance.
    """
    labels = [f"{row['model']} / {row['target']}" for row in rows]
    label_width = 12 + 7 * max((len(_short(label)) for label in labels), default=10)
    width = label_width + BAR_WIDTH + 150
    height = LEGEND_HEIGHT + ROW_PITCH * max(len(rows), 1) + 6
    scale = max((max(row["npu"] or 0, 0) + max(row["cpu"] or 0, 0) for row in rows), default=0) or 1

    parts = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="NPU and CPU layers per model and target">',
        f'<g class="legend"><rect class="npu" x="{label_width}" y="4" width="12" height="12"/>'
        f'<text x="{label_width + 18}" y="14">NPU layers</text>'
        f'<rect class="cpu-bar" x="{label_width + 110}" y="4" width="12" height="12"/>'
        f'<text x="{label_width + 128}" y="14">CPU layers</text></g>',
    ]
    for index, (row, label) in enumerate(zip(rows, labels)):
        y = LEGEND_HEIGHT + index * ROW_PITCH
        text_y = y + BAR_HEIGHT - 5
        npu, cpu = max(row["npu"] or 0, 0), max(row["cpu"] or 0, 0)
        parts.append(f'<g class="bar" data-cpu="{cpu}">')
        parts.append(f"<title>{_e(label)}: {npu} NPU, {cpu} CPU layers ({_e(row['status'])})</title>")
        parts.append(f'<text x="{label_width - 8}" y="{text_y}" text-anchor="end">{_e(_short(label))}</text>')
        if row["npu"] is None and row["cpu"] is None:
            parts.append(f'<text class="empty" x="{label_width}" y="{text_y}">no placement ({_e(row["status"])})</text>')
        else:
            npu_width = BAR_WIDTH * npu / scale
            cpu_width = BAR_WIDTH * cpu / scale
            parts.append(f'<rect class="npu" x="{label_width}" y="{y}" width="{npu_width:.1f}" height="{BAR_HEIGHT}">'
                         f"<title>{_e(label)}: {npu} NPU layers</title></rect>")
            parts.append(f'<rect class="cpu-bar" x="{label_width + npu_width:.1f}" y="{y}" width="{cpu_width:.1f}" '
                         f'height="{BAR_HEIGHT}"><title>{_e(label)}: {cpu} CPU layers</title></rect>')
            parts.append(f'<text x="{label_width + npu_width + cpu_width + 6:.1f}" y="{text_y}">'
                         f"{npu} / {cpu}</text>")
        parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts)


def _layer_chart(row: dict) -> str:
    """One bar per analysed layer, in network order: its cosine on its own (int8 against float).

    Bars below the model's accuracy threshold are drawn in the warning colour;
    the whole-model-so-far ("entire") cosine is written after each bar.
    """
    layers = row["layer_accuracy"]
    threshold = row["accuracy"]["threshold"] if row["accuracy"]["threshold"] is not None else 0.99
    label_width = 12 + 7 * max(len(_short(layer["label"])) for layer in layers)
    width = label_width + BAR_WIDTH + 230
    height = ROW_PITCH * len(layers) + 6
    title = f"{row['model']} / {row['target']}"
    parts = [f'<svg class="layers" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="per-layer cosine of {_e(title)}">']
    for index, layer in enumerate(layers):
        y = index * ROW_PITCH
        text_y = y + BAR_HEIGHT - 5
        value = max(layer["single"], 0.0)
        bar_class = "cpu-bar" if layer["single"] < threshold else "npu"
        entire = f", entire {layer['entire']:.4f}" if layer["entire"] is not None else ""
        parts.append(f'<g class="layer" data-single="{layer["single"]}">')
        parts.append(f'<text x="{label_width - 8}" y="{text_y}" text-anchor="end">{_e(_short(layer["label"]))}</text>')
        parts.append(f'<rect class="{bar_class}" x="{label_width}" y="{y}" width="{BAR_WIDTH * value:.1f}" '
                     f'height="{BAR_HEIGHT}"><title>{_e(layer["label"])}, tensor {_e(layer["tensor"])}: single '
                     f'{layer["single"]:.4f}{_e(entire)}</title></rect>')
        parts.append(f'<text x="{label_width + BAR_WIDTH * value + 6:.1f}" y="{text_y}">'
                     f'{layer["single"]:.4f}{_e(entire)}</text>')
        parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts)


def _layer_charts(rows: list[dict]) -> str:
    analysed = [row for row in rows if row["layer_accuracy"]]
    if not analysed:
        return ""
    parts = ["<h2>Per-layer accuracy</h2>",
             '<p class="totals">The toolkit\'s per-layer analysis on its simulator: each layer\'s cosine on its own '
             "(int8 against float, exact inputs), in network order; bars below the accuracy threshold are "
             "highlighted, and the cosine of the whole model up to that layer follows.</p>"]
    for row in analysed:
        parts.append(f"<h3>{_e(row['model'])} / {_e(row['target'])}</h3>")
        parts.append(_layer_chart(row))
    return "\n".join(parts)


def _details(summary: str, items: list[str], wrap: str = "ul") -> str:
    if not items:
        return _e(summary)
    if wrap == "pre":
        body = f"<pre>{_e(items[0])}</pre>"
    else:
        body = "<ul>" + "".join(f"<li>{_e(item)}</li>" for item in items) + "</ul>"
    return f"<details><summary>{_e(summary)}</summary>{body}</details>"


NUMERIC_COLUMNS = {"Convert", ".rknn size", "NPU", "CPU", "Rewrites", MISPREDICTED,
                   "Min cosine", "Est. cycles"}


def _html_row(row: dict) -> str:
    text = dict(zip(COLUMNS, _cells(row)))
    cells = {column: _e(value) for column, value in text.items()}
    # Cells whose details (error text, layer lists) fold out on click.
    status_class = {"ok": "status-ok", "failed": "status-failed"}.get(row["status"], "status-other")
    error = [row["error"]] if row["error"] else []
    cells["Status"] = f'<span class="{status_class}">{_details(text["Status"], error, "pre")}</span>'
    cells["CPU layers by op"] = _details(text["CPU layers by op"], [_layer_label(layer) for layer in row["cpu_layers"]])
    cells[MISPREDICTED] = _details(
        text[MISPREDICTED], [_disagreement_label(item) for item in row["disagreements"]])
    if row["accuracy"]["passed"] is False:
        cells["Accuracy"] = f'<span class="fail">{cells["Accuracy"]}</span>'
    tds = "".join(f'<td class="num">{cell}</td>' if column in NUMERIC_COLUMNS else f"<td>{cell}</td>"
                  for column, cell in cells.items())
    row_class = ' class="cpu"' if row["cpu"] else ""
    return f"<tr{row_class}>{tds}</tr>"


def render_html(summary: dict) -> str:
    rows, totals = summary["rows"], summary["totals"]
    head = "".join(f'<th scope="col">{_e(column)}</th>' for column in COLUMNS)
    if rows:
        body = "\n".join(_html_row(row) for row in rows)
        foot = "".join(f"<td>{_e(cell)}</td>" for cell in _total_cells(totals))
        table = (f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n"
                 f"<tfoot><tr>{foot}</tr></tfoot>\n</table>")
        chart = _chart(rows)
    else:
        table = chart = "<p>No conversions to report.</p>"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(TITLE)}</title>
<style>{CSS}</style>
</head>
<body>
<main>
<h1>{_e(TITLE)}</h1>
<p class="totals">{_e(_totals_line(totals))}</p>
<h2>NPU / CPU placement</h2>
{chart}
<h2>Conversions</h2>
<p class="totals">Rows with CPU fallbacks are highlighted; cycles are the compiler's estimate.</p>
{table}
{_layer_charts(rows)}
</main>
</body>
</html>
"""


# --- files ---------------------------------------------------------------------


def write_report(records: list[dict], html_path: Path, md_path: Path) -> tuple[Path, Path]:
    """Write the HTML and Markdown reports atomically (where :class:`pipeline.layout.Layout` says);
    return their paths."""
    html_path, md_path = Path(html_path), Path(md_path)
    summary = build_report(records)
    atomic_write_text(html_path, render_html(summary))
    atomic_write_text(md_path, render_markdown(summary))
    return html_path, md_path
