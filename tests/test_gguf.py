"""Tests for the GGUF backend (qconvert.convert.gguf).

Fast: the policy on key lists, names, encoders (K types on rows of 256), every scheme on
tiny-flux (diffusers layout: diffusers loads and generates; T5: transformers loads and matches
the source), the BFL layout's tensors against the source, determinism across --jobs and
pools, bad input. Slow: slim-flux (width 3072) in the BFL layout through diffusers'
``from_single_file`` converter, and the memory bound of streaming.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf

from qconvert.families import flux
from qconvert.convert import SCHEMES
from qconvert.convert import gguf as G
from qconvert.identity import BuiltinSource, SourceIdentity
from qconvert.plan import KEEP, QUANTIZE, TensorPlan

ALL = list(SCHEMES["gguf"])
Q = gguf.GGMLQuantizationType

# Relative error ||deq - x|| / ||x|| on Gaussian rows, ggml's typical values x 1.3
# (Q8_0 0.005, Q6_K 0.018, Q5_K 0.036, Q4_K 0.071, Q3_K 0.15, Q2_K 0.30: what ggml's reference
# quantizers give on Gaussian data; the K-quant ones reproduced by bench/kquant_bench.py with ggml's C code).
GAUSS_BAND = {
    "Q8_0": 0.0065, "Q6_K": 0.024, "Q5_K": 0.047, "Q5_1": 0.05, "Q5_0": 0.06, "Q4_K": 0.093,
    "Q4_1": 0.1, "Q4_0": 0.112, "Q3_K": 0.2, "Q2_K": 0.39, "F16": 1e-3, "BF16": 8e-3, "F32": 0.0,
}  # fmt: skip


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def decide(policy, name: str, shape: tuple[int, ...], dtype: str = "BF16") -> str:
    rule = policy.decide(name, shape, is_linear_weight=name.endswith(".weight") and len(shape) == 2, dtype=dtype)
    return G.GGUFBackend.target_type(rule, dtype, shape)


# --- tables ------------------------------------------------------------------------------------


def test_tables_match_gguf_py():
    assert tuple(G.GGUFBackend.schemes) == SCHEMES["gguf"] == tuple(G.SCHEME_TYPES)
    for t, size in G.TYPE_SIZES.items():
        assert gguf.GGML_QUANT_SIZES[Q[t]] == size, t
    for scheme, value in G.FILE_TYPES.items():
        assert gguf.LlamaFileType[f"MOSTLY_{scheme}"] == value, scheme
    # every type a scheme can produce (after fallback) is one diffusers loads
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES, UNQUANTIZED_TYPES

    loadable = {t.name for t in SUPPORTED_GGUF_QUANT_TYPES} | {t.name for t in UNQUANTIZED_TYPES}
    assert set(G.TYPE_SIZES) <= loadable
    for src, dst in G.FALLBACK.items():
        assert G.TYPE_SIZES[dst][0] < G.TYPE_SIZES[src][0]


# --- policy on key lists (no weights) ------------------------------------------------------------

W = 3072
BFL_KEYS = {
    "img_in.weight": (W, 64), "txt_in.weight": (W, 4096), "time_in.in_layer.weight": (W, 256),
    "time_in.out_layer.weight": (W, W), "vector_in.in_layer.weight": (W, 768),
    "guidance_in.out_layer.weight": (W, W), "final_layer.linear.weight": (64, W),
    "final_layer.adaLN_modulation.1.weight": (2 * W, W),
    "double_blocks.0.img_attn.qkv.weight": (3 * W, W), "double_blocks.0.txt_attn.qkv.weight": (3 * W, W),
    "double_blocks.0.img_attn.proj.weight": (W, W), "double_blocks.0.img_mlp.0.weight": (4 * W, W),
    "double_blocks.0.img_mlp.2.weight": (W, 4 * W), "double_blocks.0.txt_mlp.2.weight": (W, 4 * W),
    "double_blocks.0.img_mod.lin.weight": (6 * W, W), "single_blocks.3.linear1.weight": (7 * W, W),
    "single_blocks.3.linear2.weight": (W, 5 * W), "single_blocks.3.modulation.lin.weight": (3 * W, W),
    "double_blocks.0.img_attn.qkv.bias": (3 * W,), "single_blocks.3.norm.query_norm.scale": (128,),
}  # fmt: skip
HIGH_PRECISION_PREFIXES = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")
BFL_HIGH = {k for k in BFL_KEYS if k.split(".")[0] in HIGH_PRECISION_PREFIXES}
BFL_MORE = {
    "double_blocks.0.img_attn.qkv.weight", "double_blocks.0.txt_attn.qkv.weight",
    "double_blocks.0.img_mlp.2.weight", "double_blocks.0.txt_mlp.2.weight", "single_blocks.3.linear2.weight",
}  # fmt: skip


@pytest.mark.parametrize("dtype", ["BF16", "F32", "F16"])
@pytest.mark.parametrize("scheme", ALL)
def test_bfl_policy(scheme, dtype):
    main, more = G.SCHEME_TYPES[scheme]
    policy = G.transformer_policy(scheme, "bfl")
    for name, shape in BFL_KEYS.items():
        got = decide(policy, name, shape, dtype)
        if len(shape) == 1:
            want = "F32"
        elif name in BFL_HIGH:  # never quantized: BF16 stays BF16 (ComfyUI-GGUF), the others F32
            want = "BF16" if dtype == "BF16" else "F32"
        elif name in BFL_MORE and more:
            want = more
        else:
            want = main
        assert got == want, (scheme, name)


def test_m_mix_steps():
    assert G.SCHEME_TYPES["Q3_K_M"] == ("Q3_K", "Q4_K")
    assert G.SCHEME_TYPES["Q4_K_M"] == ("Q4_K", "Q5_K")
    assert G.SCHEME_TYPES["Q5_K_M"] == ("Q5_K", "Q6_K")
    assert all(more is None for s, (_, more) in G.SCHEME_TYPES.items() if not s.endswith("_M"))


@pytest.mark.parametrize(
    "name, shape, want",
    [
        ("x_embedder.weight", (W, 64), "F32"),
        ("context_embedder.weight", (W, 4096), "F32"),
        ("time_text_embed.guidance_embedder.linear_2.weight", (W, W), "F32"),
        ("proj_out.weight", (64, W), "F32"),
        ("norm_out.linear.weight", (2 * W, W), "F32"),
        ("transformer_blocks.0.attn.to_q.weight", (W, W), "Q4_K"),
        ("transformer_blocks.0.attn.to_v.weight", (W, W), "Q5_K"),
        ("transformer_blocks.0.attn.add_v_proj.weight", (W, W), "Q5_K"),
        ("transformer_blocks.0.ff.net.2.weight", (W, 4 * W), "Q5_K"),
        ("transformer_blocks.0.ff_context.net.2.weight", (W, 4 * W), "Q5_K"),
        ("transformer_blocks.0.ff.net.0.proj.weight", (4 * W, W), "Q4_K"),
        ("single_transformer_blocks.7.proj_out.weight", (W, 5 * W), "Q5_K"),
        ("single_transformer_blocks.7.attn.to_v.weight", (W, W), "Q5_K"),
        ("single_transformer_blocks.7.proj_mlp.weight", (4 * W, W), "Q4_K"),
        ("single_transformer_blocks.7.proj_out.bias", (W,), "F32"),
        ("transformer_blocks.0.attn.norm_q.weight", (128,), "F32"),
    ],
)
def test_diffusers_policy_q4_k_m(name, shape, want):
    # from an F32 source; a BF16 source keeps the input/output layers in BF16 (test_bfl_policy)
    assert decide(G.transformer_policy("Q4_K_M", "diffusers"), name, shape, "F32") == want


@pytest.mark.parametrize(
    "scheme, name, shape, want",
    [
        ("Q4_K_S", "token_embd.weight", (32128, 4096), "Q6_K"),
        ("Q2_K", "token_embd.weight", (32128, 4096), "Q6_K"),
        ("Q4_0", "token_embd.weight", (32128, 4096), "Q6_K"),
        ("Q8_0", "token_embd.weight", (32128, 4096), "Q8_0"),
        ("F16", "token_embd.weight", (32128, 4096), "F16"),
        ("BF16", "token_embd.weight", (32128, 4096), "BF16"),
        ("Q4_K_S", "token_embd.weight", (32128, 100), "F16"),  # Q6_K -> Q8_0 -> F16
        ("Q4_K_M", "enc.blk.0.attn_rel_b.weight", (32, 64), "F32"),
        ("Q4_K_M", "enc.blk.3.attn_q.weight", (4096, 4096), "Q4_K"),
        ("Q4_K_M", "enc.blk.3.attn_v.weight", (4096, 4096), "Q5_K"),
        ("Q4_K_M", "enc.blk.3.ffn_down.weight", (4096, 10240), "Q5_K"),
        ("Q4_K_M", "enc.blk.3.ffn_gate.weight", (10240, 4096), "Q4_K"),
        ("Q3_K_M", "enc.blk.3.ffn_down.weight", (4096, 10240), "Q4_K"),
        ("Q5_K_M", "enc.blk.3.attn_v.weight", (4096, 4096), "Q6_K"),
        ("Q5_K_S", "enc.blk.3.attn_v.weight", (4096, 4096), "Q5_K"),
        ("Q4_K_M", "enc.blk.3.attn_norm.weight", (4096,), "F32"),
        ("Q4_K_M", "enc.output_norm.weight", (4096,), "F32"),
    ],
)
def test_t5_policy(scheme, name, shape, want):
    assert decide(G.t5_policy(scheme), name, shape) == want


@pytest.mark.parametrize(
    "target, row, want",
    [
        ("Q2_K", 512, "Q2_K"), ("Q2_K", 96, "Q4_0"), ("Q3_K", 96, "Q4_0"), ("Q4_K", 96, "Q5_0"),
        ("Q5_K", 96, "Q5_1"), ("Q6_K", 96, "Q8_0"), ("Q4_K", 100, "F16"), ("Q8_0", 37, "F16"),
        ("Q4_0", 64, "Q4_0"), ("F16", 37, "F16"), ("BF16", 3, "BF16"), ("F32", 1, "F32"),
    ],
)  # fmt: skip
def test_row_length_fallback(target, row, want):
    assert G.resolve_type(target, (8, row)) == want
    # and through a policy: a 2-D weight whose rows do not fit the scheme's block
    if target in ("Q2_K", "Q4_K", "Q6_K") and row == 96:
        scheme = {"Q2_K": "Q2_K", "Q4_K": "Q4_K_S", "Q6_K": "Q6_K"}[target]
        assert decide(G.transformer_policy(scheme), "double_blocks.0.img_mlp.0.weight", (4096, row)) == want


def test_small_and_1d_tensors_f32():
    policy = G.transformer_policy("Q4_K_S")
    assert decide(policy, "double_blocks.0.img_mlp.0.weight", (4, 256)) == "F32"  # 1024 elements
    assert decide(policy, "double_blocks.0.img_mlp.0.weight", (5, 256)) == "Q4_K"
    assert decide(policy, "double_blocks.0.img_mlp.0.bias", (4 * W,)) == "F32"
    rule = policy.decide("something.3d", (16, 32, 4), is_linear_weight=False)
    assert rule.action == KEEP and G.GGUFBackend.target_type(rule, "BF16", (16, 32, 4)) == "BF16"


def test_t5_names_match_gguf_py():
    from gguf import MODEL_ARCH, get_tensor_name_map

    names = [
        "shared.weight", "encoder.final_layer_norm.weight",
        *(f"encoder.block.{i}.{k}.weight" for i in (0, 23) for k in G._T5_BLOCK if not k.endswith(".wi")),
    ]  # fmt: skip
    m = get_tensor_name_map(MODEL_ARCH.T5ENCODER, 24)
    for n in names:
        base = n[: -len(".weight")]
        assert G.t5_gguf_name(n) == m.get_name(base) + ".weight", n
    assert G.t5_gguf_name("encoder.block.0.layer.0.SelfAttention.q.bias") == "enc.blk.0.attn_q.bias"
    assert G.t5_gguf_name("decoder.block.0.layer.0.SelfAttention.q.weight") is None


@pytest.mark.parametrize(
    "family, identity, want",
    [
        ("flux", {"kind": "builtin", "name": "tiny-flux"}, "flux1-tiny-flux"),
        ("flux", {"kind": "hub", "repo_id": "black-forest-labs/FLUX.1-dev"}, "flux1-dev"),
        ("flux", {"kind": "hub", "repo_id": "black-forest-labs/FLUX.1-schnell"}, "flux1-schnell"),
        ("flux", {"kind": "bfl", "file": "flux1-dev.safetensors"}, "flux1-dev"),
        ("flux", {"kind": "bfl", "file": "flux1-krea dev (fp8).safetensors"}, "flux1-krea-dev-fp8"),
        ("flux", {"kind": "local", "path": "/data/My_Flux"}, "flux1-my_flux"),
        ("flux", {"kind": "local", "path": "/data/flux"}, "flux1-flux"),
        # the community's names (city96, QuantStack, YarvixPA, silveroxides)
        ("flux-kontext", {"kind": "hub", "repo_id": "black-forest-labs/FLUX.1-Kontext-dev"}, "flux1-kontext-dev"),
        ("flux-fill", {"kind": "hub", "repo_id": "black-forest-labs/FLUX.1-Fill-dev"}, "flux1-fill-dev"),
        ("flux-control", {"kind": "hub", "repo_id": "black-forest-labs/FLUX.1-Depth-dev"}, "flux1-depth-dev"),
        ("flux-control", {"kind": "hub", "repo_id": "black-forest-labs/FLUX.1-Canny-dev"}, "flux1-canny-dev"),
        ("chroma", {"kind": "hub", "repo_id": "lodestones/Chroma1-HD"}, "chroma1-hd"),
        ("chroma", {"kind": "bfl", "file": "chroma-unlocked-v38.safetensors"}, "chroma-unlocked-v38"),
        ("chroma", {"kind": "builtin", "name": "tiny-chroma"}, "chroma-tiny-chroma"),
    ],
)
def test_file_stem(family, identity, want):
    from qconvert.families import family as family_named

    fam = family_named(family)
    assert fam.gguf_stem("transformer", G.short_name(SourceIdentity.from_dict(identity))) == want


def test_bad_schemes_library():
    from qconvert.errors import UsageError

    for scheme in ("IQ2_XXS", "TQ1_0", "MXFP4", "Q4_K_X", "q4_k_s"):
        with pytest.raises(UsageError) as e:
            G.GGUFBackend(scheme)
        assert "Q4_K_S" in e.value.one_line() and scheme in e.value.one_line()
    with pytest.raises(UsageError):
        G.GGUFBackend("Q8_0", layout="comfy")
    with pytest.raises(UsageError):
        G.GGUFBackend("Q8_0", jobs=0)


# --- encoders ----------------------------------------------------------------------------------


ENCODE_TARGETS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "F16", "BF16", "F32"]


@pytest.mark.parametrize("target", ENCODE_TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_rows_of_256(target, dtype):
    """Every target type through the backend's encode on rows of 512 decodes within its band."""
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((16, 512), dtype=np.float32)).to(dtype)
    plan = TensorPlan("w", (16, 512), "BF16", QUANTIZE, target, 0, G.type_nbytes(target, (16, 512)), "blk.w")
    [(name, data)] = G.GGUFBackend("Q8_0").encode("transformer", plan, x)
    assert name == "blk.w" and data.nbytes == plan.bytes_out
    packed = data if target in ("F32", "F16") else data.view(np.uint8).reshape(16, -1)
    deq = gguf.quants.dequantize(packed, Q[target])
    ref = x.float().numpy()
    assert deq.shape == ref.shape
    assert rel_err(deq, ref) <= GAUSS_BAND[target], target
    if target == "F32" or (target == "BF16" and dtype == torch.bfloat16):
        assert np.array_equal(deq, ref)  # lossless


