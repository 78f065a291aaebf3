"""Streaming shard writer: valid safetensors, groups never split, header space reserved."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from qconvert.convert.writers import ShardedSafetensorsWriter, parse_size


@pytest.mark.parametrize("reserve", [1 << 16, 8])  # ample, and too small (data moved once)
def test_shards_round_trip(tmp_path, reserve):
    w = ShardedSafetensorsWriter(tmp_path, "model", max_shard_bytes=1000, header_reserve=reserve)
    tensors = {f"layer.{i}.weight": torch.randn(10, 10) for i in range(4)}
    for name, t in tensors.items():
        w.add_group([(name, t), (name + ".absmax", torch.arange(3, dtype=torch.uint8))])
    files = w.finish({"format": "pt", "k": "v"})
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2  # 403 B groups, 1000 B shards: two per shard
    for name, t in tensors.items():
        shard = index["weight_map"][name]
        assert index["weight_map"][name + ".absmax"] == shard  # a group never splits
        with safe_open(str(tmp_path / shard), "pt") as f:
            assert torch.equal(f.get_tensor(name), t)
            assert f.metadata()["k"] == "v"
    assert not list(tmp_path.glob(".*"))  # no scratch files left
    assert all(p.exists() for p in files)


def test_single_shard_has_no_index(tmp_path):
    w = ShardedSafetensorsWriter(tmp_path, "diffusion_pytorch_model", 10**9)
    w.add_group([("a", torch.ones(2, dtype=torch.bfloat16))])
    assert [p.name for p in w.finish()] == ["diffusion_pytorch_model.safetensors"]


def test_parse_size():
    assert parse_size("10GB") == 10**10 and parse_size("2MiB") == 2 << 20 and parse_size(5) == 5
    with pytest.raises(ValueError):
        parse_size("lots")
