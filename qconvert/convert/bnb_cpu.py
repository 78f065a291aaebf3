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
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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
