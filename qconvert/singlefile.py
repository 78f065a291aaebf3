"""Single-file checkpoints: what the keys of one ``.safetensors`` file hold, and how to read them.

Layouts seen in the wild (key names checked against ComfyUI's save code, Comfy-Org/ComfyUI
a125cd84, ``comfy/supported_models_base.py``, ``comfy/supported_models.py``, ``comfy/sd1_clip.py``):

* **BFL**: the transformer alone, with Black Forest Labs' names (``flux1-dev.safetensors``);
* **ComfyUI / Forge**: the transformer under ``model.diffusion_model.``
  (``BASE.process_unet_state_dict_for_saving``);
* **all-in-one** (ComfyUI's ``CheckpointSave``): also the text encoders under
  ``text_encoders.<name>.transformer.`` (``Flux.text_encoder_key_prefix``; models that keep
  ``BASE``'s, Chroma among them, save ``cond_stage_model.``), with ``<name>`` ``t5xxl`` and
  ``clip_l`` (``flux_clip``'s attributes; ``.transformer.`` is ``SDClipModel``'s) and the
  module names of transformers' ``T5EncoderModel`` / ``CLIPTextModel`` inside; and the VAE
  under ``vae.`` (``BASE``: ``first_stage_model.``) in the original (LDM) layout, which
  diffusers' own ``convert_ldm_vae_checkpoint`` maps to ``AutoencoderKL``'s names.

**Float8** weights (``F8_E4M3``, ``F8_E5M2``) are read upcast (see :func:`upcast`), so no
backend ever sees float8. ComfyUI's *scaled* fp8 (``comfy/ops.py`` ``scaled_fp8_ops``) gives
every Linear ``X`` a float32 per-tensor ``X.scale_weight`` (the true weight is
``X.weight * X.scale_weight``), may give it an ``X.scale_input`` (only for its fp8 matmul)
and marks the model with an empty ``scaled_fp8`` tensor whose dtype names the format
(``comfy/model_detection.py`` pops it): the scales are applied, the rest is ignored.

This module imports nothing of qconvert's sources (they import it): it works on header
entries (``key -> (dtype, shape)``) and on plain paths.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CorruptCheckpoint, NotAFluxModel, opt
from .families.flux import _BFL_PREFIXES

# role -> the key prefixes ComfyUI saves it under (see the module docstring)
ROLE_PREFIXES: dict[str, tuple[str, ...]] = {
    "transformer": _BFL_PREFIXES,
    "t5": ("text_encoders.t5xxl.transformer.", "cond_stage_model.t5xxl.transformer."),
    "clip_l": ("text_encoders.clip_l.transformer.", "cond_stage_model.clip_l.transformer."),
    "vae": ("vae.", "first_stage_model."),
}
# ComfyUI's bookkeeping, not weights: SDClipModel's logit_scale, the scaled-fp8 marker and
# scale_input (used only by its fp8 matmul; the weight's value does not depend on it).
_IGNORED = re.compile(r"^(?:(?:text_encoders|cond_stage_model)\.\w+\.logit_scale|.*scaled_fp8|.*\.scale_input)$")
_SCALE = ".scale_weight"
FLOAT8 = {"F8_E4M3": "e4m3fn", "F8_E5M2": "e5m2"}
# what float8 weights are presented (and read) as: FLUX.1's and Chroma's compute dtype
UPCAST_DTYPE = "BF16"
# Tensors a text-encoder part may carry that the diffusers component has no place for:
# ComfyUI's CLIPTextModel keeps a text_projection that FluxPipeline's CLIPTextModel lacks (Flux
# uses the unprojected pooled output); position_ids are a buffer transformers rebuilds.
_DROPPABLE = {"text_projection.weight", "text_model.embeddings.position_ids", "embeddings.position_ids"}
DERIVED_VERSION = 1  # bump when what derived_pipeline writes changes


@dataclass(frozen=True)
class Layout:
    """The parts of one checkpoint file."""

    parts: dict[str, dict[str, str]]  # role -> {name inside the part: key in the file}
    scales: dict[str, str] = field(default_factory=dict)  # weight key -> its scale_weight key
    float8: str | None = None  # "e4m3fn" / "e5m2" when any weight is stored in float8
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # file key -> shape

    @property
    def transformer(self) -> dict[str, str]:
        return self.parts.get("transformer", {})

    @property
    def embedded(self) -> tuple[str, ...]:
        """The roles besides the transformer that the file carries (all-in-one files)."""
        return tuple(r for r in ROLE_PREFIXES if r != "transformer" and r in self.parts)


def split_checkpoint(entries: dict[str, tuple[str, tuple[int, ...]]], label: str) -> Layout:
    """Sort a file's keys into parts by ComfyUI's prefixes (a file without any is a BFL transformer)."""
    parts: dict[str, dict[str, str]] = {}
    scales: dict[str, str] = {}
    loose: list[str] = []
    for key in entries:
        if _IGNORED.match(key):
            continue
        if key.endswith(_SCALE):
            scales[key[: -len(_SCALE)] + ".weight"] = key
            continue
        role, prefix = _role_of(key)
        if role is None:
            loose.append(key)
        else:
            parts.setdefault(role, {})[key[len(prefix) :]] = key
    if loose and parts:
        raise NotAFluxModel(f"{label}: tensor {loose[0]} is under none of the prefixes of a ComfyUI checkpoint",
                            hint="pass a BFL, ComfyUI (model.diffusion_model.) or all-in-one checkpoint")  # fmt: skip
    if loose:
        parts["transformer"] = {k: k for k in loose}
    _check_scales(entries, scales, label)
    kinds = sorted({FLOAT8[d] for d, _ in entries.values() if d in FLOAT8})
    return Layout(parts, scales, ",".join(kinds) or None, {k: tuple(s) for k, (_, s) in entries.items()})


def _role_of(key: str) -> tuple[str | None, str]:
    for role, prefixes in ROLE_PREFIXES.items():
        for p in prefixes:
            if key.startswith(p):
                return role, p
    return None, ""


def _check_scales(entries: dict[str, tuple[str, tuple[int, ...]]], scales: dict[str, str], label: str) -> None:
    for weight, scale in scales.items():
        if weight not in entries:
            raise CorruptCheckpoint(f"{label}: {scale} scales no tensor ({weight} is missing)", hint="re-download or re-export it")
        shape = entries[scale][1]
        if len(shape) > 1 or (shape and shape[0] != 1):
            raise NotAFluxModel(f"{label}: {scale} has shape {list(shape)}; qconvert reads per-tensor fp8 scales only",
                                hint="convert from the BF16 checkpoint")  # fmt: skip


def presented_dtype(dtype: str) -> str:
    """The dtype a stored tensor is read as (float8: upcast)."""
    return UPCAST_DTYPE if dtype in FLOAT8 else dtype


def upcast(t: Any, scale: Any | None, dtype: Any) -> Any:
    """A float8 (or ComfyUI-scaled) weight as ``dtype``.

    float8 -> float32 is exact (every e4m3fn/e5m2 value is a float32), and so is float32 ->
    bfloat16 for an unscaled float8 value (3 or 2 mantissa bits, exponents inside bfloat16's
    range): an unscaled file is read losslessly. With a scale, the product is taken in float32
    (one rounding to 24 bits) before the one rounding to ``dtype`` -- closer to
    ``weight * scale`` than ComfyUI's own bfloat16 product of the bfloat16-rounded scale.
    """
    import torch

    x = t.to(torch.float32)
    if scale is not None:
        x = x * scale.to(torch.float32).reshape(())
    return x.to(dtype)


# --- all-in-one parts: the base's components, filled from the file ---------------------------


@dataclass(frozen=True)
class PartPlan:
    """One component of ``--base`` whose weights come from the file instead."""

    component: str
    role: str
    base_folder: Path  # supplies config.json and whatever else is not a weight
    weight_name: str  # "model" (transformers) or "diffusion_pytorch_model" (diffusers)
    keys: dict[str, str]  # component tensor name -> key in the file (VAE: LDM name -> key)
    config: dict[str, Any]


def role_components(family: Any) -> dict[str, str]:
    """role -> the component of ``family`` it fills: T5, the CLIP encoder (the other text
    encoder, where the family has one) and the VAE."""
    others = [c for c in family.weight_components if c not in ("transformer", "vae", family.t5())]
    out = {"t5": family.t5(), "vae": "vae"}
    if others:
        out["clip_l"] = others[0]
    return out


def plan_parts(layout: Layout, family: Any, base: dict[str, Any], label: str) -> list[PartPlan]:
    """What each embedded part replaces in the base pipeline (``base``: component name ->
    :class:`~qconvert.sources.Component`), with its key set checked against the base's."""
    roles = role_components(family)
    plans = []
    for role in layout.embedded:
        if role not in roles:
            raise NotAFluxModel(f"{label} carries a {role} text encoder, which a {family.label} pipeline has none of",
                                hint=f"pass a {opt('base')} of the file's family")  # fmt: skip
        comp = base[roles[role]]
        part = layout.parts[role]
        want = {n: t.shape for n, t in comp.tensors.items()}
        if role == "vae":
            keys = dict(part)
            _check_vae(layout, keys, want, comp.config, label)
        else:
            keys = _encoder_keys(part, want, label, role)
        weight_name = "model" if comp.library == "transformers" else "diffusion_pytorch_model"
        plans.append(PartPlan(comp.name, role, Path(comp.folder), weight_name, keys, dict(comp.config)))
    return plans


