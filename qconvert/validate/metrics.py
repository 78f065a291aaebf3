"""Quality and size measures: PSNR/SSIM/LPIPS (torchmetrics), forward relative error, weight bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# LPIPS needs an image backbone: AlexNet from torchvision, its ImageNet weights from the torch hub
# cache. qconvert never downloads them itself (a validation must not depend on the network).
LPIPS_FETCH_HINT = "python -c \"import torchvision; torchvision.models.alexnet(weights='DEFAULT')\""
LPIPS_MIN_SIZE = 32  # AlexNet's strides and pools leave nothing of a smaller image


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


def lpips(quantized: Any, reference: Any) -> tuple[float | None, str]:
    """LPIPS (AlexNet) of two image batches in [0, 1], or None and why it was not measured.

    Measured only when torchvision imports and the AlexNet weights are already in the torch hub
    cache (``torch.hub.get_dir()/checkpoints``), so that torchmetrics never starts a download.
    """
    import torch

    try:
        import torchvision
    except Exception:  # noqa: BLE001 - not installed, or built for another torch (its ops fail to load)
        return None, "skipped: needs a working torchvision (pip install 'qconvert[lpips]')"
    weights = torchvision.models.AlexNet_Weights.DEFAULT
    path = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    if not path.is_file():
        return None, f"skipped: AlexNet weights not in {path} (fetch them once: {LPIPS_FETCH_HINT})"
    if not (torch.isfinite(quantized).all() and torch.isfinite(reference).all()):
        return None, "skipped: the images are not finite"
    if min(quantized.shape[-2:]) < LPIPS_MIN_SIZE:
        return None, f"skipped: images smaller than {LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE} px"
    from torchmetrics.functional.image.lpips import learned_perceptual_image_patch_similarity

    value = learned_perceptual_image_patch_similarity(
        quantized.float().clamp(0, 1), reference.float().clamp(0, 1), net_type="alex", normalize=True
    )
    return float(value), ""


def relative_error(a: Any, b: Any) -> float:
    """||a - b|| / ||b|| in float32."""
    import torch

    a, b = a.float(), b.float()
    denom = torch.linalg.vector_norm(b)
    return float(torch.linalg.vector_norm(a - b) / denom) if float(denom) > 0 else float(torch.linalg.vector_norm(a))
