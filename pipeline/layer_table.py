"""Parse the toolkit's "Network Layer Information Table" out of a build log.

With ``RKNN(verbose=True)`` the toolkit's C++ compiler prints, once per build, a
table of the layers it emitted and where each runs (NPU or CPU). It is the only
place that states the *actual* placement, so it is the ground truth that
``placement.json`` and every later verdict are built on. The table goes to file
descriptor 1 with a log prefix (``D RKNN: [hh:mm:ss.mmm] ``); columns are
whitespace separated and no cell contains a space, so a split is exact.

Input and output operators are bookkeeping layers that the table always marks
CPU; they are kept in the records but never counted as CPU fallbacks.
"""

from __future__ import annotations

import re
from collections import Counter

TITLE = "Network Layer Information Table"
_PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m)?D RKNN: \[[0-9:.]+\] ?")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
BOOKKEEPING_OPS = frozenset({"InputOperator", "OutputOperator"})


def _strip(line: str) -> str:
    return _PREFIX.sub("", _ANSI.sub("", line.rstrip("\n")), count=1)


def _shapes(cell: str) -> list[list[int]] | None:
    """``(1,3,224,224),(64)`` -> ``[[1,3,224,224],[64]]``; ``\\`` -> None.

    The toolkit abbreviates long lists with ``...``; the listed shapes are kept.
    """
    if cell in ("\\", ""):
        return None
    return [[int(d) for d in m.split(",") if d.strip().lstrip("-").isdigit()]
            for m in re.findall(r"\(([^)]*)\)", cell)]


def _cycles(cell: str) -> dict[str, int | None]:
    parts = cell.split("/")
    values = [int(p) if p.isdigit() else None for p in parts] + [None] * 3
    return {"ddr": values[0], "npu": values[1], "total": values[2]}


def parse_layer_table(log_text: str) -> list[dict]:
    """Return one record per layer of the *last* layer table in ``log_text``.

    A record is ``{"id", "op_type", "dtype", "target", "input_shapes",
    "output_shapes", "cycles": {"ddr", "npu", "total"}, "rw_kb", "full_name",
    "origin_op", "node"}``, where ``full_name`` is the table's FullName
    (``AveragePool:n65``) split into the originating ONNX op type and node name.
    Returns an empty list when the log holds no table (the build failed before
    the compiler ran, or verbose logging was off).
    """
    lines = log_text.splitlines()
    starts = [i for i, line in enumerate(lines) if TITLE in line]
    if not starts:
        return []
    records: list[dict] = []
    seen_header = False
    for raw in lines[starts[-1] + 1:]:
        line = _strip(raw)
        if line.startswith("ID ") and "OpType" in line:
            seen_header = True
            continue
        if set(line.strip()) <= {"-"}:
            if seen_header and records:
                break
            continue
        cells = line.split(None, 8)
        if not seen_header or len(cells) < 8 or not cells[0].isdigit():
            if seen_header and records:
                break
            continue
        # FullName is empty for layers the compiler made up (e.g. a tiled Conv's parts)
        layer_id, op_type, dtype, target, ins, outs, cycles, rw, full_name = (cells + [""])[:9]
        origin_op, _, node = full_name.strip().partition(":")
        records.append({
            "id": int(layer_id),
            "op_type": op_type,
            "dtype": dtype,
            "target": target.upper(),
            "input_shapes": _shapes(ins),
            "output_shapes": _shapes(outs),
            "cycles": _cycles(cycles),
            "rw_kb": float(rw) if rw.replace(".", "", 1).isdigit() else None,
            "full_name": full_name.strip(),
            "origin_op": origin_op,
            "node": node,
        })
    return records


def summarize(layers: list[dict]) -> dict:
    """Counts that the sidecar, the task line and the report show.

    ``layers`` excludes input/output bookkeeping operators; ``total_cycles`` is
    the sum of the table's estimated total cycles (an estimate by the compiler,
    not a measurement on a board).
    """
    real = [layer for layer in layers if layer["op_type"] not in BOOKKEEPING_OPS]
    cpu = [layer for layer in real if layer["target"] == "CPU"]
    return {
        "layers": len(real),
        "npu": sum(1 for layer in real if layer["target"] == "NPU"),
        "cpu": len(cpu),
        "cpu_layers": [{"id": layer["id"], "op_type": layer["op_type"], "name": layer["full_name"],
                        "node": layer["node"]} for layer in cpu],
        "cpu_by_op": dict(sorted(Counter(layer["origin_op"] or layer["op_type"] for layer in cpu).items())),
        "total_cycles": sum((layer["cycles"]["total"] or 0) for layer in real),
    }
