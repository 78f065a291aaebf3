"""Quality and size measures: PSNR/SSIM (torchmetrics), forward relative error, weight bytes."""

from __future__ import annotations

from typing import Any


def tensor_storage_bytes(t: Any) -> int:
    """Bytes a (possibly quantized tensor-subclass) parameter really occupies.

    torchao tensors flatten into inner tensors (``__tensor_flatten__``); bitsandbytes'
    Params4bit/Int8Params and diffusers' GGUFParameter hold their packed bytes directly.
    """
    import torch

    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        inner = [getattr(t, n) for n in names]
        return sum(tensor_storage_bytes(x) for x in inner if isinstance(x, torch.Tensor))
    n = t.numel() * t.element_size()
    qs = getattr(t, "quant_state", None)
    if qs is not None:  # bnb 4-bit: absmax (+ nested) and code tables
        for name in ("absmax", "code"):
            v = getattr(qs, name, None)
            if isinstance(v, torch.Tensor):
                n += v.numel() * v.element_size()
        nested = getattr(qs, "state2", None)
        if nested is not None and isinstance(getattr(nested, "absmax", None), torch.Tensor):
            n += nested.absmax.numel() * nested.absmax.element_size()
    scb = getattr(t, "SCB", None)
    if isinstance(scb, torch.Tensor):
        n += scb.numel() * scb.element_size()
    return n


def module_bytes(module: Any) -> int:
    """Weight bytes of a model: parameters and buffers, quantized ones at their packed size."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += tensor_storage_bytes(t)
    return total


def image_quality(quantized: Any, reference: Any) -> dict[str, float]:
    """PSNR (dB) and SSIM of two image batches in [0, 1], shape (N, 3, H, W)."""
    import torch
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    q = quantized.float().clamp(0, 1)
    r = reference.float().clamp(0, 1)
    if torch.equal(q, r):
        psnr = float("inf")
    else:
        psnr = float(peak_signal_noise_ratio(q, r, data_range=1.0))
    kernel = min(11, q.shape[-1] - (1 - q.shape[-1] % 2), q.shape[-2] - (1 - q.shape[-2] % 2))
    ssim = float(structural_similarity_index_measure(q, r, data_range=1.0, kernel_size=max(3, kernel)))
    return {"psnr": psnr, "ssim": ssim}


def relative_error(a: Any, b: Any) -> float:
    """||a - b|| / ||b|| in float32."""
    import torch

    a, b = a.float(), b.float()
    denom = torch.linalg.vector_norm(b)
    return float(torch.linalg.vector_norm(a - b) / denom) if float(denom) > 0 else float(torch.linalg.vector_norm(a))


def transformer_forward_inputs(config: dict[str, Any], *, device: str, dtype: Any, seed: int = 0) -> dict[str, Any]:
    """Fixed inputs for one Flux transformer forward (8x8 latent patches, 16 text tokens)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    grid = 8
    img_ids = torch.zeros(grid, grid, 3)
    img_ids[..., 1] = torch.arange(grid)[:, None]
    img_ids[..., 2] = torch.arange(grid)[None, :]
    inputs = {
        "hidden_states": torch.randn(1, grid * grid, config["in_channels"], generator=g),
        "encoder_hidden_states": torch.randn(1, 16, config["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": img_ids.reshape(-1, 3),
        "txt_ids": torch.zeros(16, 3),
    }
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.tensor([3.5])
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
