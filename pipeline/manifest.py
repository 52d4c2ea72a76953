"""Load, validate and normalise ``models.yaml``, the pipeline's manifest.

Every later stage trusts what this module returns, so all checking happens
here, before any conversion starts: the JSON Schema (shared with editors via
the ``yaml-language-server`` comment), then the rules a schema cannot
express (unique names, platform limits from :mod:`pipeline.platforms`,
files that must exist, tensor names that must be in the ONNX graph). All
problems are collected and reported together as ``PATH:LINE:COL: message``
so one run shows everything to fix. The result holds plain JSON data with
defaults merged in and paths made absolute, ready to hash and to pass on.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from . import inputs as input_facts
from . import platforms
from . import shapes as shape_sets
from .errors import PipelineError
from .names import nearest
from .onnx_util import dims as value_dims
from .schema import load as _schema
from .yaml_source import YamlDocument, YamlError, load_yaml

SAMPLE_TYPES = input_facts.SAMPLE_TYPES

# Op types accepted without loading ONNX's operator registry.
_COMMON_OPS = frozenset(
    "Abs Add And ArgMax ArgMin AveragePool BatchNormalization Cast Ceil Clip Concat Constant "
    "ConstantOfShape Conv ConvTranspose DepthToSpace Div Dropout Einsum Elu Equal Erf Exp Expand "
    "Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalMaxPool Greater "
    "GridSample GRU HardSigmoid HardSwish Identity InstanceNormalization LayerNormalization LeakyRelu "
    "Less Log LogSoftmax LRN LSTM MatMul Max MaxPool Mean Min Mish Mod Mul Neg Not Or Pad Pow PRelu "
    "ReduceL2 ReduceMax ReduceMean ReduceMin ReduceSum Relu Reshape Resize RNN ScatterND Shape Sigmoid "
    "Sign Sin Slice Softmax Softplus SpaceToDepth Split Sqrt Squeeze Sub Sum Tanh Tile TopK Transpose "
    "Unsqueeze Upsample Where Xor".split()
)

_TYPE_WORDS = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}
_ENUM_NOUNS = {"targets": "platform", "dtype": "quantization dtype", "algorithm": "quantization algorithm"}


class Problem(NamedTuple):
    """One thing wrong with a manifest, at a 1-based position in it."""

    path: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}: {self.message}"


class ManifestError(PipelineError):
    """A manifest that cannot be used; ``problems`` says why, sorted by line."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(map(str, self.problems)))


@dataclass
class Manifest:
    """A valid manifest: effective models with defaults merged and paths absolute."""

    path: Path
    directory: Path
    version: int
    toolkit: str | None
    cache_url: str | None  # a local directory (absolute) or an object-store URL such as s3://bucket/prefix
    models: list[dict]
    _doc: YamlDocument = field(repr=False, compare=False)

    def location(self, *path) -> str:
        """``PATH:LINE:COL`` of the value at ``path`` (or its nearest parent)."""
        _, (line, col) = _locate(self._doc, path)
        return f"{self._doc.name}:{line}:{col}"

    def model(self, name: str) -> dict:
        for model in self.models:
            if model["name"] == name:
                return model
        raise KeyError(f"no model named {name!r} in {self._doc.name}")


def load_manifest(path, *, check_files: bool = True) -> Manifest:
    """Load and check the manifest at ``path``; raise ManifestError if it is bad.

    With ``check_files=False`` nothing but the manifest itself is read: sources,
    datasets and ONNX graphs go unchecked and ``quantization["samples"]`` is None.
    """
    try:
        doc = load_yaml(path)
    except YamlError as error:
        raise ManifestError([Problem(error.name, error.line, error.col, error.message)]) from None
    if not isinstance(doc.data, dict):
        raise ManifestError([_top_level_problem(doc)])
    directory = Path(os.path.abspath(path)).parent
    report = _Report(doc)
    broken = _check_schema(doc, report)
    models = _effective_models(doc.data, directory)
    _Checker(report, doc.data, models, broken, check_files).run()
    if report.problems:
        raise ManifestError(report.sorted())
    models = shape_sets.expand(models, input_facts.sample_shape)
    cache = doc.data.get("cache")
    return Manifest(
        path=Path(path),
        directory=directory,
        version=doc.data["version"],
        toolkit=doc.data.get("toolkit"),
        cache_url=_cache_url(directory, cache),
        models=models,
        _doc=doc,
    )


def _cache_url(directory: Path, cache: dict | None) -> str | None:
    """The manifest's cache as a URL: ``dir`` (relative to the manifest) or ``url`` (a path or object-store URL)."""
    if not cache:
        return None
    value = cache.get("url") or cache.get("dir")
    if "://" in value:
        return value
    return _absolute(directory, value)


def _top_level_problem(doc: YamlDocument) -> Problem:
    if doc.data is None:
        message = "the manifest is empty: it needs version: 1 and a models: list"
    else:
        message = f"the manifest must be a mapping with version: and models:, not {_describe(doc.data)}"
    return Problem(doc.name, *doc.position(()), message)


# -- positions ---------------------------------------------------------------


def _locate(doc: YamlDocument, path, key: bool = False) -> tuple[tuple, tuple[int, int]]:
    """The document path that best shows ``path``, and its (line, col).

    A model's effective value may come from ``defaults:``; then the position
    there is used, unless the model itself has a deeper match.
    """
    path = tuple(path)
    exact = doc.key_position(path) if key else doc.position(path)
    if exact:
        return path, exact
    found, where = doc.nearest(path)
    if len(path) > 2 and path[0] == "models":
        alternative = ("defaults", *path[2:])
        in_defaults = doc.key_position(alternative) if key else doc.position(alternative)
        if in_defaults:
            return alternative, in_defaults
        deeper, position = doc.nearest(alternative)
        if len(deeper) - 1 > len(found) - 2:
            return deeper, position
    return found, where


class _Report:
    """Collects problems at document paths."""

    def __init__(self, doc: YamlDocument):
        self.doc = doc
        self.problems: list[Problem] = []

    def add(self, path, message: str, *, key: bool = False) -> None:
        _, (line, col) = _locate(self.doc, path, key)
        self.problems.append(Problem(self.doc.name, line, col, message))

    def add_model(self, model: dict, *rest, message: str, key: bool = False) -> None:
        """Report at a path inside an effective model, noting values from defaults."""
        used, (line, col) = _locate(self.doc, ("models", model["index"], *rest), key)
        if used[:1] == ("defaults",):
            message += f" (model {model['name']!r}, set in defaults)"
        self.problems.append(Problem(self.doc.name, line, col, message))

    def sorted(self) -> list[Problem]:
        return sorted(set(self.problems), key=lambda p: (p.line, p.col, p.message))


