"""Safe YAML loading that remembers where every key and value came from.

PyYAML's loaders either lose positions (``safe_load``) or are slow and keep
whole node graphs around (``compose`` + ``construct``). Manifest errors must
point at ``PATH:LINE:COL``, hostile input must fail fast and cleanly, and a
large manifest must load in milliseconds, so this module drives the YAML
event stream itself (libyaml's parser when available) and builds plain data
plus a light "shadow" tree of positions in a single pass. Along the way it:

* accepts only plain data tags (str, int, float, bool, null, seq, map);
  timestamps stay strings so the result is always JSON-serialisable;
* rejects duplicate keys and non-string keys;
* keeps aliases and ``<<`` merges, but counts the nodes they expand to and
  stops past ``max_nodes`` (billion laughs) and refuses recursive aliases;
* bounds nesting depth so later recursive consumers cannot overflow;
* reports tabs, undecodable bytes, control characters and syntax errors
  with 1-based line and column.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import yaml
from yaml import events as ev
from yaml.constructor import SafeConstructor
from yaml.nodes import ScalarNode
from yaml.resolver import Resolver
from pipeline.errors import PipelineError

try:  # libyaml's parser is several times faster than the pure-Python one
    from yaml.cyaml import CParser as _FastParser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    _FastParser = None

MAX_NODES = 100_000
MAX_DEPTH = 64

_TAG = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (_TAG + t for t in ("str", "int", "float", "bool", "null"))
_SCALAR_TAGS = {_STR, _INT, _FLOAT, _BOOL, _NULL, _TAG + "timestamp", _TAG + "merge", _TAG + "value"}
_CONTAINER_TAGS = {None, "!", _TAG + "map", _TAG + "seq"}
_CONSTRUCTOR = SafeConstructor()
_DECIMAL = re.compile(r"[-+]?(?:0|[1-9][0-9]*)\Z")
_NOT_PRINTABLE = re.compile("[^\t\n\r\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

Position = tuple  # (line, col), both 1-based


class YamlError(PipelineError, ValueError):
    """Bad YAML input, located at 1-based ``line`` and ``col`` of ``name``."""

    def __init__(self, name: str, line: int, col: int, message: str):
        super().__init__(f"{name}:{line}:{col}: {message}")
        self.name, self.line, self.col, self.message = name, line, col, message


_MISSING = object()


class _MergeKey(str):
    """The plain ``<<`` key, as opposed to a quoted ``"<<"`` string."""


# A shadow is (line, col, children): children is None for a scalar, a list of
# shadows for a sequence, or a dict key -> (key_line, key_col, shadow).


@dataclass(frozen=True)
class YamlDocument:
    """Plain data from one YAML document, with positions by path."""

    name: str
    data: object
    _shadow: tuple = field(repr=False, compare=False)

    def _find(self, path) -> tuple[int, tuple]:
        """How many leading path items exist, and the shadow they lead to."""
        node = self._shadow
        for depth, item in enumerate(path):
            child = _child(node[2], item)
            if child is None:
                return depth, node
            node = child[2] if isinstance(node[2], dict) else child
        return len(path), node

    def position(self, path=()) -> Position | None:
        """(line, col) of the value at ``path``, or None if there is none."""
        depth, node = self._find(path)
        return (node[0], node[1]) if depth == len(path) else None

    def key_position(self, path) -> Position | None:
        """(line, col) of the mapping key that ``path`` ends with."""
        depth, node = self._find(path[:-1])
        if not path or depth < len(path) - 1 or not isinstance(node[2], dict):
            return None
        entry = node[2].get(path[-1])
        return (entry[0], entry[1]) if entry else None

    def nearest(self, path) -> tuple[tuple, Position]:
        """The longest existing prefix of ``path`` and its value's position."""
        depth, node = self._find(path)
        return tuple(path[:depth]), (node[0], node[1])


def _child(children, item):
    if isinstance(children, dict):
        return children.get(item) if isinstance(item, str) else None
    if isinstance(children, list) and type(item) is int and 0 <= item < len(children):
        return children[item]
    return None


def load_yaml(path, *, max_nodes: int = MAX_NODES) -> YamlDocument:
    """Read and parse the YAML file at ``path`` (shown in errors as given)."""
    name = os.fspath(path)
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as error:
        raise YamlError(name, 1, 1, f"cannot read file: {error.strerror or error}") from None
    return parse_yaml(data, name, max_nodes=max_nodes)


def parse_yaml(source: str | bytes, name: str = "<string>", *, max_nodes: int = MAX_NODES) -> YamlDocument:
    """Parse one YAML document from ``source``; raise YamlError if it is bad."""
    text = _decode(source, name) if isinstance(source, bytes) else source
    text = text[1:] if text.startswith("\ufeff") else text
    bad = _NOT_PRINTABLE.search(text)
    if bad:
        line, col = _line_col(text, bad.start())
        raise YamlError(name, line, col, f"control character U+{ord(bad.group()):04X} is not allowed in YAML")
    parser = _FastParser(text) if _FastParser else _PyParser(text)
    try:
        data, shadow = _Builder(parser, name, max_nodes).document()
    except yaml.MarkedYAMLError as error:
        raise _syntax_error(error, text, name) from None
    except yaml.YAMLError as error:
        raise YamlError(name, 1, 1, f"YAML error: {error}") from None
    return YamlDocument(name, data, shadow)


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        start = error.start
        line_start = data.rfind(b"\n", 0, start) + 1
        line = data.count(b"\n", 0, start) + 1
        col = len(data[line_start:start].decode("utf-8", "replace")) + 1
        message = f"not valid UTF-8: byte 0x{data[start]:02x} cannot be decoded; save the file as UTF-8"
        raise YamlError(name, line, col, message) from None


