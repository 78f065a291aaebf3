"""torchao backend: streaming output equals diffusers'/transformers' own quantization."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import tree_hashes
from qconvert import errors
from qconvert.convert import convert
from qconvert.sources import resolve_source


@pytest.fixture(scope="module")
def int8_out(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("tao") / "flux-int8"
    convert(resolve_source("tiny-flux"), "torchao", "int8wo", out, progress=False)
    return out


def test_transformer_equals_diffusers_on_the_fly(int8_out, tiny_path, tmp_path):
    from diffusers import FluxTransformer2DModel, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    ref = FluxTransformer2DModel.from_pretrained(
        tiny_path / "transformer", quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), dtype=torch.float32
    )
    ref.save_pretrained(tmp_path / "ref")
    ours = load_file(str(int8_out / "transformer" / "diffusion_pytorch_model.safetensors"))
    theirs = load_file(str(tmp_path / "ref" / "diffusion_pytorch_model.safetensors"))
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    with safe_open(str(int8_out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        mine = f.metadata()
    with safe_open(str(tmp_path / "ref" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        ref_meta = f.metadata()
    assert {k: v for k, v in mine.items() if k != "tensor_names"} == {
        k: v for k, v in ref_meta.items() if k != "tensor_names"
    }
    assert set(json.loads(mine["tensor_names"])) == set(json.loads(ref_meta["tensor_names"]))
    cfg = json.loads((int8_out / "transformer" / "config.json").read_text())
    ref_cfg = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert cfg["quantization_config"] == ref_cfg["quantization_config"]


def test_t5_equals_transformers_on_the_fly(int8_out, tiny_path, tmp_path):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import T5EncoderModel, TorchAoConfig

    ref = T5EncoderModel.from_pretrained(
        tiny_path / "text_encoder_2", quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
    )
    ref.save_pretrained(tmp_path / "ref_t5")
    ours = load_file(str(int8_out / "text_encoder_2" / "model.safetensors"))
    theirs = load_file(str(tmp_path / "ref_t5" / "model.safetensors"))
    shared = set(ours) & set(theirs)
    assert {k for k in ours if "_weight_" in k} == {k for k in theirs if "_weight_" in k}
    for k in shared:
        assert torch.equal(ours[k], theirs[k]), k


def test_output_loads_and_generates_like_a_user_would(int8_out, tiny_path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(int8_out)
    assert type(pipe.transformer.proj_out.weight).__name__ == "Int8Tensor"
    assert type(pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight).__name__ == "Int8Tensor"
    img = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(img).all()
    # untouched components are byte-identical copies
    src, out = tree_hashes(tiny_path), tree_hashes(int8_out)
    for comp in ("text_encoder", "vae", "tokenizer", "tokenizer_2", "scheduler"):
        for rel, digest in src.items():
            if rel.startswith(comp + "/"):
                assert out[rel] == digest, rel


def test_manifest_records_source_files_and_versions(int8_out):
    m = json.loads((int8_out / "qconvert.json").read_text())
    assert m["source"] == {"kind": "builtin", "name": "tiny-flux", "builder_version": 1}
    assert m["backend"] == "torchao" and m["scheme"] == "int8wo"
    assert {"torch", "diffusers", "transformers", "torchao", "qconvert", "python"} <= set(m["versions"])
    files = m["components"]["transformer"]["files"]
    assert "transformer/diffusion_pytorch_model.safetensors" in files
    assert all(len(f["sha256"]) == 64 for f in files.values())


@pytest.mark.parametrize("scheme", ["fp8wo", "int8dq"])
def test_other_cpu_schemes_load_and_run(scheme, tmp_path):
    from diffusers import FluxPipeline

    out = tmp_path / scheme
    convert(resolve_source("tiny-flux"), "torchao", scheme, out, progress=False)
    pipe = FluxPipeline.from_pretrained(out)
    img = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="pt").images
    assert torch.isfinite(img).all()


def test_row_chunked_quantization_is_identical(tmp_path, monkeypatch):
    convert(resolve_source("tiny-flux"), "torchao", "int8wo", tmp_path / "whole", progress=False)
    monkeypatch.setattr("qconvert.convert.schedule.CHUNK_VALUES", 64)  # a few rows per chunk
    convert(resolve_source("tiny-flux"), "torchao", "int8wo", tmp_path / "chunked", progress=False)
    assert tree_hashes(tmp_path / "whole") == tree_hashes(tmp_path / "chunked")


@pytest.mark.parametrize("scheme", ["int8wo", "fp8wo"])
def test_jobs_do_not_change_the_output(scheme, tmp_path):
    """Tensors encoded on 1 or 4 threads, finishing in any order: identical files."""
    src = resolve_source("tiny-flux")
    convert(src, "torchao", scheme, tmp_path / "one", progress=False, options={"jobs": 1})
    convert(src, "torchao", scheme, tmp_path / "four", progress=False, options={"jobs": 4})
    assert tree_hashes(tmp_path / "one") == tree_hashes(tmp_path / "four")


def test_jobs_must_be_positive(tmp_path):
    with pytest.raises(errors.UsageError, match="`jobs` must be at least 1"):
        convert(resolve_source("tiny-flux"), "torchao", "int8wo", tmp_path / "x", progress=False, options={"jobs": 0})
    assert not (tmp_path / "x").exists()


def test_int4wo_policy_keeps_weights_int4_cannot_group():
    """torchao's int4 groups 128 input features; FLUX.1-dev's x_embedder has 64 (kept as is)."""
    from qconvert.convert.torchao import TorchAOBackend
    from qconvert.plan import KEEP, QUANTIZE

    policy = TorchAOBackend("int4wo").policy("transformer", None)
    assert policy.decide("x_embedder.weight", (3072, 64), is_linear_weight=True).action == KEEP
    assert policy.decide("proj_out.weight", (64, 3072), is_linear_weight=True).action == QUANTIZE
    assert policy.decide("norm.weight", (3072,), is_linear_weight=False).action == KEEP
    int8 = TorchAOBackend("int8wo").policy("transformer", None)
    assert int8.decide("x_embedder.weight", (3072, 64), is_linear_weight=True).action == QUANTIZE


def test_int4wo_needs_cuda_and_converts_on_it(tmp_path, slim_path):
    """On CPU: refused before anything is written. On a CUDA machine: the slim (width 3072)
    transformer converts and loads, x_embedder (64 inputs) kept, the rest int4."""
    if not torch.cuda.is_available():
        with pytest.raises(errors.DeviceError, match="CUDA"):
            convert(resolve_source("tiny-flux"), "torchao", "int4wo", tmp_path / "x", progress=False)
        assert not (tmp_path / "x").exists()
        return
    from diffusers import FluxTransformer2DModel

    out = tmp_path / "int4"
    convert(resolve_source(str(slim_path)), "torchao", "int4wo", out, components=("transformer",), progress=False)
    m = FluxTransformer2DModel.from_pretrained(out / "transformer", device_map={"": "cuda"})
    assert type(m.x_embedder.weight) in (torch.Tensor, torch.nn.Parameter)
    assert "Int4" in type(m.proj_out.weight).__name__


def test_sharding_splits_and_indexes(tmp_path):
    out = tmp_path / "sharded"
    convert(resolve_source("tiny-flux"), "torchao", "int8wo", out, progress=False,
            options={"max_shard_size": "40KB"})
    index = json.loads((out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel.from_pretrained(out / "transformer")
    assert type(m.proj_out.weight).__name__ == "Int8Tensor"
    for shard in shards:
        with safe_open(str(out / "transformer" / shard), "pt") as f:
            assert "tensor_names" in f.metadata()  # full metadata in every shard


@pytest.mark.parametrize("scheme", ["int8wo", "fp8wo", "int8dq"])
def test_plan_predicts_the_written_tensor_bytes(scheme, tiny_path, tmp_path):
    """--dry-run's sizes are the bytes written, for a bf16 source too (scales are float32)."""
    from safetensors.torch import load_file, save_file

    from qconvert.convert import get_backend, make_plan

    src_dir = tmp_path / "bf16"
    shutil.copytree(tiny_path, src_dir)
    f = src_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(f))
    src = resolve_source(str(src_dir))
    plan, _ = make_plan(src, get_backend("torchao", scheme), ("transformer",))
    out = tmp_path / "out"
    convert(src, "torchao", scheme, out, components=("transformer",), progress=False)
    written = 0
    for shard in (out / "transformer").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as h:
            written += sum(h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in h.keys())
    assert plan.component("transformer").bytes_out == written


