"""README's "every toolkit option is a manifest key" against the installed toolkit's own signatures.

Each parameter of the RKNN calls the pipeline makes is either set from a manifest key (or by the
pipeline itself), or in NOT_EXPOSED, which the README lists. A toolkit upgrade that adds a
parameter fails here until it is exposed or listed.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# toolkit parameter -> where it comes from: a manifest key path, or "pipeline" (set by the build itself)
FROM_MANIFEST = {
    "config": {
        "mean_values": "mean_values", "std_values": "std_values", "quantized_dtype": "quantization.dtype",
        "quantized_algorithm": "quantization.algorithm", "quantized_method": "quantization.method",
        "quantized_hybrid_level": "quantization.hybrid_level", "target_platform": "targets",
        "op_target": "overrides", "auto_hybrid_cos_thresh": "quantization.auto_hybrid_cos_thresh",
        "auto_hybrid_euc_thresh": "quantization.auto_hybrid_euc_thresh",
    },
    "load_onnx": {"model": "source", "inputs": "inputs", "input_size_list": "inputs", "outputs": "outputs"},
    "build": {"do_quantization": "quantization", "dataset": "quantization.dataset",
              "rknn_batch_size": "build.rknn_batch_size", "auto_hybrid": "quantization.auto_hybrid"},
    "hybrid_quantization_step1": {"dataset": "quantization.dataset", "rknn_batch_size": "build.rknn_batch_size",
                                  "custom_hybrid": "quantization.hybrid.custom_layers"},
}
NOT_EXPOSED = {("config", "compiler_control_file"), ("load_onnx", "input_initial_val"),
               ("hybrid_quantization_step1", "proposal"), ("hybrid_quantization_step1", "proposal_dataset_size")}


@pytest.mark.toolkit
def test_every_toolkit_parameter_is_a_manifest_key_or_listed_as_not_exposed():
    from rknn.api import RKNN

    options = set(json.loads((REPO / "schema" / "models.schema.json").read_text())["$defs"]["options"]["properties"])
    unaccounted = []
    for method, mapped in FROM_MANIFEST.items():
        for name in list(inspect.signature(getattr(RKNN, method)).parameters)[1:]:
            if name == "kwargs" or (method, name) in NOT_EXPOSED or name in mapped:
                continue
            if method == "config" and name in options:
                continue  # options: {...} passes it through
            unaccounted.append(f"{method}({name})")
    assert not unaccounted, f"toolkit parameters neither in the manifest nor in NOT_EXPOSED: {unaccounted}"
    readme = (REPO / "README.md").read_text()
    for method, name in NOT_EXPOSED:
        assert f"`{name}`" in readme or f"({name})`" in readme, f"README does not list {method}({name})"
