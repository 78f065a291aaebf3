"""Release plans: parsing errors, matrix, and a resumable three-variant run on the local Hub."""

from __future__ import annotations

import json
import signal

import pytest

from conftest import REPO_ROOT, assert_one_line_error, invoke, run_cli
from qconvert.release import load_plan, matrix

GOOD = """
[release]
source = "tiny-flux"
namespace = "acme"

[[variant]]
name = "a"
backend = "torchao"
scheme = "int8wo"
"""

BAD_PLANS = {
    "invalid toml": ("[release\nsource=", "not valid TOML"),
    "missing source": ('[release]\nnamespace = "acme"\n[[variant]]\nname="a"\nbackend="bnb"\nscheme="nf4"\n', "source"),
    "missing namespace": ('[release]\nsource = "tiny-flux"\n[[variant]]\nname="a"\nbackend="bnb"\nscheme="nf4"\n', "namespace"),
    "unknown backend": (GOOD.replace('backend = "torchao"', 'backend = "onnx"'), "line 8"),
    "unknown scheme": (GOOD.replace('scheme = "int8wo"', 'scheme = "int3"'), "line 9"),
    "duplicate names": (GOOD + '\n[[variant]]\nname = "a"\nbackend = "bnb"\nscheme = "nf4"\n', "line 12"),
    "unknown key": (GOOD.replace('namespace = "acme"', 'namespace = "acme"\nsorce = "x"'), "unknown key 'sorce'"),
    "no variants": ('[release]\nsource = "tiny-flux"\nnamespace = "acme"\n', "no [[variant]]"),
    "bad components": (GOOD + 'components = ["vae"]\n', "components"),
    "repo_pattern with an unknown field": (GOOD.replace('namespace = "acme"', 'namespace = "acme"\nrepo_pattern = "{source}"'), "repo_pattern"),
    "repo_pattern not a string": (GOOD.replace('namespace = "acme"', 'namespace = "acme"\nrepo_pattern = 3'), "repo_pattern"),
    "malformed repo id": (GOOD + 'repo_id = "acme/bad..name"\n', "not a Hub repo id"),
    "options not a table": (GOOD + 'options = "fast"\n', "options must be a table"),
    "option the backend does not read": (GOOD + 'options = { layout = "bfl" }\n', "does not take 'layout'"),
    "thresholds not a table": (GOOD + 'thresholds = 3\n', "thresholds must be a table"),
    "misspelt threshold": (GOOD + 'thresholds = { min_psrn = 40 }\n', "unknown threshold 'min_psrn'"),
    "threshold that is not a number": (GOOD + 'thresholds = { min_psnr = "20" }\n', "must be a non-negative number"),
    "threshold size that is not a size": (GOOD + 'thresholds = { max_memory = "lots" }\n', "is not a size"),
    "device that is not one": (GOOD.replace('namespace = "acme"', 'namespace = "acme"\ndevice = "gpu"'), "line 5"),
    "misspelt release threshold": (GOOD.replace('namespace = "acme"', 'namespace = "acme"\nthresholds = { max_memry = "1GB" }'), "line 5"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_bad_plan_is_one_line_naming_the_problem(case, tmp_path):
    text, needle = BAD_PLANS[case]
    plan = tmp_path / "plan.toml"
    plan.write_text(text)
    proc = invoke("release", str(plan), "--dry-run")
    line = assert_one_line_error(proc, code=2, contains=needle)
    assert "plan.toml" in line


def test_matrix_and_repo_names():
    plan = load_plan(REPO_ROOT / "releases" / "tiny-demo.toml")
    m = matrix(plan)
    assert [v["name"] for v in m] == ["int8wo", "fp8wo", "Q8_0"]
    assert m[0]["repo_id"] == "acme/tiny-flux-int8wo"


def test_dry_run_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = invoke("release", str(REPO_ROOT / "releases" / "tiny-demo.toml"), "--dry-run", "--push")
    assert proc.returncode == 0, proc.stderr
    assert "would convert, validate, card, push: torchao int8wo" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # not even the default work folder


def test_a_failed_variant_does_not_stop_the_others_and_sets_the_exit_code(tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text(GOOD.replace('scheme = "int8wo"', 'scheme = "int8wo"\nthresholds = { min_psnr = 1000 }')
                    + '\n[[variant]]\nname = "b"\nbackend = "torchao"\nscheme = "fp8wo"\n')  # fmt: skip
    proc = run_cli("-q", "release", str(plan), "--workdir", str(tmp_path / "work"), "--json")
    line = assert_one_line_error(proc, code=4, contains="1 of 2 variants failed (first: a: validation failed: psnr")
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["a"]["status"] == "failed" and rows["a"]["exit_code"] == 4 and rows["b"]["status"] == "done"
    assert "needs >= 1000" in line


def test_an_unexpected_error_in_one_variant_does_not_stop_the_others(tmp_path):
    """A bug in the first variant (injected while it converts) fails that variant alone: the
    later ones run, the state file and the report are written, the exit code is 1."""
    plan = tmp_path / "plan.toml"
    plan.write_text(GOOD + '\n[[variant]]\nname = "b"\nbackend = "gguf"\nscheme = "Q8_0"\noptions = { layout = "diffusers" }\n')
    work = tmp_path / "work"
    proc = run_cli("-q", "release", str(plan), "--workdir", str(work), "--json",
                   env={"QCONVERT_KILL_AT": "tensor-1", "QCONVERT_KILL_SIGNAL": "RAISE"})  # fmt: skip
    line = assert_one_line_error(proc, code=1, contains="1 of 2 variants failed (first: a: unexpected failure: InjectedFault")
    assert "--only a --debug" in line
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["a"]["status"] == "failed" and rows["a"]["exit_code"] == 1 and rows["b"]["status"] == "done"
    state = json.loads((work / "release-state.json").read_text())
    assert state["a"]["status"] == "failed" and state["b"]["status"] == "done"
    report = json.loads((work / "release-report.json").read_text())
    assert [v["status"] for v in report["variants"]] == ["failed", "done"]
    assert not (work / "a").exists() and not any(p.name.startswith(".a") for p in work.iterdir())  # nothing half-written


def _release(plan, workdir, hub, *extra, env_extra=None):
    env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": hub.token, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
    env.update(env_extra or {})
    return run_cli("-q", "release", str(plan), "--workdir", str(workdir), "--push", "--json", *extra, env=env)


@pytest.mark.slow
def test_three_variants_resume_after_kill_and_push_nothing_twice(hub, hub_env, tmp_path):
    plan_text = (REPO_ROOT / "releases" / "tiny-demo.toml").read_text().replace(
        'repo_pattern = "tiny-flux-{name}"', 'repo_pattern = "rel-{name}"'
    )
    plan = tmp_path / "tiny.toml"
    plan.write_text(plan_text)
    work = tmp_path / "work"
    # kill the run before the second variant's validation and push (all three are converted
    # in one read; the first is then fully pushed)
    killed = _release(plan, work, hub, env_extra={"QCONVERT_KILL_AT": "variant-2"})
    assert killed.returncode == -signal.SIGKILL
    state = json.loads((work / "release-state.json").read_text())
    assert state["int8wo"]["status"] == "done" and "fp8wo" not in state
    first_commits = hub.commit_count("acme/rel-int8wo")

    resumed = _release(plan, work, hub)
    assert resumed.returncode == 0, resumed.stderr
    rows = {r["name"]: r for r in json.loads(resumed.stdout)}
    assert rows["int8wo"]["status"] == "skipped"
    assert rows["fp8wo"]["status"] == rows["Q8_0"]["status"] == "done"
    # int8wo is not pushed again; its card gets the other variants' table (qconvert report), README.md alone
    assert hub.commit_count("acme/rel-int8wo") == first_commits + 1
    assert hub.commits("acme/rel-int8wo")[0]["message"].count("1 file(s) added or changed, 0 deleted") == 1
    counts = {r: hub.commit_count(f"acme/rel-{r}") for r in ("int8wo", "fp8wo", "Q8_0")}

    # a second full run, even from a fresh workdir, pushes nothing
    again = _release(plan, tmp_path / "fresh", hub)
    assert again.returncode == 0, again.stderr
    assert all(r["status"] == "skipped" for r in json.loads(again.stdout))
    assert {r: hub.commit_count(f"acme/rel-{r}") for r in counts} == counts

    # an option that changes the output (shard size) is a new release of that variant; one
    # that does not (--jobs) is not
    plan.write_text(plan_text.replace('scheme = "int8wo"', 'scheme = "int8wo"\noptions = { max_shard_size = "100KB" }')
                    .replace('scheme = "fp8wo"', 'scheme = "fp8wo"\noptions = { jobs = 1 }'))
    changed = _release(plan, tmp_path / "fresh2", hub)
    assert changed.returncode == 0, changed.stderr
    rows = {r["name"]: r["status"] for r in json.loads(changed.stdout)}
    assert rows == {"int8wo": "done", "fp8wo": "skipped", "Q8_0": "skipped"}
    # the new conversion, then its card's cross-links (the fresh output's card had none)
    assert hub.commit_count("acme/rel-int8wo") == counts["int8wo"] + 2
    assert "## Other variants of this model" in hub.read_file("acme/rel-int8wo", "README.md").decode()


def test_matrix_needs_only_qconvert_itself():
    """The release workflow's plan job installs qconvert alone (--no-deps): --matrix must not
    import torch, numpy, huggingface_hub or any other dependency, plan checks included."""
    import subprocess
    import sys

    code = (
        "import builtins, sys\n"
        "real = builtins.__import__\n"
        "blocked = {'torch', 'numpy', 'huggingface_hub', 'diffusers', 'transformers', 'safetensors', 'gguf',\n"
        "           'httpx', 'requests', 'PIL', 'tqdm', 'torchao', 'bitsandbytes', 'accelerate'}\n"
        "def guarded(name, *a, **k):\n"
        "    if name.split('.')[0] in blocked:\n"
        "        raise ImportError(name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guarded\n"
        "from qconvert.cli import main\n"
        "sys.exit(main(['release', sys.argv[1], '--matrix']))\n"
    )
    for plan in sorted((REPO_ROOT / "releases").glob("*.toml")):
        proc = subprocess.run([sys.executable, "-c", code, str(plan)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == matrix(load_plan(plan))