def _line_col(text: str, index: int) -> Position:
    return text.count("\n", 0, index) + 1, index - text.rfind("\n", 0, index)


def _syntax_error(error: yaml.MarkedYAMLError, text: str, name: str) -> YamlError:
    mark = error.problem_mark or error.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    problem = error.problem or error.context or "invalid YAML"
    if _tab_at(text, line, col) or "tab" in problem:
        return YamlError(name, line, col, "tab character in indentation or before a value; YAML needs spaces here")
    message = f"YAML syntax error: {problem}"
    if error.context and error.context_mark and error.problem:
        where = error.context_mark
        message += f" ({error.context} started at line {where.line + 1}, column {where.column + 1})"
    return YamlError(name, line, col, message)


def _tab_at(text: str, line: int, col: int) -> bool:
    lines = text.split("\n", line)
    row = lines[line - 1] if len(lines) >= line else ""
    return row[col - 1 : col] == "\t" or "\t" in row[: len(row) - len(row.lstrip(" \t"))]


class _PyParser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    """Pure-Python event source, used only when libyaml is missing."""

    def __init__(self, text: str):
        yaml.reader.Reader.__init__(self, text)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)


class _Frame:
    """An open mapping or sequence while its events are being read."""

    __slots__ = ("data", "children", "start", "anchor", "key", "key_at", "merges", "line", "col")

    def __init__(self, data, start: int, anchor, line: int, col: int):
        self.data, self.start, self.anchor = data, start, anchor
        self.children = {} if isinstance(data, dict) else []
        self.key = self.key_at = None
        self.merges: list = []
        self.line, self.col = line, col


