"""fp8 backend: the diffusers layout equals diffusers' own layerwise cast byte for byte, the BFL
fp8r file loads through diffusers' BFL quantizer with the scales diffusers' quantize_fp8r
computes, the ComfyUI file has the BFL keys and float8 weights; plans are exact, bytes do not
depend on chunks or --jobs, cards' snippets run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, invoke, tree_hashes
from qconvert.convert import convert, get_backend, make_plan
from qconvert.sources import resolve_source

FLOAT8 = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@pytest.fixture(scope="module")
def bf16_src(tiny_path, tmp_path_factory):
    """tiny-flux with a bf16 transformer (FLUX.1-dev's dtype)."""
    src = tmp_path_factory.mktemp("fp8") / "tiny-bf16"
    shutil.copytree(tiny_path, src)
    f = src / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(f), metadata={"format": "pt"})
    return src


def _tensors(folder, pattern="*.safetensors"):
    out = {}
    for shard in sorted(folder.glob(pattern)):
        out.update(load_file(str(shard)))
    return out


def _same_bytes(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _written_bytes(files):
    total = 0
    for f in files:
        with safe_open(str(f), "pt") as h:
            total += sum(h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in h.keys())
    return total


# --- (a) diffusers layout ------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["e4m3fn", "e5m2"])
def test_diffusers_layout_equals_diffusers_own_layerwise_cast(scheme, bf16_src, tmp_path):
    """Every tensor, float8 or kept, has the bytes of the bf16 model's parameters after
    diffusers' own enable_layerwise_casting (the library's cast is the reference)."""
    from diffusers import FluxTransformer2DModel

    out = tmp_path / "out"
    convert(resolve_source(str(bf16_src)), "fp8", scheme, out, components=("transformer",), progress=False)
    ref = FluxTransformer2DModel.from_pretrained(bf16_src / "transformer", dtype=torch.bfloat16)
    ref.enable_layerwise_casting(storage_dtype=FLOAT8[scheme], compute_dtype=torch.bfloat16)
    theirs = ref.state_dict()
    ours = _tensors(out / "transformer")
    assert set(ours) == set(theirs)
    assert all(_same_bytes(ours[k], theirs[k]) for k in ours), [k for k in ours if not _same_bytes(ours[k], theirs[k])]
    cast = {k for k, v in ours.items() if v.dtype == FLOAT8[scheme]}
    assert "x_embedder.weight" in cast and "transformer_blocks.0.attn.to_q.bias" in cast
    assert not {"proj_out.weight", "transformer_blocks.0.norm1.linear.weight", "norm_out.linear.weight"} & cast
    assert "quantization_config" not in json.loads((out / "transformer" / "config.json").read_text())
    # a plain from_pretrained loads it too (upcast to the dtype asked for)
    plain = FluxTransformer2DModel.from_pretrained(out / "transformer", dtype=torch.bfloat16)
    assert plain.x_embedder.weight.dtype == torch.bfloat16


def test_flux_converts_validates_and_the_cards_snippet_keeps_float8(tmp_path, monkeypatch):
    out = tmp_path / "out"
    proc = invoke("flux", "--source", "tiny-flux", "--backend", "fp8", "--scheme", "e4m3fn", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"], report
    assert report["environment"]["transformer_values_by_dtype"]["float8_e4m3fn"] > 0
    assert invoke("card", str(out)).returncode == 0
    from qconvert.cards import extract_usage

    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "- fp8" in card
    code = extract_usage(card)
    assert "enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "card_snippet.py", "exec"), namespace)  # the card's code, as a user runs it
    assert list(tmp_path.glob("*.png"))
    transformer = namespace["pipe"].transformer
    assert transformer.x_embedder.weight.dtype == torch.float8_e4m3fn  # still float8 after generating
    assert transformer.proj_out.weight.dtype == torch.float32  # skipped by layerwise casting: source dtype
    stored = _tensors(out / "transformer")
    assert all(_same_bytes(t, stored[k]) for k, t in transformer.state_dict().items())  # never upcast in memory


# --- plans, chunks, jobs ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["diffusers", "bfl", "comfyui"])
def test_plan_predicts_the_written_bytes(layout, bf16_src, tmp_path):
    src = resolve_source(str(bf16_src))
    plan, _ = make_plan(src, get_backend("fp8", "e4m3fn", layout=layout), ("transformer",))
    out = tmp_path / "out"
    convert(src, "fp8", "e4m3fn", out, components=("transformer",), progress=False, options={"layout": layout})
    files = list((out / "transformer").glob("*.safetensors")) if layout == "diffusers" else list(out.glob("*.safetensors"))
    assert len(files) == 1
    assert plan.component("transformer").bytes_out == _written_bytes(files)
    manifest = json.loads((out / "qconvert.json").read_text())
    assert manifest["layout"] == ("pipeline" if layout == "diffusers" else "files")
    if layout != "diffusers":
        assert plan.component("text_encoder_2").action == "from-base" and not (out / "text_encoder_2").exists()


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_row_chunks_and_jobs_do_not_change_the_bytes(layout, bf16_src, tmp_path, monkeypatch):
    src = resolve_source(str(bf16_src))
    opts = {"layout": layout}
    convert(src, "fp8", "e4m3fn", tmp_path / "whole", progress=False, options={**opts, "jobs": 1})
    monkeypatch.setattr("qconvert.convert.schedule.CHUNK_VALUES", 64)  # chunks of a few rows
    convert(src, "fp8", "e4m3fn", tmp_path / "chunked", progress=False, options={**opts, "jobs": 3})
    assert tree_hashes(tmp_path / "whole") == tree_hashes(tmp_path / "chunked")


@pytest.mark.parametrize("shape", [(64, 256), (37, 32)])
def test_fp8r_codec_equals_diffusers_quantize_fp8r(shape, monkeypatch):
    """In row chunks (37 rows end in a 1-row chunk), against diffusers' own quantize_fp8r."""
    from diffusers.quantizers.bfl.utils import quantize_fp8r

    from qconvert.convert.fp8 import FP8R, FP8Backend
    from qconvert.plan import QUANTIZE, TensorPlan

    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)).mul(0.02).to(torch.bfloat16)
    w[3] = 0  # an all-zero row: the 1e-12 floor
    monkeypatch.setattr("qconvert.convert.schedule.CHUNK_VALUES", 4 * shape[1])
    plan = TensorPlan("m.weight", shape, "BF16", QUANTIZE, FP8R, w.numel() * 2, 0)
    ours = dict(FP8Backend("e4m3fn", layout="bfl").encode("transformer", plan, w))
    q, s = quantize_fp8r(w)
    assert _same_bytes(ours["m.weight"], q) and _same_bytes(ours["m.weight_scale"], s)


