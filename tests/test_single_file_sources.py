"""Single-file sources: files in Hub repos (local test Hub), the ComfyUI/Forge and all-in-one
layouts, float8 files (plain and ComfyUI-scaled), finetune cards. Fixtures are written here from
tiny-flux with ComfyUI's key names; diffusers and transformers load what comes out."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import assert_one_line_error, export_bfl, invoke
from qconvert import errors
from qconvert.job import Job, run
from qconvert.sources import TensorReader, resolve_source
from qconvert.tiny import builtin_path

T5 = "text_encoders.t5xxl.transformer."
CLIP = "text_encoders.clip_l.transformer."
UNET = "model.diffusion_model."


def _state(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def ldm_vae(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL names -> the original (LDM) names ComfyUI saves (test helper; the
    test below checks it against diffusers' own convert_ldm_vae_checkpoint)."""
    n_up = len(config["up_block_types"])
    out = {}
    for k, v in state.items():
        new = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.block.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.", new)
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", new)
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for a, b in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")):
                new = new.replace(a, b)
            if new.endswith("weight") and v.ndim == 2:  # LDM's attention is 1x1 convolutions
                v = v[:, :, None, None]
        out[new] = v
    return out


def _bfl_state(tmp: Path, base: Path) -> dict[str, torch.Tensor]:
    return _state_of(export_bfl(base / "transformer", tmp / "bfl.safetensors"))


