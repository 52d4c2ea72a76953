"""What rknn-toolkit2 2.5.0 accepts per target platform, kept as data.

The toolkit only reports an unsupported platform/option combination after
loading and often quantizing the model, minutes into a conversion. Checking
the manifest against these tables first turns that into an instant error
pointing at the offending line. Every fact names where it comes from:
``MEASURED`` (observed with the real toolkit 2.5.0) or ``DOCS`` (stated by
Rockchip's documentation but not measured here), so a later toolkit release
can be re-measured fact by fact. ``schema/models.schema.json`` repeats the
facts it can express; a test keeps the two in agreement.
"""

from __future__ import annotations

MEASURED = "measured 2.5.0"
DOCS = "Rockchip docs"

# Values rknn.config(target_platform=...) accepts in 2.5.0.
TARGETS: tuple[str, ...] = (
    "rk3562",
    "rk3566",
    "rk3568",
    "rk3576",
    "rk3588",
    "rv1103",
    "rv1103b",
    "rv1106",
    "rv1106b",
    "rv1126b",
    "rk2118",
)

# Platforms whose build() refuses do_quantization=False.
FLOAT_REFUSED: dict[str, str] = {
    "rv1103": MEASURED,
    "rv1103b": MEASURED,
    "rv1106": MEASURED,
    "rv1106b": MEASURED,
}

# quantized_dtype values accepted by config() in 2.5.0. "only" lists the
# platforms a dtype is limited to (None: no known limit); "refused" and
# "accepted" record per-platform outcomes and take precedence over "only".
QUANTIZED_DTYPES: dict[str, dict] = {
    "w8a8": {"source": MEASURED, "only": None},
    "w8a16": {
        "source": MEASURED,
        "only": ("rk3562",),
        "only_source": DOCS,
        "refused": {"rk3588": MEASURED},
    },
    "w16a16i_dfp": {
        "source": MEASURED,
        "only": None,
        "accepted": {"rk3588": MEASURED},
    },
    "w4a16": {
        "source": MEASURED,
        "only": ("rk3576", "rv1126b"),
        "only_source": DOCS,
        "refused": {"rk3588": MEASURED},
        "accepted": {"rk3576": MEASURED},
    },
}

# dtype spellings the toolkit rejects, with the accepted replacement.
REJECTED_DTYPES: dict[str, dict] = {
    "w16a16i": {"source": MEASURED, "use": "w16a16i_dfp"},
}

# config() options that only some platforms support.
OPTION_PLATFORMS: dict[str, dict] = {
    "single_core_mode": {"only": ("rk3588", "rk3576"), "source": DOCS},
}

# quantized_algorithm values limited to some dtypes.
ALGORITHM_DTYPES: dict[str, dict] = {
    "gdq": {"dtypes": ("w4a16", "w8a16"), "source": DOCS},
}

# Combinations config() accepts whose build() then kills the process in the toolkit's native
# compiler ("Meet unsupported conv, input tensor name: x input type: N"), every run, measured by
# tests/platform_probe.py. Refused at load: there is nothing a retry or an option could change.
ABORTS: dict[tuple[str, str], str] = {
    ("rk2118", "w8a8"): MEASURED,
    ("rk2118", "w16a16i_dfp"): MEASURED,
    ("rv1103b", "w16a16i_dfp"): MEASURED,
    ("rv1106b", "w16a16i_dfp"): MEASURED,
}

# Builds that crash only some of the time (SIGSEGV or std::bad_alloc in build(), about 4 runs in
# 10 with the probe model). Retried, not refused: rk3562 is the only platform with w8a16, so a
# refusal would take the dtype away, while ``attempts`` tries of a 40 % crash all fail about
# 6 times in 100. The conversion makes up to ``attempts`` tries when the worker dies of a signal,
# says so in the log, and records the tries in convert.json.
UNSTABLE: dict[tuple[str, str], dict] = {
    ("rk3562", "w8a16"): {"source": MEASURED, "attempts": 3},
}

DEFAULT_DTYPE = "w8a8"
DEFAULT_ALGORITHM = "normal"


def _quantization(model: dict) -> dict | None:
    quant = model.get("quantization")
    return quant if isinstance(quant, dict) else None


def _dtype(quant: dict) -> str:
    dtype = quant.get("dtype", DEFAULT_DTYPE)
    return dtype if isinstance(dtype, str) else DEFAULT_DTYPE


def _float_problem(target: str, model: dict) -> str | None:
    if target not in FLOAT_REFUSED or _quantization(model) is not None:
        return None
    return (
        f"{target} requires quantization: the toolkit refuses "
        f"do_quantization=False on {target} ({FLOAT_REFUSED[target]}); "
        "add a quantization: block with a dataset"
    )


def _dtype_problem(target: str, quant: dict) -> str | None:
    dtype = _dtype(quant)
    if (target, dtype) in ABORTS:
        default = " (the default dtype)" if "dtype" not in quant else ""
        return (f"{target} cannot build quantization dtype {dtype}{default}: config() accepts it, then the "
                f"toolkit's compiler aborts the whole process in build() (\"Meet unsupported conv\"; "
                f"{ABORTS[target, dtype]}); choose another dtype or target")
    fact = QUANTIZED_DTYPES.get(dtype)
    if fact is None or target in fact.get("accepted", {}):
        return None
    if target in fact.get("refused", {}):
        why = f"rknn-toolkit2 refuses it ({fact['refused'][target]})"
    elif fact["only"] is not None and target not in fact["only"]:
        why = f"it is only supported on {', '.join(fact['only'])} ({fact['only_source']})"
    else:
        return None
    return f"{target} does not support quantization dtype {dtype}: {why}"


def _option_problems(target: str, model: dict) -> list[str]:
    options = model.get("options")
    if not isinstance(options, dict):
        return []
    problems = []
    for option, fact in OPTION_PLATFORMS.items():
        if options.get(option) and target not in fact["only"]:
            problems.append(
                f"{target} does not support {option}: it is only supported on "
                f"{', '.join(fact['only'])} ({fact['source']})"
            )
    return problems


def check_target_options(target: str, model: dict) -> list[str]:
    """Problems converting ``model`` (an effective manifest model) for ``target``."""
    if target not in TARGETS:
        return [f"unknown target platform {target!r}"]
    quant = _quantization(model)
    if quant is None:
        first = _float_problem(target, model)
    else:
        first = _dtype_problem(target, quant)
    return ([first] if first else []) + _option_problems(target, model)


def check_model_options(model: dict) -> list[str]:
    """Problems in ``model`` that hold whatever the target platform."""
    quant = _quantization(model)
    if quant is None:
        return []
    algorithm = quant.get("algorithm", DEFAULT_ALGORITHM)
    fact = ALGORITHM_DTYPES.get(algorithm) if isinstance(algorithm, str) else None
    dtype = _dtype(quant)
    if fact is None or dtype in fact["dtypes"]:
        return []
    return [
        f"quantization algorithm {algorithm} needs dtype "
        f"{' or '.join(fact['dtypes'])}, not {dtype} ({fact['source']})"
    ]


def attempts(target: str, model: dict) -> int:
    """How many tries a conversion gets when the toolkit crashes: more than one only for UNSTABLE builds."""
    quant = _quantization(model)
    fact = UNSTABLE.get((target, _dtype(quant))) if quant is not None else None
    return fact["attempts"] if fact else 1
