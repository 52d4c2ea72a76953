"""The toolkit internals this project relies on, checked against the installed rknn-toolkit2.

pipeline/toolkit.py is the only module that touches rknn-toolkit2, and one
function there (optimized_node_outputs) reads private API. If a toolkit upgrade
changes either the error message that names a rejected op_target key or the
optimised graph the remap reads, this test fails and says which.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import make_pool_identity_model

pytestmark = pytest.mark.toolkit

PROBE = r"""
import json, sys
from pipeline.toolkit import Session, ToolkitError, rejected_op_target_key
session = Session(verbose=False)
session.config(target_platform="rk3588", op_target={"301": "npu"})
session.load_onnx(sys.argv[1])
out = {}
try:
    session.build(do_quantization=False)
    out["build"] = "accepted"
except ToolkitError as exc:
    out["build"] = "rejected"
    out["step"] = exc.step
    out["message"] = str(exc)
    out["key"] = rejected_op_target_key(str(exc))
out["outputs"] = session.optimized_node_outputs()
session.release()
with open(sys.argv[2], "w") as handle:
    json.dump(out, handle)
"""


def test_a_renamed_op_target_key_is_rejected_and_the_optimised_graph_names_its_new_tensor(tmp_path):
    model = make_pool_identity_model(tmp_path / "pool_identity.onnx")
    result_path = tmp_path / "result.json"
    with open(tmp_path / "probe.log", "wb") as log:
        subprocess.run([sys.executable, "-c", PROBE, str(model), str(result_path)], stdout=log,
                       stderr=subprocess.STDOUT, cwd=tmp_path, timeout=600, check=True)
    result = json.loads(result_path.read_text())
    assert result["build"] == "rejected", "rknn-toolkit2 now accepts the pre-optimisation tensor name"
    assert result["step"] == "build"
    assert result["key"] == "301", f"the rejection message changed: {result['message']!r}"
    # private API: rknn.rknn_base.ir.model after a failed build; node names survive, tensors are renamed
    assert result["outputs"].get("pool0") == ["y"], result["outputs"]


def test_installed_version_reads_metadata_without_importing_the_toolkit():
    code = "import sys; from pipeline.toolkit import installed_version; print(installed_version(), 'rknn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["2.5.0", "False"]