# -- schema --------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _validator():
    from jsonschema import Draft202012Validator, validators

    # JSON Schema counts 2.0 as an integer; the toolkit wants real ints.
    checker = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
    )
    strict = validators.extend(Draft202012Validator, type_checker=checker)
    return strict(_schema())


@functools.lru_cache(maxsize=None)
def _schema_defaults(definition: str) -> dict:
    properties = _schema()["$defs"][definition]["properties"]
    return {key: sub["default"] for key, sub in properties.items() if "default" in sub}


def _check_schema(doc: YamlDocument, report: _Report) -> list[tuple]:
    """Report schema violations; return the paths they make unusable."""
    broken = []
    if _fast_check()(doc.data):
        return broken
    for error in _validator().iter_errors(doc.data):
        if "allOf" in error.absolute_schema_path:
            continue  # platform rules: reported from platforms.py with more context
        for path, key, message in _translate(error):
            report.add(path, message, key=key)
            broken.append(path)
    return broken


# jsonschema needs ~0.1 ms per model; a manifest that is valid (the usual case)
# is instead confirmed by plain closures compiled once from the same schema.
# They may be stricter than jsonschema, never laxer: any doubt means "invalid",
# and jsonschema then finds the actual errors. ``allOf`` holds only platform
# rules, whose errors are not reported from the schema, so it is skipped.
_ANNOTATIONS = frozenset(
    ("$schema", "$defs", "$comment", "title", "description", "examples", "default", "errorMessage", "allOf")
)
_TYPE_TESTS = {
    "object": lambda x: isinstance(x, dict),
    "array": lambda x: isinstance(x, list),
    "string": lambda x: isinstance(x, str),
    "integer": lambda x: isinstance(x, int) and not isinstance(x, bool),
    "number": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
    "boolean": lambda x: isinstance(x, bool),
    "null": lambda x: x is None,
}


class _Unsupported(Exception):
    """The schema uses a keyword the fast check does not know."""


@functools.lru_cache(maxsize=1)
def _fast_check():
    try:
        return _compile(_schema(), {})
    except _Unsupported:
        return lambda _: False  # always ask jsonschema


def _compile(schema: dict, refs: dict):
    checks = [_keyword(word, value, schema, refs) for word, value in schema.items() if word not in _ANNOTATIONS]
    checks = [check for check in checks if check is not None]
    if len(checks) == 1:
        return checks[0]

    def check_all(x) -> bool:
        for check in checks:
            if not check(x):
                return False
        return True

    return check_all


def _compile_ref(ref: str, refs: dict):
    if ref not in refs:
        refs[ref] = None  # placeholder while compiling, in case of cycles
        refs[ref] = _compile(_resolve({"$ref": ref}), refs)
    return lambda x: refs[ref](x)


def _same(x, value) -> bool:
    """JSON equality for scalars; containers count as different (doubt)."""
    if isinstance(x, (dict, list)) or isinstance(x, bool) != isinstance(value, bool):
        return False
    return x == value


def _keyword(word: str, value, schema: dict, refs: dict):  # noqa: C901 - one branch per keyword
    is_dict, is_list = _TYPE_TESTS["object"], _TYPE_TESTS["array"]
    is_str, is_num = _TYPE_TESTS["string"], _TYPE_TESTS["number"]
    if word == "$ref":
        return _compile_ref(value, refs)
    if word == "type":
        tests = [_TYPE_TESTS[t] for t in ([value] if isinstance(value, str) else value)]
        return lambda x: any(test(x) for test in tests)
    if word in ("enum", "const"):
        allowed = value if word == "enum" else [value]
        return lambda x: any(_same(x, item) for item in allowed)
    if word == "properties":
        props = {key: _compile(sub, refs) for key, sub in value.items()}
        return lambda x: not is_dict(x) or all(props[k](v) for k, v in x.items() if k in props)
    if word == "additionalProperties":
        known = set(schema.get("properties", ()))
        if value is False:
            return lambda x: not is_dict(x) or all(k in known for k in x)
        extra = _compile(value, refs)
        return lambda x: not is_dict(x) or all(extra(v) for k, v in x.items() if k not in known)
    if word == "required":
        return lambda x: not is_dict(x) or all(k in x for k in value)
    if word == "minProperties":
        return lambda x: not is_dict(x) or len(x) >= value
    if word == "propertyNames":
        names = _compile(value, refs)
        return lambda x: not is_dict(x) or all(names(k) for k in x)
    if word == "items":
        item = _compile(value, refs)
        return lambda x: not is_list(x) or all(item(i) for i in x)
    if word == "minItems":
        return lambda x: not is_list(x) or len(x) >= value
    if word == "uniqueItems":
        return lambda x: not is_list(x) or not value or (all(map(is_str, x)) and len(set(x)) == len(x))
    if word in ("minLength", "maxLength", "pattern"):
        test = {"minLength": lambda x: len(x) >= value, "maxLength": lambda x: len(x) <= value}.get(word)
        test = test or re.compile(value).search
        return lambda x: not is_str(x) or bool(test(x))
    if word in ("minimum", "maximum"):
        return lambda x: not is_num(x) or (x >= value if word == "minimum" else x <= value)
    raise _Unsupported(word)


def _translate(error) -> list[tuple[tuple, bool, str]]:
    """(path, is_key, message) for each problem a jsonschema error stands for."""
    path = tuple(error.absolute_path)
    if error.validator == "additionalProperties":
        extra = [k for k in error.instance if k not in error.schema.get("properties", {})]
        return [(path + (k,), True, _unknown_key(k, error.schema, path)) for k in extra]
    if error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        return [(path + (k,), False, _missing_key(k, path)) for k in missing]
    if error.validator == "uniqueItems":
        index = _first_repeat(error.instance)
        item = error.instance[index]
        return [(path + (index,), False, f"{_label(path)} lists {item!r} more than once")]
    return [(path, False, _message(error, path))]


def _message(error, path: tuple) -> str:
    label, value, rule = _label(path), error.instance, error.validator_value
    messages = {
        "type": lambda: _type_message(label, rule, value),
        "enum": lambda: _enum_message(path, value, rule),
        "const": lambda: f"{label} must be {rule!r}, got {_describe(value)}",
        "pattern": lambda: f"invalid {label} {value!r}: {error.schema.get('errorMessage', f'must match {rule}')}",
        "oneOf": lambda: f"invalid {label} {value!r}: {error.schema.get('errorMessage', 'matches none of its forms')}",
        "minLength": lambda: f"{label} must not be empty",
        "maxLength": lambda: f"{label} is longer than {rule} characters",
        "minItems": lambda: f"{label} must not be empty" if rule == 1 else f"{label} needs at least {rule} items",
        "minProperties": lambda: _min_properties_message(label, error.schema),
        "minimum": lambda: f"{label} must be at least {rule}, got {value!r}",
        "maximum": lambda: f"{label} must be at most {rule}, got {value!r}",
        "exclusiveMinimum": lambda: f"{label} must be above {rule}, got {value!r}",
    }
    make = messages.get(error.validator)
    return make() if make else f"{label}: {error.message}"


