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
    "flux-kontext": "qconvert.families.flux_kontext",
    "flux-fill": "qconvert.families.flux_fill",
    "flux-control": "qconvert.families.flux_control",
    "chroma": "qconvert.families.chroma",
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
    "FluxPriorReduxPipeline": "Flux Redux (an image-variation adapter, not a transformer)",
    "Flux2Pipeline": "FLUX.2",
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
    # Families whose single files have the same keys share a kind (FLUX.1 dev, Kontext, Fill,
    # Depth/Canny: "flux1"); the file's shapes and --base's model_index.json tell them apart.
    kind: ClassVar[str] = ""
    tags: ClassVar[tuple[str, ...]] = ()
    gguf_arch: ClassVar[dict[str, str]] = {}  # component -> general.architecture
    gguf_file_prefix: ClassVar[dict[str, str]] = {}  # component -> <prefix>-<name>-<scheme>.gguf
    # Pipeline inputs besides the prompt: argument -> the kind of image (see make_input_image).
    inputs: ClassVar[dict[str, str]] = {}
    # What the card's snippet generates with at full size (the pipeline's documented settings).
    card_settings: ClassVar[dict[str, Any]] = {"steps": 28, "size": 1024, "guidance": 3.5}
    # Built-in tiny fixtures of this family: name -> transformer config changes (see qconvert.tiny).
    builtins: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def gguf_stem(cls, component: str, name: str) -> str:
        """A GGUF file's name before ``-<SCHEME>.gguf``, from the source's short name."""
        return f"{cls.gguf_file_prefix[component]}-{name}"

    @classmethod
    def t5(cls) -> str:
        """The component holding its T5 encoder (quantized with the transformer)."""
        return cls.text_encoder[0]

    @classmethod
    def resolve_components(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        """``--components`` as this family names them: ``t5``, or another family's T5 folder
        this family lacks (``text_encoder_2``, the default, for Chroma), is its T5."""
        t5_names = {"t5"} | {fam.t5() for fam in all_families()}
        return tuple(dict.fromkeys(cls.t5() if n not in cls.components and n in t5_names else n for n in names))

    @classmethod
    def role(cls, component: str) -> str:
        """What a component is to a backend: ``transformer``, ``t5`` or its own name."""
        return "t5" if component == cls.t5() else component

    # --- single files -----------------------------------------------------------------------

    @classmethod
    def looks_like_single_file(cls, keys: list[str]) -> bool:
        """True for a single-file transformer of this family's kind (its own, not diffusers', names).

        Families whose files have the same keys (FLUX.1 dev, Kontext, Fill, Depth/Canny) answer
        alike: the key set tells the *kind*, and ``--base`` (or ``--family``) the family."""
        return False

    @classmethod
    def matches_config(cls, config: dict[str, Any]) -> bool:
        """True when a transformer config has this family's shape (Fill: 384 input channels ...)."""
        return True

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
        """What validation passes to the pipeline besides the prompt, generator and callback:
        the family's fixed input images too, so source and output see the same inputs."""
        args: dict[str, Any] = {"num_inference_steps": steps, "height": size, "width": size, "max_sequence_length": 64}
        return {**args, **{arg: make_input_image(kind, size) for arg, kind in cls.inputs.items()}, **cls.call_extras(size)}

    @classmethod
    def call_extras(cls, size: int) -> dict[str, Any]:
        """Pipeline arguments a call at ``size`` needs (Kontext: keep the input image's size)."""
        return {}

    @classmethod
    def generation_settings(cls, config: dict[str, Any], *, builtin: bool) -> dict[str, Any]:
        """Steps/size/guidance (and T5 tokens) of the card's snippet."""
        if builtin:  # random-weight demo pipelines: tiny images, few steps
            return {**cls.card_settings, "steps": 2, "size": 32}
        return dict(cls.card_settings)

    @classmethod
    def forward_inputs(cls, config: dict[str, Any], *, device: str, dtype: Any, seed: int = 0) -> dict[str, Any]:
        """Fixed inputs of one transformer forward, compared between output and source."""
        raise NotImplementedError(f"{cls.name}: forward_inputs")

    @classmethod
    def tiny_transformer_config(cls, base: dict[str, Any]) -> dict[str, Any]:
        """The transformer config of its built-in tiny fixture, from tiny-flux's."""
        return dict(base)


def latent_grid_inputs(config: dict[str, Any], *, device: str, dtype: Any, seed: int, **extra: Any) -> dict[str, Any]:
    """A Flux-style transformer forward's inputs: 8x8 latent patches, 16 text tokens, timestep
    0.5, seeded; ``extra`` (name -> shape, or a tensor) adds the family's own."""
    import torch

    g = torch.Generator().manual_seed(seed)
    grid = 8
    img_ids = torch.zeros(grid, grid, 3)
    img_ids[..., 1] = torch.arange(grid)[:, None]
    img_ids[..., 2] = torch.arange(grid)[None, :]
    inputs = {
        "hidden_states": torch.randn(1, grid * grid, config["in_channels"], generator=g),
        "encoder_hidden_states": torch.randn(1, 16, config["joint_attention_dim"], generator=g),
    }
    inputs.update({k: torch.randn(*v, generator=g) if isinstance(v, tuple) else v for k, v in extra.items()})
    inputs.update({"timestep": torch.tensor([0.5]), "img_ids": img_ids.reshape(-1, 3), "txt_ids": torch.zeros(16, 3)})
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}


# --- the fixed input images of image-conditioned families --------------------------------------
# One definition serves validation (PIL images) and the cards (the code that makes them), so a
# card's snippet runs as written; users replace them with their own images.
_INPUT_CODE = {
    "image": 'Image.new("RGB", ({s}, {s}), (176, 112, 64))  # your input image: Image.open("photo.png")',
    "mask": 'Image.new("L", ({s}, {s}), 0)  # your mask: white where to paint\n'
            "mask.paste(255, ({q}, {q}, {s} - {q}, {s} - {q}))",
    "control": 'Image.new("RGB", ({s}, {s}), (128, 128, 128))  # your depth map or Canny edges',
}


def make_input_image(kind: str, size: int) -> Any:
    """The input image of ``kind`` at ``size`` (exactly what :func:`input_image_code` writes)."""
    from PIL import Image

    if kind == "image":
        return Image.new("RGB", (size, size), (176, 112, 64))
    if kind == "mask":
        mask = Image.new("L", (size, size), 0)
        mask.paste(255, (size // 4, size // 4, size - size // 4, size - size // 4))
        return mask
    return Image.new("RGB", (size, size), (128, 128, 128))


def input_image_code(variable: str, kind: str, size: int) -> list[str]:
    """Snippet lines that bind ``variable`` to the input image of ``kind``."""
    first, *rest = _INPUT_CODE[kind].format(s=size, q=size // 4).split("\n")
    return [f"{variable} = {first}", *[line.replace("mask.", f"{variable}.") for line in rest]]


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
    """The first family whose single-file transformers have these keys, or None (see
    :meth:`Family.looks_like_single_file`: families of one kind answer alike)."""
    return next((fam for fam in all_families() if fam.looks_like_single_file(keys)), None)


def quantizable_names() -> tuple[str, ...]:
    """Every name ``--components`` takes, in some family: the folders and ``t5``."""
    return tuple(dict.fromkeys([n for fam in all_families() for n in fam.quantizable] + ["t5"]))



