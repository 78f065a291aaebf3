"""Load bitsandbytes checkpoints with diffusers on a CPU-only machine (validation only).

diffusers refuses every bitsandbytes model without a GPU, for quantizing and for loading a
pre-quantized checkpoint alike ("No GPU found. A GPU is needed for quantization.", and with
``device_map={"": "cpu"}`` "Some modules are dispatched on the CPU or the disk"), although
bitsandbytes itself quantizes, dequantizes and runs ``Linear4bit``/``Linear8bitLt`` on CPU
tensors. :func:`allow_bnb_on_cpu` lifts that refusal for the duration of a ``with`` block by
replacing two methods of diffusers' bitsandbytes quantizers:

* ``validate_environment`` -> a no-op;
* ``update_device_map`` -> ``{"": "cpu"}``.

Both are restored on exit (also when the block raises). Only qconvert's own CPU validation
and its tests use this; users on a GPU machine load the checkpoints qconvert writes with a
plain ``FluxPipeline.from_pretrained(out, torch_dtype=torch.bfloat16)`` and never need it.
transformers needs no such override: its ``BitsAndBytesConfig`` loads T5 on CPU as is.

It patches classes, so it affects every thread of the process while active; it is not
reentrant across threads (nesting in one thread is fine).

bitsandbytes' CPU paths for 4-bit layers
-----------------------------------------
bitsandbytes 0.50 has two CPU paths for a ``Linear4bit``, and both assume whole 64-value
blocks per weight row (``in % blocksize == 0``), which FLUX.1 and T5-XXL layers all have and
small models (qconvert's ``tiny-flux``/``slim-flux``, test fixtures) do not:

* on a CPU with AVX512-BF16 (``bitsandbytes.functional.has_avx512bf16()``) the first eval-mode
  forward without grad repacks the weight (``functional._convert_weight_packed_for_cpu``) for a
  fused bf16 kernel; the repack reshapes absmax to ``(out, in // blocksize)`` and tiles rows by
  32, so a narrower layer fails (``RuntimeError: shape '[32, 0]' is invalid for input of size
  16``);
* otherwise its C ``dequantize_4bit`` kernel dequantizes per row, which for rows narrower than
  a block reads the wrong absmax (measured: relative error 0.196 against 0.092 for the same
  nf4 bytes dequantized block by block, as they were quantized and as CUDA reads them).

:func:`configure_cpu_repack` gives each layer one of three paths: ``repacked`` (the fused
kernel: wide layers, where the CPU has it), ``dequantize`` (bitsandbytes' C dequantize +
matmul: wide layers otherwise) and ``reference`` (narrow layers: bitsandbytes' own pure-torch
dequantizer, ``backends.default.ops._dequantize_4bit_compute``, + matmul — what every CPU
computes alike). ``QCONVERT_BNB_CPU_REPACK`` = ``auto`` | ``on`` | ``off`` picks between the
first two; ``on`` needs the instruction set (the fused kernel is the only reader of that
layout). :func:`load_pipeline_on_cpu` loads a pipeline and does both steps.
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import DeviceError, UsageError

REPACK_ENV = "QCONVERT_BNB_CPU_REPACK"
REPACK_MODES = ("auto", "on", "off")
_REPACK_ROW_TILE = 32  # _convert_weight_packed_for_cpu's block_n: output rows per tile

_QUANTIZERS = ("BnB4BitDiffusersQuantizer", "BnB8BitDiffusersQuantizer")


def _validate_environment(self: Any, *args: Any, **kwargs: Any) -> None:
    return None


def _update_device_map(self: Any, device_map: Any) -> dict[str, str]:
    return {"": "cpu"}


@contextmanager
def allow_bnb_on_cpu() -> Iterator[None]:
    """Temporarily let diffusers quantize/load bitsandbytes models on the CPU."""
    from diffusers.quantizers import bitsandbytes as dq

    saved: list[tuple[type, str, Any]] = []
    try:
        for cls_name in _QUANTIZERS:
            cls = getattr(dq, cls_name)
            for attr, repl in (
                ("validate_environment", _validate_environment),
                ("update_device_map", _update_device_map),
            ):
                # Remember the class's own attribute (not an inherited one) so that exit
                # restores exactly the previous state.
                saved.append((cls, attr, cls.__dict__.get(attr, _MISSING)))
                setattr(cls, attr, repl)
        yield
    finally:
        for cls, attr, old in reversed(saved):
            if old is _MISSING:
                delattr(cls, attr)
            else:
                setattr(cls, attr, old)


_MISSING = object()


# --- the AVX512-BF16 repack path ----------------------------------------------------------


@dataclass(frozen=True)
class RepackPlan:
    """The CPU path :func:`configure_cpu_repack` gave each 4-bit layer, counted."""

    mode: str
    repacked: int  # bitsandbytes' fused AVX512-BF16 kernel on repacked weights
    dequantize: int  # bitsandbytes' C dequantize + matmul
    reference: int  # narrow layers: bitsandbytes' pure-torch dequantizer + matmul


def cpu_has_repack_kernel() -> bool:
    """True when bitsandbytes runs its AVX512-BF16 repacked 4-bit kernel on this CPU."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def can_repack(shape: Any, blocksize: int) -> bool:
    """Whether bitsandbytes' CPU kernels handle a 4-bit weight of ``shape`` = (out, in).

    absmax holds one value per block of the flattened weight; the CPU kernels read it per row,
    which needs whole blocks per row, and the repack tiles rows by 32.
    """
    out_features, in_features = (int(d) for d in shape)
    return in_features >= blocksize and in_features % blocksize == 0 and out_features % _REPACK_ROW_TILE == 0