class _Builder:
    """Turns one YAML event stream into (data, shadow), bounding expansion."""

    def __init__(self, parser, name: str, max_nodes: int):
        self.parser, self.name, self.max_nodes = parser, name, max_nodes
        self.anchors: dict[str, tuple] = {}  # name -> (data, shadow, size or None while open)
        self.stack: list[_Frame] = []
        self.count = 0  # nodes so far, aliases counted at their expanded size
        self.plain: dict[str, object] = {}  # untagged plain scalar -> its value

    def error(self, where: Position, message: str) -> YamlError:
        return YamlError(self.name, where[0], where[1], message)

    def document(self) -> tuple[object, tuple]:
        self.parser.get_event()  # stream start
        if self.parser.check_event(ev.StreamEndEvent):
            return None, (1, 1, None)
        self.parser.get_event()  # document start
        result = self.node()
        self.parser.get_event()  # document end
        if not self.parser.check_event(ev.StreamEndEvent):
            where = _pos(self.parser.peek_event().start_mark)
            raise self.error(where, "expected a single YAML document, found another one ('---')")
        return result

    def node(self) -> tuple[object, tuple]:
        handlers = {
            ev.ScalarEvent: self.scalar,
            ev.AliasEvent: self.alias,
            ev.MappingStartEvent: self.open,
            ev.SequenceStartEvent: self.open,
            ev.MappingEndEvent: self.close,
            ev.SequenceEndEvent: self.close,
        }
        while True:
            event = self.parser.get_event()
            value = handlers[type(event)](event)
            if value is None:
                continue  # a container was opened
            if not self.stack:
                return value
            self.add(*value)

    def open(self, event) -> None:
        if event.tag not in _CONTAINER_TAGS:
            raise self.error(_pos(event.start_mark), _unsupported(event.tag))
        if len(self.stack) >= MAX_DEPTH:
            raise self.error(_pos(event.start_mark), f"nested deeper than {MAX_DEPTH} levels")
        self.count += 1
        data = {} if isinstance(event, ev.MappingStartEvent) else []
        line, col = _pos(event.start_mark)
        frame = _Frame(data, self.count, event.anchor, line, col)
        if event.anchor is not None:
            self.anchors[event.anchor] = (data, None, None)
        self.stack.append(frame)

    def close(self, event) -> tuple[object, tuple]:
        frame = self.stack.pop()
        for data, shadow in frame.merges:
            self.merge(frame, data, shadow)
        shadow = (frame.line, frame.col, frame.children)
        if frame.anchor is not None:
            self.anchors[frame.anchor] = (frame.data, shadow, self.count - frame.start + 1)
        return frame.data, shadow

    def scalar(self, event) -> tuple[object, tuple]:
        self.count += 1
        if event.tag is None and event.implicit[0]:
            data = self.plain.get(event.value, _MISSING)
            if data is _MISSING:
                data = self.plain[event.value] = _scalar_value(event, self)
        else:
            data = _scalar_value(event, self)
        if event.value or event.style:  # not an empty plain scalar
            shadow = (event.start_mark.line + 1, event.start_mark.column + 1, None)
        else:
            shadow = (*self.value_position(event), None)
        if event.anchor is not None:
            self.anchors[event.anchor] = (data, shadow, 1)
        return data, shadow

    def alias(self, event) -> tuple[object, tuple]:
        where = _pos(event.start_mark)
        if event.anchor not in self.anchors:
            raise self.error(where, f"undefined alias *{event.anchor}")
        data, shadow, size = self.anchors[event.anchor]
        if size is None:
            raise self.error(where, f"alias *{event.anchor} refers to a node that contains it (recursive alias)")
        self.count += size
        if self.count > self.max_nodes:
            message = f"aliases expand the document past {self.max_nodes} nodes; refusing to expand it"
            raise self.error(where, message + " (billion laughs?)")
        return data, (*where, shadow[2])

    def value_position(self, event) -> Position:
        """Where an empty value starts: at its key when it has one."""
        frame = self.stack[-1] if self.stack else None
        if frame is not None and frame.key_at is not None:
            return frame.key_at
        return _pos(event.start_mark)

    def add(self, data, shadow: tuple) -> None:
        frame = self.stack[-1]
        if isinstance(frame.data, list):
            frame.data.append(str(data) if isinstance(data, _MergeKey) else data)
            frame.children.append(shadow)
        elif frame.key_at is None:
            self.set_key(frame, data, shadow[:2])
        else:
            self.set_value(frame, data, shadow)

    def set_key(self, frame: _Frame, key, where: Position) -> None:
        if not isinstance(key, str):
            hint = "; quote it" if key is None or isinstance(key, (bool, int, float)) else ""
            raise self.error(where, f"mapping keys must be strings, found {_kind(key)} {key!r}{hint}")
        if key in frame.data or (isinstance(key, _MergeKey) and frame.merges):
            first = frame.children[key][0] if key in frame.children else frame.line
            raise self.error(where, f"duplicate key {key!r} (first defined at line {first})")
        frame.key, frame.key_at = key, where

    def set_value(self, frame: _Frame, data, shadow) -> None:
        key, (line, col) = frame.key, frame.key_at
        frame.key = frame.key_at = None
        if isinstance(key, _MergeKey):
            self.add_merge(frame, data, shadow, (line, col))
            return
        frame.data[key] = str(data) if isinstance(data, _MergeKey) else data
        frame.children[key] = (line, col, shadow)

    def add_merge(self, frame: _Frame, data, shadow, where: Position) -> None:
        if isinstance(data, dict):
            sources = [(data, shadow)]
        else:
            sources = list(zip(data, shadow[2])) if isinstance(data, list) else []
        if not sources or not all(isinstance(item, dict) for item, _ in sources):
            raise self.error(where, "'<<' (merge) needs a mapping or a list of mappings")
        frame.merges.extend(sources)

    @staticmethod
    def merge(frame: _Frame, data: dict, shadow: tuple) -> None:
        """Copy keys from a ``<<`` source that the mapping does not set itself."""
        for key, value in data.items():
            if key not in frame.data:
                frame.data[key] = value
                frame.children[key] = shadow[2][key]


def _scalar_value(event, builder: _Builder):
    tag, value = event.tag, event.value
    if tag is None:
        tag = _implicit_tag(value) if event.implicit[0] else _STR
    elif tag == "!":
        tag = _STR
    if tag == _STR:
        return value
    if tag not in _SCALAR_TAGS:
        raise builder.error(_pos(event.start_mark), _unsupported(tag))
    if tag == _TAG + "merge":
        return _MergeKey(value) if event.tag is None else value
    if tag in (_TAG + "timestamp", _TAG + "value"):
        return value  # kept as text so data stays JSON-serialisable
    return _construct(tag, value, event, builder)


def _construct(tag: str, value: str, event, builder: _Builder):
    if tag == _INT and _DECIMAL.match(value):
        return int(value)
    try:
        return _CONSTRUCTOR.yaml_constructors[tag](_CONSTRUCTOR, ScalarNode(tag, value))
    except (ValueError, KeyError, TypeError, ArithmeticError):
        raise builder.error(_pos(event.start_mark), f"invalid {_short(tag)} value {value!r}") from None


def _pos(mark) -> Position:
    return mark.line + 1, mark.column + 1


def _implicit_tag(value: str) -> str:
    resolvers = Resolver.yaml_implicit_resolvers
    for tag, regexp in resolvers.get(value[:1], ()):
        if regexp.match(value):
            return tag
    return _STR


def _unsupported(tag: str | None) -> str:
    return f"unsupported YAML tag {_short(tag)}: only plain data is allowed"


def _short(tag: str | None) -> str:
    return "!!" + tag[len(_TAG) :] if tag and tag.startswith(_TAG) else str(tag)


def _kind(value) -> str:
    names = {bool: "boolean", int: "integer", float: "number", type(None): "null", list: "list", dict: "mapping"}
    return names.get(type(value), type(value).__name__)
