"""Predict where rknn-toolkit2 places one ONNX node: NPU, CPU fallback, or nowhere.

A build reveals CPU fallbacks only after it has run, and a build that "succeeds"
may still put a layer on a CPU runtime that cannot execute it (rk2118 has none,
rv1103/rv1106 run eleven ops). The analysis stage wants that verdict per node and
per target before converting, with a reason a person can act on.

The facts live in ``data/op_rules.yaml`` (Rockchip's operator list v2.3.2 plus
measurements of toolkit 2.5.0), so a new document or toolkit release is a data
edit. This module only loads that file, checks it against its own small
constraint vocabulary (documented at the top of the YAML) and evaluates it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml
from pipeline.errors import PipelineError
from pipeline.onnx_util import DEFAULT_DOMAINS

DEFAULT_RULES_PATH = Path(__file__).resolve().parent / "data" / "op_rules.yaml"

NPU, CPU, UNSUPPORTED, NONE = "npu", "cpu", "unsupported", "none"
FOLDED_REASON = "folded by the toolkit's graph optimisation"

TOP_KEYS = {"version", "source", "folded", "off_npu", "cpu_aliases", "cpu_constraints",
            "rockchip_ops", "unsupported_onnx_ops", "templates", "groups"}
GROUP_KEYS = {"platforms", "cpu_ops", "npu", "off_npu"}
OP_KEYS = {"as", "constraints", "note"}
SUBJECTS = {"attr", "axis", "dim", "rank", "scale", "count", "any_nonzero"}
TESTS = {"equals", "in", "not_in", "each_in", "range", "multiple_of", "integer_scale"}
META = {"id", "index", "when", "why", "tolerated"}

COUNTED = {"inputs": "input_shapes", "outputs": "output_shapes"}
_UNKNOWN = object()  # a value that cannot be read from the node (missing or symbolic)


class RulesError(PipelineError, ValueError):
    """The rules file does not follow its own vocabulary."""


# --------------------------------------------------------------------------- validation

def _check_keys(mapping: Any, allowed: set[str], where: str) -> None:
    if not isinstance(mapping, dict):
        raise RulesError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    unknown = sorted(str(key) for key in set(mapping) - allowed)
    if unknown:
        raise RulesError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _check_subject(c: dict, where: str) -> str:
    subjects = [key for key in c if key in SUBJECTS]
    if len(subjects) != 1:
        raise RulesError(f"{where}: needs exactly one subject of {sorted(SUBJECTS)}, got {subjects}")
    subject = subjects[0]
    value = c[subject]
    if subject in ("dim", "rank"):
        size = 3 if subject == "dim" else 2
        if not (isinstance(value, list) and len(value) == size and value[0] in ("input", "output")
                and all(isinstance(i, int) for i in value[1:])):
            raise RulesError(f"{where}: {subject} must be [input|output, tensor{', dim' * (size == 3)}]")
    if subject == "count" and value not in COUNTED:
        raise RulesError(f"{where}: count must be 'inputs' or 'outputs'")
    if "index" in c and subject != "attr":
        raise RulesError(f"{where}: index applies to attr only")
    return subject


def _check_constraint(c: Any, where: str) -> None:
    _check_keys(c, SUBJECTS | TESTS | META, where)
    subject = _check_subject(c, where)
    tests = [key for key in c if key in TESTS]
    if not tests and subject != "any_nonzero":
        raise RulesError(f"{where}: no test among {sorted(TESTS)}")
    if "range" in c and not (isinstance(c["range"], list) and len(c["range"]) == 2):
        raise RulesError(f"{where}: range must be [low, high]")
    if "integer_scale" in c and c["integer_scale"] is not True:
        raise RulesError(f"{where}: integer_scale can only be true")
    for key in ("in", "not_in", "each_in"):
        if key in c and not isinstance(c[key], list):
            raise RulesError(f"{where}: {key} must be a list")
    if "when" in c:
        if "when" in c["when"]:
            raise RulesError(f"{where}: nested when is not supported")
        _check_constraint(c["when"], f"{where}.when")


def _check_op(entry: Any, where: str) -> None:
    _check_keys(entry, OP_KEYS, where)
    seen: set[str] = set()
    for i, c in enumerate(entry.get("constraints", [])):
        _check_constraint(c, f"{where}.constraints[{i}]")
        cid = constraint_id(c)
        if cid in seen:
            raise RulesError(f"{where}: duplicate constraint id {cid!r}; give one an explicit id")
        seen.add(cid)


def _check_names(value: Any, where: str) -> None:
    if not (isinstance(value, list) and all(isinstance(name, str) for name in value)):
        raise RulesError(f"{where}: expected a list of names")


def _check_group(name: str, group: Any) -> None:
    where = f"groups.{name}"
    _check_keys(group, GROUP_KEYS, where)
    _check_names(group.get("platforms"), f"{where}.platforms")
    _check_names(group.get("cpu_ops"), f"{where}.cpu_ops")
    for op, entry in (group.get("npu") or {}).items():
        _check_op(entry, f"{where}.npu.{op}")
    clash = sorted(set(group.get("npu") or {}) & set(group.get("off_npu") or {}))
    if clash:
        raise RulesError(f"{where}: {clash} both in npu and off_npu")


def validate(data: Any) -> None:
    """Raise RulesError unless ``data`` follows the vocabulary documented in the YAML."""
    _check_keys(data, TOP_KEYS, "rules")
    if "version" not in data or not data.get("groups"):
        raise RulesError("rules: version and groups are required")
    for key in ("folded", "unsupported_onnx_ops"):
        _check_names(data.get(key, []), key)
    for op, constraints in (data.get("cpu_constraints") or {}).items():
        _check_op({"constraints": constraints}, f"cpu_constraints.{op}")
    for name, group in data["groups"].items():
        _check_group(name, group)


# --------------------------------------------------------------------------- evaluation

def constraint_id(c: dict) -> str:
    """Stable name of a constraint within its op (the last part of a rule id)."""
    if "id" in c:
        return str(c["id"])
    subject = next(key for key in c if key in SUBJECTS)
    value = c[subject]
    if subject == "dim":
        return f"{value[0]}{value[1]}_dim{value[2]}"
    if subject == "rank":
        return f"{value[0]}{value[1]}_rank"
    if subject == "scale":
        return "scale"
    if subject == "count":
        return f"{value}_count"
    if subject == "any_nonzero":
        return f"nonzero_{value}"
    return f"{value}[{c['index']}]" if "index" in c else str(value)


def _shape(node: dict, side: str, tensor: int) -> list | None:
    shapes = node.get(f"{side}_shapes") or []
    return shapes[tensor] if tensor < len(shapes) else None


def _static_shape(node: dict, side: str, tensor: int) -> list | None:
    """The shape when every dimension is a known integer, else None."""
    shape = _shape(node, side, tensor)
    if shape is None or any(not isinstance(d, int) or isinstance(d, bool) for d in shape):
        return None
    return shape


def _rank(node: dict, side: str, tensor: int) -> int | None:
    shape = _shape(node, side, tensor)
    return None if shape is None else len(shape)


def _normalise_axes(value: Any, rank: int | None) -> Any:
    axes = value if isinstance(value, list) else [value]
    if any(a < 0 for a in axes):
        if rank is None:
            return _UNKNOWN
        axes = [a + rank if a < 0 else a for a in axes]
    return axes if isinstance(value, list) else axes[0]


def _subject_value(c: dict, node: dict) -> Any:
    """The value a constraint talks about, or _UNKNOWN."""
    attrs = node.get("attrs") or {}
    if "attr" in c:
        value = attrs.get(c["attr"], _UNKNOWN)
        if "index" in c and isinstance(value, list):
            return value[c["index"]] if c["index"] < len(value) else _UNKNOWN
        return value
    if "any_nonzero" in c:
        value = attrs.get(c["any_nonzero"], _UNKNOWN)
        return value if value is _UNKNOWN else any(v != 0 for v in _as_list(value))
    if "axis" in c:
        value = attrs.get(c["axis"], _UNKNOWN)
        return value if value is _UNKNOWN else _normalise_axes(value, _rank(node, "input", 0))
    if "dim" in c:
        side, tensor, d = c["dim"]
        shape = _static_shape(node, side, tensor)
        return _UNKNOWN if shape is None or not -len(shape) <= d < len(shape) else shape[d]
    if "rank" in c:
        rank = _rank(node, *c["rank"])
        return _UNKNOWN if rank is None else rank
    if "scale" in c:
        return _scales(node, c["scale"])
    return len(node.get(COUNTED[c["count"]]) or [])


def _scales(node: dict, dims: list[int]) -> Any:
    src, dst = _static_shape(node, "input", 0), _static_shape(node, "output", 0)
    if src is None or dst is None or len(src) != len(dst):
        return _UNKNOWN
    if any(src[d] <= 0 or dst[d] <= 0 for d in dims if d < len(src)):
        return _UNKNOWN
    return [dst[d] / src[d] for d in dims if d < len(src)]


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _is_integer_scale(x: float) -> bool:
    """True for 2, 3, 0.5, 1/3 ... (sizes are integers, so allow rounding noise)."""
    return x > 0 and any(abs(v - round(v)) < 1e-6 for v in (x, 1 / x))


def _in_range(x: Any, bounds: list) -> bool:
    low, high = bounds
    return (low is None or x >= low) and (high is None or x <= high)


def _tests_hold(c: dict, value: Any) -> bool:
    items = _as_list(value)
    checks = {
        "equals": lambda: value == c["equals"],
        "in": lambda: value in c["in"],
        "not_in": lambda: value not in c["not_in"],
        "each_in": lambda: all(x in c["each_in"] for x in items),
        "range": lambda: all(_in_range(x, c["range"]) for x in items),
        "multiple_of": lambda: all(x % c["multiple_of"] == 0 for x in items),
        "integer_scale": lambda: all(_is_integer_scale(x) for x in items),
    }
    return all(check() for key, check in checks.items() if key in c)


def evaluate(c: dict, node: dict) -> tuple[bool | None, Any]:
    """(True | False | None for unknown, the subject value) for one constraint."""
    if "when" in c:
        applies, _ = evaluate(c["when"], node)
        if applies is None:
            return None, _UNKNOWN
        if not applies:
            return True, _UNKNOWN
    try:
        value = _subject_value(c, node)
        if value is _UNKNOWN:
            return None, value
        if "any_nonzero" in c and not any(key in c for key in TESTS):
            return bool(value), value
        return _tests_hold(c, value), value
    except TypeError:  # the node holds a value of the wrong kind, e.g. a string
        return None, _UNKNOWN


# --------------------------------------------------------------------------- wording

def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _subject_text(c: dict) -> str:
    if "attr" in c:
        return f"{c['attr']}[{c['index']}]" if "index" in c else c["attr"]
    if "axis" in c:
        return c["axis"]
    if "dim" in c:
        side, tensor, d = c["dim"]
        return f"{side} {tensor} dim {d}"
    if "rank" in c:
        return f"{c['rank'][0]} {c['rank'][1]} rank"
    if "scale" in c:
        return f"scale on dims {_fmt(c['scale'])}"
    if "count" in c:
        return f"number of {c['count']}"
    return f"non-zero {c['any_nonzero']}"


def _test_text(key: str, expected: Any) -> str:
    if key == "range":
        low, high = expected
        if high is None:
            return f">= {_fmt(low)}"
        return f"<= {_fmt(high)}" if low is None else f"in {_fmt(low)}..{_fmt(high)}"
    words = {"equals": "=", "in": "in", "not_in": "not in", "each_in": "each in", "multiple_of": "a multiple of"}
    if key == "integer_scale":
        return "an integer or 1/integer"
    return f"{words[key]} {_fmt(expected)}"


def _tests_text(c: dict) -> str:
    return " and ".join(_test_text(key, c[key]) for key in c if key in TESTS)


def _condition_text(c: dict) -> str:
    if "any_nonzero" in c and not any(key in c for key in TESTS):
        return f"non-zero {c['any_nonzero']}"
    return f"{_subject_text(c)} {_tests_text(c)}"


def describe_failure(c: dict, value: Any) -> str:
    """``count_include_pad=0 with non-zero pads; the NPU implements ...``."""
    text = f"{_subject_text(c)}={_fmt(value)}"
    if "when" in c:
        text += f" with {_condition_text(c['when'])}"
    return f"{text}; {c.get('why') or 'the NPU needs ' + _subject_text(c) + ' ' + _tests_text(c)}"


# --------------------------------------------------------------------------- rules

@functools.lru_cache(maxsize=None)
def _load_cached(path: str) -> "Rules":
    with open(path, encoding="utf-8") as handle:
        data = yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # C parser: 10x faster
    validate(data)
    return Rules(data)


class Rules:
    """The placement rules of one YAML file; see the module docstring."""

    def __init__(self, data: dict):
        self._data = data
        self.version = str(data["version"])
        self._groups: dict[str, dict] = data["groups"]
        self._target_group = {platform.lower(): name for name, group in self._groups.items()
                              for platform in group["platforms"]}
        self._folded = set(data.get("folded") or ())
        self._off_npu: dict[str, str] = data.get("off_npu") or {}
        self._aliases: dict[str, str] = data.get("cpu_aliases") or {}
        self._cpu_constraints: dict[str, list] = data.get("cpu_constraints") or {}
        self._unloadable = set(data.get("unsupported_onnx_ops") or ())

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Rules":
        """Load and validate a rules file (default: the packaged one); cached per path."""
        return _load_cached(str(Path(path or DEFAULT_RULES_PATH).resolve()))

    # ----------------------------------------------------------------- lookups

    @property
    def targets(self) -> list[str]:
        return sorted(self._target_group)

    def group_of(self, target: str) -> str:
        try:
            return self._target_group[str(target).lower()]
        except KeyError:
            raise ValueError(f"unknown target platform {target!r}; known targets: "
                             f"{', '.join(self.targets)}") from None

    def cpu_can_run(self, op_type: str, target: str) -> bool:
        cpu_ops = self._groups[self.group_of(target)]["cpu_ops"]
        return op_type in cpu_ops or self._aliases.get(op_type) in cpu_ops

    def npu_runs(self, op_type: str, target: str) -> bool:
        return op_type in (self._groups[self.group_of(target)].get("npu") or {})

    def op_types(self) -> set[str]:
        """Every ONNX op type the rules mention (Rockchip-only names excluded)."""
        ops = self._folded | set(self._off_npu) | set(self._aliases) | self._unloadable
        for group in self._groups.values():
            ops |= set(group.get("npu") or {}) | set(group.get("off_npu") or {}) | set(group["cpu_ops"])
        return ops - set(self._data.get("rockchip_ops") or {})

    # ----------------------------------------------------------------- prediction

    def predict(self, node: dict, target: str) -> dict:
        """Placement of one node on one target: npu, cpu, unsupported or none."""
        group = self.group_of(target)
        op = node.get("op_type", "")
        domain = node.get("domain") or ""
        if domain not in DEFAULT_DOMAINS:
            why = f"{op} is from domain {domain!r}; the Rockchip tables cover only the default ONNX domain"
            return self._fallback(node, target, group, why, f"{group}/{op}/domain")
        if op in self._folded:
            return _result(NONE, FOLDED_REASON, f"folded/{op}")
        entry = (self._groups[group].get("npu") or {}).get(op)
        if entry is None:
            return self._fallback(node, target, group, self._absence_reason(group, op),
                                  f"{group}/{op}/not_on_npu")
        return self._check_npu(node, op, target, group, entry)

    def _absence_reason(self, group: str, op: str) -> str:
        reason = (self._groups[group].get("off_npu") or {}).get(op) or self._off_npu.get(op)
        if reason:
            return f"{op} does not run on the {group} NPU: {reason}"
        return f"{op} is not in the {group} NPU operator list"

    def _check_npu(self, node: dict, op: str, target: str, group: str, entry: dict) -> dict:
        tolerated, unknown = [], []
        for c in entry.get("constraints") or ():
            ok, value = evaluate(c, node)
            if ok is None:
                unknown.append(_subject_text(c))
            elif not ok and c.get("tolerated"):
                tolerated.append(f"{_subject_text(c)}={_fmt(value)}: {c['tolerated']}")
            elif not ok:
                return self._fallback(node, target, group, describe_failure(c, value),
                                      f"{group}/{op}/{constraint_id(c)}")
        lowered = entry.get("as")
        reason = f"{op} runs on the {group} NPU" + (f" as {lowered}" if lowered and lowered != op else "")
        if tolerated:
            reason += "; outside the documented limits but measured on the NPU (" + "; ".join(tolerated) + ")"
        if unknown:
            reason += "; not checked without static shapes or values: " + ", ".join(unknown)
        return _result(NPU, reason, f"{group}/{op}/npu")

    def _fallback(self, node: dict, target: str, group: str, why: str, rule: str) -> dict:
        """CPU when this target's CPU runtime can run the node, otherwise unsupported."""
        op = node.get("op_type", "")
        if not self.cpu_can_run(op, target):
            tail = " (listed as not supported by the toolkit's ONNX table)" if op in self._unloadable else ""
            return _result(UNSUPPORTED, f"{why}; and the {target} CPU runtime cannot run {op} either{tail}",
                           rule)
        for c in self._cpu_constraints.get(op, ()):
            ok, value = evaluate(c, node)
            if ok is False:
                limit = c.get("why") or f"it needs {_subject_text(c)} {_tests_text(c)}"
                return _result(UNSUPPORTED, f"{why}; and the {target} CPU runtime cannot run it either: "
                               f"{limit}", f"cpu/{op}/{constraint_id(c)}")
        return _result(CPU, f"{why}; falls back to the {target} CPU runtime", rule)


def _result(placement: str, reason: str, rule: str) -> dict:
    return {"placement": placement, "reason": reason, "rule": rule}
