"""The publish workflow template: valid against GitHub's workflow schema (check-jsonschema's
vendored copy), shell steps that parse, and the steps and secrets it promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github/workflows/publish.yml"
EXPRESSION = re.compile(r"\$\{\{.*?\}\}")


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


@pytest.fixture(scope="module")
def steps(workflow: dict) -> list[dict]:
    (job,) = workflow["jobs"].values()
    return job["steps"]


def schema_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
         str(path)],
        capture_output=True, text=True,
    )


def test_matches_the_github_workflow_schema(tmp_path: Path):
    result = schema_check(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("runs-on:", "runs_on:"))
    assert schema_check(broken).returncode != 0


def test_run_scripts_parse_and_take_no_expression_inline(steps: list[dict]):
    for step in steps:
        if "run" in step:
            # inputs reach scripts through env only (no ${{ }} spliced into shell code)
            assert not EXPRESSION.search(step["run"]), step["run"]
            check = subprocess.run(["bash", "-n"], input=step["run"], text=True,
                                   capture_output=True)
            assert check.returncode == 0, check.stderr


def test_steps_build_push_then_publish(workflow: dict, steps: list[dict]):
    assert "workflow_dispatch" in workflow[True]  # PyYAML reads the key `on` as True
    uses = [s["uses"].split("@")[0] for s in steps if "uses" in s]
    assert uses == ["actions/checkout", "actions/setup-python"]
    script = "\n".join(s.get("run", "") for s in steps)
    order = ["bash scripts/setup.sh", "mixq compose", "dvc repro --pull",
             "dvc push --run-cache", "publish.push=true", "dvc repro publish"]
    positions = [script.find(command) for command in order]
    assert -1 not in positions and positions == sorted(positions), positions


def test_hf_token_only_reaches_the_publish_step(workflow: dict, steps: list[dict]):
    (job,) = workflow["jobs"].values()
    assert "HF_TOKEN" not in str(workflow.get("env", {})) + str(job.get("env", {}))
    with_token = [s for s in steps if "HF_TOKEN" in str(s)]
    assert len(with_token) == 1 and with_token[0] is steps[-1]
    assert with_token[0]["env"] == {"HF_TOKEN": "${{ secrets.HF_TOKEN }}"}
    assert "dvc repro publish" in with_token[0]["run"]
    assert "HF_TOKEN" not in with_token[0]["run"]  # never echoed or passed on a command line


def test_commands_exist_in_the_installed_tools():
    def help_text(*command: str) -> str:
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout

    assert "--pull" in help_text(sys.executable, "-m", "dvc", "repro", "--help")
    assert "--run-cache" in help_text(sys.executable, "-m", "dvc", "push", "--help")
    assert "compose" in help_text(sys.executable, "-m", "mixq", "--help")