def _check_vae(layout: Layout, keys: dict[str, str], want: dict[str, tuple[int, ...]], config: dict[str, Any], label: str) -> None:
    """Run diffusers' converter on shapes alone (meta tensors): the names and shapes it gives
    must be the base VAE's, before anything is read."""
    import torch

    shapes = {name: layout.shapes[key] for name, key in keys.items()}
    got = {k: tuple(v.shape) for k, v in _convert_vae({n: torch.empty(s, device="meta") for n, s in shapes.items()}, config).items()}
    if got != {k: tuple(v) for k, v in want.items()}:
        diff = sorted(set(got) ^ set(want)) or sorted(k for k in got if got[k] != tuple(want[k]))
        raise NotAFluxModel(f"{label}: its VAE does not match {opt('base')}'s ({diff[0]})",
                            hint=f"pass a {opt('base')} whose VAE has the file's shape")  # fmt: skip


def _encoder_keys(part: dict[str, str], want: dict[str, tuple[int, ...]], label: str, role: str) -> dict[str, str]:
    """Base tensor name -> file key for a text encoder (ComfyUI keeps transformers' module
    names; with or without CLIP's ``text_model.``; T5's tied ``encoder.embed_tokens`` from ``shared``)."""
    out: dict[str, str] = {}
    for name in want:
        bare = name.removeprefix("text_model.")
        for cand in (name, bare, "text_model." + bare) + (("shared.weight",) if name == "encoder.embed_tokens.weight" else ()):
            if cand in part:
                out[name] = part[cand]
                break
        else:
            raise NotAFluxModel(f"{label}: its {role} has no tensor {name}, which {opt('base')}'s encoder has",
                                hint=f"pass a {opt('base')} whose text encoders match the file's")  # fmt: skip
    used = {k for k, v in part.items() if v in out.values()}
    extra = sorted(k for k in set(part) - used if k not in _DROPPABLE and k != "encoder.embed_tokens.weight")
    if extra:
        raise NotAFluxModel(f"{label}: its {role} has a tensor {extra[0]} that {opt('base')}'s encoder has no place for",
                            hint=f"pass a {opt('base')} whose text encoders match the file's")  # fmt: skip
    return out