# --- tiny-flux, every scheme -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """(scheme, layout) -> ConvertResult, converting on first use."""
    from qconvert.convert import convert

    root = tmp_path_factory.mktemp("gguf")
    cache: dict = {}

    def get(scheme: str, layout: str = "diffusers", jobs: int = 2):
        key = (scheme, layout, jobs)
        if key not in cache:
            out = root / f"{scheme}-{layout}-{jobs}"
            cache[key] = convert(source, "gguf", scheme, out, progress=False, options={"layout": layout, "jobs": jobs})
        return cache[key]

    return get


@pytest.fixture(scope="module")
def base_pipe(source):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(source.root)


def read_gguf(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (type name, dequantized float32 array in the logical shape)."""
    r = gguf.GGUFReader(path)
    out = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        out[t.name] = (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape))
    return out


def read_fields(path: Path) -> dict[str, object]:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("scheme", ALL)
def test_tiny_diffusers_layout_loads_and_generates(scheme, source, converted, base_pipe):
    from diffusers import FluxPipeline, FluxTransformer2DModel, GGUFQuantizationConfig

    res = converted(scheme)
    path = res.out / f"flux1-tiny-flux-{scheme}.gguf"
    assert sorted(p.name for p in res.out.iterdir()) == sorted(
        [path.name, f"t5xxl-tiny-flux-{scheme}.gguf", "qconvert.json"]
    )
    fields = read_fields(path)
    assert fields["general.architecture"] == "flux"
    assert fields["general.file_type"] == gguf.LlamaFileType[f"MOSTLY_{scheme}"]
    assert fields["general.quantization_version"] == 2
    assert fields["qconvert.layout"] == "diffusers"
    # names are diffusers' own; sizes are exactly the plan's estimate
    r = gguf.GGUFReader(path)
    plan = {t.out_name: t for t in res.plan.component("transformer").tensors}
    assert {t.name for t in r.tensors} == set(source.components["transformer"].tensors) == set(plan)
    for t in r.tensors:
        assert t.tensor_type.name == plan[t.name].target
        assert int(t.n_bytes) == plan[t.name].bytes_out
    assert res.manifest["components"]["transformer"]["bytes_out"] == path.stat().st_size

    tr = FluxTransformer2DModel.from_single_file(
        str(path),
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=str(source.root),
        subfolder="transformer",
        dtype=torch.float32,
    )
    pipe = FluxPipeline(**{**base_pipe.components, "transformer": tr})
    img = pipe(
        "a photo of a cat", num_inference_steps=2, height=32, width=32, max_sequence_length=16,
        output_type="pt", generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert img.shape == (1, 3, 32, 32) and bool(torch.isfinite(img).all())


# Relative error of the tiny T5's last hidden state vs the source: measured x ~2. Its rows of
# 32 and 37 make the K types fall back (Q6_K -> Q8_0, Q5_K -> Q5_1, Q4_K -> Q5_0, Q3_K/Q2_K ->
# Q4_0; rows of 37 -> F16) and keep the 32x32 attention weights F32 (1024 elements).
T5_BAND = {
    "F16": 1e-3, "BF16": 8e-3, "Q8_0": 0.02, "Q6_K": 0.02, "Q5_K_M": 0.08, "Q5_K_S": 0.08,
    "Q5_1": 0.08, "Q5_0": 0.08, "Q4_K_M": 0.08, "Q4_K_S": 0.08, "Q4_1": 0.15, "Q4_0": 0.18,
    "Q3_K_M": 0.18, "Q3_K_S": 0.18, "Q2_K": 0.18,
}  # fmt: skip


@pytest.fixture(scope="module")
def t5_reference(source):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config.from_pretrained(source.root / "text_encoder_2")
    model = T5EncoderModel.from_pretrained(source.root / "text_encoder_2", dtype=torch.float32).eval()
    ids = torch.tensor([[3, 9, 17, 25, 40, 2, 1]])
    with torch.no_grad():
        return cfg, ids, model(ids).last_hidden_state


@pytest.mark.parametrize("scheme", ALL)
def test_tiny_t5_loads_with_transformers(scheme, converted, t5_reference):
    from transformers import T5EncoderModel

    cfg, ids, ref = t5_reference
    res = converted(scheme)
    name = f"t5xxl-tiny-flux-{scheme}.gguf"
    fields = read_fields(res.out / name)
    assert fields["general.architecture"] == "t5encoder"
    assert fields["t5encoder.block_count"] == cfg.num_layers
    assert fields["t5encoder.embedding_length"] == cfg.d_model
    assert fields["t5encoder.feed_forward_length"] == cfg.d_ff
    assert fields["t5encoder.attention.head_count"] == cfg.num_heads
    assert fields["t5encoder.attention.key_length"] == cfg.d_kv
    model, info = T5EncoderModel.from_pretrained(
        res.out, gguf_file=name, config=cfg, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        out = model.eval()(ids).last_hidden_state
    err = float((out - ref).norm() / ref.norm())
    assert err <= T5_BAND[scheme], (scheme, err)
    if scheme == "F16":
        assert err > 0  # really converted


def test_t5_config_from_file_alone(converted, source):
    """Without config=, transformers rebuilds the sizes from the t5encoder.* keys."""
    from transformers import T5EncoderModel

    res = converted("Q8_0")
    model = T5EncoderModel.from_pretrained(res.out, gguf_file="t5xxl-tiny-flux-Q8_0.gguf")
    c = model.config
    assert (c.d_model, c.d_ff, c.num_layers, c.num_heads, c.d_kv, c.vocab_size) == (32, 37, 2, 4, 8, 142)


def test_tiny_bfl_layout_matches_source(source, converted):
    """BFL names (what ComfyUI-GGUF reads) and values: fused qkv/linear1, swapped adaLN halves."""
    res = converted("Q8_0", "bfl")
    path = res.out / "flux1-tiny-flux-Q8_0.gguf"
    assert read_fields(path)["qconvert.layout"] == "bfl"
    got = read_gguf(path)
    comp = source.components["transformer"]
    recipes = flux.diffusers_to_bfl({n: t.shape for n, t in comp.tensors.items()})
    assert set(got) == set(recipes)
    from safetensors.torch import load_file

    sd = {}
    for f in comp.weight_files:
        sd.update(load_file(f))
    for name, recipe in recipes.items():
        want = torch.cat([sd[s.key][s.start : s.stop] for s in recipe]).numpy()
        qtype, arr = got[name]
        assert arr.shape == want.shape, name
        if qtype == "F32":
            assert np.array_equal(arr, want), name
        else:
            assert rel_err(arr, want) < 0.01, name
    # high precision / fused names, as ComfyUI-GGUF expects
    high = "BF16" if comp.tensors["x_embedder.weight"].dtype == "BF16" else "F32"  # the source's, lossless
    assert got["img_in.weight"][0] == high and got["final_layer.adaLN_modulation.1.weight"][0] == high
    assert got["double_blocks.0.img_attn.qkv.weight"][0] == "Q8_0"
    assert got["single_blocks.0.linear1.weight"][0] == "Q8_0"


def test_bfl_source_to_bfl_layout(source, converted, tmp_path):
    """A BFL single file comes out with the same tensors, read as whole file tensors."""
    from conftest import export_bfl

    from qconvert.convert import convert
    from qconvert.sources import resolve_source

    bfl = export_bfl(source.root / "transformer", tmp_path / "flux1-tinydev.safetensors")
    src = resolve_source(str(bfl), base="tiny-flux")
    backend = G.GGUFBackend("Q8_0")
    for name, (t, _) in backend.output_tensors(src.components["transformer"]).items():
        assert len(t.segments) == 1 and t.segments[0].key == name, name
        assert t.segments[0].start is None and t.segments[0].stop is None
    res = convert(src, "gguf", "Q8_0", tmp_path / "out", components=("transformer",), progress=False)
    path = res.out / "flux1-tinydev-Q8_0.gguf"
    fields = read_fields(path)
    assert fields["general.name"] == "flux1-tinydev"
    assert str(tmp_path) not in fields["qconvert.source"]  # no local directories in the file
    ref = gguf.GGUFReader(converted("Q8_0", "bfl").out / "flux1-tiny-flux-Q8_0.gguf")
    got = gguf.GGUFReader(path)
    assert [(t.name, t.tensor_type, bytes(t.data)) for t in got.tensors] == [
        (t.name, t.tensor_type, bytes(t.data)) for t in ref.tensors
    ]


@pytest.mark.parametrize("scheme", ["Q4_K_M", "Q8_0"])
def test_deterministic_across_runs_and_jobs(scheme, converted):
    a, b = converted(scheme, "bfl", 1), converted(scheme, "bfl", 2)
    for name in (f"flux1-tiny-flux-{scheme}.gguf", f"t5xxl-tiny-flux-{scheme}.gguf"):
        assert (a.out / name).read_bytes() == (b.out / name).read_bytes()
    ca, cb = a.manifest["components"], b.manifest["components"]
    assert {k: v["files"] for k, v in ca.items()} == {k: v["files"] for k, v in cb.items()}


# --- streaming with K types, chunks, pools ---------------------------------------------------------


def synthetic_t5(tmp_path: Path, *, nan: bool = False):
    """A small T5-shaped component whose rows fit the K types (no Flux needed)."""
    from safetensors.torch import save_file

    from qconvert.sources import Component, describe_files

    g = torch.Generator().manual_seed(0)
    tensors = {
        "shared.weight": torch.randn(100, 256, generator=g),
        "encoder.block.0.layer.0.SelfAttention.v.weight": torch.randn(256, 256, generator=g),
        "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": torch.randn(600, 512, generator=g),
        "encoder.block.0.layer.1.DenseReluDense.wo.weight": torch.randn(256, 512, generator=g),
        "encoder.block.0.layer.1.layer_norm.weight": torch.ones(256),
        "encoder.final_layer_norm.weight": torch.ones(256),
    }
    tensors = {k: (v * 0.02).to(torch.bfloat16) for k, v in tensors.items()}
    if nan:
        tensors["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][599, 7] = float("nan")
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    cfg = dict(d_model=256, d_ff=512, num_layers=1, num_heads=4, d_kv=64, vocab_size=100)
    comp = Component("text_encoder_2", tmp_path, "transformers", "T5EncoderModel", cfg, describe_files([path]), [path])
    return comp, tensors


def write_synthetic(comp, scheme: str, out: Path, *, jobs: int, pool: str = "thread") -> tuple[Path, object]:
    from qconvert.convert import _check_finite
    from qconvert.sources import TensorReader

    backend = G.GGUFBackend(scheme, jobs=jobs, pool=pool)
    cp = backend.plan_component(comp, None)
    with TensorReader() as reader, backend.scheduler(reader, _check_finite) as scheduler:
        identity = BuiltinSource("x")
        backend.write_gguf(out, comp, cp, None, identity, "x", scheduler, lambda n: None)
    return out, cp


def test_k_types_stream_in_chunks_identically(tmp_path, monkeypatch):
    monkeypatch.setattr("qconvert.convert.schedule.CHUNK_VALUES", 512 * 64)  # wi_0: 10 chunks of 64 rows (last 24)
    comp, tensors = synthetic_t5(tmp_path)
    p1, cp = write_synthetic(comp, "Q4_K_M", tmp_path / "j1.gguf", jobs=1)
    p3, _ = write_synthetic(comp, "Q4_K_M", tmp_path / "j3.gguf", jobs=3)
    pp, _ = write_synthetic(comp, "Q4_K_M", tmp_path / "p2.gguf", jobs=2, pool="process")
    assert p1.read_bytes() == p3.read_bytes() == pp.read_bytes()
    got = read_gguf(p1)
    types = {t.out_name: t.target for t in cp.tensors}
    assert types == {
        "token_embd.weight": "Q6_K", "enc.blk.0.attn_v.weight": "Q5_K", "enc.blk.0.ffn_gate.weight": "Q4_K",
        "enc.blk.0.ffn_down.weight": "Q5_K", "enc.blk.0.ffn_norm.weight": "F32", "enc.output_norm.weight": "F32",
    }  # fmt: skip
    for t in cp.tensors:
        qtype, arr = got[t.out_name]
        assert qtype == t.target
        want = tensors[t.name].float().numpy()
        assert rel_err(arr, want) <= GAUSS_BAND[qtype], t.out_name


def test_nan_in_source_is_reported(tmp_path, monkeypatch):
    from qconvert.errors import CorruptCheckpoint

    monkeypatch.setattr("qconvert.convert.schedule.CHUNK_VALUES", 512 * 64)
    comp, _ = synthetic_t5(tmp_path, nan=True)
    for jobs in (1, 2):
        with pytest.raises(CorruptCheckpoint, match="DenseReluDense.wi_0.weight contains NaN"):
            write_synthetic(comp, "Q4_K_S", tmp_path / f"nan{jobs}.gguf", jobs=jobs)


def test_transformer_only_components(source, tmp_path):
    from qconvert.convert import convert

    res = convert(source, "gguf", "Q5_0", tmp_path / "t", components=("transformer",), progress=False)
    assert sorted(p.name for p in res.out.iterdir()) == ["flux1-tiny-flux-Q5_0.gguf", "qconvert.json"]
    assert res.manifest["components"]["transformer"]["files"]



def test_manifest_sha256_is_taken_while_writing(source, tmp_path, monkeypatch):
    """A GGUF file is hashed as its bytes are written: the manifest's sha256 is the file's, and
    the file is never read back for it (at full size that was a second read from disk)."""
    import hashlib

    from qconvert import output
    from qconvert.convert import convert

    real = output.sha256_of

    def no_gguf_read_back(path, *a, **k):
        assert not str(path).endswith(".gguf"), f"{path} read back to hash it"
        return real(path, *a, **k)

    monkeypatch.setattr(output, "sha256_of", no_gguf_read_back)
    res = convert(source, "gguf", "Q4_K_S", tmp_path / "t", progress=False)
    files = {name: e for c in res.manifest["components"].values() for name, e in c["files"].items()}
    ggufs = [name for name in files if name.endswith(".gguf")]
    assert len(ggufs) == 2, files  # the transformer's and T5's
    for name in ggufs:
        data = (res.out / name).read_bytes()
        assert files[name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert not [p for p in output._HASHED if p.name in ggufs]  # each record was used once

# --- command line ------------------------------------------------------------------------------------


def run_cli(args: list[str], cwd: Path, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"import sys\n{prelude}\nfrom qconvert.cli import main\nsys.exit(main({args!r}))"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, env=dict(os.environ)
    )


@pytest.mark.parametrize(
    "scheme, prelude, code, needle",
    [
        ("IQ2_XXS", "", 2, "gguf scheme 'IQ2_XXS' is not supported (diffusers cannot load it"),
        ("TQ1_0", "", 2, "gguf scheme 'TQ1_0' is not supported (diffusers cannot load it"),
        ("Q4_K_X", "", 2, "unknown gguf scheme 'Q4_K_X'"),
        ("Q4_K_S", "sys.modules['gguf'] = None", 3, "gguf is not installed (pip install 'qconvert[gguf]')"),
    ],
    ids=["IQ2_XXS", "TQ1_0", "unknown", "no-gguf"],
)
def test_cli_errors(scheme, prelude, code, needle, tmp_path):
    out = tmp_path / "never"
    args = ["flux", "--source", "tiny-flux", "--backend", "gguf", "--scheme", scheme, "--out", str(out)]
    r = run_cli(args, tmp_path, prelude)
    assert r.returncode == code, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not out.exists()
    assert not any(p.name.startswith(".never") for p in tmp_path.iterdir())


def test_cli_dry_run_shows_gguf_names(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "qconvert.cli", "-v", "flux", "--source", "tiny-flux", "--backend", "gguf",
         "--scheme", "Q4_K_M", "--dry-run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "shared.weight as token_embd.weight" in r.stdout
    assert "double_blocks.0.img_attn.qkv.weight [96, 32] F32 quantize -> Q5_1" in r.stdout  # Q5_K fallback
    assert not (tmp_path / "out").exists()


# --- slim-flux (width 3072): the BFL layout through diffusers' converter ------------------------------


@pytest.fixture(scope="module")
def slim(tmp_path_factory):
    from qconvert.sources import resolve_source

    return resolve_source("slim-flux"), tmp_path_factory.mktemp("slim-gguf")


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["Q8_0", "Q4_K_S", "Q2_K"])
def test_slim_bfl_loads_in_diffusers(scheme, slim):
    from diffusers import FluxPipeline, FluxTransformer2DModel, GGUFQuantizationConfig
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    from qconvert.convert import convert
    from qconvert.memory import PeakSampler

    src, root = slim
    # The layout, the streaming and diffusers' loader are what this tests, not the search: the
    # reference search keeps it at its old cost (the weighted default is ~4x slower on the K types
    # and covered end to end on tiny-flux and in tests/test_gguf_search.py).
    opts = {"gguf_search": "reference"}
    with PeakSampler() as sampler:
        res = convert(src, "gguf", scheme, root / scheme, components=("transformer",), progress=False, options=opts)
    path = res.out / f"flux1-slim-flux-{scheme}.gguf"
    fields = read_fields(path)
    assert fields["general.architecture"] == "flux" and fields["qconvert.layout"] == "bfl"
    # streaming: the conversion's own anonymous memory stays far below the 1.1 GB transformer
    assert sampler.anon_above_baseline < 400 << 20, sampler.anon_above_baseline

    tr = FluxTransformer2DModel.from_single_file(
        str(path),
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=str(src.root),
        subfolder="transformer",
        dtype=torch.float32,
    )
    # diffusers split qkv/linear1 and swapped the adaLN halves back: compare a few tensors
    from safetensors import safe_open

    comp = src.components["transformer"]
    params = dict(tr.named_parameters())
    band = {"Q8_0": 0.01, "Q4_K_S": 0.1, "Q2_K": 0.4}[scheme]
    for name in (
        "transformer_blocks.0.attn.to_k.weight",
        "single_transformer_blocks.0.proj_mlp.weight",
        "single_transformer_blocks.0.attn.to_v.weight",
        "norm_out.linear.weight",
        "context_embedder.weight",
    ):
        seg = comp.tensors[name].segments[0]
        with safe_open(seg.path, "pt") as f:
            want = f.get_tensor(seg.key).float()
        got = dequantize_gguf_tensor(params[name]).detach().float()
        assert got.shape == want.shape
        assert float((got - want).norm() / want.norm()) < band, name

    pipe = FluxPipeline.from_pretrained(src.root, transformer=tr, dtype=torch.float32)
    img = pipe(
        "a photo of a cat", num_inference_steps=2, height=32, width=32, max_sequence_length=16,
        output_type="pt", generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert img.shape == (1, 3, 32, 32) and bool(torch.isfinite(img).all())
