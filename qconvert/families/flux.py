"""The FLUX.1 text-to-image family: ``FluxPipeline``, its components, the BFL <-> diffusers key map.

The key map is expressed as *recipes*: an output tensor is the concatenation, along dim 0, of
row ranges of source tensors. That one form covers every case of the Flux map (renames,
fused qkv split into q/k/v, the single-block ``linear1`` split into q/k/v/mlp, and the final
adaLN modulation whose two halves swap), works in both directions, and lets sources read
tensors lazily: only the rows a recipe names are read from the mmapped file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from . import Family, latent_grid_inputs

# Components a FluxPipeline folder holds, in model_index.json order.
PIPELINE_COMPONENTS = (
    "scheduler",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "transformer",
    "vae",
)
# Components qconvert quantizes; everything else is copied byte for byte.
QUANTIZABLE = ("transformer", "text_encoder_2")


@dataclass(frozen=True)
class Segment:
    """Rows ``start:stop`` (dim 0) of source tensor ``key``; ``None`` bounds mean the whole."""

    key: str
    start: int | None = None
    stop: int | None = None


Recipe = tuple[Segment, ...]


# --- BFL single-file layout -----------------------------------------------------------------

# Top-level renames (weight and bias each): diffusers module -> BFL module.
_TOP_LEVEL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}

# transformer_blocks.{i}.<diffusers> -> double_blocks.{i}.<bfl>; lists are concatenated.
_DOUBLE = {
    "img_mod.lin": ["norm1.linear"],
    "txt_mod.lin": ["norm1_context.linear"],
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"],
    "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE = {
    "modulation.lin": ["norm.linear"],
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
}
_SINGLE_NORMS = {
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
_FINAL_ADALN = "final_layer.adaLN_modulation.1"
# Chroma's modulation approximator (in place of time_in/vector_in/guidance_in and the blocks'
# modulation layers, which Chroma prunes): distilled_guidance_layer.<diffusers> -> .<bfl>
_APPROXIMATOR = "distilled_guidance_layer"
_APPROXIMATOR_LAYER = {"linear_1": "in_layer", "linear_2": "out_layer"}


def _block_indices(keys: list[str], prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def bfl_to_diffusers_layout(diffusers_keys: list[str]) -> dict[str, list[str]]:
    """BFL name -> the diffusers names whose tensors it concatenates (dim 0), in order.

    Built from the diffusers key list so it covers exactly the blocks and biases present.
    The adaLN of the final layer is special (halves swapped): see :func:`diffusers_to_bfl`.
    """
    present = set(diffusers_keys)
    table: dict[str, list[str]] = {}

    def add(bfl: str, parts: list[str]) -> None:
        for suffix in ("weight", "bias"):
            names = [f"{p}.{suffix}" for p in parts]
            if all(n in present for n in names):
                table[f"{bfl}.{suffix}"] = names

    for d, b in _TOP_LEVEL.items():
        add(b, [d])
    for i in _block_indices(diffusers_keys, "transformer_blocks"):
        for b, parts in _DOUBLE.items():
            add(f"double_blocks.{i}.{b}", [f"transformer_blocks.{i}.{p}" for p in parts])
        for b, d in _DOUBLE_NORMS.items():
            if f"transformer_blocks.{i}.{d}" in present:
                table[f"double_blocks.{i}.{b}"] = [f"transformer_blocks.{i}.{d}"]
    for i in _block_indices(diffusers_keys, "single_transformer_blocks"):
        for b, parts in _SINGLE.items():
            add(f"single_blocks.{i}.{b}", [f"single_transformer_blocks.{i}.{p}" for p in parts])
        for b, d in _SINGLE_NORMS.items():
            if f"single_transformer_blocks.{i}.{d}" in present:
                table[f"single_blocks.{i}.{b}"] = [f"single_transformer_blocks.{i}.{d}"]
    add(_FINAL_ADALN, ["norm_out.linear"])
    for proj in ("in_proj", "out_proj"):
        add(f"{_APPROXIMATOR}.{proj}", [f"{_APPROXIMATOR}.{proj}"])
    for i in _block_indices(diffusers_keys, f"{_APPROXIMATOR}.layers"):
        for d, b in _APPROXIMATOR_LAYER.items():
            add(f"{_APPROXIMATOR}.layers.{i}.{b}", [f"{_APPROXIMATOR}.layers.{i}.{d}"])
    for i in _block_indices(diffusers_keys, f"{_APPROXIMATOR}.norms"):
        if f"{_APPROXIMATOR}.norms.{i}.weight" in present:
            table[f"{_APPROXIMATOR}.norms.{i}.scale"] = [f"{_APPROXIMATOR}.norms.{i}.weight"]
    return table


def diffusers_to_bfl(shapes: dict[str, tuple[int, ...]]) -> dict[str, Recipe]:
    """Recipes that build each BFL tensor from diffusers-named tensors of the given shapes."""
    recipes: dict[str, Recipe] = {}
    for bfl, parts in bfl_to_diffusers_layout(list(shapes)).items():
        if bfl.startswith(_FINAL_ADALN):
            # diffusers' AdaLayerNormContinuous emits (scale, shift); BFL's final layer
            # emits (shift, scale): swap the two halves.
            (name,) = parts
            half = shapes[name][0] // 2
            recipes[bfl] = (Segment(name, half, None), Segment(name, 0, half))
        else:
            recipes[bfl] = tuple(Segment(p) for p in parts)
    unmapped = set(shapes) - {s.key for r in recipes.values() for s in r}
    if unmapped:
        raise KeyError(f"no BFL name for diffusers tensor(s): {sorted(unmapped)[:3]}")
    return recipes


def bfl_to_diffusers(
    bfl_shapes: dict[str, tuple[int, ...]], *, inner_dim: int
) -> dict[str, Recipe]:
    """Recipes that build each diffusers tensor from BFL-named tensors.

    ``inner_dim`` (heads x head_dim, 3072 for FLUX.1) sizes the q/k/v pieces of the fused
    projections; the MLP part of ``linear1`` is what remains.
    """
    # First express every diffusers tensor as segments of BFL tensors.
    synthetic: dict[str, tuple[int, ...]] = {}
    for bfl, shape in bfl_shapes.items():
        for d in _diffusers_names_for(bfl):
            synthetic[d] = shape  # placeholder; only the key set matters for the layout
    layout = bfl_to_diffusers_layout(list(synthetic))
    recipes: dict[str, Recipe] = {}
    for bfl, parts in layout.items():
        if bfl not in bfl_shapes:
            continue
        rows = bfl_shapes[bfl][0]
        if bfl.startswith(_FINAL_ADALN):
            half = rows // 2
            recipes[parts[0]] = (Segment(bfl, half, None), Segment(bfl, 0, half))
            continue
        if len(parts) == 1:
            recipes[parts[0]] = (Segment(bfl),)
            continue
        sizes = [inner_dim] * len(parts)
        if len(parts) == 4:  # linear1: q, k, v, mlp
            sizes[3] = rows - 3 * inner_dim
        if sum(sizes) != rows or min(sizes) <= 0:
            raise ValueError(
                f"{bfl} has {rows} rows, which does not split into {len(parts)} parts of "
                f"inner_dim {inner_dim}: the base config does not match this checkpoint"
            )
        start = 0
        for part, size in zip(parts, sizes):
            recipes[part] = (Segment(bfl, start, start + size),)
            start += size
    unmapped = set(bfl_shapes) - {s.key for r in recipes.values() for s in r}
    if unmapped:
        raise KeyError(f"unknown BFL tensor(s): {sorted(unmapped)[:3]}")
    return recipes


def _diffusers_names_for(bfl: str) -> list[str]:
    """Every diffusers name a BFL name could expand to (used to build the inverse table)."""
    suffix = bfl.rsplit(".", 1)[1]
    module = bfl.rsplit(".", 1)[0]
    for d, b in _TOP_LEVEL.items():
        if module == b:
            return [f"{d}.{suffix}"]
    if module == _FINAL_ADALN:
        return [f"norm_out.linear.{suffix}"]
    m = re.match(re.escape(_APPROXIMATOR) + r"\.(?:(in_proj|out_proj)|layers\.(\d+)\.(in_layer|out_layer)|norms\.(\d+))$", module)
    if m:
        proj, layer, part, norm = m.groups()
        if proj:
            return [bfl]
        if layer is not None:
            inverse = {b: d for d, b in _APPROXIMATOR_LAYER.items()}
            return [f"{_APPROXIMATOR}.layers.{layer}.{inverse[part]}.{suffix}"]
        return [f"{_APPROXIMATOR}.norms.{norm}.weight"]
    m = re.match(r"double_blocks\.(\d+)\.(.+)$", bfl)
    if m:
        i, rest = m.groups()
        if rest in _DOUBLE_NORMS:
            return [f"transformer_blocks.{i}.{_DOUBLE_NORMS[rest]}"]
        mod, suf = rest.rsplit(".", 1)
        return [f"transformer_blocks.{i}.{p}.{suf}" for p in _DOUBLE.get(mod, [])]
    m = re.match(r"single_blocks\.(\d+)\.(.+)$", bfl)
    if m:
        i, rest = m.groups()
        if rest in _SINGLE_NORMS:
            return [f"single_transformer_blocks.{i}.{_SINGLE_NORMS[rest]}"]
        mod, suf = rest.rsplit(".", 1)
        return [f"single_transformer_blocks.{i}.{p}.{suf}" for p in _SINGLE.get(mod, [])]
    return []


def looks_like_bfl_flux(keys: list[str]) -> bool:
    """True for a Black Forest Labs Flux transformer state dict (optionally prefixed)."""
    ks = {strip_bfl_prefix(k) for k in keys}
    return "img_in.weight" in ks and any(k.startswith("double_blocks.") for k in ks)


# ComfyUI "full checkpoint" files prefix the transformer with this.
_BFL_PREFIXES = ("model.diffusion_model.",)


def strip_bfl_prefix(key: str) -> str:
    for p in _BFL_PREFIXES:
        if key.startswith(p):
            return key[len(p) :]
    return key


def guess_architecture(keys: list[str]) -> str:
    """Name what a non-Flux safetensors file probably is, for error messages."""
    ks = keys[:2000]
    if any("lora_" in k or ".lora." in k or "lora_A" in k for k in ks):
        return "a LoRA adapter"
    if any(k.startswith("joint_blocks.") or "joint_blocks" in k for k in ks):
        return "a Stable Diffusion 3 model"
    if any("conditioner.embedders" in k for k in ks):
        return "a Stable Diffusion XL checkpoint"
    if any(k.startswith("model.diffusion_model.input_blocks") for k in ks):
        return "a Stable Diffusion 1.x/2.x checkpoint"
    if any(k.startswith("transformer_blocks.") for k in ks) and any(
        k.startswith("single_transformer_blocks.") for k in ks
    ):
        return "a diffusers-format Flux transformer (pass its pipeline folder instead)"
    if any(k.startswith("encoder.block.") for k in ks):
        return "a T5 encoder"
    if any(k.startswith("text_model.") for k in ks):
        return "a CLIP text encoder"
    if any(k.startswith("encoder.down_blocks") or k.startswith("decoder.up_blocks") for k in ks):
        return "a VAE"
    return "an unrecognized model"


def channel_ratio(config: dict[str, Any]) -> int:
    """1, 2 or 3 (meaning "more than 2"): input over output channels of a FLUX.1 transformer."""
    inputs = int(config.get("in_channels", 64))
    outputs = int(config.get("out_channels") or inputs)
    return 1 if inputs <= outputs else 2 if inputs == 2 * outputs else 3


class Flux(Family):
    name = "flux"
    label = "FLUX.1"
    pipeline_classes = ("FluxPipeline",)
    pipeline_class = "FluxPipeline"
    transformer_class = "FluxTransformer2DModel"
    components = PIPELINE_COMPONENTS
    weight_components = ("transformer", "text_encoder", "text_encoder_2", "vae")
    quantizable = QUANTIZABLE
    tags = ("flux",)
    kind = "flux1"
    # ComfyUI-GGUF's and llama.cpp's names (see qconvert.convert.gguf)
    gguf_arch: ClassVar[dict[str, str]] = {"transformer": "flux", "text_encoder_2": "t5encoder"}
    gguf_file_prefix: ClassVar[dict[str, str]] = {"transformer": "flux1", "text_encoder_2": "t5xxl"}
    # The input channels of a FLUX.1 transformer (x_embedder / img_in) over its output channels,
    # by family: 1 text-to-image (64/64), 2 with a control image's latents (Depth/Canny,
    # 128/64), more with the masked image's latents and the mask (Fill, 384/64; 12/4 in the tiny
    # fixture, whose VAE does not downscale) -- the one shape that tells them apart.
    input_ratio: ClassVar[int] = 1
    builtins: ClassVar[dict[str, dict[str, Any]]] = {"tiny-flux": {}, "tiny-flux-schnell": {"guidance_embeds": False}}

    @classmethod
    def looks_like_single_file(cls, keys: list[str]) -> bool:
        return looks_like_bfl_flux(keys) and not any("distilled_guidance_layer." in k for k in keys[:4000])

    @classmethod
    def matches_config(cls, config: dict[str, Any]) -> bool:
        return channel_ratio(config) == cls.input_ratio

    @classmethod
    def gguf_stem(cls, component: str, name: str) -> str:
        # city96's naming: a leading flux.1-/flux1-/flux- of the source's name gives way to
        # flux1-, so FLUX.1-Kontext-dev and flux1-kontext-dev.safetensors both give flux1-kontext-dev
        return super().gguf_stem(component, re.sub(r"^flux(?:[._-]?1)?[._-]+(?=[a-z0-9])", "", name))

    @classmethod
    def generation_settings(cls, config: dict[str, Any], *, builtin: bool) -> dict[str, Any]:
        settings = super().generation_settings(config, builtin=builtin)
        if config.get("guidance_embeds", True) is False:
            # FLUX.1 [schnell]-style, timestep-distilled: 4 steps, no guidance, 256 T5 tokens
            settings.update(guidance=0.0, **({} if builtin else {"steps": 4, "max_sequence_length": 256}))
        return settings

    @classmethod
    def forward_inputs(cls, config: dict[str, Any], *, device: str, dtype: Any, seed: int = 0) -> dict[str, Any]:
        """8x8 latent patches, 16 text tokens, timestep 0.5 (guidance 3.5 where it is embedded)."""
        import torch

        extra: dict[str, Any] = {"pooled_projections": (1, config["pooled_projection_dim"])}
        if config.get("guidance_embeds"):
            extra["guidance"] = torch.tensor([3.5])
        return latent_grid_inputs(config, device=device, dtype=dtype, seed=seed, **extra)


FAMILY = Flux
