"""Chroma: the Flux-derived text-to-image model of lodestones, with ``ChromaPipeline``.

What differs from FLUX.1: no CLIP (one T5 encoder, in ``text_encoder``/``tokenizer``); the
transformer (``ChromaTransformer2DModel``) prunes the per-block modulation layers and the
time/vector/guidance embedders, and computes every modulation with one small MLP, the
``distilled_guidance_layer`` (the "approximator"). Its Black Forest Labs-style single files
use FLUX.1's names for everything else, so the FLUX.1 key map serves it (the approximator's
renames are part of it: :mod:`qconvert.families.flux`); ComfyUI-GGUF loads its GGUF files
under ``general.architecture = "flux"`` and tells Chroma by the approximator's keys.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from . import Family, latent_grid_inputs
from .flux import looks_like_bfl_flux


class Chroma(Family):
    name = "chroma"
    label = "Chroma"
    pipeline_classes = ("ChromaPipeline",)
    pipeline_class = "ChromaPipeline"
    transformer_class = "ChromaTransformer2DModel"
    components = ("scheduler", "text_encoder", "tokenizer", "transformer", "vae")
    weight_components = ("transformer", "text_encoder", "vae")
    quantizable = ("transformer", "text_encoder")
    text_encoder = ("text_encoder", "tokenizer")
    tags = ("chroma",)
    kind = "chroma"
    gguf_arch: ClassVar[dict[str, str]] = {"transformer": "flux", "text_encoder": "t5encoder"}
    gguf_file_prefix: ClassVar[dict[str, str]] = {"transformer": "chroma", "text_encoder": "t5xxl"}
    # lodestones/Chroma1-HD's card: 40 steps, CFG 3.0 (Chroma uses real classifier-free guidance)
    card_settings: ClassVar[dict[str, Any]] = {"steps": 40, "size": 1024, "guidance": 3.0}
    builtins: ClassVar[dict[str, dict[str, Any]]] = {"tiny-chroma": {}}

    @classmethod
    def looks_like_single_file(cls, keys: list[str]) -> bool:
        return looks_like_bfl_flux(keys) and any("distilled_guidance_layer." in k for k in keys)

    @classmethod
    def gguf_stem(cls, component: str, name: str) -> str:
        # the community names Chroma files after the model (Chroma1-HD-Q8_0.gguf,
        # chroma-unlocked-v38-Q8_0.gguf): prefix "chroma-" only where the name lacks it
        if component == "transformer" and re.match(r"chroma", name):
            return name
        return super().gguf_stem(component, name)

    @classmethod
    def tiny_transformer_config(cls, base: dict[str, Any]) -> dict[str, Any]:
        cfg = {k: v for k, v in base.items() if k not in ("guidance_embeds", "pooled_projection_dim")}
        if int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"]) == 3072:
            # the width-3072 fixture (what ComfyUI and diffusers' BFL converter load): the real
            # approximator, whose shape ComfyUI hard-codes (64 in, 5120 wide, 5 layers; ~0.27B)
            return {**cfg, "approximator_num_channels": 64, "approximator_hidden_dim": 5120, "approximator_layers": 5}
        return {**cfg, "approximator_num_channels": 16, "approximator_hidden_dim": 32, "approximator_layers": 1}

    @classmethod
    def forward_inputs(cls, config: dict[str, Any], *, device: str, dtype: Any, seed: int = 0) -> dict[str, Any]:
        """8x8 latent patches, 16 text tokens, timestep 0.5 (no pooled text, no guidance)."""
        return latent_grid_inputs(config, device=device, dtype=dtype, seed=seed)


FAMILY = Chroma
