"""GitHub workflows: linted offline (zizmor, the workflow JSON schema), and the release
workflow consumes exactly what `qconvert release --matrix` prints."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, run_cli

WORKFLOWS = sorted((REPO_ROOT / ".github" / "workflows").glob("*.yml"))


def _tool(name: str) -> str:
    path = shutil.which(name) or str(__import__("pathlib").Path(sys.executable).parent / name)
    return path


def test_zizmor_offline_finds_nothing():
    proc = subprocess.run([_tool("zizmor"), "--offline", str(REPO_ROOT / ".github" / "workflows")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No findings" in proc.stdout + proc.stderr


def test_workflow_schema():
    proc = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows",
                           *map(str, WORKFLOWS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_release_workflow_consumes_the_matrix_output():
    text = (REPO_ROOT / ".github" / "workflows" / "release.yml").read_text()
    # the matrix job runs our command and the variant job expands its output
    assert 'qconvert release "$PLAN" --matrix' in text
    assert "variant: ${{ fromJSON(needs.plan.outputs.matrix) }}" in text
    used = set(re.findall(r"matrix\.variant\.([a-z_]+)", text))
    assert used, "the workflow should read fields of matrix.variant"
    proc = run_cli("release", str(REPO_ROOT / "releases" / "flux1-dev.toml"), "--matrix")
    assert proc.returncode == 0, proc.stderr
    variants = json.loads(proc.stdout)
    assert isinstance(variants, list) and variants
    for v in variants:
        assert used <= set(v), (used, v)
    only = json.loads(run_cli("release", str(REPO_ROOT / "releases" / "flux1-dev.toml"), "--matrix",
                              "--only", "nf4,Q4_K_S").stdout)
    assert [v["name"] for v in only] == ["nf4", "Q4_K_S"]


def test_ci_script_runs_the_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text().splitlines()
    assert readme[0].startswith("pip install") and "qconvert flux --source tiny-flux" in readme[0]
    assert readme[1].startswith("pip install") and "pytest" in readme[1]
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "README.md" in ci and "pytest" in ci
    line = subprocess.run(["grep", "-m1", "-E", "^pip install .*pytest", str(REPO_ROOT / "README.md")],
                          capture_output=True, text=True).stdout.strip()
    assert line == readme[1]


@pytest.mark.parametrize("plan", sorted((REPO_ROOT / "releases").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_plans_load(plan):
    from qconvert.release import load_plan

    p = load_plan(plan)
    assert p.variants and len({v.name for v in p.variants}) == len(p.variants)
