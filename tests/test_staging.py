"""Convert here, validate there: variants staged on a branch (stage), validated as downloaded
from it (validate-staged), and only the passing ones promoted to main by a commit that uploads
no weight again (promote); each step killed and re-run (test Hub)."""

from __future__ import annotations

import json
import re

import pytest

VALIDATION = "validation.json"

from qconvert import faults
from qconvert.faults import InjectedFault
from qconvert.release import load_plan
from qconvert.promote import promote_release, validate_release
from qconvert.staging import STAGING_BRANCH, stage_release

PLAN = """
[release]
source = "tiny-flux"
namespace = "alice"
repo_pattern = "{source_name}-{name}-{suffix}"
collection = "{suffix} release"

[[variant]]
name = "good"
backend = "torchao"
scheme = "int8wo"

[[variant]]
name = "bad"
backend = "torchao"
scheme = "int8wo"
thresholds = { min_psnr = 400 }   # no conversion reaches this: validation fails
"""


@pytest.fixture
def plan(tmp_path, request):
    suffix = re.sub(r"[^a-z0-9]", "", request.node.name.lower())[-20:]
    path = tmp_path / "plan.toml"
    path.write_text(PLAN.replace("{suffix}", suffix))
    return load_plan(path)


def _weight_puts(hub, repo_id: str, branch: str) -> int:
    """LFS PUTs of the weight files a branch holds (uploads, not references)."""
    oids = {m["sha256"] for p, m in hub.files(repo_id, revision=branch).items() if m["lfs"] and p.endswith(".safetensors")}
    return sum(1 for method, path, status in hub.requests if method == "PUT" and path.rsplit("/", 1)[-1] in oids and status == 200)


def _killed(step, kill, monkeypatch):
    faults.reset()
    monkeypatch.setenv("QCONVERT_KILL_AT", kill)
    monkeypatch.setenv("QCONVERT_KILL_SIGNAL", "RAISE")  # a crash at that point, in-process
    try:
        with pytest.raises(InjectedFault):
            step()
    finally:
        monkeypatch.delenv("QCONVERT_KILL_AT")


def test_stage_then_promote_only_the_passing_variant(hub_env, plan, tmp_path, monkeypatch):
    hub = hub_env
    args = {"token": hub.token, "endpoint": hub.endpoint, "log": lambda m: None}
    good, bad = (v.repo_id for v in plan.variants)

    staged = stage_release(plan, only=None, workdir=tmp_path / "work", **args)
    assert [r.status for r in staged] == ["staged", "staged"]
    for repo in (good, bad):
        assert hub.commit_count(repo) == 1  # main: only the repo's initial commit
        assert hub.commit_count(repo, branch=STAGING_BRANCH) == 2
        assert "qconvert.json" in hub.files(repo, revision=STAGING_BRANCH)
    assert not list((tmp_path / "work").iterdir()), "a staged output stays on the runner's disk"
    uploaded = _weight_puts(hub, good, STAGING_BRANCH)
    assert uploaded >= 2  # the transformer and the T5 shards
    staged_files = hub.files(good, revision=STAGING_BRANCH)

    again = stage_release(plan, only=None, workdir=tmp_path / "work", **args)
    assert [r.status for r in again] == ["skipped", "skipped"] and hub.commit_count(good, branch=STAGING_BRANCH) == 2

    # the GPU job: killed before it commits its measurements, then run again
    _killed(lambda: validate_release(plan, only="good", workdir=tmp_path / "gpu", **args), "before-validation-commit", monkeypatch)
    assert VALIDATION not in hub.files(good, revision=STAGING_BRANCH)
    checked = {r.name: r for r in validate_release(plan, only=None, workdir=tmp_path / "gpu", **args)}
    assert checked["good"].status == "validated" and checked["bad"].status == "failed" and checked["bad"].exit_code == 4
    assert hub.commit_count(good) == 1 and hub.commit_count(good, branch=STAGING_BRANCH) == 3  # + measurements
    again = validate_release(plan, only=None, workdir=tmp_path / "gpu", **args)
    assert "earlier run" in again[0].detail and hub.commit_count(good, branch=STAGING_BRANCH) == 3

    # promote: killed just before its commit (nothing on main), right after (main has it,
    # not the collection item nor the branch's deletion), then run again
    promote = lambda: promote_release(plan, only="good", **args)  # noqa: E731
    _killed(promote, "before-promote-commit", monkeypatch)
    assert hub.commit_count(good) == 1
    _killed(promote, "after-promote-commit", monkeypatch)
    assert hub.commit_count(good) == 2
    results = promote_release(plan, only=None, **args)
    by = {r.name: r for r in results}
    assert by["good"].status == "skipped" and by["bad"].status == "failed" and by["bad"].exit_code == 4
    assert "psnr" in by["bad"].detail and STAGING_BRANCH in by["bad"].detail

    # the passing variant: one commit on main, the staged weights referenced, not re-uploaded
    assert hub.commit_count(good) == 2
    main = hub.files(good)
    for path, meta in staged_files.items():
        if path.endswith(".safetensors"):
            assert main[path]["sha256"] == meta["sha256"]
    assert _weight_puts(hub, good, "main") == uploaded
    assert json.loads(hub.read_file(good, VALIDATION))["passed"] is True
    card = hub.read_file(good, "README.md").decode()
    assert f'"{good}"' in card and str(tmp_path) not in card  # the snippet loads the repo, no local path
    assert "README.md" in main and any(p.startswith("samples/") for p in main)
    assert STAGING_BRANCH not in [b["name"] for b in hub._repo(good).git.refs()["branches"]]
    # the failing one: never on main; its validation.json on the staging branch
    assert hub.commit_count(bad) == 1 and "qconvert.json" not in hub.files(bad)
    failed = json.loads(hub.read_file(bad, "validation.json", revision=STAGING_BRANCH))
    assert failed["passed"] is False
    from huggingface_hub import HfApi

    coll = HfApi(endpoint=hub.endpoint, token=hub.token).list_collections(owner="alice", item=f"models/{good}")
    assert len(list(coll)) == 1
    assert not list(HfApi(endpoint=hub.endpoint, token=hub.token).list_collections(owner="alice", item=f"models/{bad}"))

    rerun = promote_release(plan, only="good", **args)
    assert [r.status for r in rerun] == ["skipped"] and hub.commit_count(good) == 2
