"""The GitHub Actions workflows: valid YAML, wired plan -> shards -> fan-in, and every command they call exists."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys

import yaml

from conftest import REPO

WORKFLOWS = REPO / ".github" / "workflows"


def load(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def run_lines(workflow: dict, job: str | None = None) -> list[str]:
    jobs = [workflow["jobs"][job]] if job else list(workflow["jobs"].values())
    return [line.strip() for j in jobs for step in j["steps"] for line in str(step.get("run", "")).splitlines()
            if line.strip()]


def uv_commands(lines: list[str]) -> list[list[str]]:
    """``uv run ...`` commands, up to a pipe or redirection."""
    found = []
    for line in lines:
        for part in re.findall(r"uv run ([^|>&;)\"]+)", line):
            found.append(shlex.split(re.sub(r"\$\{\{[^}]*\}\}", "EXPR", part)))
    return found


def test_every_workflow_is_valid_yaml_with_jobs():
    for path in WORKFLOWS.glob("*.yml"):
        workflow = yaml.safe_load(path.read_text())
        assert isinstance(workflow.get("jobs"), dict) and workflow["jobs"], path.name
        for name, job in workflow["jobs"].items():
            assert job.get("runs-on") and job.get("steps"), f"{path.name}: job {name}"


def test_sharded_workflow_wires_plan_shards_and_fan_in():
    workflow = load("sharded.yml")
    jobs = workflow["jobs"]
    assert set(jobs) >= {"test", "plan", "shard", "fanin"}
    plan_step = next(step for step in jobs["plan"]["steps"] if step.get("id") == "plan")
    assert "python -m pipeline.ci plan" in plan_step["run"] and 'matrix=' in plan_step["run"]
    assert jobs["plan"]["outputs"]["matrix"] == "${{ steps.plan.outputs.matrix }}"
    assert jobs["shard"]["needs"] == "plan"
    assert jobs["shard"]["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}"
    assert "needs.plan.outputs.shards != '0'" in jobs["shard"]["if"]  # an empty matrix starts nothing
    assert any("shard=${{ matrix.shard }}" in line for line in run_lines(workflow, "shard"))
    failure_upload = [s for s in jobs["shard"]["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert failure_upload and failure_upload[0]["if"] == "failure()"
    assert "${{ strategy.job-index }}" in failure_upload[0]["with"]["name"]
    assert set(jobs["fanin"]["needs"]) == {"plan", "shard"}
    assert any("fanin=1" in line for line in run_lines(workflow, "fanin"))
    uploads = [s for s in jobs["fanin"]["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert "dist/" in uploads[0]["with"]["path"] and "build/report.html" in uploads[0]["with"]["path"]
    # one build path per repository: the single-runner workflow steps aside when a shared cache is set
    assert load("build.yml")["jobs"]["convert"]["if"] == "vars.RKNN_PIPELINE_CACHE == ''"
    assert jobs["plan"]["if"] == "vars.RKNN_PIPELINE_CACHE != ''"


def test_the_test_job_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    command = re.search(r"^(uv run pytest)\b", readme, flags=re.M).group(1)
    assert command in run_lines(load("sharded.yml"), "test")


def test_every_command_the_workflows_call_exists():
    tasks_source = (REPO / "pipeline" / "tasks.py").read_text()
    doit_vars = set(re.findall(r'get_var\("(\w+)"', tasks_source))
    lines = [line for path in WORKFLOWS.glob("*.yml") for line in run_lines(yaml.safe_load(path.read_text()))]
    commands = uv_commands(lines)
    assert commands
    for command in commands:
        if command[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(command[2]) is not None, command
            if command[2:4] == ["pipeline.ci", "plan"]:
                proc = subprocess.run([sys.executable, "-m", "pipeline.ci", "plan", "--help"], cwd=REPO,
                                      capture_output=True, text=True, timeout=120)
                assert proc.returncode == 0 and "--max-shards" in proc.stdout
        elif command[0] == "doit":
            for word in command[1:]:
                if "=" in word and not word.startswith("-"):
                    assert word.split("=")[0] in doit_vars, f"doit variable {word} is not read by pipeline.tasks"
                elif not word.startswith("-") and not word.isdigit() and word not in ("process", "thread"):
                    assert f"def task_{word}" in tasks_source or word in ("report", "lock"), command
        else:
            assert command[0] == "pytest", command


def test_every_secret_and_variable_is_documented():
    text = (WORKFLOWS / "sharded.yml").read_text()
    names = set(re.findall(r"\$\{\{ (?:secrets|vars)\.(\w+) \}\}", text))
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RKNN_PIPELINE_CACHE"} <= names
    docs = (REPO / "docs" / "scaling.md").read_text()
    header = text.split("\nname:")[0]
    for name in names:
        assert name in docs and name in header, name
