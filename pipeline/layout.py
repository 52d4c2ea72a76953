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


ACCURACY_FILE = "accuracy.json"  # also named by the conversion, which knows only the workdir


class Layout:
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

    def workdir(self, name: str, target: str) -> Path:
        return self._inside(self.build, name, target)

    def analysis(self, name: str, target: str) -> Path:
        return self.workdir(name, target) / "analysis.json"

    def resolved(self, name: str, target: str) -> Path:
        return self.workdir(name, target) / "resolved.json"

    def rknn(self, name: str, target: str) -> Path:
        return self.workdir(name, target) / "model.rknn"

    def convert_record(self, name: str, target: str) -> Path:
        return self.workdir(name, target) / "convert.json"

    def placement(self, name: str, target: str) -> Path:
        return self.workdir(name, target) / "placement.json"

    def calibration_dir(self, name: str, target: str) -> Path:
        """The calibration samples as the toolkit reads them: links (or decoded images), no space in a name."""
        return self.workdir(name, target) / "calibration"

    def calibration_list(self, name: str, target: str) -> Path:
        """The toolkit's dataset file, written by the pipeline (paths relative to it)."""
        return self.calibration_dir(name, target) / "dataset.txt"

    def verify_samples_dir(self, name: str, target: str) -> Path:
        """A dynamic model's samples decoded again at each shape set, for the accuracy check."""
        return self.calibration_dir(name, target) / "verify"

    def accuracy(self, name: str, target: str) -> Path:
        """The per-layer quantization analysis (:mod:`pipeline.accuracy`), when one ran."""
        return self.workdir(name, target) / ACCURACY_FILE

    def log(self, name: str, target: str) -> Path:
        return self.workdir(name, target) / "convert.log"

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
