"""Upload as you go: a staging conversion streams its source from the Hub, pre-uploads each
finished shard and deletes it, and commits once; killed anywhere (streaming, uploading,
before the commit) and run again it publishes one commit and uploads no object twice."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from qconvert import faults
from qconvert.faults import InjectedFault
from qconvert.release import load_plan
from qconvert.staging import STAGING_BRANCH, stage_release
from test_stream_source import DiskSampler, big_path  # noqa: F401 - the session fixture

PLAN = """
[release]
source = "{source}"
namespace = "alice"
repo_pattern = "up-{name}"
license = "apache-2.0"

[[variant]]
name = "{name}"
backend = "bnb"
scheme = "int8"
options = {{ max_shard_size = "256KB" }}
"""


def _object_puts(hub) -> dict[str, int]:
    """LFS PUTs per object id (successful uploads of bytes)."""
    out: dict[str, int] = {}
    for method, path, status in hub.requests:
        if method == "PUT" and "/_lfs/" in path and status == 200:
            oid = path.rsplit("/", 1)[-1]
            out[oid] = out.get(oid, 0) + 1
    return out


def _stage(plan, tmp_path, hub, kill: str | None, monkeypatch):
    faults.reset()
    if kill:
        monkeypatch.setenv("QCONVERT_KILL_AT", kill)
        monkeypatch.setenv("QCONVERT_KILL_SIGNAL", "RAISE")  # a crash at that point, in-process
    else:
        monkeypatch.delenv("QCONVERT_KILL_AT", raising=False)
    try:
        return stage_release(plan, only=None, workdir=tmp_path / "work", token=hub.token, endpoint=hub.endpoint,
                             log=lambda m: None)  # fmt: skip
    finally:
        monkeypatch.delenv("QCONVERT_KILL_AT", raising=False)


def test_killed_staging_runs_then_one_commit_and_no_object_uploaded_twice(hub_env, big_path, tmp_path, monkeypatch):  # noqa: F811
    hub = hub_env
    name = f"k{random.Random(os.getpid()).randrange(10**6)}"
    src = f"alice/src-{name}"
    hub.seed_repo(src, big_path)
    (tmp_path / "plan.toml").write_text(PLAN.format(source=src, name=name))
    plan = load_plan(tmp_path / "plan.toml")
    repo = plan.variants[0].repo_id
    rng = random.Random(20)
    kills = [f"fetch-{rng.randrange(3, 40)}", f"upload-{rng.randrange(2, 6)}", "before-stage-commit"]
    puts0 = _object_puts(hub)
    for kill in kills:
        with pytest.raises(InjectedFault):
            _stage(plan, tmp_path, hub, kill, monkeypatch)
        # nothing visible: main untouched, the staging branch without this conversion
        assert hub.commit_count(repo) == 1
        assert "qconvert.json" not in hub.files(repo, revision=STAGING_BRANCH), kill
    hf_home = Path(os.environ["HF_HOME"])
    with DiskSampler(hf_home, tmp_path / "work") as disk:
        results = _stage(plan, tmp_path, hub, None, monkeypatch)
    assert [r.status for r in results] == ["staged"], results
    assert hub.commit_count(repo) == 1 and hub.commit_count(repo, branch=STAGING_BRANCH) == 2

    staged = hub.files(repo, revision=STAGING_BRANCH)
    shards = {p: m for p, m in staged.items() if p.endswith(".safetensors")}
    transformer = [m["size"] for p, m in shards.items() if p.startswith("transformer/")]
    assert len(transformer) >= 4, shards  # several shards, each uploaded when it was full
    puts = _object_puts(hub)
    for p, m in shards.items():
        if p.split("/")[0] in ("transformer", "text_encoder_2"):
            assert puts.get(m["sha256"], 0) - puts0.get(m["sha256"], 0) == 1, (p, kills)  # once, over all runs
    # the disk a conversion used: about one shard plus the small files, never the output
    largest = max(m["size"] for m in shards.values())
    total = sum(transformer)
    assert disk.peak <= largest + (768 << 10), (disk.peak, largest, total)
    assert disk.peak < total
    assert not (tmp_path / "work" / plan.variants[0].name).exists()
    print(f"kills {kills}: peak disk {disk.peak} B, largest shard {largest} B, transformer output {total} B, "
          f"{len(shards)} shards each uploaded once")