def _state_of(f: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(f), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def all_in_one(tmp: Path, *, scale: float = 0.75) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """A ComfyUI CheckpointSave-style file from tiny-flux: transformer, T5, CLIP and VAE (the
    encoders and VAE scaled by ``scale``, so the test can tell the file's from the base's)."""
    import json

    base = builtin_path("tiny-flux")
    parts = {
        "transformer": _bfl_state(tmp, base),
        "t5": {k: v * scale for k, v in _state(base / "text_encoder_2").items()},
        "clip": {k: v * scale for k, v in _state(base / "text_encoder").items()},
        "vae": {k: v * scale for k, v in _state(base / "vae").items()},
    }
    sd = {UNET + k: v for k, v in parts["transformer"].items()}
    sd.update({T5 + k: v for k, v in parts["t5"].items()})
    # ComfyUI's CLIPTextModel: transformers' names under text_model., plus a text_projection
    sd.update({CLIP + "text_model." + k.removeprefix("text_model."): v for k, v in parts["clip"].items()})
    sd[CLIP + "text_projection.weight"] = torch.eye(32)
    sd["text_encoders.clip_l.logit_scale"] = torch.tensor(4.6055)
    sd["text_encoders.t5xxl.logit_scale"] = torch.tensor(4.6055)
    vae_cfg = json.loads((base / "vae" / "config.json").read_text())
    sd.update({"vae." + k: v for k, v in ldm_vae(parts["vae"], vae_cfg).items()})
    f = tmp / "flux1-tiny-aio.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
    return f, parts


def fp8_file(tmp: Path, *, scaled: bool, prefix: str = "") -> Path:
    """The tiny transformer with its Linear weights in float8 e4m3fn, the rest in bf16; scaled:
    ComfyUI's layout (per-tensor float32 ``scale_weight``, a ``scaled_fp8`` marker)."""
    sd = {}
    for k, v in _bfl_state(tmp, builtin_path("tiny-flux")).items():
        if v.ndim == 2 and k.endswith(".weight"):
            s = v.abs().max().float() / 448.0 if scaled else torch.tensor(1.0)
            sd[prefix + k] = (v.float() / s).to(torch.float8_e4m3fn)
            if scaled:
                sd[prefix + k[: -len("weight")] + "scale_weight"] = s.reshape(())
        else:
            sd[prefix + k] = v.to(torch.bfloat16)
    if scaled:
        sd[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    f = tmp / f"flux1-tiny-fp8{'-scaled' if scaled else ''}.safetensors"
    save_file(sd, str(f))
    return f


# --- the ComfyUI/Forge prefix and all-in-one files ------------------------------------------


def test_ldm_vae_helper_matches_diffusers_converter():
    """The fixture's LDM VAE is what diffusers' own converter maps back, exactly."""
    import json

    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    base = builtin_path("tiny-flux")
    state = _state(base / "vae")
    cfg = json.loads((base / "vae" / "config.json").read_text())
    back = convert_ldm_vae_checkpoint(ldm_vae(state, cfg), cfg)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_comfyui_prefixed_transformer_converts_and_validates(tmp_path):
    sd = {UNET + k: v for k, v in _bfl_state(tmp_path, builtin_path("tiny-flux")).items()}
    f = tmp_path / "flux1-tiny-comfy.safetensors"
    save_file(sd, str(f))
    src = resolve_source(str(f), base="tiny-flux")
    ref = resolve_source("tiny-flux").components["transformer"]
    with TensorReader() as r:
        for name, t in src.components["transformer"].tensors.items():
            assert torch.equal(r.load(t), r.load(ref.tensors[name])), name
    assert src.identity.embedded is None and src.root == builtin_path("tiny-flux")
    result = run(Job(str(f), "torchao", "int8wo", out=tmp_path / "o", base="tiny-flux"))
    assert result.report.passed


def test_all_in_one_uses_the_files_encoders_and_vae(tmp_path):
    """T5, CLIP and VAE come from the file (the VAE through diffusers' LDM converter), configs,
    tokenizers and scheduler from --base; the pipeline validates and its outputs carry the file's weights."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, T5EncoderModel

    f, parts = all_in_one(tmp_path)
    src = resolve_source(str(f), base="tiny-flux")
    assert src.identity.embedded == ("text_encoder_2", "text_encoder", "vae")
    t5 = T5EncoderModel.from_pretrained(src.root / "text_encoder_2").state_dict()
    assert all(torch.equal(t5[k], v) for k, v in parts["t5"].items())
    clip = CLIPTextModel.from_pretrained(src.root / "text_encoder").state_dict()
    assert all(torch.equal(clip[k if k in clip else "text_model." + k], v) for k, v in parts["clip"].items())
    vae = AutoencoderKL.from_pretrained(src.root / "vae").state_dict()
    assert all(torch.equal(vae[k], v) for k, v in parts["vae"].items())
    # the tokenizers and scheduler are the base's
    assert (src.root / "tokenizer_2" / "tokenizer.json").resolve() == (builtin_path("tiny-flux") / "tokenizer_2" / "tokenizer.json").resolve()

    result = run(Job(str(f), "torchao", "int8wo", out=tmp_path / "o", base="tiny-flux", components=("transformer",)))
    assert result.report.passed
    out_vae = AutoencoderKL.from_pretrained(tmp_path / "o" / "vae").state_dict()
    assert all(torch.equal(out_vae[k], v) for k, v in parts["vae"].items())
    out_t5 = _state(tmp_path / "o" / "text_encoder_2")  # copied (not quantized here): the file's T5
    assert all(torch.equal(out_t5[k], v) for k, v in parts["t5"].items())
    assert list(result.convert.manifest["source"]["embedded"]) == ["text_encoder_2", "text_encoder", "vae"]
    # resolved again (validate's reference, a second run): the same derived folder, not rebuilt
    assert resolve_source(str(f), base="tiny-flux").root == src.root


def test_all_in_one_with_a_stray_tensor_is_one_line(tmp_path):
    f, _ = all_in_one(tmp_path)
    sd = _state_of(f)
    sd["text_encoders.t5xxl.transformer.encoder.block.9.extra.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(errors.NotAFluxModel, match="its t5 has a tensor encoder.block.9.extra.weight"):
        resolve_source(str(tmp_path / "bad.safetensors"), base="tiny-flux")
    sd.pop("text_encoders.t5xxl.transformer.encoder.block.9.extra.weight")
    sd["cond_stage_model.something"] = torch.zeros(2)
    sd["loose.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "bad2.safetensors"))
    with pytest.raises(errors.NotAFluxModel, match="is under none of the prefixes"):
        resolve_source(str(tmp_path / "bad2.safetensors"), base="tiny-flux")


# --- float8 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scaled", [False, True])
def test_float8_is_read_upcast(tmp_path, scaled):
    """Unscaled: torch's own float8 -> bfloat16 cast (exact). Scaled: the float32 product with
    the per-tensor scale, rounded once to bfloat16; the scale and marker are no tensors of the model."""
    f = fp8_file(tmp_path, scaled=scaled, prefix=UNET if scaled else "")
    stored = _state_of(f)
    src = resolve_source(str(f), base="tiny-flux")
    comp = src.components["transformer"]
    assert {t.dtype for t in comp.tensors.values()} == {"BF16"}
    assert (src.identity.float8, src.identity.scaled) == ("e4m3fn", True if scaled else None)
    t = comp.tensors["proj_out.weight"]
    key = t.segments[0].key
    with TensorReader() as r:
        got = r.load(t)
        rows = r.load(t, rows=(1, 3))
    want = stored[key].to(torch.bfloat16)
    if scaled:
        want = (stored[key].float() * stored[key[: -len("weight")] + "scale_weight"]).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want) and torch.equal(rows, want[1:3])


# every registered backend (test_backends' card conversions) and GGUF's BFL layout, whose plan
# rebuilds the file segments: the output of the fp8 file is byte for byte that of a bf16 file
# holding the upcast values
from test_backends import CARD_CONVERSIONS  # noqa: E402

FP8_CONVERSIONS = [(b, s, o) for b, (s, o) in CARD_CONVERSIONS.items()] + [("gguf", "Q8_0", {})]


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp8")
    f = fp8_file(tmp, scaled=True, prefix=UNET)
    src = resolve_source(str(f), base="tiny-flux")
    with TensorReader() as r:
        upcast = {k: r.load(t) for k, t in src.components["transformer"].tensors.items()}
    ref = resolve_source("tiny-flux").components["transformer"]
    # the same tensors as a BFL bf16 file (written through diffusers' names -> BFL)
    d = tmp / "diffusers"
    (d / "transformer").mkdir(parents=True)
    shutil.copy(ref.folder / "config.json", d / "transformer" / "config.json")
    save_file(upcast, str(d / "transformer" / "diffusion_pytorch_model.safetensors"))
    (tmp / "bf16").mkdir()  # the same file name: GGUF names its files after the source
    bf16 = export_bfl(d / "transformer", tmp / "bf16" / f.name)
    return f, bf16


@pytest.mark.parametrize("backend,scheme,options", FP8_CONVERSIONS, ids=lambda v: str(v) if not isinstance(v, dict) else "")
def test_float8_source_converts_like_its_upcast(backend, scheme, options, fp8_pair, tmp_path):
    from qconvert.convert import convert

    f, bf16 = fp8_pair
    outs = []
    for i, file in enumerate((f, bf16)):
        out = tmp_path / str(i)
        convert(resolve_source(str(file), base="tiny-flux"), backend, scheme, out, components=("transformer",),
                progress=False, options=options)  # fmt: skip
        outs.append(out)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file() and p.name != "qconvert.json")
    assert files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file() and p.name != "qconvert.json")
    for rel in files:
        assert _payload(outs[0] / rel) == _payload(outs[1] / rel), rel


def _payload(path: Path) -> object:
    """A file's bytes; a GGUF file's tensors (its metadata records the source identity)."""
    if path.suffix != ".gguf":
        return path.read_bytes()
    from gguf import GGUFReader

    return [(t.name, int(t.tensor_type), bytes(t.data.tobytes())) for t in GGUFReader(str(path)).tensors]


def test_float8_source_validates_and_the_card_says_so(fp8_pair, tmp_path):
    from qconvert.cards import render_card

    f, _ = fp8_pair
    result = run(Job(str(f), "torchao", "int8wo", out=tmp_path / "o", base="tiny-flux"))
    assert result.report.passed
    card = render_card(tmp_path / "o", license="apache-2.0").read_text()
    assert "The source was float8 (e4m3fn) with per-tensor scales (ComfyUI's scaled fp8)" in card


# --- single files in Hub repos (the local test Hub) -----------------------------------------

FINETUNE_CARD = """---
license: other
license_name: flux-1-dev-non-commercial-license
license_link: LICENSE.md
base_model: black-forest-labs/FLUX.1-dev
---
# a finetune
"""


def _finetune_repo(hub, tmp_path, repo_id, files: dict[str, Path], card: str = FINETUNE_CARD) -> str:
    folder = tmp_path / repo_id.replace("/", "--")
    folder.mkdir()
    for name, f in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, folder / name)
    (folder / "README.md").write_text(card)
    return hub.seed_repo(repo_id, folder)


@pytest.fixture(scope="module")
def tiny_bfl(tmp_path_factory) -> Path:
    return export_bfl(builtin_path("tiny-flux") / "transformer", tmp_path_factory.mktemp("bfl") / "flux1-tiny-ft.safetensors")


def test_hub_repo_with_one_file_converts_with_base(hub, hub_env, tmp_path, tiny_bfl):
    """No model_index.json: the repo's one .safetensors, downloaded alone (hf_hub_download);
    the identity records repo, commit and file; the card's base_model is the finetune repo."""
    from qconvert.cards import render_card

    vae = tmp_path / "ae.txt"
    vae.write_text("not a weight")
    sha = _finetune_repo(hub, tmp_path, "acme/ft-one", {"flux1-tiny-ft.safetensors": tiny_bfl, "notes.txt": vae})
    src = resolve_source("acme/ft-one", base="tiny-flux", token=hub.token, endpoint=hub.endpoint)
    ident = src.identity.to_dict()
    assert (ident["repo_id"], ident["commit"], ident["file"], ident["base"]["name"]) == ("acme/ft-one", sha, "flux1-tiny-ft.safetensors", "tiny-flux")
    assert hub.count_requests("GET", "acme/ft-one/resolve/") == 1  # that file, nothing else
    assert src.identity.reproduce_args() == ["--source", "acme/ft-one", "--file", "flux1-tiny-ft.safetensors",
                                             "--revision", sha, "--base", "tiny-flux"]  # fmt: skip
    from huggingface_hub import constants

    requests = hub.count_requests()
    with pytest.MonkeyPatch.context() as mp:  # HF_HUB_OFFLINE=1: the cached file, no request
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        assert resolve_source("acme/ft-one", base="tiny-flux", token=hub.token, endpoint=hub.endpoint).identity == src.identity
    assert hub.count_requests() == requests
    result = run(Job("acme/ft-one", "torchao", "int8wo", out=tmp_path / "o", base="tiny-flux",
                     token=hub.token, endpoint=hub.endpoint))  # fmt: skip
    assert result.report.passed
    card = render_card(tmp_path / "o", token=hub.token, endpoint=hub.endpoint).read_text()
    assert "base_model: acme/ft-one" in card
    assert "license_name: flux-1-dev-non-commercial-license" in card
    # the relative link points into the repo whose card declared it
    assert "license_link: https://huggingface.co/acme/ft-one/blob/main/LICENSE.md" in card


def test_hub_repo_with_several_files(hub, hub_env, tmp_path, tiny_bfl):
    """The one Flux transformer among other files is picked by its header (range requests, the
    others never downloaded); two transformers: a one-line error listing them and naming --file,
    which (or org/name/<file>) picks one."""
    ae = tmp_path / "ae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(ae))
    _finetune_repo(hub, tmp_path, "acme/ft-pick", {"flux1-tiny-ft.safetensors": tiny_bfl, "ae.safetensors": ae})
    src = resolve_source("acme/ft-pick", base="tiny-flux", token=hub.token, endpoint=hub.endpoint)
    assert src.identity.file == "flux1-tiny-ft.safetensors"
    assert hub.count_requests("GET", "acme/ft-pick/resolve/main/ae.safetensors") <= 1  # its header only

    fp8 = fp8_file(tmp_path, scaled=False)
    _finetune_repo(hub, tmp_path, "acme/ft-two", {"flux1-tiny-ft.safetensors": tiny_bfl, "fp8/flux1-tiny-fp8.safetensors": fp8})
    proc = invoke("flux", "--source", "acme/ft-two", "--base", "tiny-flux", "--backend", "torchao", "--scheme", "int8wo",
                  "--dry-run", env={"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": hub.token})  # fmt: skip
    line = assert_one_line_error(proc, code=2, contains="acme/ft-two holds 2 .safetensors files")
    assert "flux1-tiny-ft.safetensors, fp8/flux1-tiny-fp8.safetensors" in line and "--file <name>" in line
    by_option = resolve_source("acme/ft-two", source_file="fp8/flux1-tiny-fp8.safetensors", base="tiny-flux",
                               token=hub.token, endpoint=hub.endpoint)  # fmt: skip
    by_spec = resolve_source("acme/ft-two/fp8/flux1-tiny-fp8.safetensors", base="tiny-flux", token=hub.token, endpoint=hub.endpoint)
    assert by_option.identity == by_spec.identity and by_spec.identity.float8 == "e4m3fn"
    with pytest.raises(errors.SourceNotFound, match="acme/ft-two has no file typo.safetensors"):
        resolve_source("acme/ft-two", source_file="typo.safetensors", base="tiny-flux", token=hub.token, endpoint=hub.endpoint)


def test_hub_single_file_needs_a_base_and_a_pipeline_refuses_file(hub, hub_env, tmp_path, tiny_bfl):
    _finetune_repo(hub, tmp_path, "acme/ft-nobase", {"flux1-tiny-ft.safetensors": tiny_bfl})
    proc = invoke("flux", "--source", "acme/ft-nobase", "--backend", "torchao", "--scheme", "int8wo", "--dry-run",
                  env={"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": hub.token})  # fmt: skip
    assert_one_line_error(proc, code=2, contains="add --base <pipeline folder or Hub id>")
    assert hub.count_requests("GET", "acme/ft-nobase/resolve/") == 0  # nothing downloaded before the error
    with pytest.raises(errors.UsageError, match="picks a file in a Hub repo"):
        resolve_source("tiny-flux", source_file="x.safetensors")


def test_finetune_of_a_gated_base_keeps_the_bases_license_fields(hub, hub_env, tmp_path, tiny_bfl):
    """A finetune card that says `license: other` alone (or nothing): the base's name and link,
    the link into the base's repo."""
    from qconvert.cards import render_card

    base = tmp_path / "base"
    shutil.copytree(builtin_path("tiny-flux"), base)
    (base / "README.md").write_text(FINETUNE_CARD.replace("base_model: black-forest-labs/FLUX.1-dev\n", ""))
    hub.seed_repo("acme/gated-base", base)
    for repo, card in (("acme/ft-other", "---\nlicense: other\n---\n"), ("acme/ft-none", "# no metadata\n")):
        _finetune_repo(hub, tmp_path, repo, {"flux1-tiny-ft.safetensors": tiny_bfl}, card=card)
        run(Job(repo, "torchao", "int8wo", out=tmp_path / repo, base="acme/gated-base", validate=False,
                token=hub.token, endpoint=hub.endpoint))  # fmt: skip
        text = render_card(tmp_path / repo, token=hub.token, endpoint=hub.endpoint).read_text()
        assert f"base_model: {repo}" in text, repo
        assert "license: other" in text and "license_name: flux-1-dev-non-commercial-license" in text, repo
        assert "license_link: https://huggingface.co/acme/gated-base/blob/main/LICENSE.md" in text, repo


def test_chroma_all_in_one_with_base_prefixes(tmp_path):
    """Chroma keeps ComfyUI BASE's prefixes (cond_stage_model., first_stage_model.) and has no
    CLIP: its T5 and VAE come from the file through the same code."""
    import json

    base = builtin_path("tiny-chroma")
    sd = {UNET + k: v for k, v in _state_of(export_bfl(base / "transformer", tmp_path / "c.safetensors")).items()}
    t5 = {k: v * 0.5 for k, v in _state(base / "text_encoder").items()}
    sd.update({"cond_stage_model.t5xxl.transformer." + k: v for k, v in t5.items()})
    cfg = json.loads((base / "vae" / "config.json").read_text())
    sd.update({"first_stage_model." + k: v for k, v in ldm_vae(_state(base / "vae"), cfg).items()})
    save_file(sd, str(tmp_path / "chroma-aio.safetensors"))
    src = resolve_source(str(tmp_path / "chroma-aio.safetensors"), base=str(base))
    assert src.family.name == "chroma" and src.identity.embedded == ("text_encoder", "vae")
    with TensorReader() as r:
        got = {k: r.load(t) for k, t in src.components["text_encoder"].tensors.items()}
    assert set(got) == set(t5) and all(torch.equal(got[k], t5[k]) for k in t5)
