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


def _release_workflow() -> dict:
    import yaml

    return yaml.safe_load((REPO_ROOT / ".github" / "workflows" / "release.yml").read_text())


def _runs(job: dict) -> str:
    return "\n".join(step.get("run", "") for step in job["steps"])


def test_release_graph_converts_on_stock_runners_validates_on_the_gpu_then_promotes():
    jobs = _release_workflow()["jobs"]
    assert set(jobs) == {"plan", "convert", "validate", "promote"}
    assert jobs["convert"]["needs"] == "plan"
    assert set(jobs["validate"]["needs"]) == {"plan", "convert"} and set(jobs["promote"]["needs"]) == {"plan", "validate"}
    # each job runs its own mode of `qconvert release`, and only that one
    modes = {"convert": "--stage", "validate": "--validate-staged", "promote": "--promote"}
    for job, mode in modes.items():
        text = _runs(jobs[job])
        assert f'qconvert release "$PLAN"' in text and mode in text, job
        assert not any(other in text.split() for other in set(modes.values()) - {mode}), job
    assert "--push" not in json.dumps(jobs)  # nothing is published but by promotion
    # stock runners convert (a variant marked large goes to the large-runner input), the GPU
    # runner validates, and the convert job shows what it needs before it downloads anything
    assert "matrix.variant.runner == 'large'" in jobs["convert"]["runs-on"] and "'ubuntu-24.04'" in jobs["convert"]["runs-on"]
    assert "inputs.gpu-runner" in jobs["validate"]["runs-on"]
    steps = [s.get("run", "") for s in jobs["convert"]["steps"]]
    dry = next(i for i, s in enumerate(steps) if "--stage --dry-run" in s)
    real = next(i for i, s in enumerate(steps) if "--stage --workdir" in s)
    assert dry < real
    # validation and promotion also run when some conversions failed; a dry run publishes nothing
    for job in ("validate", "promote"):
        assert "always()" in jobs[job]["if"] and "!inputs.dry-run" in jobs[job]["if"]
    help_text = run_cli("release", "--help").stdout
    for flag in ("--stage", "--validate-staged", "--promote", "--dry-run", "--only", "--workdir"):
        assert flag in help_text


def test_release_jobs_inputs_and_outputs_fit_the_matrix():
    from qconvert.release import load_plan

    wf = _release_workflow()
    jobs = wf["jobs"]
    plan_path = REPO_ROOT / "releases" / "flux1-dev.toml"
    matrix = run_cli("release", str(plan_path), "--matrix").stdout.strip()
    variants = json.loads(matrix)
    # the plan job's `only` output, computed by its own step from the matrix it emits
    step = next(s["run"] for s in jobs["plan"]["steps"] if s.get("id") == "matrix")
    one_liner = re.search(r"python -c '([^']+)'", step).group(1)
    only = subprocess.run([sys.executable, "-c", one_liner, matrix], capture_output=True, text=True, check=True).stdout.strip()
    assert only.split(",") == [v["name"] for v in variants]
    assert [v.name for v in load_plan(plan_path).select(only)] == only.split(",")
    assert set(jobs["plan"]["outputs"]) == {"matrix", "only"}
    for job in ("validate", "promote"):
        assert "needs.plan.outputs.only" in json.dumps(jobs[job])
    # every runner kind in the matrix is one the convert job routes
    assert {v["runner"] for v in variants} <= {"standard", "large"}
    # YAML 1.1 reads the key `on` as True
    assert {"gpu-runner", "large-runner", "dry-run", "plan", "variants"} <= set(wf[True]["workflow_dispatch"]["inputs"])
