"""Model families: everything qconvert knows about one kind of pipeline, one module each.

A family module (``qconvert/families/<name>.py``) defines a :class:`Family` subclass and says
how to recognise its pipelines (``model_index.json`` class names) and single files (key set),
which components it has and which of them are quantized, its single-file key maps, how GGUF
files of it are named, its built-in tiny fixtures, how validation runs it and how its card
speaks of it. ``FAMILIES`` is the one explicit registry; modules are imported when first asked
for, and import nothing heavy (``qconvert --help`` and ``release --matrix`` stay instant).
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

from ..errors import NotAFluxModel

# name -> module defining it (``FAMILY``: its Family subclass)
FAMILIES: dict[str, str] = {
    "flux": "qconvert.families.flux",
}

# model_index.json class names of pipelines people mistake for a supported one, to name them in errors.
KNOWN_OTHER_PIPELINES = {
    "StableDiffusionPipeline": "Stable Diffusion 1.x/2.x",
    "StableDiffusionXLPipeline": "Stable Diffusion XL",
    "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "PixArtSigmaPipeline": "PixArt-Sigma",
    "SanaPipeline": "Sana",
    "AuraFlowPipeline": "AuraFlow",
    "HunyuanDiTPipeline": "Hunyuan-DiT",
    "LuminaText2ImgPipeline": "Lumina",
    "FluxControlPipeline": "Flux Control (not plain text-to-image)",
    "FluxFillPipeline": "Flux Fill (inpainting)",
    "QwenImagePipeline": "Qwen-Image",
}


class Family:
    """One model family, declared in one place (class attributes are plain data)."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # how cards and errors name it
    pipeline_classes: ClassVar[tuple[str, ...]] = ()  # model_index.json classes it converts
    pipeline_class: ClassVar[str] = ""  # what users load it with (cards, validation)
    transformer_class: ClassVar[str] = ""
    # Components of its pipeline folder, in model_index.json order; those with weights; those
    # qconvert quantizes (everything else is copied byte for byte).
    components: ClassVar[tuple[str, ...]] = ()
    weight_components: ClassVar[tuple[str, ...]] = ()
    quantizable: ClassVar[tuple[str, ...]] = ()
    # the text encoder whose output validation compares, and its tokenizer
    text_encoder: ClassVar[tuple[str, str]] = ("text_encoder_2", "tokenizer_2")
    pipeline_tag: ClassVar[str] = "text-to-image"
    tags: ClassVar[tuple[str, ...]] = ()
    gguf_arch: ClassVar[dict[str, str]] = {}  # component -> general.architecture
    gguf_file_prefix: ClassVar[dict[str, str]] = {}  # component -> <prefix>-<scheme>.gguf

    # --- single files -----------------------------------------------------------------------

    @classmethod
    def looks_like_single_file(cls, keys: list[str]) -> bool:
        """True for a single-file transformer of this family (its own, not diffusers', names)."""
        return False

    # --- running it ------------------------------------------------------------------------

    @classmethod
    def pipeline_type(cls) -> Any:
        """The diffusers pipeline class users load it with."""
        import diffusers

        return getattr(diffusers, cls.pipeline_class)

    @classmethod
    def transformer_type(cls) -> Any:
        import diffusers

        return getattr(diffusers, cls.transformer_class)

    @classmethod
    def validation_args(cls, *, steps: int, size: int) -> dict[str, Any]:
        """What validation passes to the pipeline besides the prompt, generator and callback."""
        return {"num_inference_steps": steps, "height": size, "width": size, "max_sequence_length": 64}

    @classmethod
    def forward_inputs(cls, config: dict[str, Any], *, device: str, dtype: Any, seed: int = 0) -> dict[str, Any]:
        """Fixed inputs of one transformer forward, compared between output and source."""
        raise NotImplementedError(f"{cls.name}: forward_inputs")


def family(name: str) -> type[Family]:
    """The registered family ``name``."""
    if name not in FAMILIES:
        raise NotAFluxModel(f"unknown model family {name!r}", hint=f"qconvert converts: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name]).FAMILY


def all_families() -> list[type[Family]]:
    return [family(name) for name in FAMILIES]


def for_pipeline_class(class_name: Any, spec: str) -> type[Family]:
    """The family whose pipelines have ``model_index.json`` class ``class_name``, or a one-line error."""
    for fam in all_families():
        if class_name in fam.pipeline_classes:
            return fam
    what = KNOWN_OTHER_PIPELINES.get(str(class_name), str(class_name))
    accepted = ", ".join(c for fam in all_families() for c in fam.pipeline_classes)
    raise NotAFluxModel(f"{spec} is a {what} pipeline ({class_name}), not one qconvert converts",
                        hint=f"qconvert converts {accepted} pipelines")  # fmt: skip


def for_single_file(keys: list[str]) -> type[Family] | None:
    """The family whose single-file transformers have these keys, or None."""
    return next((fam for fam in all_families() if fam.looks_like_single_file(keys)), None)