def _label(path: tuple) -> str:
    names = [item for item in path if isinstance(item, str)]
    if not names:
        return "the manifest"
    return f"each entry of {names[-1]}" if isinstance(path[-1], int) else names[-1]


def _type_message(label: str, expected, value) -> str:
    expected = [expected] if isinstance(expected, str) else expected
    words = " or ".join(_TYPE_WORDS.get(t, t) for t in expected)
    hint = "; quote it" if "string" in expected and isinstance(value, (int, float, bool)) else ""
    return f"{label} must be {words}, got {_describe(value)}{hint}"


def _enum_message(path: tuple, value, choices: list) -> str:
    names = [item for item in path if isinstance(item, str)]
    noun = _ENUM_NOUNS.get(names[-1], f"{names[-1]} value") if names else "value"
    expected = f"(expected one of: {', '.join(map(str, choices))})"
    if not isinstance(value, str):
        return f"{noun} must be a name, got {_describe(value)} {expected}"
    rejected = platforms.REJECTED_DTYPES.get(value) if noun == "quantization dtype" else None
    if rejected:
        return f"{noun} {value!r} is rejected by rknn-toolkit2 ({rejected['source']}); use {rejected['use']!r}"
    return f"unknown {noun} {value!r}{_did_you_mean(value, choices)} {expected}"


def _min_properties_message(label: str, schema: dict) -> str:
    keys = list(schema.get("properties", {}))
    return f"{label} needs at least one of: {', '.join(keys)}" if keys else f"{label} must not be empty"


def _unknown_key(key: str, schema: dict, path: tuple) -> str:
    allowed = list(schema.get("properties", {}))
    if path == ("defaults",) and key in ("name", "source"):
        return f"{key!r} cannot be set in defaults: each model needs its own"
    close = _did_you_mean(key, allowed)
    if close:
        return f"unknown key {key!r}{close}"
    for parent, sub in schema.get("properties", {}).items():
        nested = list(_resolve(sub).get("properties", {}))
        guess = nearest(key, nested, cutoff=0.75)
        if guess and guess[0] == key:
            return f"unknown key {key!r} here: it belongs under {parent}:"
        if guess:
            return f"unknown key {key!r}; did you mean {guess[0]!r} under {parent}:?"
    return f"unknown key {key!r} (allowed here: {', '.join(allowed)})"


def _missing_key(key: str, path: tuple) -> str:
    if not path:
        hint = {"version": " (add version: 1)", "models": " (the list of models to convert)"}.get(key, "")
        return f"the manifest is missing required key {key!r}{hint}"
    where = "model" if len(path) == 2 and path[0] == "models" else _label(path)
    return f"{where} is missing required key {key!r}"


def _resolve(schema: dict) -> dict:
    """Follow local ``$ref`` pointers (``#/$defs/...``) to the schema they name."""
    while "$ref" in schema:
        node = _schema()
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def _first_repeat(items: list) -> int:
    for index, item in enumerate(items):
        if item in items[:index]:
            return index
    return 0


def _did_you_mean(value, choices) -> str:
    if not isinstance(value, str):
        return ""
    by_lower = {str(choice).lower(): choice for choice in choices}
    close = nearest(value.lower(), by_lower)
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""


def _describe(value) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    kind = {bool: "boolean", int: "integer", float: "number", str: "string"}.get(type(value))
    text = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return f"{kind} {text}" if kind else "null"


# -- effective models ------------------------------------------------------------