def derived_pipeline(file: Path, key: str, base_root: Path, plans: list[PartPlan], cache: Path, scales: dict[str, str]) -> Path:
    """A pipeline folder: ``--base``'s files (linked), with the components in ``plans`` written
    from ``file``. Built once per (file, base) ``key`` into ``cache``; written whole, then renamed."""
    target = cache / "single-file" / f"{key}-v{DERIVED_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        replaced = {p.component for p in plans}
        _link_base(base_root, tmp, replaced)
        for plan in plans:
            _write_part(file, plan, tmp / plan.component, scales)
        if (target / "model_index.json").is_file():  # another process finished it first
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _link_base(base_root: Path, dst: Path, replaced: set[str]) -> None:
    """Symlink every file of the base (the weights of replaced components excepted)."""
    for p in sorted(base_root.rglob("*")):
        rel = p.relative_to(base_root)
        if not p.is_file() or ".cache" in rel.parts:
            continue
        if rel.parts[0] in replaced and (p.name.endswith(".safetensors") or p.name.endswith(".safetensors.index.json")):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(p.resolve(), dst / rel)


def _write_part(file: Path, plan: PartPlan, folder: Path, scales: dict[str, str]) -> None:
    from safetensors import safe_open

    from .convert.writers import ShardedSafetensorsWriter

    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardedSafetensorsWriter(folder, plan.weight_name, max_shard_bytes=5 * 10**9)
    with safe_open(str(file), framework="pt") as fh:
        read = lambda key: _read(fh, key, scales)  # noqa: E731
        if plan.role == "vae":
            state = _convert_vae({name: read(key) for name, key in plan.keys.items()}, plan.config)
            for name in sorted(state):
                writer.add_group([(name, state[name].contiguous())])
        else:
            for name in sorted(plan.keys):  # one tensor in memory at a time
                writer.add_group([(name, read(plan.keys[name]))])
    writer.finish({"format": "pt"})


def _read(fh: Any, key: str, scales: dict[str, str]) -> Any:
    import torch

    t = fh.get_tensor(key)
    scale = fh.get_tensor(scales[key]) if key in scales else None
    if scale is not None or t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return upcast(t, scale, torch.bfloat16 if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t.dtype)
    return t


def _convert_vae(ldm: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """An LDM-layout VAE (``vae.`` stripped) in AutoencoderKL's names, by diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return {k: v for k, v in convert_ldm_vae_checkpoint(ldm, config).items() if v is not None}


def describe_derived(plans: list[PartPlan]) -> str:
    """For messages: which components came from the file."""
    return ", ".join(p.component for p in plans)


def json_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (the derived folder's name)."""
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
