"""FLUX.1 Kontext [dev]: image editing with ``FluxKontextPipeline``.

Its transformer is FLUX.1 [dev]'s (same keys, same shapes: the input image's latents are
appended to the sequence, not to the channels), so a single file cannot tell Kontext from dev or
Krea: the family comes from ``--base``'s ``model_index.json`` or ``--family``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .flux import Flux


class FluxKontext(Flux):
    name = "flux-kontext"
    label = "FLUX.1 Kontext"
    pipeline_classes = ("FluxKontextPipeline",)
    pipeline_class = "FluxKontextPipeline"
    pipeline_tag = "image-to-image"
    tags = ("flux", "flux-kontext", "image-editing")
    gguf_file_prefix: ClassVar[dict[str, str]] = {"transformer": "flux1", "text_encoder_2": "t5xxl"}
    inputs: ClassVar[dict[str, str]] = {"image": "image"}
    card_settings: ClassVar[dict[str, Any]] = {"steps": 28, "size": 1024, "guidance": 2.5}
    builtins: ClassVar[dict[str, dict[str, Any]]] = {"tiny-flux-kontext": {}}

    @classmethod
    def call_extras(cls, size: int) -> dict[str, Any]:
        # The pipeline resizes the input image to max_area (1024^2) and snaps it to its preferred
        # resolutions unless told not to: keep the asked size (FACTS: a 1M-token sequence otherwise).
        return {} if size >= 1024 else {"max_area": size * size, "_auto_resize": False}


FAMILY = FluxKontext
