"""The records stages pass each other on disk, typed, and read back only in the format they were written.

Each record is a JSON object whose key names are the product's contract (the
sidecar ships in ``dist/``), so the typed view is a ``TypedDict`` and the
reading and writing go through one :class:`RecordKind` per file kind. A reader
gets either a record with every key it relies on, or a :class:`StaleRecord`
that says to rebuild: never a ``KeyError`` three modules later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Generic, TypedDict, TypeVar

from pipeline import files
from pipeline.errors import StaleRecord  # noqa: F401  (re-exported for readers)
from pipeline.formats import ANALYSIS_FORMAT, CONVERT_FORMAT, RESOLUTION_FORMAT, SIDECAR_FORMAT


class Analysis(TypedDict, total=False):
    """``analysis.json``: what the graph holds and where each node is predicted to run (:mod:`pipeline.analysis`)."""

    format: int
    model: str
    target: str
    platform_group: str
    nodes: list[dict]  # each: index, name, op_type, attrs, inputs, outputs, shapes, predicted
    graph_inputs: list[dict]
    graph_outputs: list[dict]
    dynamic_inputs: list[str]
    predicted_summary: dict[str, int]
    predicted_off_npu: list[dict]
    external_data: list[str]


class Resolution(TypedDict, total=False):
    """``resolved.json``: the exact ``op_target`` and why each key is there (:mod:`pipeline.resolution`)."""

    format: int
    model: str
    target: str
    op_target: dict[str, str]
    explanations: dict[str, dict]  # op_target key -> override, action, node, op_type, predicted
    overrides_applied: list[dict]
    rewrites: list[dict]
    converted_onnx: str | None
    notes: list[str]
    warnings: list[str]
    remaps: list[dict]  # added after conversion: keys the toolkit renamed
    op_target_used: dict[str, str]
    repair: dict  # a repair's choice of float layers, with the key it was searched for


class ConvertRecord(TypedDict, total=False):
    """``convert.json``: one conversion's outcome (:mod:`pipeline.conversion`), also stored in the cache."""

    format: int
    model: str
    target: str
    ok: bool
    arguments: dict
    converted_onnx: str
    op_target: dict[str, str]
    remaps: list[dict]
    seconds: float | None
    verify: dict | None
    placement: dict | None
    diagnostics: list[dict]
    accuracy: dict
    cache: dict
    repair: dict
    error: str
    step: str | None
    shard: str | None  # "2/3": the CI shard that converted it (pipeline.shard), None outside sharded builds
    run: str | None  # that shard's CI run


class Sidecar(TypedDict, total=False):
    """``dist/<target>/<name>.json``: what was built, from what, with which tools (:func:`pipeline.stages.export`)."""

    format: int
    model: str
    target: str
    status: str
    rknn: dict  # file, sha256, size
    inputs: dict
    versions: dict
    arguments: dict
    op_target: dict
    placement: dict | None
    verify: dict | None
    warnings: list[str]
    shard: str | None  # the CI shard that converted it (report: "hit, shard 2/3")


T = TypeVar("T")


class RecordKind(Generic[T]):
    """One kind of record file: its format number and the keys every reader relies on.

    ``write`` stamps the format; ``read`` refuses a record of another format,
    or without those keys, with a message that says to rebuild.
    """

    def __init__(self, kind: str, format: int, required: tuple[str, ...], *, compact: bool = False):
        self.kind = kind
        self.format = format
        self.required = required
        self.compact = compact  # big machine records: compact JSON is several times faster

    def check(self, doc: Any, where: str | Path) -> T:
        found = doc.get("format") if isinstance(doc, dict) else None
        missing = [key for key in self.required if key not in doc] if isinstance(doc, dict) else list(self.required)
        if found != self.format or missing:
            detail = f"format {found!r}, this rknn-pipeline reads format {self.format}"
            if found == self.format:
                detail = f"no {', '.join(missing)}"
            hint = f"delete {Path(where).parent} and run doit again" if isinstance(where, Path) else "rebuild it"
            raise StaleRecord(f"{where}: a {self.kind} record from another version of rknn-pipeline ({detail}); "
                              f"{hint}")
        return doc  # type: ignore[return-value]

    def read(self, path: Path, *, missing_ok: bool = False) -> T | None:
        """The record at ``path``; None when it does not exist and ``missing_ok``."""
        doc = files.read_json(path)
        if doc is None:
            if missing_ok:
                return None
            raise StaleRecord(f"{path}: no {self.kind} record; the stage that writes it has not run "
                              f"(run doit again)")
        return self.check(doc, Path(path))

    def write(self, path: Path, doc: T) -> T:
        stamped = {**doc, "format": self.format}  # type: ignore[arg-type]
        self.check(stamped, "the record being written")
        files.atomic_write_json(path, stamped, compact=self.compact)
        return stamped  # type: ignore[return-value]


ANALYSIS: RecordKind[Analysis] = RecordKind("analysis", ANALYSIS_FORMAT, ("model", "target", "nodes"), compact=True)
RESOLUTION: RecordKind[Resolution] = RecordKind("resolution", RESOLUTION_FORMAT,
                                                ("model", "target", "op_target", "explanations", "rewrites"))
CONVERT: RecordKind[ConvertRecord] = RecordKind("convert", CONVERT_FORMAT, ("model", "target", "ok"))
SIDECAR: RecordKind[Sidecar] = RecordKind("sidecar", SIDECAR_FORMAT, ("model", "target", "status", "rknn"))