# --- option errors: one line, before any work -------------------------------------------------------


@pytest.mark.parametrize("args,contains", [
    (["--scheme", "e5m2", "--layout", "bfl"], "float8_e4m3fn only"),
    (["--scheme", "e4m3fn", "--layout", "comfyui", "--max-shard-size", "1GB"], "one file"),
    (["--scheme", "e4m3fn", "--layout", "bfl"], "width 3072"),  # tiny-flux is 32 wide: cannot validate
    (["--scheme", "e4m3", "--layout", "bfl"], "unknown fp8 scheme"),
])  # fmt: skip
def test_bad_options_are_one_line_errors(args, contains, tmp_path):
    proc = invoke("flux", "--source", "tiny-flux", "--backend", "fp8", *args, "--out", str(tmp_path / "x"))
    assert_one_line_error(proc, contains=contains)
    assert not (tmp_path / "x").exists()


def test_a_release_plan_names_the_layouts(tmp_path, monkeypatch):
    plan = tmp_path / "plan.toml"
    plan.write_text('[release]\nsource = "tiny-flux"\nnamespace = "acme"\n\n'
                    '[[variant]]\nname = "fp8"\nbackend = "fp8"\nscheme = "e4m3fn"\n\n'
                    '[[variant]]\nname = "fp8-e5m2"\nbackend = "fp8"\nscheme = "e5m2"\n'
                    'options = { layout = "diffusers" }\n')  # fmt: skip
    monkeypatch.chdir(tmp_path)
    proc = invoke("release", str(plan), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "fp8 e4m3fn" in proc.stdout and "fp8 e5m2" in proc.stdout


# --- (b) and (c) at width 3072: the slim model ----------------------------------------------------


@pytest.fixture(scope="module")
def slim_outs(slim_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8-slim")
    src = resolve_source("slim-flux")  # the built-in: its card needs no license lookup
    for layout in ("bfl", "comfyui"):
        convert(src, "fp8", "e4m3fn", root / layout, components=("transformer",), progress=False,
                options={"layout": layout})  # fmt: skip
    return root


@pytest.mark.slow
def test_bfl_file_loads_with_diffusers_bfl_quantizer_and_its_scales(slim_outs, slim_path):
    """diffusers' from_single_file + BFLQuantizationConfig: every block Linear is a BFLFP8RLinear
    holding what diffusers' quantize_fp8r gives for the source weight (fused qkv/linear1 split
    back by the loader; per-row scales split with them); the in/out layers are the source's."""
    from diffusers import BFLQuantizationConfig, FluxTransformer2DModel
    from diffusers.quantizers.bfl.utils import BFLFP8RLinear, quantize_fp8r

    (path,) = (slim_outs / "bfl").glob("*.safetensors")
    assert path.name == "flux1-slim-flux-fp8r.safetensors"  # <family prefix>-<source name>-fp8r
    model = FluxTransformer2DModel.from_single_file(
        str(path), config=str(slim_path), subfolder="transformer",
        quantization_config=BFLQuantizationConfig(compute_dtype=torch.bfloat16), dtype=torch.bfloat16,
    )  # fmt: skip
    source = load_file(str(slim_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, BFLFP8RLinear)}
    assert len(quantized) == 20  # the 14 Linears of the double block, the 6 of the single block (modulation included)
    for name, module in quantized.items():
        q, s = quantize_fp8r(source[f"{name}.weight"])
        assert _same_bytes(module.weight.data, q) and torch.equal(module.weight_scale, s), name
    for name in ("x_embedder", "context_embedder", "proj_out", "norm_out.linear"):
        assert torch.equal(model.get_submodule(name).weight, source[f"{name}.weight"]), name


@pytest.mark.slow
def test_comfyui_file_has_bfl_keys_and_float8_weights(slim_outs, slim_path):
    from qconvert.families import flux

    (path,) = (slim_outs / "comfyui").glob("*.safetensors")
    assert path.name == "flux1-slim-flux-fp8-e4m3fn.safetensors"
    source = load_file(str(slim_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    recipes = flux.diffusers_to_bfl({k: tuple(v.shape) for k, v in source.items()})
    with safe_open(str(path), "pt") as h:
        assert set(h.keys()) == set(recipes) and not any("scale_weight" in k or "weight_scale" in k for k in h.keys())
        for key in h.keys():
            t = h.get_tensor(key)
            parts = [source[s.key][s.start : s.stop] for s in recipes[key]]
            want = torch.cat(parts)
            in_out = key.startswith(("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer"))
            if key.endswith(".weight") and t.dim() == 2 and not in_out:
                assert _same_bytes(t, want.to(torch.float8_e4m3fn)), key
            else:
                assert _same_bytes(t, want), key


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["bfl", "comfyui"])
def test_single_file_cards_snippet_generates(layout, slim_outs, tmp_path, monkeypatch):
    from qconvert.cards import card_text, extract_usage

    out = tmp_path / layout
    shutil.copytree(slim_outs / layout, out)
    code = extract_usage(card_text(out))
    assert ("BFLQuantizationConfig" in code) == (layout == "bfl")
    assert ("enable_layerwise_casting" in code) == (layout == "comfyui")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "card_snippet.py", "exec"), namespace)
    assert list(tmp_path.glob("*.png"))
    weight = namespace["pipe"].transformer.transformer_blocks[0].attn.to_q.weight
    assert weight.dtype == torch.float8_e4m3fn
