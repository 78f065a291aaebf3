"""BFL <-> diffusers key maps (qconvert.flux), checked against diffusers' own converter."""

from __future__ import annotations

import pytest
import torch

from qconvert.families import flux
from qconvert.sources import describe_files


def _shapes(folder):
    return {k: t.shape for k, t in describe_files(sorted(folder.glob("*.safetensors"))).items()}


def test_round_trip_on_tiny_keys(tiny_path):
    shapes = _shapes(tiny_path / "transformer")
    to_bfl = flux.diffusers_to_bfl(shapes)
    # every diffusers tensor is used exactly once by the BFL layout
    used = [s.key for r in to_bfl.values() for s in r]
    assert sorted(set(used)) == sorted(shapes)
    bfl_shapes = {}
    for name, recipe in to_bfl.items():
        rows = sum(((s.stop if s.stop is not None else shapes[s.key][0]) - (s.start or 0)) for s in recipe)
        bfl_shapes[name] = (rows, *shapes[recipe[0].key][1:])
    back = flux.bfl_to_diffusers(bfl_shapes, inner_dim=2 * 16)
    assert set(back) == set(shapes)
    assert "double_blocks.0.img_attn.qkv.weight" in to_bfl
    assert [s.key for s in to_bfl["single_blocks.0.linear1.weight"]] == [
        f"single_transformer_blocks.0.{m}.weight" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    ]


def test_final_layer_halves_are_swapped():
    shapes = {"norm_out.linear.weight": (8, 4), "norm_out.linear.bias": (8,)}
    r = flux.diffusers_to_bfl(shapes)["final_layer.adaLN_modulation.1.weight"]
    assert r == (flux.Segment("norm_out.linear.weight", 4, None), flux.Segment("norm_out.linear.weight", 0, 4))
    back = flux.bfl_to_diffusers({"final_layer.adaLN_modulation.1.weight": (8, 4)}, inner_dim=4)
    assert back["norm_out.linear.weight"] == (
        flux.Segment("final_layer.adaLN_modulation.1.weight", 4, None),
        flux.Segment("final_layer.adaLN_modulation.1.weight", 0, 4),
    )


def test_unknown_bfl_key_is_reported():
    with pytest.raises(KeyError, match="unknown BFL"):
        flux.bfl_to_diffusers({"img_in.weight": (4, 4), "mystery.weight": (3,)}, inner_dim=4)


def test_linear1_split_checks_inner_dim():
    with pytest.raises(ValueError, match="does not split"):
        flux.bfl_to_diffusers({"single_blocks.0.linear1.weight": (10, 4)}, inner_dim=4)


@pytest.mark.slow
def test_bfl_export_matches_diffusers_converter(slim_path, slim_bfl_file):
    """Our BFL export, read back by diffusers' own converter, gives the original tensors."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    bfl = load_file(str(slim_bfl_file))
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    original = load_file(str(slim_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert set(converted) == set(original)
    for k, v in original.items():
        assert torch.equal(converted[k], v), k


def test_guess_architecture_names_common_models():
    assert "LoRA" in flux.guess_architecture(["lora_unet_x.lora_down.weight"])
    assert "XL" in flux.guess_architecture(["conditioner.embedders.0.x"])
    assert "1.x" in flux.guess_architecture(["model.diffusion_model.input_blocks.0.0.weight"])
    assert "3" in flux.guess_architecture(["joint_blocks.0.x_block.attn.qkv.weight"])
    assert flux.looks_like_bfl_flux(["model.diffusion_model.img_in.weight", "model.diffusion_model.double_blocks.0.x"])


# --- the family's declarations and FLUX.1 [schnell] ------------------------------------------


def test_family_is_found_from_model_index_and_names_others():
    from qconvert.errors import NotAFluxModel
    from qconvert.families import for_pipeline_class, for_single_file

    assert for_pipeline_class("FluxPipeline", "x") is flux.Flux
    with pytest.raises(NotAFluxModel, match=r"x is a FLUX.2 pipeline \(Flux2Pipeline\), not one qconvert converts"):
        for_pipeline_class("Flux2Pipeline", "x")
    assert for_single_file(["img_in.weight", "double_blocks.0.img_attn.qkv.weight"]) is flux.Flux
    assert for_single_file(["encoder.block.0.layer.0.SelfAttention.q.weight"]) is None


def test_schnell_builtin_has_no_guidance_embedder():
    from qconvert.sources import resolve_source

    src = resolve_source("tiny-flux-schnell")
    comp = src.components["transformer"]
    assert comp.config["guidance_embeds"] is False and src.family is flux.Flux
    assert not any("guidance" in name for name in comp.tensors)
    bfl = flux.diffusers_to_bfl({n: t.shape for n, t in comp.tensors.items()})
    assert not any(k.startswith("guidance_in") for k in bfl) and "time_in.in_layer.weight" in bfl
    assert "guidance" not in flux.Flux.forward_inputs(comp.config, device="cpu", dtype=torch.float32)


def test_schnell_single_file_converts_and_validates(tmp_path):
    """A BFL-layout [schnell] transformer (no guidance_in) + --base: converted and validated
    against the file, as qconvert's BFL map reads it."""
    from conftest import export_bfl
    from qconvert.job import Job, run
    from qconvert.tiny import builtin_path

    base = builtin_path("tiny-flux-schnell")
    single = export_bfl(base / "transformer", tmp_path / "flux1-schnell-tiny.safetensors")
    result = run(Job(str(single), "torchao", "int8wo", out=tmp_path / "o", base=str(base)))
    assert result.report.passed
    assert result.convert.manifest["source"]["kind"] == "bfl"


def test_schnell_card_uses_its_settings(tmp_path):
    """A schnell-shaped pipeline that is not a built-in: the snippet runs 4 steps without
    guidance at 256 T5 tokens (the built-in demos keep their tiny settings)."""
    import shutil

    from qconvert.cards import extract_usage, render_card
    from qconvert.job import Job, run
    from qconvert.tiny import builtin_path

    folder = tmp_path / "my-schnell"
    shutil.copytree(builtin_path("tiny-flux-schnell"), folder)
    run(Job(str(folder), "torchao", "int8wo", out=tmp_path / "o", validate=False))
    snippet = extract_usage(render_card(tmp_path / "o", license="apache-2.0").read_text())
    assert "num_inference_steps=4," in snippet and "guidance_scale=0.0," in snippet
    assert "max_sequence_length=256," in snippet
    demo = tmp_path / "demo"
    run(Job("tiny-flux-schnell", "torchao", "int8wo", out=demo, validate=False))
    demo_snippet = extract_usage(render_card(demo).read_text())
    assert "num_inference_steps=2," in demo_snippet and "guidance_scale=0.0," in demo_snippet
