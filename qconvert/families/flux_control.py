"""FLUX.1 Depth [dev] and Canny [dev]: structural conditioning with ``FluxControlPipeline``.

The transformer is FLUX.1's with 128 input channels (the control image's latents concatenated
to the noise latents), which is how a single file is recognised. Depth and Canny share the
architecture and differ only in weights (and the control image users pass).
"""

from __future__ import annotations

from typing import Any, ClassVar

from .flux import Flux


class FluxControl(Flux):
    name = "flux-control"
    label = "FLUX.1 Depth/Canny"
    pipeline_classes = ("FluxControlPipeline",)
    pipeline_class = "FluxControlPipeline"
    pipeline_tag = "image-to-image"
    tags = ("flux", "flux-control", "controlnet")
    gguf_file_prefix: ClassVar[dict[str, str]] = {"transformer": "flux1", "text_encoder_2": "t5xxl"}
    input_ratio: ClassVar[int] = 2
    inputs: ClassVar[dict[str, str]] = {"control_image": "control"}
    card_settings: ClassVar[dict[str, Any]] = {"steps": 30, "size": 1024, "guidance": 10.0}
    builtins: ClassVar[dict[str, dict[str, Any]]] = {"tiny-flux-control": {"in_channels": 8, "out_channels": 4}}


FAMILY = FluxControl
