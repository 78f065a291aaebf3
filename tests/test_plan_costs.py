"""What a staging job costs (download, disk, memory, time on the runner kind), said before any
weight is read, and a job that does not fit the machine fails before its first download."""

from __future__ import annotations

import json

import pytest

from conftest import REPO_ROOT, assert_one_line_error, run_cli
from test_errors import _can_mount, _cli_on_tmpfs
from test_stream_source import big_path  # noqa: F401 - the session fixture

PLAN = """
[release]
source = "{source}"
namespace = "alice"
repo_pattern = "costs-{name}-{{name}}"
license = "apache-2.0"

[[variant]]
name = "int8"
backend = "bnb"
scheme = "int8"
options = {{ max_shard_size = "256KB" }}

[[variant]]
name = "Q8_0"
backend = "gguf"
scheme = "Q8_0"
runner = "large"
"""


def _header_bytes(folder) -> int:
    import struct

    total = 0
    for p in folder.rglob("*.safetensors"):
        with open(p, "rb") as fh:
            total += 8 + struct.unpack("<Q", fh.read(8))[0]
    return total


def _plan(hub, big_path, tmp_path, name):  # noqa: F811
    src = f"alice/costs-src-{name}"
    hub.seed_repo(src, big_path)
    path = tmp_path / "plan.toml"
    path.write_text(PLAN.format(source=src, name=name))
    return path


def test_stage_dry_run_says_what_each_job_needs(hub_env, big_path, tmp_path):  # noqa: F811
    from qconvert.release import load_plan
    from qconvert.staging import stage_costs

    hub = hub_env
    plan = load_plan(_plan(hub, big_path, tmp_path, "dry"))
    from qconvert import remote

    fetched = remote.STATS["bytes"]
    rows = {r.name: r for r in stage_costs(plan, only=None, workdir=tmp_path / "w", token=hub.token, endpoint=hub.endpoint)}
    weights = sum(p.stat().st_size for p in big_path.rglob("*.safetensors"))
    for name, r in rows.items():
        assert r.status == "dry-run"
        for what in ("download", "disk", "memory", "min on the"):
            assert what in r.detail, r.detail
    assert "on the standard runner: fits" in rows["int8"].detail
    assert "on the large runner" in rows["Q8_0"].detail
    # headers only (length + JSON of each weight file, read again for a check or two), no data
    assert remote.STATS["bytes"] - fetched <= 3 * _header_bytes(big_path)
    assert not (tmp_path / "w").exists()

    from qconvert.convert import get_backend, make_plan
    from qconvert.costs import estimate
    from qconvert.job import resolve
    from qconvert.release import variant_job

    v = plan.variants[0]
    job = variant_job(plan, v, workdir=tmp_path / "w", push=False, token=hub.token, endpoint=hub.endpoint, progress=False)
    backend = get_backend(v.backend, v.scheme, **v.options)
    p = make_plan(resolve(job), backend, v.components)[0]
    c = estimate(p, backend, streamed=True, staged=True)
    assert 0.98 * weights <= c.download <= weights + (64 << 10)  # every weight byte once (+ the copied configs)
    from qconvert.costs import MARGIN

    assert c.disk - MARGIN < p.bytes_out / 2  # one shard on disk at a time, not the output
    gguf = estimate(make_plan(resolve(job), get_backend("gguf", "Q8_0"), v.components)[0], get_backend("gguf", "Q8_0"),
                    streamed=True, staged=True)  # fmt: skip
    assert gguf.disk >= make_plan(resolve(job), get_backend("gguf", "Q8_0"), v.components)[0].bytes_out  # the whole file


def test_stage_fails_before_any_download_when_the_disk_is_too_small(hub_env, big_path, tmp_path):  # noqa: F811
    if not _can_mount():
        pytest.skip("needs a mount namespace (unshare) for a real small filesystem")
    hub = hub_env
    plan = _plan(hub, big_path, tmp_path, "small")
    gets, puts = hub.count_requests("GET", ".safetensors"), hub.count_requests("PUT")
    mnt = tmp_path / "small"
    proc, left = _cli_on_tmpfs(mnt, "size=1m", "release", str(plan), "--stage", "--only", "int8",
                               "--workdir", str(mnt / "work"))  # fmt: skip
    line = assert_one_line_error(proc, code=3, contains="variant int8 needs ~")
    assert "of disk" in line and "free" in line and "larger runner" in line
    assert hub.count_requests("GET", ".safetensors") - gets <= 3 * len(list(big_path.rglob("*.safetensors")))
    assert hub.count_requests("PUT") == puts and not hub.repo_exists("alice/costs-small-int8")
    assert left == []


def test_the_matrix_carries_each_variant_runner():
    proc = run_cli("release", str(REPO_ROOT / "releases" / "flux1-dev.toml"), "--matrix")
    runners = {v["name"]: v["runner"] for v in json.loads(proc.stdout)}
    assert runners["Q8_0"] == "large" and runners["nf4"] == "standard"
    assert set(runners.values()) <= {"standard", "large"}