def repack_mode(mode: str | None = None) -> str:
    """``mode``, else ``$QCONVERT_BNB_CPU_REPACK``, else ``auto``; checked against the CPU."""
    mode = (mode or os.environ.get(REPACK_ENV) or "auto").strip().lower()
    if mode not in REPACK_MODES:
        raise UsageError(f"{REPACK_ENV}={mode!r} is not a repack mode", hint=f"use one of: {', '.join(REPACK_MODES)}")
    if mode == "on" and not cpu_has_repack_kernel():
        raise DeviceError(
            "bitsandbytes' repacked CPU kernel needs a CPU with AVX512-BF16, and this one has none",
            hint=f"use {REPACK_ENV}=auto or off",
        )
    return mode


def _reference_forward(layer: Any, x: Any) -> Any:
    """``Linear4bit.forward`` through bitsandbytes' block-by-block pure-torch dequantizer."""
    import torch
    from bitsandbytes.backends.default import ops
    from bitsandbytes.functional import dequantize_blockwise

    # bitsandbytes wraps it in torch.compile (one recompilation per shape, and a C compiler
    # for inductor): the function itself is the reference.
    dequantize = getattr(ops._dequantize_4bit_compute, "__wrapped__", ops._dequantize_4bit_compute)

    if not layer.compute_type_is_set:  # as Linear4bit.forward: compute in the input's dtype
        layer.set_compute_type(x)
        layer.compute_type_is_set = True
    dtype = layer.compute_dtype or x.dtype
    state = layer.weight.quant_state
    absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    data = layer.weight.data.view(torch.uint8).reshape(-1)
    weight = dequantize(data, absmax.float(), state.code, state.blocksize, state.shape, dtype)
    bias = None if layer.bias is None else layer.bias.to(dtype)
    return torch.nn.functional.linear(x.to(dtype), weight, bias).to(x.dtype)


def configure_cpu_repack(model: Any, mode: str | None = None) -> RepackPlan:
    """Choose bitsandbytes' CPU path for every ``Linear4bit`` of ``model`` (before its first forward).

    Narrow layers always take the reference path. Wide ones: ``auto`` the repacked kernel
    where the CPU has it, ``on`` the repacked kernel, ``off`` the C dequantize path.
    """
    from bitsandbytes.nn import Linear4bit

    mode = repack_mode(mode)
    wanted = cpu_has_repack_kernel() if mode == "auto" else mode == "on"
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for module in layers:
        state = module.weight.quant_state
        fits = can_repack(state.shape, state.blocksize)
        module.support_avx512bf16_for_cpu = wanted and fits
        module.__dict__.pop("forward", None)  # a previous call's reference path
        if not fits:
            module.forward = types.MethodType(_reference_forward, module)
    return RepackPlan(mode, **_count_paths(layers))


def _count_paths(layers: list[Any]) -> dict[str, int]:
    """Layers per CPU path, read from what :func:`configure_cpu_repack` set on each."""
    counts = {"repacked": 0, "dequantize": 0, "reference": 0}
    for m in layers:
        counts["reference" if "forward" in m.__dict__ else "repacked" if m.support_avx512bf16_for_cpu else "dequantize"] += 1
    return counts


def describe_cpu_paths(pipe: Any) -> dict[str, Any]:
    """How many 4-bit layers of a loaded pipeline take each CPU path (for validation.json)."""
    import torch
    from bitsandbytes.nn import Linear4bit

    layers = [m for c in pipe.components.values() if isinstance(c, torch.nn.Module)
              for m in c.modules() if isinstance(m, Linear4bit)]  # fmt: skip
    return {"avx512_bf16": cpu_has_repack_kernel(), "layers": _count_paths(layers)}


def load_pipeline_on_cpu(path_or_repo_id: Any, dtype: Any = None, *, repack: str | None = None, **kwargs: Any) -> Any:
    """``from_pretrained`` of a bitsandbytes pipeline on a CPU-only machine (its ``model_index.json``
    names the pipeline class, as for ``DiffusionPipeline.from_pretrained``).

    Lifts diffusers' GPU-only check while loading, then picks bitsandbytes' CPU path per layer
    (:func:`configure_cpu_repack`). ``kwargs`` go to ``from_pretrained``.
    """
    import torch
    from diffusers import DiffusionPipeline

    with allow_bnb_on_cpu():
        pipe = DiffusionPipeline.from_pretrained(path_or_repo_id, dtype=dtype or torch.bfloat16, **kwargs)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            configure_cpu_repack(component, repack)
    return pipe
