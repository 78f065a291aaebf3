"""Every model family through every stage, on its built-in tiny fixture (qconvert/families/).

FLUX.1 [dev]/[schnell] have their own tests (test_family_flux.py and the backend tests); here:
Kontext (input image), Fill (image + mask), Depth/Canny (control image) and Chroma (T5 only,
ChromaTransformer2DModel) -- conversion, validation with the family's own pipeline, the card's
snippet executed, single files with --base, the plan, GGUF names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, export_bfl, run_cli
from qconvert.errors import NotAFluxModel
from qconvert.families import all_families, family, for_pipeline_class, for_single_file
from qconvert.families import flux as flux_module
from qconvert.job import Job, run

NEW_FAMILIES = {
    "tiny-flux-kontext": "flux-kontext",
    "tiny-flux-fill": "flux-fill",
    "tiny-flux-control": "flux-control",
    "tiny-chroma": "chroma",
}


# --- declarations -------------------------------------------------------------------------


@pytest.mark.parametrize("fam", all_families(), ids=lambda f: f.name)
def test_declarations_match_diffusers(fam):
    """Each family's pipeline class exists, takes exactly its components (plus the optional
    IP-adapter ones), and its transformer class is the one the pipeline builds."""
    import inspect

    pipeline = fam.pipeline_type()
    params = set(inspect.signature(pipeline.__init__).parameters) - {"self"}
    assert params - set(getattr(pipeline, "_optional_components", [])) == set(fam.components)
    assert fam.transformer_type().__name__ == fam.transformer_class
    assert for_pipeline_class(fam.pipeline_class, "x") is fam
    assert set(fam.quantizable) == {"transformer", fam.t5()}
    assert fam.role(fam.t5()) == "t5" and fam.role("transformer") == "transformer"


def test_single_files_by_kind_and_shape():
    flux_keys = ["img_in.weight", "double_blocks.0.img_attn.qkv.weight"]
    chroma_keys = [*flux_keys, "distilled_guidance_layer.in_proj.weight"]
    assert for_single_file(flux_keys).kind == "flux1"
    assert for_single_file(chroma_keys) is family("chroma")
    # within a kind, the input channels tell text-to-image, control and fill apart
    by_shape = {name: [f.name for f in all_families() if f.kind == "flux1" and f.matches_config(cfg)]
                for name, cfg in {"t2i": {"in_channels": 64}, "control": {"in_channels": 128, "out_channels": 64},
                                  "fill": {"in_channels": 384, "out_channels": 64}}.items()}  # fmt: skip
    assert by_shape == {"t2i": ["flux", "flux-kontext"], "control": ["flux-control"], "fill": ["flux-fill"]}


def test_chroma_key_map_matches_diffusers_converter():
    """qconvert's BFL names of a Chroma transformer, read back by diffusers' own converter."""
    from diffusers import ChromaTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

    cfg = dict(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
               joint_attention_dim=64, approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=2)  # fmt: skip
    torch.manual_seed(0)
    sd = ChromaTransformer2DModel(**cfg).state_dict()
    recipes = flux_module.diffusers_to_bfl({k: tuple(v.shape) for k, v in sd.items()})
    bfl = {k: torch.cat([sd[s.key][s.start : s.stop] for s in r]) for k, r in recipes.items()}
    assert "distilled_guidance_layer.layers.1.in_layer.weight" in bfl and "distilled_guidance_layer.norms.0.scale" in bfl
    back = convert_chroma_transformer_checkpoint_to_diffusers(dict(bfl))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # and qconvert's own inverse gives the same tensors
    inverse = flux_module.bfl_to_diffusers({k: tuple(v.shape) for k, v in bfl.items()}, inner_dim=3072)
    assert all(torch.equal(torch.cat([bfl[s.key][s.start : s.stop] for s in inverse[k]]), sd[k]) for k in sd)


# --- conversion, validation, card -------------------------------------------------------------


def _run(tmp_path: Path, source: str, backend: str, scheme: str, **options) -> Path:
    out = tmp_path / f"{source}-{backend}-{scheme}"
    result = run(Job(source, backend, scheme, out=out, options=options, card=True))
    assert result.report is not None and result.report.passed, result.report
    return out


def _snippet(out: Path) -> str:
    from qconvert.cards import extract_usage

    return extract_usage((out / "README.md").read_text())


@pytest.mark.parametrize("source", list(NEW_FAMILIES))
def test_converts_validates_and_card_snippet_runs(source, tmp_path):
    """torchao int8wo of each family: validation ran the family's pipeline with its inputs;
    the card names the right pipeline and tag, and its snippet generates as written."""
    fam = family(NEW_FAMILIES[source])
    out = _run(tmp_path, source, "torchao", "int8wo")
    manifest = json.loads((out / "qconvert.json").read_text())
    assert manifest["family"] == fam.name and set(manifest["components"]) >= {"transformer", fam.t5()}
    assert manifest["components"][fam.t5()]["action"] == "quantize"
    validation = json.loads((out / "validation.json").read_text())
    assert validation["passed"] and validation["quantized"]["t5_bytes"] > 0
    text = (out / "README.md").read_text()
    assert f"pipeline_tag: {fam.pipeline_tag}" in text and fam.tags[0] in text
    code = _snippet(out)
    assert f"{fam.pipeline_class}.from_pretrained(" in code
    for arg in fam.inputs:
        assert f"    {arg}={arg}," in code
    _exec(code, tmp_path)
    from PIL import Image

    assert Image.open(tmp_path / f"{fam.name}-int8wo.png").size == (32, 32)


def _exec(code: str, cwd: Path) -> None:
    import os

    here = os.getcwd()
    os.chdir(cwd)
    try:
        exec(compile(code, "<card snippet>", "exec"), {"__name__": "__main__"})
    finally:
        os.chdir(here)


def test_fill_through_bnb_and_chroma_through_gguf(tmp_path):
    """bnb nf4 of Fill validates (its image is encoded in the compute dtype); Chroma's T5 sits in
    ``text_encoder`` and becomes the t5xxl GGUF; both cards' snippets run."""
    fill = _run(tmp_path, "tiny-flux-fill", "bnb", "nf4")
    assert json.loads((fill / "validation.json").read_text())["settings"]["dtype"] == "bfloat16"
    chroma = _run(tmp_path, "tiny-chroma", "gguf", "Q8_0", layout="diffusers")
    assert sorted(p.name for p in chroma.glob("*.gguf")) == ["chroma-tiny-chroma-Q8_0.gguf", "t5xxl-tiny-chroma-Q8_0.gguf"]
    code = _snippet(chroma)
    assert "ChromaTransformer2DModel.from_single_file(" in code and "text_encoder=text_encoder" in code
    assert "text_encoder_2" not in code
    _exec(code, tmp_path)
    assert (tmp_path / "chroma-Q8_0.png").is_file()


