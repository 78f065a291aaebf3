"""A Hub pipeline converted straight from the Hub: range reads, no source copy on disk.

The source lives only on the test Hub (tests/hubserver). Its transformer is ~7x the few MB of
small files, so a conversion that copied it anywhere (the Hub cache, a temp folder) would
show in the sampled disk use; the output must equal a conversion of a local copy byte for
byte, a truncated read is resumed, and a file whose bytes differ from the sha256 the Hub
gives for it fails the conversion before anything is renamed into place.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from conftest import tree_hashes

# the shape that makes the transformer the bulk of the pipeline (~7.4 MB float32) while
# converting in a second or two
BIG = dict(num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=4)


@pytest.fixture(scope="session")
def big_path(tmp_path_factory) -> Path:
    from qconvert import tiny

    out = tmp_path_factory.mktemp("stream") / "big-flux"
    tiny.build_pipeline(out, **BIG)
    return out


def _tree_size(*roots: Path) -> int:
    total = 0
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for n in names:
                try:
                    total += os.lstat(os.path.join(dirpath, n)).st_size
                except FileNotFoundError:  # a temporary renamed or removed while walking
                    pass
    return total


class DiskSampler:
    """Peak total size of some folders, sampled on a thread while a block runs."""

    def __init__(self, *roots: Path, every: float = 0.005) -> None:
        self.roots, self.every, self.peak = roots, every, 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_size(*self.roots))
            self._stop.wait(self.every)

    def __enter__(self) -> DiskSampler:
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _tree_size(*self.roots))


def _convert(spec: str, out: Path, hub, **kw):
    from qconvert.job import Job, run

    job = Job(spec, "torchao", "int8wo", out=out, validate=False, token=hub.token, endpoint=hub.endpoint, **kw)
    return run(job)


def test_hub_source_streams_with_disk_bound_and_identical_output(hub_env, big_path, tmp_path, monkeypatch):
    import tempfile

    from qconvert import remote

    hub = hub_env
    hub.seed_repo("alice/stream-big", big_path)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    hf_home = Path(os.environ["HF_HOME"])
    before = dict(remote.STATS)
    # one range request refused outright, one cut after half its body: both resumed
    weights_file = "transformer/diffusion_pytorch_model.safetensors"
    hub.fail_next(weights_file, "drop", method="GET")
    hub.fail_next(weights_file, "cut", method="GET")
    monkeypatch.setattr(remote, "_BACKOFF", (0.0,) * 5)  # the test need not wait for the real backoff
    with DiskSampler(hf_home, tmp_path) as disk:
        _convert("alice/stream-big", tmp_path / "out" / "hub", hub)
    got = {k: remote.STATS[k] - before[k] for k in before}

    out = tmp_path / "out" / "hub"
    source_bytes = _tree_size(big_path / "transformer")
    out_bytes = _tree_size(out)
    small = _tree_size(hf_home)  # what the Hub cache holds: configs, tokenizers, scheduler
    assert source_bytes > 5 * small
    assert not list(hf_home.rglob("*.safetensors")), "a weight file was downloaded into the Hub cache"
    assert disk.peak <= out_bytes + small + (1 << 20), (disk.peak, out_bytes, small)
    assert disk.peak < out_bytes + source_bytes / 2
    # every weight byte is read once: the transformer and T5 by range, CLIP and VAE copied
    weights = sum(p.stat().st_size for p in big_path.rglob("*.safetensors"))
    assert weights <= got["bytes"] <= weights * 1.05, (got, weights)
    assert got["retries"] == 2
    print(f"streamed: {got['bytes']} B in {got['requests']} range requests ({got['retries']} resumed), weights {weights} B; "
          f"peak disk {disk.peak} B = output {out_bytes} B + Hub cache {small} B; transformer source {source_bytes} B")

    _convert(str(big_path), tmp_path / "out" / "local", hub)
    a, b = tree_hashes(out), tree_hashes(tmp_path / "out" / "local")
    a.pop("qconvert.json"), b.pop("qconvert.json")  # the source identity differs, nothing else
    assert a == b and any(k.startswith("transformer/") for k in a)
    import json

    ma, mb = (json.loads((p / "qconvert.json").read_text()) for p in (out, tmp_path / "out" / "local"))
    assert ma["files"] == mb["files"]
    assert ma["source"]["kind"] == "hub" and ma["source"]["repo_id"] == "alice/stream-big"


def test_a_file_that_does_not_match_its_sha256_fails_before_the_output_exists(hub_env, big_path, tmp_path):
    from qconvert.errors import CorruptCheckpoint

    hub = hub_env
    hub.seed_repo("alice/stream-sha", big_path)
    meta = hub.files("alice/stream-sha")["transformer/diffusion_pytorch_model.safetensors"]
    # damage the stored object behind the Hub's back (a bad disk, a broken CDN copy): the Hub
    # still announces the original sha256, the bytes served differ in the last tensor
    stored = hub._repo("alice/stream-sha").git.lfs_path(meta["sha256"])
    data = bytearray(stored.read_bytes())
    data[-3] ^= 0x01
    stored.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="does not match the sha256") as e:
        _convert("alice/stream-sha", tmp_path / "out", hub)
    assert "transformer/diffusion_pytorch_model.safetensors" in str(e.value) and hub.token not in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*"))


def test_a_repo_in_the_local_hub_cache_is_read_from_there(hub_env, tiny_path):
    from huggingface_hub import snapshot_download

    from qconvert import remote
    from qconvert.sources import TensorReader, resolve_source

    hub = hub_env
    sha = hub.seed_repo("alice/stream-cached", tiny_path)
    snapshot_download("alice/stream-cached", revision=sha, endpoint=hub.endpoint, token=hub.token)
    source = resolve_source("alice/stream-cached", stream=True, token=hub.token, endpoint=hub.endpoint)
    files = [f for c in source.components.values() for f in c.weight_files]
    assert files and all(isinstance(f, Path) for f in files)  # the cached copies, no RemoteFile
    before = remote.STATS["bytes"]
    with TensorReader() as reader:
        for t in source.components["transformer"].tensors.values():
            reader.load(t)
    assert remote.STATS["bytes"] == before
