"""What an .rknn file says about itself: file format, toolkit version, compiler and target.

``python -m pipeline.rknn_file MODEL.rknn [...]`` prints them and checks that the
header and the trailer agree; standard library only, so it runs anywhere a
model is deployed from (a board's Python, a CI image without the toolkit).

The layout (format 6 measured on rk3588 files from rknn-toolkit2 2.2.0, 2.3.0, 2.3.2 and 2.5.0;
both formats on 2.5.0 files for eight targets, see ``pipeline/data/runtimes.yaml``):

- bytes 0-3 ``RKNN``; a little-endian u64 file format at offset 8; a u64 body
  length at offset 16; the body starts at offset 64;
- the body holds a FlatBuffer whose file identifier is ``RKNN`` (at the body's
  start for format 6, the rk35xx/rv1126b container; after a section table for
  format 0x1004, the rv1103/rv1106/rv1103b/rv1106b/rk2118 container). Its root
  table holds the toolkit version as ``major*10000 + minor*100 + patch``, the
  compiler string and the target, in fields that depend on the format
  (:data:`ROOT_FIELDS`);
- after the body, a u64 length and a JSON trailer that repeats ``version`` and
  ``target_platform``.

Board runtimes read the format first: librknnrt before 1.5.2 refuses format 6
("Invalid RKNN model version 6"), which is why the runtime gate needs it.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from pipeline.errors import PipelineError

MAGIC = b"RKNN"
BODY_OFFSET = 64
# file format -> root-table field numbers of (toolkit version, compiler string, target string)
ROOT_FIELDS = {6: (6, 7, 8), 0x1004: (4, 5, 6)}


class RknnFileError(PipelineError, ValueError):
    """The file is not an .rknn model this reader understands; the message says where it stopped."""


@dataclass(frozen=True)
class RknnInfo:
    """What one .rknn file records about how it was built."""

    path: str
    file_format: int
    toolkit: str | None  # from the FlatBuffer header, e.g. "2.5.0"
    compiler: str | None
    target: str | None
    trailer_toolkit: str | None  # the JSON trailer's "version"
    trailer_targets: tuple[str, ...]

    def disagreements(self) -> list[str]:
        """Where the header and the trailer disagree (empty for a sound file)."""
        problems = []
        if self.toolkit and self.trailer_toolkit and self.toolkit != self.trailer_toolkit:
            problems.append(f"header says toolkit {self.toolkit}, trailer says {self.trailer_toolkit}")
        if self.target and self.trailer_targets and self.target not in self.trailer_targets:
            problems.append(f"header says target {self.target}, trailer says {', '.join(self.trailer_targets)}")
        return problems

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["trailer_targets"] = list(self.trailer_targets)
        return doc


def _version_text(number: int) -> str:
    return f"{number // 10000}.{number // 100 % 100}.{number % 100}"


class _Table:
    """A FlatBuffer table: enough to read u32 scalars and strings by field number."""

    def __init__(self, data: bytes, position: int):
        self.data = data
        self.position = position
        vtable = position - struct.unpack_from("<i", data, position)[0]
        size = struct.unpack_from("<H", data, vtable)[0]
        count = (size - 4) // 2
        self.offsets = struct.unpack_from(f"<{count}H", data, vtable + 4)

    def _field(self, number: int) -> int | None:
        if number >= len(self.offsets) or not self.offsets[number]:
            return None
        return self.position + self.offsets[number]

    def u32(self, number: int) -> int | None:
        at = self._field(number)
        return None if at is None else struct.unpack_from("<I", self.data, at)[0]

    def string(self, number: int) -> str | None:
        at = self._field(number)
        if at is None:
            return None
        start = at + struct.unpack_from("<I", self.data, at)[0]
        length = struct.unpack_from("<I", self.data, start)[0]
        return self.data[start + 4:start + 4 + length].decode("utf-8", "replace")


def _root_table(body: bytes) -> _Table:
    """The root table of the body's FlatBuffer (the first 4-aligned place whose identifier is RKNN)."""
    at = 0
    while True:
        at = body.find(MAGIC, at + 1)
        if at < 0:
            raise RknnFileError("no FlatBuffer with identifier RKNN in the body")
        start = at - 4
        if start % 4 == 0:
            root = start + struct.unpack_from("<I", body, start)[0]
            if root < len(body):
                return _Table(body, root)


def read(path) -> RknnInfo:
    """Read an .rknn file's build facts; raise :class:`RknnFileError` if it is not one."""
    data = Path(path).read_bytes()
    if len(data) < BODY_OFFSET or data[:4] != MAGIC:
        raise RknnFileError(f"{path}: not an .rknn file (it does not start with {MAGIC!r})")
    file_format, body_length = struct.unpack_from("<QQ", data, 8)
    body_end = BODY_OFFSET + body_length
    if body_end > len(data):
        raise RknnFileError(f"{path}: truncated: the header promises a {body_length}-byte body, "
                            f"the file has {len(data) - BODY_OFFSET}")
    toolkit = compiler = target = None
    fields = ROOT_FIELDS.get(file_format)
    if fields is not None:
        try:
            table = _root_table(data[BODY_OFFSET:body_end])
            number = table.u32(fields[0])
            toolkit = _version_text(number) if number else None
            compiler, target = table.string(fields[1]), table.string(fields[2])
        except (struct.error, RknnFileError) as exc:
            raise RknnFileError(f"{path}: the model header cannot be read ({exc})") from None
    trailer_toolkit, trailer_targets = None, ()
    if len(data) >= body_end + 8:
        length = struct.unpack_from("<Q", data, body_end)[0]
        try:
            trailer = json.loads(data[body_end + 8:body_end + 8 + length])
            trailer_toolkit = trailer.get("version")
            trailer_targets = tuple(trailer.get("target_platform") or ())
        except (ValueError, AttributeError):
            pass
    if toolkit is None and trailer_toolkit is None:
        raise RknnFileError(f"{path}: file format {file_format:#x} records no toolkit version this reader knows")
    return RknnInfo(str(path), file_format, toolkit, compiler, target, trailer_toolkit, trailer_targets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.rknn_file",
                                     description="Print how .rknn files were built; exit 1 if one is unreadable "
                                                 "or its header and trailer disagree.")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--json", action="store_true", help="one JSON object per file")
    args = parser.parse_args(argv)
    status = 0
    for path in args.files:
        try:
            info = read(path)
        except (OSError, RknnFileError) as exc:
            print(f"{path}: {exc}" if isinstance(exc, OSError) else str(exc), file=sys.stderr)
            status = 1
            continue
        problems = info.disagreements()
        status |= bool(problems)
        if args.json:
            print(json.dumps({**info.to_json(), "problems": problems}, sort_keys=True))
            continue
        print(f"{path}: file format {info.file_format:#x}, toolkit {info.toolkit or info.trailer_toolkit}, "
              f"target {info.target or ', '.join(info.trailer_targets)}")
        print(f"  compiler: {info.compiler}")
        for problem in problems:
            print(f"  problem: {problem}")
    return status


if __name__ == "__main__":
    sys.exit(main())