@pytest.mark.parametrize("scheme", ["int8wo", "fp8wo", "int8dq"])
def test_slabs_of_rows_equal_one_quantize_call(scheme, monkeypatch):
    """encode_chunk quantizes a per-row scheme in cache-sized slabs of rows: the same tensors
    and header JSON as torchao's quantize_ on the whole weight in one call."""
    from qconvert.convert import torchao as T
    from qconvert.plan import QUANTIZE, TensorPlan

    w = (torch.randn(300, 256, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    plan = TensorPlan("blk.weight", (300, 256), "BF16", QUANTIZE, scheme, 0, 0)
    backend = T.TorchAOBackend(scheme)
    backend._config = backend.torchao_config()
    whole = backend._quantize_rows(plan, w)
    monkeypatch.setattr(T, "SLAB_VALUES", 256 * 64)  # 64 rows per slab: 5 slabs, the last of 44 rows
    slabbed = backend.encode_chunk("transformer", plan, w)
    assert slabbed.meta == whole.meta and slabbed.parts.keys() == whole.parts.keys()
    for key, t in whole.parts.items():
        assert slabbed.parts[key].dtype == t.dtype and slabbed.parts[key].shape == t.shape
        assert torch.equal(slabbed.parts[key].view(torch.uint8), t.view(torch.uint8)), key