def _clone(value):
    """A deep copy of plain YAML data (aliases may share objects)."""
    if isinstance(value, dict):
        return {key: _clone(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_clone(item) for item in value]
    return value


def _absolute(directory: Path, path: str) -> str:
    return os.path.normpath(os.path.join(directory, path))


def _merge(defaults: dict, model: dict) -> dict:
    """Model over defaults; mappings are merged one level deep, lists replaced."""
    merged = _clone(defaults)
    for key, value in model.items():
        base = merged.get(key)
        merged[key] = {**base, **_clone(value)} if isinstance(base, dict) and isinstance(value, dict) else _clone(value)
    return merged


def _effective_models(data: dict, directory: Path) -> list[dict]:
    models = data.get("models")
    defaults = data.get("defaults")
    if not isinstance(models, list):
        return []
    defaults = defaults if isinstance(defaults, dict) else {}
    return [
        _effective_model(index, raw, defaults, directory)
        for index, raw in enumerate(models)
        if isinstance(raw, dict)
    ]


def _effective_model(index: int, raw: dict, defaults: dict, directory: Path) -> dict:
    merged = _merge(defaults, raw)
    blank = {"targets": [], "overrides": [], "options": {}, "build": {}, **_schema_defaults("model")}
    model = {key: merged.get(key, _clone(blank.get(key))) for key in _schema()["$defs"]["model"]["properties"]}
    if isinstance(model["source"], str):
        model["source"] = _absolute(directory, model["source"])
    model["quantization"] = _effective_quantization(model["quantization"], directory)
    model["shape_sets"] = shape_sets.shape_sets(model["inputs"])
    if model["verify"] is True:  # "verify: true" means the defaults: block's settings, else the schema's
        model["verify"] = _clone(defaults.get("verify")) if isinstance(defaults.get("verify"), dict) else {}
    elif model["verify"] is False:
        model["verify"] = None
    if isinstance(model["verify"], dict):
        model["verify"] = {**_schema_defaults("verify"), **model["verify"]}
    for override in model["overrides"] if isinstance(model["overrides"], list) else ():
        if isinstance(override, dict):
            override.setdefault("targets", None)
    model["index"] = index
    return model


def _effective_quantization(quant, directory: Path):
    if not isinstance(quant, dict):
        return quant
    quant = {"dataset": None, **_schema_defaults("quantization"), "hybrid": None, **quant}
    if isinstance(quant["dataset"], str):
        quant["dataset"] = _absolute(directory, quant["dataset"])
    elif isinstance(quant["dataset"], dict):
        quant["dataset"] = {name: _effective_samples(entry, directory) for name, entry in quant["dataset"].items()}
    quant["samples"] = None
    quant["images"] = None
    return quant


def _effective_samples(entry, directory: Path):
    """One input's entry of a dataset mapping as ``{"samples": [absolute paths], "layout", "colour"}``."""
    if isinstance(entry, list):
        entry = {"samples": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("samples"), list):
        return entry  # the schema reports it
    samples = [_absolute(directory, item) if isinstance(item, str) else item for item in entry["samples"]]
    return {"layout": None, "colour": "rgb", **entry, "samples": samples}


# -- checks beyond the schema ------------------------------------------------------


class _Graph(NamedTuple):
    inputs: dict  # real input name -> rank (None if unknown)
    tensors: frozenset
    ops: frozenset
    input_types: dict  # real input name -> [ONNX element type, dims (None for a dynamic dim) or None]
    # what override selectors match, per node: index, name, op_type, attrs (ONNX defaults and small
    # constant inputs filled in, as in analysis.json), inputs, outputs
    nodes: tuple = ()


class _Checker:
    """Rules a schema cannot express, run on the effective models."""

    def __init__(self, report: _Report, data: dict, models: list[dict], broken: list[tuple], check_files: bool):
        self.report, self.data, self.models, self.check_files = report, data, models, check_files
        self.broken = _broken_fields(broken)
        self.datasets: dict[str, tuple] = {}
        self.unknown_op_types: set[tuple[int, int]] = set()  # (model, override) already reported

    def clean(self, model: dict, *fields: str) -> bool:
        """Whether the schema found nothing wrong in these fields of ``model``."""
        for scope in (("models", model["index"]), ("defaults",)):
            bad = self.broken.get(scope, set())
            if None in bad or bad.intersection(fields):
                return False
        return True

    def run(self) -> None:
        self.check_names()
        for model in self.models:
            self.check_model(model)

    def check_names(self) -> None:
        first: dict[str, int] = {}
        for model in self.models:
            name = model["name"]
            if not isinstance(name, str):
                continue
            if name in first:
                line = self.report.doc.position(("models", first[name], "name"))[0]
                message = f"duplicate model name {name!r} (first used at line {line})"
                self.report.add_model(model, "name", message=message)
            first.setdefault(name, model["index"])
        from .layout import Layout

        for model in self.models:  # build/<name>/ must not be a file the build writes there itself
            if model["name"] in Layout.BUILD_FILES:
                message = (f"model name {model['name']!r} is reserved: the build writes build/{model['name']} "
                           f"itself (reserved under build/: {', '.join(Layout.BUILD_FILES)}); rename the model")
                self.report.add_model(model, "name", message=message)
        for model in self.models:  # a bucket is named <name>.<dims>: it must not clash either
            if not isinstance(model["name"], str) or shape_sets.mode(model) != "buckets":
                continue
            for bucket in shape_sets.bucket_names(model):
                if bucket in first:
                    line = self.report.doc.position(("models", first[bucket], "name"))[0]
                    message = f"bucket {bucket!r} of this model has the name of the model at line {line}"
                    self.report.add_model(model, "inputs", message=message)

    def check_model(self, model: dict) -> None:
        graph = self.check_source(model) if self.check_files and self.clean(model, "source") else None
        if self.clean(model, "targets"):
            self.check_targets(model)
        if self.clean(model, "targets", "quantization", "options"):
            self.check_platforms(model)
        if self.clean(model, "overrides"):
            self.check_op_types(model, graph)
        if graph is not None and graph.nodes and model["overrides"] and self.clean(model, "overrides", "outputs",
                                                                                   "targets"):
            self.check_selectors(model, graph)
        if self.clean(model, "inputs", "shapes"):
            self.check_shapes(model)
        infos = self.input_infos(model, graph) if graph is not None and self.clean(model, "inputs") else None
        if self.clean(model, "mean_values", "std_values"):
            self.check_normalisation(model, infos)
        if model["quantization"] and self.clean(model, "quantization"):
            self.check_quantization(model, infos)
        if graph is not None and self.clean(model, "inputs", "outputs", "quantization", "mean_values", "std_values"):
            self.check_tensor_names(model, graph)
        if (self.clean(model, "quantization", "targets", "verify") and isinstance(model["quantization"], dict)
                and model["quantization"].get("repair")):
            self.check_repair(model)
        if model.get("toolkit") and self.clean(model, "targets", "toolkit"):
            self.check_toolkit(model)
        if model.get("runtime") and self.clean(model, "targets", "runtime", "allow_newer_toolkit", "toolkit"):
            self.check_runtime(model)

    def check_repair(self, model: dict) -> None:
        """quantization.repair needs the accuracy check, no second chooser, and float16 hybrid layers."""
        from pipeline.repair import NO_FLOAT16_HYBRID

        where = ("quantization", "repair")
        if model["verify"] is None:
            message = ("repair measures each rebuild with the accuracy check, which is off: add "
                       "verify: {min_cosine: ...} (or remove verify: null)")
            self.report.add_model(model, *where, message=message)
        if model["quantization"].get("auto_hybrid"):
            message = "repair and auto_hybrid both choose float layers: keep one"
            self.report.add_model(model, *where, message=message)
        refused = [target for target in model["targets"] if target in NO_FLOAT16_HYBRID]
        if refused:
            message = (f"repair keeps layers in float16, which the toolkit refuses in hybrid quantization for "
                       f"{', '.join(refused)} (it accepts only int8/int16 there): build those targets without repair")
            self.report.add_model(model, *where, message=message)

    def check_toolkit(self, model: dict) -> None:
        """A per-model toolkit must be one PyPI has for this Python (or the installed one), for a built target."""
        from pipeline import runtime_gate
        from pipeline.toolkit import installed_version

        chosen = model["toolkit"]
        by_target = chosen if isinstance(chosen, dict) else {None: chosen}
        available = runtime_gate.rules()["pypi_toolkits"]["versions"]
        for target, version in by_target.items():
            where = ("toolkit", target) if target else ("toolkit",)
            if target and target not in model["targets"]:
                message = (f"toolkit for {target!r}, which model {model['name']!r} does not build "
                           f"(targets: {', '.join(model['targets'])})")
                self.report.add_model(model, *where, message=message, key=True)
            elif version not in available and version != installed_version():
                message = (f"rknn-toolkit2 {version} is not on PyPI for this Python and platform (available: "
                           f"{', '.join(available)})")
                self.report.add_model(model, *where, message=message)

    def check_runtime(self, model: dict) -> None:
        """The boards' runtime against the toolkit that builds each target (pipeline/runtime_gate.py)."""
        from pipeline import runtime_gate
        from pipeline.toolkit import installed_version

        runtime = model["runtime"]
        if isinstance(runtime, dict):
            for target in runtime:
                if target not in model["targets"]:
                    message = (f"runtime for {target!r}, which model {model['name']!r} does not build "
                               f"(targets: {', '.join(model['targets'])})")
                    self.report.add_model(model, "runtime", target, message=message, key=True)
        for target in model["targets"]:
            declared = runtime_gate.runtime_for(model, target)
            toolkit = runtime_gate.toolkit_for(model, target, installed_version())
            if not declared or not toolkit:
                continue
            verdict = runtime_gate.check(target, toolkit, declared, bool(model.get("allow_newer_toolkit")))
            where = ("runtime", target) if isinstance(runtime, dict) else ("runtime",)
            for message in verdict.errors:
                self.report.add_model(model, *where, message=message)

    def check_targets(self, model: dict) -> None:
        if not model["targets"]:
            message = f"model {model['name']!r} has no targets: add targets: to it or to defaults:"
            self.report.add_model(model, message=message)

    def check_platforms(self, model: dict) -> None:
        for index, target in enumerate(model["targets"]):
            for message in platforms.check_target_options(target, model):
                self.report.add_model(model, "targets", index, message=message)
        for message in platforms.check_model_options(model):
            self.report.add_model(model, "quantization", "algorithm", message=message)

    def check_op_types(self, model: dict, graph: _Graph | None) -> None:
        for index, override in enumerate(model["overrides"]):
            op_type = override["match"].get("op_type")
            if op_type is None or op_type in _COMMON_OPS or (graph and op_type in graph.ops):
                continue
            known = _onnx_op_types() | (graph.ops if graph else frozenset())
            if op_type not in known:
                message = f"unknown op_type {op_type!r}{_did_you_mean(op_type, known)}"
                self.report.add_model(model, "overrides", index, "match", "op_type", message=message)
                self.unknown_op_types.add((model["index"], index))

    def check_selectors(self, model: dict, graph: _Graph) -> None:
        """What resolve would refuse for any target (a selector matching nothing, ...), now, not mid-build."""
        from .resolution import selector_problems

        for index, path, message in selector_problems(model, _kept_nodes(graph.nodes, model["outputs"])):
            if (model["index"], index) not in self.unknown_op_types:  # "did you mean" says it better
                self.report.add_model(model, "overrides", index, *path, message=message)

    def check_shapes(self, model: dict) -> None:
        """Several shapes per input: lists of equal length, one form per input."""
        inputs = model["inputs"]
        if not inputs:
            if model["shapes"] == "dynamic" and self.declared(model, "shapes"):
                self.report.add_model(model, "shapes", message="shapes: dynamic needs inputs: with a list of "
                                      "shapes for the inputs that vary")
            return
        if shape_sets.declared(inputs) is None:
            for name, value in inputs.items():
                if not (all(isinstance(i, int) for i in value) or all(isinstance(i, list) for i in value)):
                    message = (f"input {name!r} mixes dims and shapes: give one shape [1, 3, 224, 224] or a "
                               f"list of shapes [[1, 3, 48, 160], [1, 3, 48, 320]]")
                    self.report.add_model(model, "inputs", name, message=message)
            return
        counts = {name: len(items) for name, items in shape_sets.declared(inputs).items() if len(items) > 1}
        if len(set(counts.values())) > 1:
            listing = ", ".join(f"{name}: {count}" for name, count in counts.items())
            message = f"inputs with a list of shapes must list the same number (one per shape set); got {listing}"
            self.report.add_model(model, "inputs", message=message)
            return
        sets = model["shape_sets"]
        if len(sets) > 1 and len({tuple(map(tuple, s.values())) for s in sets}) < len(sets):
            self.report.add_model(model, "inputs", message="two shape sets are the same: list each once")
        if len(sets) > 1 and isinstance(model["options"], dict) and "dynamic_input" in model["options"]:
            message = ("options.dynamic_input and a list of shapes in inputs: say it once; with shapes: dynamic "
                       "the pipeline writes dynamic_input from inputs (and checks it)")
            self.report.add_model(model, "options", "dynamic_input", message=message)

    def declared(self, model: dict, key: str) -> bool:
        """Whether ``key`` is written for this model (or its defaults), not just a schema default."""
        return _raw_value(self.data, model, (key,)) is not None

    def input_infos(self, model: dict, graph: _Graph) -> list[input_facts.InputInfo] | None:
        """The inputs the toolkit compiles, in its order (``inputs:`` keys, else the graph's); None if unknown.

        ``shapes`` holds every declared shape of the input, except for a dynamic
        model's samples, which must have the largest set (the toolkit's rule).
        """
        declared = shape_sets.declared(model["inputs"]) or {}
        if model["inputs"] and (not declared or model["shape_sets"] is None or any(
                _input_problem(name, shape, graph) for name, items in declared.items() for shape in items)):
            return None  # reported by check_shapes / check_tensor_names
        infos = []
        for name in declared or graph.inputs:
            elem_type, dims = graph.input_types.get(name, [None, None])
            items = declared.get(name) or [dims]
            if any(not shape or any(not isinstance(d, int) or d <= 0 for d in shape) for shape in items):
                return None  # a dynamic input without a declared shape: analysis refuses it
            infos.append(input_facts.InputInfo(name, tuple(tuple(shape) for shape in items),
                                               input_facts.ONNX_DTYPES.get(elem_type)))
        return infos

    def check_dynamic(self, model: dict, graph: _Graph) -> None:
        """The toolkit's measured limits on ``dynamic_input`` (see :mod:`pipeline.shapes`)."""
        if shape_sets.mode(model) != "dynamic":
            return
        names, order = list(model["inputs"]), list(graph.inputs)
        if names != order:
            message = (f"shapes: dynamic builds through the toolkit's dynamic_input, which cannot be combined "
                       f"with cut or reordered inputs: list every model input in the model's order "
                       f"({', '.join(order)})")
            self.report.add_model(model, "inputs", message=message)
            return
        for name, items in shape_sets.declared(model["inputs"]).items():
            dims = graph.input_types.get(name, [None, None])[1] or []
            for index, shape in enumerate(items if len(items) > 1 else []):
                fixed = [(axis, d) for axis, d in enumerate(dims) if d is not None and axis < len(shape)
                         and shape[axis] != d]
                if fixed:
                    axis, value = fixed[0]
                    message = (f"shape {shape} changes dim {axis}, which the model fixes at {value}: the toolkit "
                               f"refuses it in dynamic_input (only dims dynamic in the ONNX model may vary)")
                    self.report.add_model(model, "inputs", name, index, message=message)

    def check_normalisation(self, model: dict, infos: list | None) -> None:
        means, stds = model["mean_values"], model["std_values"]
        if isinstance(means, dict) or isinstance(stds, dict):
            self.normalisation_by_name(model, infos)
            return
        if not means or not stds:
            return
        if len(means) != len(stds):
            message = f"std_values has {len(stds)} entries but mean_values has {len(means)}: give one per input"
            self.report.add_model(model, "std_values", message=message)
            return
        for index, (mean, std) in enumerate(zip(means, stds)):
            if len(mean) != len(std):
                message = f"std_values has {len(std)} channels here but mean_values has {len(mean)}"
                self.report.add_model(model, "std_values", index, message=message)
        if infos is not None and len(means) == len(infos):
            for key, values in (("mean_values", means), ("std_values", stds)):
                for index, (row, info) in enumerate(zip(values, infos)):
                    problem = input_facts.normalisation_problem(row, info, key)
                    if problem:
                        self.report.add_model(model, key, index, message=problem)

    def normalisation_by_name(self, model: dict, infos: list | None) -> None:
        """``mean_values``/``std_values`` as mappings by input name: checked, then turned into the
        toolkit's per-input lists (an input left out gets mean 0 / std 1 on each channel)."""
        if infos is None:
            return  # the order is unknown without the graph; check_files=False loads do not convert
        by_name = {info.name: info for info in infos}
        rows = {}
        for key, neutral in (("mean_values", 0), ("std_values", 1)):
            values = model[key]
            if values is None:
                continue
            if isinstance(values, list):
                message = f"{key} is a list but the other one is a mapping by input name: give both the same way"
                self.report.add_model(model, key, message=message)
                return
            for name, row in values.items():
                if name not in by_name:
                    message = (f"{key} names {name!r}, which is not an input of the model"
                               f"{_did_you_mean(name, by_name)} (inputs: {', '.join(by_name)})")
                    self.report.add_model(model, key, name, message=message, key=True)
                    continue
                problem = input_facts.normalisation_problem(row, by_name[name], key)
                if problem:
                    self.report.add_model(model, key, name, message=problem)
            rows[key] = [list(values.get(info.name) or [neutral] * input_facts.channel_count(info.shape))
                         for info in infos]
        model.update(rows)

    def check_source(self, model: dict) -> _Graph | None:
        raw = _raw_value(self.data, model, ("source",))
        problem = _file_problem(model["source"])
        if problem is None:
            graph = _onnx_graph(model["source"])
            if isinstance(graph, _Graph):
                return graph
            problem = graph
        self.report.add_model(model, "source", message=f"source {raw!r} {problem}")
        return None

    def check_quantization(self, model: dict, infos: list | None) -> None:
        dataset = model["quantization"]["dataset"]
        if dataset is None:
            message = "quantization needs a dataset: (in the model or in defaults)"
            self.report.add_model(model, "quantization", message=message)
        elif not self.check_files:
            return
        else:
            if infos is not None and shape_sets.mode(model) == "dynamic":
                largest = shape_sets.largest(model["shape_sets"])  # the toolkit calibrates at it
                infos = [input_facts.InputInfo(i.name, (tuple(largest[i.name]),), i.dtype) for i in infos]
            before = len(self.report.problems)
            if isinstance(dataset, dict):
                self.check_dataset_mapping(model, infos)
            else:
                self.check_dataset_file(model, infos)
            if infos is not None and len(self.report.problems) == before:
                self.check_buckets_calibrated(model)

    def check_buckets_calibrated(self, model: dict) -> None:
        """Each bucket calibrates with the steps whose .npy samples have its shapes: it needs one at least."""
        if shape_sets.mode(model) != "buckets" or not model["quantization"]["samples"]:
            return
        for unit in shape_sets.expand([model], input_facts.sample_shape):
            if not unit["quantization"]["samples"]:
                shapes = ", ".join(f"{name} {shape}" for name, shape in unit["inputs"].items())
                message = (f"bucket {unit['name']!r} has no calibration step whose samples all have its shapes "
                           f"({shapes}): add .npy samples of that shape, or give images, which are resized")
                self.report.add_model(model, "quantization", "dataset", message=message)

    def check_dataset_file(self, model: dict, infos: list | None) -> None:
        """The single-file form: one line per step, one path per input in the model's input order."""
        quant = model["quantization"]
        raw = _raw_value(self.data, model, ("quantization", "dataset"))
        if quant["dataset"] not in self.datasets:
            self.datasets[quant["dataset"]] = _read_dataset(quant["dataset"])
        rows, problems = self.datasets[quant["dataset"]]
        quant["samples"] = [list(paths) for _, paths in rows]
        widths = {len(paths) for _, paths in rows}
        if infos is not None and len(widths) == 1 and widths != {len(infos)}:
            problems = [*problems, f"has {widths.pop()} path(s) per line but the model has {len(infos)} inputs"]
        elif infos is not None:
            problems = [*problems, *_row_problems(rows, infos)]
        for problem in problems:
            self.report.add_model(model, "quantization", "dataset", message=f"dataset {raw!r} {problem}")

    def check_dataset_mapping(self, model: dict, infos: list | None) -> None:
        """The mapping form: input name -> samples (one per calibration step), checked sample by sample."""
        quant = model["quantization"]
        where = ("quantization", "dataset")
        mapping = quant["dataset"]
        found = True
        unreadable = set()
        for name, entry in mapping.items():
            for index, path in enumerate(entry["samples"]):
                problem = _file_problem(path) or (None if path.lower().endswith(SAMPLE_TYPES)
                                                  else f"is not one of {', '.join(SAMPLE_TYPES)}")
                if problem:
                    path_in_manifest = self.sample_path(model, name, index)
                    raw = _raw_value(self.data, model, path_in_manifest)
                    self.report.add_model(model, *path_in_manifest, message=f"sample {raw!r} {problem}")
                    unreadable.add(path)
                    found = False
        counts = {name: len(entry["samples"]) for name, entry in mapping.items()}
        if len(set(counts.values())) > 1:
            listing = ", ".join(f"{name}: {count}" for name, count in counts.items())
            message = f"every input needs the same number of samples (one per calibration step); got {listing}"
            self.report.add_model(model, *where, message=message)
            found = False
        if infos is None:
            return
        by_name = {info.name: info for info in infos}
        for name in mapping:
            if name not in by_name:
                message = (f"dataset names {name!r}, which is not an input of the model"
                           f"{_did_you_mean(name, by_name)} (inputs: {', '.join(by_name)})")
                self.report.add_model(model, *where, name, message=message, key=True)
                found = False
        missing = [info.name for info in infos if info.name not in mapping]
        if missing:
            message = f"dataset has no samples for input(s) {', '.join(map(repr, missing))}: give samples for every input"
            self.report.add_model(model, *where, message=message)
            found = False
        for name, entry in mapping.items():  # every readable sample of a known input, whatever else is wrong
            for index, path in enumerate(entry["samples"] if name in by_name else ()):
                if path in unreadable:
                    continue
                problem = input_facts.sample_problem(path, by_name[name], entry.get("layout"))
                if problem:
                    self.report.add_model(model, *self.sample_path(model, name, index),
                                          message=f"sample {os.path.basename(path)!r} {problem}")
        if found:
            quant["samples"] = [list(row) for row in zip(*(mapping[info.name]["samples"] for info in infos))]
            quant["images"] = [_decode_spec(mapping[info.name], info) for info in infos]

    def sample_path(self, model: dict, name: str, index: int) -> tuple:
        """The manifest path of one sample of a dataset mapping (short or long form)."""
        entry = _raw_value(self.data, model, ("quantization", "dataset", name))
        if isinstance(entry, dict):
            return "quantization", "dataset", name, "samples", index
        return "quantization", "dataset", name, index

    def check_tensor_names(self, model: dict, graph: _Graph) -> None:
        declared = shape_sets.declared(model["inputs"]) or {}
        for name, items in declared.items():
            problem = next(filter(None, (_input_problem(name, shape, graph) for shape in items)), None)
            if problem:
                self.report.add_model(model, "inputs", name, message=problem, key=True)
        if declared and model["shape_sets"] and not any(
                _input_problem(name, shape, graph) for name, items in declared.items() for shape in items):
            self.check_dynamic(model, graph)
        for index, name in enumerate(model["outputs"] or ()):
            if name not in graph.tensors:
                message = f"output {name!r} is not a tensor of the model{_did_you_mean(name, graph.tensors)}"
                self.report.add_model(model, "outputs", index, message=message)
        self.check_layer_names(model, graph)
        self.check_input_count(model, graph)

    def check_layer_names(self, model: dict, graph: _Graph) -> None:
        hybrid = (model["quantization"] or {}).get("hybrid") or {}
        for index, layer in enumerate(hybrid.get("custom_layers", ())):
            for end in ("start", "end"):
                if layer[end] not in graph.tensors:
                    hint = _did_you_mean(layer[end], graph.tensors)
                    message = f"{end} tensor {layer[end]!r} is not in the model{hint}"
                    path = ("quantization", "hybrid", "custom_layers", index, end)
                    self.report.add_model(model, *path, message=message)

    def check_input_count(self, model: dict, graph: _Graph) -> None:
        count = _input_count(model, graph)
        for key in ("mean_values", "std_values"):
            values = model[key]
            if isinstance(values, list) and values and len(values) != count:
                message = f"{key} has {len(values)} entries but the model has {count} inputs: give one per input"
                self.report.add_model(model, key, message=message)


def _broken_fields(broken: list[tuple]) -> dict[tuple, set]:
    """Scope (a model or defaults) -> top fields with schema errors (None: all)."""
    fields: dict[tuple, set] = {}
    for path in broken:
        if path[:1] == ("models",) and len(path) >= 2:
            scope, rest = path[:2], path[2:]
        elif path[:1] == ("defaults",):
            scope, rest = path[:1], path[1:]
        else:
            continue
        fields.setdefault(scope, set()).add(rest[0] if rest else None)
    return fields


def _raw_value(data: dict, model: dict, path: tuple):
    """A value as written in the manifest: in the model, else in defaults."""
    for node in (data["models"][model["index"]], data.get("defaults") or {}):
        for key in path:
            if isinstance(node, list) and isinstance(key, int):
                node = node[key] if key < len(node) else None
            else:
                node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            return node
    return None


def _input_count(model: dict, graph: _Graph | None) -> int | None:
    if model["inputs"]:
        return len(model["inputs"])
    return len(graph.inputs) if graph is not None else None


def _input_problem(name: str, shape: list, graph: _Graph) -> str | None:
    if name in graph.inputs:
        rank = graph.inputs[name]
        if rank is not None and rank != len(shape):
            return f"input {name!r} has {rank} dimensions in the model, but {len(shape)} are given"
        return None
    if name in graph.tensors:
        return None  # an intermediate tensor: the toolkit cuts the graph there
    listed = ", ".join(graph.inputs) or "none"
    return f"input {name!r} is not a tensor of the model{_did_you_mean(name, graph.inputs)} (model inputs: {listed})"


def _file_problem(path: str) -> str | None:
    """Why ``path`` is not a readable regular file, or None if it is one."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symlink loop"
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            return "is a broken symlink" if os.path.islink(path) else f"does not exist (looked for {path})"
        return f"cannot be read ({error.strerror})"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    return None if stat.S_ISREG(mode) else "is not a regular file"


def node_count(path: str) -> int | None:
    """How many nodes an ONNX file has, from the memoised graph facts (None if it cannot be read).

    The shard planner's size estimate for a graph never converted (pipeline.shard).
    """
    graph = _onnx_graph(path)
    return len(graph.nodes) if isinstance(graph, _Graph) else None


def _onnx_graph(path: str) -> _Graph | str:
    info = os.stat(path)
    return _read_graph(path, info.st_mtime_ns, info.st_size)


@functools.lru_cache(maxsize=32)
def _read_graph(path: str, mtime_ns: int, size: int) -> _Graph | str:
    """The names in an ONNX file, or why it is not one (cached per file version).

    Parsing needs ``import onnx`` (about 0.7 s) plus the file itself, on every
    doit invocation; the facts are remembered on disk per (path, mtime, size)
    so that a no-op build of many models never imports onnx.
    """
    memo = _graph_memo_path(path, mtime_ns, size)
    graph = _read_graph_memo(memo)
    if graph is not None:
        return graph
    # A fresh checkout of files seen before (new paths and mtimes, same bytes) is found by content. The
    # hash is remembered per process, and the build's cache keys need it anyway.
    by_content = _graph_content_memo_path(path) if size else None
    graph = _read_graph_memo(by_content) if by_content else None
    if graph is None:
        graph = _parse_graph(path, size)
    if isinstance(graph, _Graph):
        for where in (memo, by_content):
            if where is not None:
                _write_graph_memo(where, graph)
    return graph


def _read_graph_memo(memo: Path) -> _Graph | None:
    try:
        facts = json.loads(memo.read_text())
        return _Graph(facts["inputs"], frozenset(facts["tensors"]), frozenset(facts["ops"]), facts["input_types"],
                      tuple(facts["nodes"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_graph_memo(memo: Path, graph: _Graph) -> None:
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.partial")
        tmp.write_text(json.dumps({"inputs": graph.inputs, "tensors": sorted(graph.tensors),
                                   "ops": sorted(graph.ops), "input_types": graph.input_types,
                                   "nodes": list(graph.nodes)}))
        os.replace(tmp, memo)
    except OSError:  # a read-only home only costs speed
        pass


def _graph_memo_path(path: str, mtime_ns: int, size: int) -> Path:
    import hashlib

    digest = hashlib.sha256(f"{os.path.abspath(path)}\0{mtime_ns}\0{size}".encode()).hexdigest()
    return _graph_memo_root() / f"{digest}.json"


def _graph_content_memo_path(path: str) -> Path | None:
    from pipeline.cache import file_sha256

    try:
        return _graph_memo_root() / f"content-{file_sha256(path)}.json"
    except OSError:
        return None


def _graph_memo_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rknn-pipeline" / "graph-facts"


def _parse_graph(path: str, size: int) -> _Graph | str:
    if size == 0:
        return "is empty, not an ONNX model"
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as error:  # any parse failure means a bad file, not a bug here
        return f"is not a valid ONNX model ({type(error).__name__}: {error})"
    if model.ir_version <= 0 or not model.HasField("graph") or not model.graph.node:
        return "is not a valid ONNX model (no graph found)"
    return _graph_names(model.graph)._replace(nodes=_selector_nodes(model))


def _selector_nodes(model) -> tuple:
    """Each node as override selectors see it, with the attributes analysis.json gives it."""
    from .analysis import constant_inputs, node_attributes, small_constants
    from .onnx_util import opset as opset_of

    constants = small_constants(model)
    records = []
    for index, node in enumerate(model.graph.node):
        opset = opset_of(model, node.domain)
        attrs = node_attributes(node, opset)
        attrs.update(constant_inputs(node, opset, constants, attrs))
        records.append({"index": index, "name": node.name, "op_type": node.op_type, "attrs": attrs,
                        "inputs": list(node.input), "outputs": list(node.output)})
    return tuple(records)


def _kept_nodes(nodes: tuple, outputs: list | None) -> list[dict]:
    """The nodes that compute ``outputs`` (all without): the subgraph the toolkit converts."""
    if not outputs:
        return list(nodes)
    producer = {out: node for node in nodes for out in node["outputs"]}
    kept: dict[int, dict] = {}
    pending = [producer[name] for name in outputs if name in producer]
    while pending:
        node = pending.pop()
        if node["index"] not in kept:
            kept[node["index"]] = node
            pending += [producer[name] for name in node["inputs"] if name in producer]
    return sorted(kept.values(), key=lambda node: node["index"])


def _graph_names(graph) -> _Graph:
    weights = {init.name for init in graph.initializer}
    inputs, types = {}, {}
    for value in graph.input:
        if value.name not in weights:
            shape = value_dims(value)
            inputs[value.name] = None if shape is None else len(shape)
            types[value.name] = [value.type.tensor_type.elem_type,
                                 None if shape is None else [d if d and d > 0 else None for d in shape]]
    tensors = {value.name for value in graph.input} | {value.name for value in graph.output}
    for node in graph.node:
        tensors.update(node.output)
    return _Graph(inputs, frozenset(tensors - {""}), frozenset(node.op_type for node in graph.node), types)


@functools.lru_cache(maxsize=1)
def _onnx_op_types() -> frozenset:
    import onnx.defs

    return frozenset(schema.name for schema in onnx.defs.get_all_schemas())


def _read_dataset(path: str) -> tuple[list[tuple[int, list[str]]], list[str]]:
    """(rows of (line number, absolute sample paths), problems) for a calibration dataset file."""
    problem = _file_problem(path)
    if problem:
        return [], [problem]
    try:
        with open(path, encoding="utf-8") as stream:
            lines = stream.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        return [], [f"cannot be read as UTF-8 text ({error})"]
    base = os.path.dirname(path)
    rows = [(number, line.split()) for number, line in enumerate(lines, 1) if line.strip()]
    if not rows:
        return [], ["lists no samples: give one sample path per line"]
    samples = [(number, [_absolute(Path(base), item) for item in items]) for number, items in rows]
    return samples, _sample_problems(base, rows)


def _row_problems(rows: list[tuple[int, list[str]]], infos: list) -> list[str]:
    """Each sample of a dataset file checked against its input (the first few problems)."""
    problems = []
    for number, paths in rows:
        for path, info in zip(paths, infos):
            if not os.path.isfile(path) or not path.lower().endswith(SAMPLE_TYPES):
                continue  # reported by _sample_problems
            problem = input_facts.sample_problem(path, info)
            if problem:
                problems.append(f"line {number}: sample {os.path.basename(path)!r} {problem}")
    if len(problems) > 3:
        problems = [*problems[:3], f"(and {len(problems) - 3} more samples with problems)"]
    return problems


def _decode_spec(entry: dict, info) -> dict | None:
    """How the pipeline decodes images given for one input (None: the input has no image samples)."""
    if not any(input_facts.is_image(path) for path in entry["samples"]):
        return None
    return {"shape": list(info.shape), "dtype": info.dtype or "float32",
            "layout": input_facts.image_layout(info.shape, entry.get("layout")), "colour": entry.get("colour", "rgb")}


def _sample_problems(base: str, rows: list[tuple[int, list[str]]]) -> list[str]:
    missing = [(n, item) for n, items in rows for item in items if not os.path.isfile(os.path.join(base, item))]
    unknown = [(n, item) for n, items in rows for item in items if not item.lower().endswith(SAMPLE_TYPES)]
    problems = []
    if missing:
        (number, item), more = missing[0], len(missing) - 1
        tail = f" (and {more} more missing)" if more else ""
        problems.append(f"line {number}: sample {item!r} not found{tail}")
    if unknown:
        number, item = unknown[0]
        problems.append(f"line {number}: sample {item!r} is not one of {', '.join(SAMPLE_TYPES)}")
    width = len(rows[0][1])
    for number, items in rows:
        if len(items) != width:
            problems.append(f"line {number} has {len(items)} paths but line {rows[0][0]} has {width}")
            break
    return problems


# -- command line ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.manifest", description="Check an rknn-pipeline manifest.")
    parser.add_argument("manifest", nargs="?", default="models.yaml", help="manifest file (default: models.yaml)")
    parser.add_argument("--no-files", action="store_true", help="check the manifest only, not the files it names")
    args = parser.parse_args(argv)
    try:
        manifest = load_manifest(args.manifest, check_files=not args.no_files)
    except ManifestError as error:
        print(error, file=sys.stderr)
        return 1
    pairs = sum(len(model["targets"]) for model in manifest.models)
    entries = len({model["index"] for model in manifest.models})
    buckets = f" ({len(manifest.models)} with each shape bucket counted)" if len(manifest.models) != entries else ""
    print(f"ok: {entries} models{buckets}, {pairs} model x target conversions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
