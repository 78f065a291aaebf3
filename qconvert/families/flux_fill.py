"""FLUX.1 Fill [dev]: inpainting and outpainting with ``FluxFillPipeline``.

The transformer is FLUX.1's with 384 input channels (64 latent + 64 masked-image latent + 256
packed-mask channels; ``img_in`` / ``x_embedder``), which is how a single file is recognised.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .flux import Flux


class FluxFill(Flux):
    name = "flux-fill"
    label = "FLUX.1 Fill"
    pipeline_classes = ("FluxFillPipeline",)
    pipeline_class = "FluxFillPipeline"
    pipeline_tag = "image-to-image"
    tags = ("flux", "flux-fill", "inpainting")
    gguf_file_prefix: ClassVar[dict[str, str]] = {"transformer": "flux1", "text_encoder_2": "t5xxl"}
    input_ratio: ClassVar[int] = 3
    inputs: ClassVar[dict[str, str]] = {"image": "image", "mask_image": "mask"}
    card_settings: ClassVar[dict[str, Any]] = {"steps": 50, "size": 1024, "guidance": 30.0}
    # the tiny VAE does not downscale: 4 latent + 4 masked-image + 4 mask channels
    builtins: ClassVar[dict[str, dict[str, Any]]] = {"tiny-flux-fill": {"in_channels": 12, "out_channels": 4}}


FAMILY = FluxFill
