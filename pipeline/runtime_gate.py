"""The gate between the toolkit that builds a model and the runtime on the boards it ships to.

A model converts and then fails on the board when the board's librknnrt is
older than the toolkit: "Invalid RKNN model version 6" below 1.5.2, or an
operator the older runtime lacks. ``runtime: "2.1.0"`` (or a mapping from
target to version) in the manifest declares what the boards run, and the
manifest loader refuses, before any work:

- a toolkit whose file format that runtime cannot load at all;
- a toolkit newer than the runtime, unless ``allow_newer_toolkit: true``
  (recorded in the sidecar), naming the newest PyPI toolkit the runtime accepts.

A toolkit older than the runtime is accepted with a warning. The facts, each
with its source, are data in ``pipeline/data/runtimes.yaml``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

RULES_PATH = Path(__file__).resolve().parent / "data" / "runtimes.yaml"
VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


def parse_version(text: str) -> tuple[int, int, int] | None:
    match = VERSION.match(str(text))
    return tuple(int(part) for part in match.groups()) if match else None


@functools.lru_cache(maxsize=1)
def rules() -> dict:
    import yaml

    return yaml.safe_load(RULES_PATH.read_text())


def file_format(target: str, toolkit: str) -> int | None:
    """The .rknn file format ``toolkit`` writes for ``target`` (None when no measured row covers it)."""
    version = parse_version(toolkit)
    for row in rules()["file_formats"]:
        if target in row["targets"] and version and row["toolkits"] == f"{version[0]}.x":
            return row["file_format"]
    return None


def newest_accepted(runtime: str) -> str | None:
    """The newest rknn-toolkit2 on PyPI that is not newer than ``runtime``."""
    limit = parse_version(runtime)
    fitting = [v for v in rules()["pypi_toolkits"]["versions"] if parse_version(v) <= limit]
    return max(fitting, key=parse_version) if fitting else None


@dataclass(frozen=True)
class Verdict:
    """The gate's answer for one model x target: refusals (load errors) and warnings."""

    errors: tuple[str, ...]
    warnings: tuple[str, ...]


def check(target: str, toolkit: str, runtime: str, allow_newer: bool = False) -> Verdict:
    """Can a model built by ``toolkit`` for ``target`` run on boards with runtime ``runtime``?"""
    errors, warnings = [], []
    fmt = file_format(target, toolkit)
    for row in rules()["format_minimum_runtime"]:
        if fmt == row["file_format"] and parse_version(runtime) < parse_version(row["runtime"]):
            errors.append(f"rknn-toolkit2 {toolkit} writes file format {fmt} for {target}, which librknnrt "
                          f"{runtime} cannot load (it needs {row['runtime']} or newer: {row['source']}); "
                          f"upgrade the boards' runtime")
    if errors:
        return Verdict(tuple(errors), ())
    if parse_version(toolkit) > parse_version(runtime):
        if allow_newer:
            warnings.append(f"{target}: rknn-toolkit2 {toolkit} is newer than the boards' runtime {runtime}; "
                            f"allowed by allow_newer_toolkit (operators the runtime lacks fail on the board)")
        else:
            newest = newest_accepted(runtime)
            hint = (f"build it with rknn-toolkit2 {newest}, the newest on PyPI that the runtime accepts "
                    f"({_how_to_use(newest)})" if newest else "no rknn-toolkit2 on PyPI is that old")
            errors.append(f"{target}: rknn-toolkit2 {toolkit} is newer than the boards' runtime {runtime}, which "
                          f"may fail on operators it lacks ({rules()['newer_toolkit']['source']}); {hint}, "
                          f"or upgrade the boards, or set allow_newer_toolkit: true")
    elif parse_version(toolkit) < parse_version(runtime):
        warnings.append(f"{target}: rknn-toolkit2 {toolkit} is older than the boards' runtime {runtime}; "
                        f"the runtime loads older models, but newer toolkits fix conversion bugs")
    return Verdict(tuple(errors), tuple(warnings))


def _how_to_use(version: str) -> str:
    """How to build with another toolkit version: per model where the manifest supports it."""
    from pipeline import schema

    if "toolkit" in schema.load()["$defs"]["model"]["properties"]:
        return f'set toolkit: "{version}" for this model'
    return f"uv add rknn-toolkit2=={version} in a checkout for these boards, with the manifest's toolkit: \"{version}\""


def facts_markdown() -> str:
    """The gate's facts as the README's table (a test keeps the README equal to this)."""
    data = rules()
    rows = [f"| {', '.join(row['targets'])} | rknn-toolkit2 {row['toolkits']} writes file format "
            f"{row['file_format']:#x} | {row['source']} |" for row in data["file_formats"]]
    rows += [f"| all | file format {row['file_format']:#x} needs librknnrt >= {row['runtime']} | {row['source']} |"
             for row in data["format_minimum_runtime"]]
    rows.append(f"| all | a toolkit newer than the runtime may build operators the runtime lacks | "
                f"{data['newer_toolkit']['source']} |")
    rows.append(f"| all | rknn-toolkit2 on PyPI for CPython 3.11, x86_64: "
                f"{', '.join(data['pypi_toolkits']['versions'])} | {data['pypi_toolkits']['source']} |")
    return "\n".join(["| targets | fact | source |", "| --- | --- | --- |", *rows])


def runtime_for(model: dict, target: str) -> str | None:
    """The runtime a model declares for ``target`` (a string for every target, or a mapping)."""
    runtime = model.get("runtime")
    if isinstance(runtime, dict):
        return runtime.get(target)
    return runtime


def toolkit_for(model: dict, target: str, installed: str | None) -> str | None:
    """The rknn-toolkit2 version that builds ``model`` for ``target``: the model's own ``toolkit``
    (a string or a mapping from target) when it has one, else the installed one."""
    chosen = model.get("toolkit")
    if isinstance(chosen, dict):
        chosen = chosen.get(target)
    return chosen or installed
