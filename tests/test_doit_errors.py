"""What doit prints for a bad manifest or a wrong toolkit version: located errors, no traceback, nothing built."""

from __future__ import annotations

from conftest import Project


def _tree(project: Project) -> set[str]:
    return {str(path.relative_to(project.root)) for path in project.root.rglob("*")}


def _assert_refused(project: Project, proc, before: set[str] | None = None) -> None:
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (project.root / "build").exists() and not (project.root / "dist").exists()
    assert not (project.root / ".doit.db").exists()  # doit opens its database before loading tasks
    if before is not None:
        assert _tree(project) == before  # nothing at all, not even .doit.lock


def test_a_selector_typo_in_the_third_model_fails_at_load_before_any_conversion(project):
    # Two good models come first, so doit would convert them before resolving the third
    # if the selector were only checked by resolve:.
    models = "".join(f"""  - name: m{index}
    source: examples/models/tiny_pool_identity.onnx
    targets: [rk3588]
    inputs: {{x: [1, 3, 32, 32]}}
""" for index in (1, 2))
    project.write_manifest("version: 1\nmodels:\n" + models + """  - name: m3
    source: examples/models/tiny_pool_identity.onnx
    targets: [rk3588, rk3566]
    inputs: {x: [1, 3, 32, 32]}
    overrides:
      - match: {op_type: AveragePool}
        action: npu
      - match: {op_type: AveragePol}
        action: npu
      - match: {node: no_such_node*}
        action: cpu
""")
    before = _tree(project)
    for args in ((), ("-n", "2", "-P", "process"), ("convert",)):
        proc = project.doit(*args, check=False, timeout=300)
        _assert_refused(project, proc, before)
        assert not list(project.root.rglob("convert.log"))
        # both selector problems at once, each where it is written, and each once
        assert proc.stderr.splitlines() == [
            "models.yaml:18:26: unknown op_type 'AveragePol'; did you mean 'AveragePool'?",
            "models.yaml:20:16: override matches no node of 'm3' (node='no_such_node*'); nearest nodes: conv0, "
            "relu0, pool0, identity0"], proc.stderr


def test_an_override_whose_action_cannot_work_is_refused_at_load(project):
    project.write_manifest("""version: 1
models:
  - name: t
    source: examples/models/tiny_pool_identity.onnx
    targets: [rk3588]
    inputs: {x: [1, 3, 32, 32]}
    overrides:
      - match: {op_type: Identity}
        action: rewrite
""")
    before = _tree(project)
    proc = project.doit(check=False, timeout=300)
    _assert_refused(project, proc, before)
    assert "models.yaml:9:17: action rewrite is defined for AveragePool only" in proc.stderr, proc.stderr


def test_every_manifest_problem_is_reported_with_its_location(project):
    project.write_manifest("version: 1\nmodels:\n  - name: a\n    source: nope.onnx\n    tragets: [rk3588]\n"
                           "  - name: b\n    source: examples/models/tiny_pool_identity.onnx\n    targets: [rv1106]\n")
    proc = project.doit(check=False)
    _assert_refused(project, proc)
    assert "models.yaml:4:13: source 'nope.onnx' does not exist" in proc.stderr
    assert "models.yaml:5:5: unknown key 'tragets'; did you mean 'targets'?" in proc.stderr
    assert "models.yaml:8:15: rv1106 requires quantization" in proc.stderr


def test_a_billion_laughs_manifest_is_refused_quickly(project):
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    lines.append("models: *a8")
    project.write_manifest("\n".join(lines) + "\n")
    proc = project.doit(check=False, timeout=60)
    _assert_refused(project, proc)
    assert "models.yaml:" in proc.stderr and "alias" in proc.stderr.lower()


def test_a_pinned_toolkit_version_that_is_not_installed_stops_before_any_conversion(project):
    project.write_manifest('version: 1\ntoolkit: "2.4.0"\nmodels:\n  - name: t\n'
                           '    source: examples/models/tiny_pool_identity.onnx\n    targets: [rk3588]\n'
                           '    inputs: {x: [1, 3, 32, 32]}\n')
    proc = project.doit(check=False)
    _assert_refused(project, proc)
    assert "models.yaml:2:10: the manifest expects rknn-toolkit2 2.4.0, but 2.5.0 is installed" in proc.stderr


def test_manifest_variable_selects_another_manifest(project):
    project.write_manifest("version: 1\nmodels:\n  - name: other\n    source: examples/models/tiny_pool_identity.onnx\n"
                           "    targets: [rk3566]\n    inputs: {x: [1, 3, 32, 32]}\n", name="other.yaml")
    proc = project.doit("list", "--all", "manifest=other.yaml")
    assert "convert:other@rk3566" in proc.stdout


def test_the_ci_workflow_is_valid_yaml_and_keys_the_cache_by_the_printed_key():
    import yaml

    from conftest import REPO

    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "build.yml").read_text())
    steps = workflow["jobs"]["convert"]["steps"]
    key_step = next(step for step in steps if step.get("id") == "key")
    assert "python -m pipeline.ci models.yaml" in key_step["run"]
    cache_step = next(step for step in steps if str(step.get("uses", "")).startswith("actions/cache"))
    assert cache_step["with"]["key"] == "${{ steps.key.outputs.key }}"
    assert cache_step["with"]["path"] in workflow["jobs"]["convert"]["env"]["RKNN_PIPELINE_CACHE"]


def test_the_ci_key_is_printed_and_stable(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    runs = [subprocess.run([sys.executable, "-m", "pipeline.ci", "models.yaml"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.strip() for _ in range(2)]
    assert runs[0] == runs[1] and runs[0].startswith("rknn-") and len(runs[0]) == 5 + 64
