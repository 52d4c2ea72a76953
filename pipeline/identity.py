"""A conversion's identity: the one document whose hash keys the artifact cache.

Everything that can change what a conversion produces is in it, and nothing
else: the bytes of every input file (never a path, so two checkouts at
different places agree), the toolkit arguments with each file argument replaced
by its content hash, the target, the exact versions of the libraries that run
the conversion, and a digest of this package's own code and data that take part
in it. The digest is computed from the files, so a change to the worker cannot
be served an artifact made by the old worker just because nobody bumped a number.

Left out on purpose: the model's name (two models with the same settings share
an artifact), the checkout's path, comments and key order in models.yaml, and
other models.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from importlib import metadata
from pathlib import Path

from pipeline import files
from pipeline.cache import file_sha256

# The libraries whose versions can change a conversion's bytes or its verify figures.
VERSIONED = ("rknn-toolkit2", "onnx", "onnxruntime", "numpy", "torch")

# This package's files that take part in a conversion (paths relative to the package). The
# rewrite and analysis code is not listed: their effect reaches the key through the rewritten
# ONNX's bytes and the resolved op_target. Orchestration (tasks, stages, cache) is not listed:
# it decides whether to convert, not what a conversion produces.
CONVERSION_CODE = (
    "conversion.py",
    "worker.py",
    "zygote.py",
    "toolkit_envs.py",
    "data/toolkits.yaml",
    "toolkit.py",
    "verify.py",
    "calibration.py",
    "shapes.py",
    "inputs.py",
    "layer_table.py",
    "diagnostics.py",
    "data/diagnostics.yaml",
    "data/op_rules.yaml",
)

PACKAGE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def _versions() -> tuple:
    found = {}
    for dist in VERSIONED:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    found["python"] = platform.python_version()
    return tuple(found.items())


def versions() -> dict:
    """Exact installed versions of the libraries in :data:`VERSIONED`, and Python's (read once per process)."""
    return dict(_versions())


def conversion_versions(model: dict, target: str) -> dict:
    """The versions that run this conversion: the project's environment, or, for a model that asks for
    another toolkit, that toolkit and the requirements its environment is made from (known without
    making it, so a warm cache needs no environment)."""
    from pipeline import toolkit_envs
    from pipeline.runtime_gate import toolkit_for

    version = toolkit_for(model, target, None)
    if not toolkit_envs.uses_own_environment(version):
        return versions()
    return {"rknn-toolkit2": version, "environment": toolkit_envs.requirements(version),
            "python": platform.python_version()}


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 over the names and bytes of :data:`CONVERSION_CODE` (computed, never bumped by hand)."""
    return source_digest(CONVERSION_CODE)


def source_digest(relatives, digest=None) -> str:
    """sha256 over the names and bytes of the package files ``relatives`` (continuing ``digest``)."""
    digest = digest or hashlib.sha256()
    for relative in relatives:
        path = PACKAGE / relative
        if not path.is_file():  # a module that does not exist yet in this version of the package
            continue
        digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _hashed_files(value, base: Path):
    """``value`` with every string naming an existing file under ``base`` replaced by its content hash."""
    def hashed(text: str):
        path = Path(text)
        if text.startswith("/") and path.is_relative_to(base) and path.is_file():
            return {"sha256": file_sha256(path)}
        return text

    return files.map_strings(value, hashed)


def external_data_hashes(source: str, locations: list[str]) -> dict:
    """sha256 of each external weight file the model names (locations are relative to the model)."""
    folder = Path(source).parent
    return {location: file_sha256(folder / location) for location in sorted(locations)}


def key_document(model: dict, target: str, resolved: dict, *, base: Path,
                 external_data: list[str] = ()) -> dict:
    """Everything that determines a conversion's outputs: hash it with :func:`pipeline.cache.cache_key`.

    ``base`` is the manifest's directory (absolute): every path under it is
    replaced by the hash of the file it names. ``external_data`` lists the
    source's external weight files (as analysis records them).
    """
    from pipeline.conversion import toolkit_arguments

    base = Path(base).resolve()
    args = toolkit_arguments(model, target, "")
    del args["source"]
    quant = model.get("quantization") or {}
    if quant:
        # The dataset argument is a listing of sample paths: what matters is the samples' bytes,
        # per calibration step and input, in order.
        args["build"]["dataset"] = {"rows": [[file_sha256(path) for path in row]
                                             for row in quant.get("samples") or []]}
    converted = resolved.get("converted_onnx")
    return {
        "target": target,
        "source": file_sha256(model["source"]),
        "external_data": external_data_hashes(model["source"], list(external_data)),
        "converted_onnx": converted and file_sha256(converted),
        "arguments": _hashed_files(args, base),
        "images": quant.get("images"),
        "op_target": resolved.get("op_target"),
        "rewrites": [{k: v for k, v in item.items() if k != "path"} for item in resolved.get("rewrites") or []],
        "hybrid": quant.get("hybrid"),
        "repair": quant.get("repair"),
        # the float layers an earlier repair search chose for these same inputs (stages.repair_choice)
        "repair_choice": (resolved.get("repair") or {}).get("float_tensors"),
        "verify": model.get("verify"),
        "verify_shapes": model.get("shape_sets"),
        "versions": conversion_versions(model, target),
        "code": code_digest(),
    }