def test_plan_names_the_family_and_components_map_to_the_t5(tmp_path):
    proc = run_cli("flux", "--source", "tiny-chroma", "--backend", "torchao", "--scheme", "int8wo", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    plan = plan.get("plan", plan)
    assert plan["family"] == "chroma"
    actions = {c["name"]: c["action"] for c in plan["components"]}
    assert actions["text_encoder"] == "quantize" and "text_encoder_2" not in actions  # the default, by role
    text = run_cli("flux", "--source", "tiny-flux-fill", "--backend", "gguf", "--scheme", "Q8_0", "--dry-run").stdout
    assert "model: FLUX.1 Fill (FluxFillPipeline)" in text


# --- single files --------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["tiny-flux-fill", "tiny-chroma"])
def test_bfl_single_file_with_its_base(source, tmp_path):
    from qconvert.sources import resolve_source
    from qconvert.tiny import builtin_path

    base = builtin_path(source)
    bfl = export_bfl(base / "transformer", tmp_path / f"{source}.safetensors")
    src = resolve_source(str(bfl), base=str(base))
    assert src.family is family(NEW_FAMILIES[source])
    out = tmp_path / "out"
    result = run(Job(str(bfl), "torchao", "int8wo", out=out, base=str(base)))
    assert result.report.passed


def test_single_file_with_the_wrong_base_names_the_right_one(tmp_path):
    from qconvert.sources import resolve_source
    from qconvert.tiny import builtin_path

    fill = export_bfl(builtin_path("tiny-flux-fill") / "transformer", tmp_path / "fill.safetensors")
    with pytest.raises(NotAFluxModel) as e:
        resolve_source(str(fill), base=str(builtin_path("tiny-flux")))
    assert "FluxFillPipeline" in e.value.hint
    chroma = export_bfl(builtin_path("tiny-chroma") / "transformer", tmp_path / "chroma.safetensors")
    proc = run_cli("flux", "--source", str(chroma), "--base", str(builtin_path("tiny-flux")), "--backend", "torchao",
                   "--scheme", "int8wo", "--out", str(tmp_path / "x"))  # fmt: skip
    line = assert_one_line_error(proc, code=3, contains="is a Chroma transformer, but --base is a FLUX.1 pipeline")
    assert "ChromaPipeline" in line
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("source", ["tiny-flux-kontext", "tiny-chroma"])
def test_hub_repo_source(source, hub, hub_env, tmp_path):
    """A family's pipeline on the (local) Hub converts from its repo id, at a recorded commit."""
    from qconvert.tiny import builtin_path

    repo_id = f"acme/{source}-hub"
    sha = hub.seed_repo(repo_id, builtin_path(source))
    result = run(Job(repo_id, "gguf", "Q8_0", out=tmp_path / "out", options={"layout": "diffusers"}, validate=False))
    manifest = result.convert.manifest
    assert manifest["family"] == NEW_FAMILIES[source]
    assert (manifest["source"]["repo_id"], manifest["source"]["revision"]) == (repo_id, sha)
    stem = family(NEW_FAMILIES[source]).gguf_stem("transformer", f"{source}-hub")
    assert (tmp_path / "out" / f"{stem}-Q8_0.gguf").is_file()
