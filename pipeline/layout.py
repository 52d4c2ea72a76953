"""Where every artifact lives, in one place (the layout is part of the product's contract).

``build/<name>/<target>/`` holds a model x target's intermediate records and
logs; ``dist/<target>/<name>.rknn`` plus ``<name>.json`` are the deliverables.
Model names are validated by the manifest (``[a-z0-9][a-z0-9._-]*``, no ``..``)
and targets are known platform names, so these paths never leave the tree;
:meth:`Layout._inside` re-checks it anyway, because a path bug here would write
outside the project.
"""

from __future__ import annotations

from pathlib import Path


ACCURACY_FILE = "accuracy.json"
# A conversion's outputs as the cache stores them (by these base names) and restores them.
CACHED_FILES = ("model.rknn", "convert.json", "placement.json", "convert.log")
OPTIONAL_CACHED_FILES = (ACCURACY_FILE,)  # the per-layer analysis, when one ran


class PairLayout:
    """The files of one model x target under ``build/<name>/<target>/``.

    The conversion and the stages receive this object, not a bare directory, so
    that no other module spells a file name. Created by :meth:`Layout.pair`, or
    around any directory (tests, benchmarks) with ``PairLayout(path)``.
    """

    def __init__(self, directory: Path):
        self.dir = Path(directory)

    @classmethod
    def of(cls, where: "PairLayout | Path | str") -> "PairLayout":
        """``where`` itself, or a pair layout around that directory (for callers that still pass one)."""
        return where if isinstance(where, PairLayout) else cls(Path(where))

    def __repr__(self) -> str:
        return f"PairLayout({str(self.dir)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, PairLayout) and other.dir == self.dir

    def __hash__(self) -> int:
        return hash(self.dir)

    @property
    def analysis(self) -> Path:
        return self.dir / "analysis.json"

    @property
    def resolved(self) -> Path:
        return self.dir / "resolved.json"

    @property
    def rewritten_onnx(self) -> Path:
        """The graph after ``action: rewrite`` overrides (resolve writes it, convert reads it)."""
        return self.dir / "rewritten.onnx"

    @property
    def rknn(self) -> Path:
        return self.dir / "model.rknn"

    @property
    def partial_rknn(self) -> Path:
        """Where the worker writes the model; renamed to :attr:`rknn` only once the record is written."""
        from pipeline.files import PARTIAL_SUFFIX

        return self.dir / ("model.rknn" + PARTIAL_SUFFIX)

    @property
    def convert_record(self) -> Path:
        return self.dir / "convert.json"

    @property
    def placement(self) -> Path:
        return self.dir / "placement.json"

    @property
    def log(self) -> Path:
        return self.dir / "convert.log"

    @property
    def accuracy(self) -> Path:
        """The per-layer quantization analysis (:mod:`pipeline.accuracy`), when one ran."""
        return self.dir / ACCURACY_FILE

    @property
    def export_error(self) -> Path:
        """Why export refused the model (read back by the lock and the report)."""
        return self.dir / "export-error.json"

    @property
    def work(self) -> Path:
        """The worker's scratch directory: its job and result documents and the toolkit's own files."""
        return self.dir / "work"

    @property
    def job(self) -> Path:
        return self.work / "job.json"

    @property
    def ahead_log(self) -> Path:
        """The log of a conversion started before its task (see pipeline.conversion); the task moves it
        to :attr:`log` when it collects the result, so an uncollected one never replaces the real log."""
        return self.work / "convert.log"

    @property
    def worker_result(self) -> Path:
        return self.dir / "worker-result.json"

    @property
    def calibration_dir(self) -> Path:
        """The calibration samples as the toolkit reads them: links (or decoded images), no space in a name."""
        return self.dir / "calibration"

    @property
    def calibration_list(self) -> Path:
        """The toolkit's dataset file, written by the pipeline (paths relative to it)."""
        return self.calibration_dir / "dataset.txt"

    @property
    def verify_samples_dir(self) -> Path:
        """A dynamic model's samples decoded again at each shape set, for the accuracy check."""
        return self.calibration_dir / "verify"


class Layout:
    """Where the whole project's artifacts live: ``build/`` per pair (:class:`PairLayout`) and ``dist/``."""

    # Files the build writes directly under build/ (beside the per-model directories) and dist/
    # (beside the per-target ones): a model or target with one of these names would collide.
    BUILD_FILES = ("report.html", "report.md")
    DIST_FILES = ("models.lock.json",)

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.build = self.root / "build"
        self.dist = self.root / "dist"

    def _inside(self, base: Path, *parts: str) -> Path:
        # A string check, not resolve(): this runs for every task at every doit start.
        for part in parts:
            if not part or part in (".", "..") or "/" in part or "\\" in part or "\0" in part:
                raise ValueError(f"refusing path outside {base}: {part!r}")
        return base.joinpath(*parts)

    def pair(self, name: str, target: str) -> PairLayout:
        return PairLayout(self._inside(self.build, name, target))

    def workdir(self, name: str, target: str) -> Path:
        return self.pair(name, target).dir

    # One-line accessors kept for the many callers that name a pair by (name, target).
    def analysis(self, name: str, target: str) -> Path:
        return self.pair(name, target).analysis

    def resolved(self, name: str, target: str) -> Path:
        return self.pair(name, target).resolved

    def rknn(self, name: str, target: str) -> Path:
        return self.pair(name, target).rknn

    def convert_record(self, name: str, target: str) -> Path:
        return self.pair(name, target).convert_record

    def placement(self, name: str, target: str) -> Path:
        return self.pair(name, target).placement

    def calibration_dir(self, name: str, target: str) -> Path:
        return self.pair(name, target).calibration_dir

    def calibration_list(self, name: str, target: str) -> Path:
        return self.pair(name, target).calibration_list

    def verify_samples_dir(self, name: str, target: str) -> Path:
        return self.pair(name, target).verify_samples_dir

    def accuracy(self, name: str, target: str) -> Path:
        return self.pair(name, target).accuracy

    def log(self, name: str, target: str) -> Path:
        return self.pair(name, target).log

    def export_error(self, name: str, target: str) -> Path:
        return self.pair(name, target).export_error

    def rewritten_onnx(self, name: str, target: str) -> Path:
        return self.pair(name, target).rewritten_onnx

    def dist_rknn(self, name: str, target: str) -> Path:
        return self._inside(self.dist, target, f"{name}.rknn")

    def sidecar(self, name: str, target: str) -> Path:
        return self._inside(self.dist, target, f"{name}.json")

    def lock_file(self) -> Path:
        return self.dist / self.DIST_FILES[0]

    def report_html(self) -> Path:
        return self.build / self.BUILD_FILES[0]

    def report_md(self) -> Path:
        return self.build / self.BUILD_FILES[1]
