"""``python -m pipeline.ci [models.yaml]``: print the CI cache key for a manifest's artifacts.

The artifact cache is content-addressed per conversion, so any old cache dir is
safe to restore; this key only decides when CI saves a new snapshot of it. It
covers everything any conversion's key covers at the manifest level: the
package's format, the installed toolkit, the effective models and the bytes of
every source and calibration file. Printed as ``rknn-<64 hex>``.
"""

from __future__ import annotations

import sys
from pathlib import Path


def manifest_key(manifest_path: str | Path) -> str:
    from pipeline.cache import cache_key, file_sha256
    from pipeline.conversion import dataset_file, sample_files
    from pipeline.manifest import load_manifest
    from pipeline.tasks import PIPELINE_FORMAT
    from pipeline.toolkit import installed_version

    manifest = load_manifest(Path(manifest_path))
    models = []
    for model in manifest.models:
        quant = model.get("quantization") or {}
        listing = dataset_file(model)
        inputs = [model["source"], *([listing] if listing else []), *sample_files(model)]
        settings = {k: v for k, v in model.items() if k not in ("source", "index", "quantization")}
        settings["quantization"] = {k: v for k, v in quant.items() if k not in ("dataset", "samples", "images")}
        models.append({"settings": settings, "inputs": [file_sha256(p) for p in inputs]})
    return "rknn-" + cache_key({"pipeline_format": PIPELINE_FORMAT, "toolkit": installed_version(), "models": models})


def main(argv: list[str]) -> int:
    from pipeline.manifest import ManifestError

    try:
        print(manifest_key(argv[0] if argv else "models.yaml"))
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
