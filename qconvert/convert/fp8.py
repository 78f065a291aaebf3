"""FP8 storage backend: float8 weights in three layouts (``layout`` option).

* ``diffusers`` (default): a pipeline folder whose transformer holds, in float8, exactly the
  tensors diffusers' ``enable_layerwise_casting`` stores in float8 and, in the source dtype,
  the ones it skips. Which those are is asked of diffusers itself: the transformer is built on
  the meta device from its config, ``enable_layerwise_casting(storage_dtype=float8)`` is
  applied (its skip patterns: ``pos_embed``, ``patch_embed``, ``norm``, ``^proj_in$``,
  ``^proj_out$`` + the model's ``_skip_layerwise_casting_patterns`` and
  ``_keep_in_fp32_modules``, on Linear/Conv/Embedding leaves only), and the names of the
  parameters it turned float8 are the plan's casts (weights *and* biases of those layers; the
  modulation Linears ``norm1.linear`` ... match ``norm`` and stay 16-bit). A cast is torch's
  elementwise ``.to(float8)``, what the hook's ``module.to(dtype=storage_dtype)`` does, so the
  bytes equal the library's own cast of the source model. No ``quantization_config``:
  ``from_pretrained`` upcasts float8 to the requested dtype; the card builds the model on the
  meta device, applies layerwise casting and assigns the stored tensors, so the float8 weights
  stay float8 in memory. The T5 encoder is copied: transformers' T5 has no
  ``enable_layerwise_casting``; diffusers' ``apply_layerwise_casting`` on it crashes with the
  default patterns (T5's ``wo`` check casts activations to the float8 storage dtype), and with
  ``wo`` skipped the pipeline reads ``text_encoder_2.dtype`` = float8 after the first call and
  fails to draw its latents.
* ``bfl``: BFL's ``fp8r`` single file (Black Forest Labs key names) that diffusers'
  ``BFLQuantizationConfig`` loads through ``from_single_file``: per Linear ``<m>``,
  ``<m>.weight`` float8_e4m3fn ``[N, K]`` and ``<m>.weight_scale`` float32 ``[N]`` with
  ``weight ~= float(fp8) * weight_scale[:, None]``, ``weight_scale = max(amax(|row|) / 448,
  1e-12)``, values ``clamp(w / scale, -448, 448)`` cast to e4m3fn (diffusers'
  ``quantizers/bfl/utils.quantize_fp8r``, from float32). e4m3fn only: the loader refuses
  other weight dtypes.
* ``comfyui``: the single file ComfyUI's ``UNETLoader`` (Load Diffusion Model) reads: BFL key
  names, the weights cast to float8 without scales, as the published ``flux1-dev-fp8`` files
  are (ComfyUI picks the model's weight dtype as the most common one by elements and casts each
  layer to the compute dtype in its forward; a ``scaled_fp8`` marker with per-layer
  ``scale_weight`` is ComfyUI's other, scaled, format, not written here).

In both single files the Linear weights of the double and single blocks (modulation included)
are float8; the input/output layers (``img_in``, ``txt_in``, ``time_in``, ``vector_in``,
``guidance_in``, ``final_layer``: ~1% of FLUX.1-dev) and every 1-D tensor (biases, norm
scales) keep the source dtype. (Published plain-fp8 files cast those too; ComfyUI reads
either. On the slim width-3072 model, quantizing the in/out layers raised the fp8r forward
error from 0.004 to 0.037.) diffusers' converter of BFL names assumes width 3072, so the
single files load in diffusers (and validate) only at full width.

Every encoding is elementwise or per row: tensors are streamed in row chunks.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, ClassVar

from ..errors import InputError, NotAFluxModel, UsageError, opt
from ..families import flux
from ..plan import CAST, KEEP, QUANTIZE, ComponentPlan, Policy, Rule, TensorPlan
from ..sources import Component, FileSegment, SourceTensor
from .base import PIPELINE_FOLDER, SINGLE_FILES, Backend, ModelFacts, ProgressFn, check_bfl_width
from .schedule import EncodedChunk, Scheduler, rows_per_chunk

LAYOUTS = ("diffusers", "bfl", "comfyui")
# scheme -> (torch dtype name, safetensors dtype)
FLOAT8 = {"e4m3fn": ("float8_e4m3fn", "F8_E4M3"), "e5m2": ("float8_e5m2", "F8_E5M2")}
FP8R = "fp8r"  # the plan's target of BFL's per-row scaled layout
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Output names (BFL) kept in the source dtype in the single files.
IN_OUT_LAYERS = r"^(img_in|txt_in|time_in|vector_in|guidance_in|final_layer)\."
_FILE_SUFFIX = {"bfl": "fp8r", "comfyui": "fp8-{scheme}"}


def layerwise_cast_names(comp: Component, storage: str) -> set[str]:
    """Parameters diffusers' ``enable_layerwise_casting`` stores in ``storage`` (a torch dtype
    name), asked of diffusers on the component's model built on the meta device."""
    import diffusers
    import torch

    cls = getattr(diffusers, comp.class_name)
    with torch.device("meta"):
        model = cls.from_config(comp.config)
    dtype = getattr(torch, storage)
    model.enable_layerwise_casting(storage_dtype=dtype, compute_dtype=torch.bfloat16)
    return {name for name, t in model.state_dict().items() if t.dtype == dtype}


def quantize_fp8r(rows: Any) -> tuple[Any, Any]:
    """Rows ``[n, K]`` -> (float8_e4m3fn ``[n, K]``, float32 per-row scales ``[n]``): BFL's
    fp8r convention, step for step as diffusers' ``quantize_fp8r`` (compared in the tests)."""
    import torch

    w = rows.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def bfl_tensors(comp: Component, facts: ModelFacts | None) -> dict[str, tuple[SourceTensor, bool]]:
    """The transformer as BFL names it: output name -> (lazy tensor over the diffusers source's
    rows, is a Linear weight), in natural name order (the map of ``families.flux``)."""
    from .gguf import _merge_segments, _natural_key, _slice_segments

    linear = facts.linear_weights if facts else set()
    try:
        recipes = flux.diffusers_to_bfl({n: t.shape for n, t in comp.tensors.items()})
    except KeyError as e:
        raise NotAFluxModel(f"transformer: {e.args[0]}") from None
    headers: dict[Path, dict[str, Any]] = {}
    out: dict[str, tuple[SourceTensor, bool]] = {}
    for bfl in sorted(recipes, key=_natural_key):
        parts = [comp.tensors[s.key] for s in recipes[bfl]]
        if len({p.dtype for p in parts}) != 1:
            raise InputError(f"transformer: the parts of {bfl} have different dtypes {sorted({p.dtype for p in parts})}")
        segs: list[FileSegment] = []
        rows = 0
        for s, t in zip(recipes[bfl], parts):
            lo, hi = s.start or 0, t.shape[0] if s.stop is None else s.stop
            segs.extend(_slice_segments(t, lo, hi, headers))
            rows += hi - lo
        tensor = SourceTensor(bfl, (rows, *parts[0].shape[1:]), parts[0].dtype, tuple(_merge_segments(segs, headers)))
        out[bfl] = (tensor, all(s.key in linear for s in recipes[bfl]))
    return out


def _layout(options: dict[str, Any]) -> str:
    return str(options.get("layout") or "diffusers")


class FP8Backend(Backend):
    name = "fp8"
    schemes: ClassVar[dict[str, str]] = {
        "e4m3fn": "float8 e4m3fn weights: diffusers layerwise-casting storage, BFL fp8r (per-row scales) or ComfyUI fp8",
        "e5m2": "float8 e5m2 weights (layouts diffusers and comfyui; BFL's fp8r is e4m3fn only)",
    }
    accepted_options = ("jobs", "layout", "max_shard_size")
    cli_flags = ("jobs", "layout", "max_shard_size")
    extra = "fp8"
    import_names = ("diffusers",)
    pip_package = "diffusers"
    version_packages = ("diffusers",)
    warm_up_modules = ("diffusers.hooks.layerwise_casting", "diffusers.quantizers.bfl.bfl_quantizer")
    container = PIPELINE_FOLDER  # layout diffusers; bfl and comfyui write single files (set per instance)
    # transformers' T5 cannot be stored for layerwise casting (module docstring): it is copied
    supported_roles: ClassVar[tuple[str, ...]] = ("transformer",)
    card_loader = "`{transformer}` with diffusers' layerwise casting, or as a single file"

    def __init__(self, scheme: str, **options: Any) -> None:
        super().__init__(scheme, **options)
        self.layout = _layout(options)
        if self.layout not in LAYOUTS:
            raise UsageError(f"unknown fp8 layout {self.layout!r}", hint=f"choose one of: {', '.join(LAYOUTS)}")
        if self.layout == "bfl" and scheme != "e4m3fn":
            raise UsageError(
                f"BFL's fp8r layout stores float8_e4m3fn only (diffusers' BFL loader refuses {scheme})",
                hint=f"pass {opt('scheme', 'e4m3fn')}, or {opt('layout', 'comfyui')} / {opt('layout', 'diffusers')} for {scheme}",
            )
        if self.layout != "diffusers" and options.get("max_shard_size") is not None:
            raise UsageError(f"the {self.layout} layout is one file: it has no shards",
                             hint=f"drop {opt('max_shard_size')}, or pass {opt('layout', 'diffusers')}")  # fmt: skip
        self.container = PIPELINE_FOLDER if self.layout == "diffusers" else SINGLE_FILES
        self.torch_dtype, self.st_dtype = FLOAT8[scheme]
        self._cast: set[str] = set()

    # --- planning --------------------------------------------------------------------------

    def plan_component(self, comp: Component, facts: ModelFacts | None) -> ComponentPlan:
        if self.layout == "diffusers":
            self._cast = layerwise_cast_names(comp, self.torch_dtype)
        return super().plan_component(comp, facts)

    def policy(self, component: str, facts: ModelFacts | None) -> Policy:
        if self.layout == "diffusers":
            names = "|".join(re.escape(n) for n in sorted(self._cast)) or "(?!)"
            return Policy(
                (Rule(f"^(?:{names})$", CAST, self.st_dtype, reason="diffusers' layerwise casting stores it in float8"),),
                default=Rule(r"", KEEP, reason="skipped by diffusers' layerwise casting: source dtype"),
            )
        target = (QUANTIZE, FP8R) if self.layout == "bfl" else (CAST, self.st_dtype)
        return Policy(
            (
                Rule(IN_OUT_LAYERS, KEEP, reason="input/output layer: source dtype"),
                Rule(r"\.weight$", *target, when=("linear", "2d"), reason="block Linear weight"),
            ),
            default=Rule(r"", KEEP, reason="bias or norm scale: source dtype"),
        )

    def tensor_sources(self, comp: Component, facts: ModelFacts | None) -> dict[str, tuple[SourceTensor, bool]]:
        if self.layout == "diffusers":
            return super().tensor_sources(comp, facts)
        return bfl_tensors(comp, facts)

    def output_name(self, component: str, key: str) -> str | None:
        return None if self.layout == "diffusers" else key  # single files: keyed by the BFL name

    def estimate_bytes(self, rule: Rule, tensor: SourceTensor) -> int:
        if rule.action == QUANTIZE:  # fp8r: one byte per value + a float32 scale per row
            return tensor.numel + 4 * tensor.shape[0]
        return super().estimate_bytes(rule, tensor)

    # --- the codec: elementwise casts and per-row scales, so any rows ----------------------

    reference_cycles = False  # plain tensors only

    def chunk_rows(self, plan: TensorPlan) -> int | None:
        return rows_per_chunk(plan.shape) if plan.action != KEEP else None

    def encode_chunk(self, component: str, plan: TensorPlan, rows: Any) -> EncodedChunk:
        name = str(plan.out_name or plan.name)
        if plan.action == KEEP:
            return EncodedChunk({name: rows})
        import torch

        if plan.action == CAST:
            return EncodedChunk({name: rows.to(getattr(torch, self.torch_dtype))})
        weight, scale = quantize_fp8r(rows)
        return EncodedChunk({name: weight, name.removesuffix("weight") + "weight_scale": scale})

    # --- single files -------------------------------------------------------------------------

    def file_name(self, family: Any, short: str) -> str:
        return f"{family.gguf_stem('transformer', short)}-{_FILE_SUFFIX[self.layout].format(scheme=self.scheme)}.safetensors"

    def write_output(
        self,
        source: Any,
        plan: Any,
        facts: dict[str, Any],
        tmp: Path,
        scheduler: Scheduler,
        progress: ProgressFn,
        seconds: dict[str, float],
    ) -> dict[str, list[Path]]:
        """One safetensors file of the transformer in BFL names (the rest: the base pipeline)."""
        import contextlib

        from ..output import copy_license_files
        from .gguf import short_name
        from .writers import ShardedSafetensorsWriter

        written: dict[str, list[Path]] = {}
        for cp in plan.components:
            if cp.action != "quantize":
                continue
            t0 = time.perf_counter()
            comp = source.components[cp.name]
            stem = self.file_name(source.family, short_name(source.identity)).removesuffix(".safetensors")
            writer = ShardedSafetensorsWriter(tmp, stem, 1 << 62, header_reserve=4096 + 256 * len(cp.tensors))
            try:
                items = self.planned_sources(comp, facts.get(cp.name), cp)
                with contextlib.closing(scheduler.tensors(self, comp.name, items)) as encoded:
                    for tp, tensors in encoded:
                        writer.add_group(tensors)
                        progress(tp.bytes_in)
                written[cp.name] = writer.finish({"format": "pt"})
            except BaseException:
                writer.abort()
                raise
            seconds[cp.name] = time.perf_counter() - t0
        written["_root"] = copy_license_files(source.root, tmp)
        return written

    # --- cards ---------------------------------------------------------------------------------

    @classmethod
    def card_method(cls, manifest: dict[str, Any]) -> str:
        layout = _layout(manifest.get("options") or {})
        dtype = FLOAT8.get(str(manifest.get("scheme")), ("float8",))[0]
        if layout == "diffusers":
            return (
                f"The transformer's weights are stored in `{dtype}` exactly where diffusers' "
                "`enable_layerwise_casting` stores them (the Linear layers of the blocks and embedders, weights and "
                "biases), and the layers it skips (norms, the modulation `norm*.linear` layers, `proj_out`) keep the "
                "source dtype; the bytes equal diffusers' own cast. Each layer is upcast to the compute dtype for its "
                "forward. The snippet builds the model empty and assigns the stored tensors, so the float8 weights are "
                "never upcast in memory (a plain `from_pretrained` loads too, but upcasts every weight first). The T5 "
                "encoder is the source's (transformers' T5 has no layerwise casting)."
            )
        files = "The file holds only the transformer: the VAE, text encoders, tokenizers and configs come from the base pipeline."
        if layout == "bfl":
            return (
                "Black Forest Labs' `fp8r` single file: BFL tensor names, each Linear weight of the blocks in "
                "`float8_e4m3fn` with a float32 per-row `weight_scale` (weight = fp8 x scale), the input/output layers, "
                "biases and norms in the source dtype. diffusers loads it with `from_single_file` and "
                "`BFLQuantizationConfig` (FP8 matmuls on GPUs with compute capability 8.9+, else dequantized per "
                f"forward). {files}"
            )
        return (
            f"A ComfyUI diffusion-model file: BFL tensor names, the Linear weights of the blocks cast to `{dtype}` "
            "without scales (as ComfyUI's fp8 Flux checkpoints are), the input/output layers, biases and norms in the "
            "source dtype. In ComfyUI put it in `models/diffusion_models` and load it with *Load Diffusion Model* "
            "(`UNETLoader`); diffusers reads it with `from_single_file` (the snippet), which upcasts the weights, and "
            "`enable_layerwise_casting` stores the blocks' layers in float8 again. "
            f"{files}"
        )

    @classmethod
    def usage_lines(cls, facts: Any) -> list[str]:
        layout = _layout(facts.manifest.get("options") or {})
        if layout == "diffusers":
            return _layerwise_usage(facts)
        return _single_file_usage(facts, bfl=layout == "bfl")

    # --- validation: load as the card does -------------------------------------------------

    @classmethod
    def check_loadable(cls, options: dict[str, Any], transformer_config: dict[str, Any]) -> None:
        if _layout(options) != "diffusers":
            check_bfl_width(transformer_config, "BFL-named single files")

    @classmethod
    def load_for_validation(cls, out: Path, manifest: dict[str, Any], ref_root: Path, *, dtype: Any, device: str) -> Any:
        import torch

        from ..manifest import manifest_family

        fam = manifest_family(manifest)
        options = manifest.get("options") or {}
        if _layout(options) == "diffusers":
            parts = {"transformer": load_layerwise_transformer(fam.transformer_type(), Path(out), dtype=dtype,
                                                               storage=FLOAT8[manifest["scheme"]][0])}  # fmt: skip
            pipe = fam.pipeline_type().from_pretrained(out, dtype=dtype, **parts)
            return pipe if device == "cpu" else pipe.to(device)
        tcfg = json.loads((Path(ref_root) / "transformer" / "config.json").read_text())
        cls.check_loadable(options, tcfg)
        files = sorted(Path(out).glob("*.safetensors"))
        if not files:
            raise InputError(f"{out} has no transformer .safetensors file", hint="convert again")
        kwargs: dict[str, Any] = {}
        if _layout(options) == "bfl":
            from diffusers import BFLQuantizationConfig

            kwargs["quantization_config"] = BFLQuantizationConfig(compute_dtype=dtype)
        transformer = fam.transformer_type().from_single_file(
            str(files[0]), config=str(ref_root), subfolder="transformer", dtype=dtype, **kwargs
        )
        if not kwargs:  # comfyui: as the card does, float8 storage again after diffusers' upcast
            transformer.enable_layerwise_casting(storage_dtype=getattr(torch, FLOAT8[manifest["scheme"]][0]),
                                                 compute_dtype=dtype)  # fmt: skip
        pipe = fam.pipeline_type().from_pretrained(ref_root, transformer=transformer, dtype=dtype)
        return pipe if device == "cpu" else pipe.to(device)

    @classmethod
    def validation_environment(cls, pipe: Any, device: str) -> dict[str, Any]:
        import torch

        counts: dict[str, int] = {}
        for t in pipe.transformer.state_dict().values():
            counts[str(t.dtype).replace("torch.", "")] = counts.get(str(t.dtype).replace("torch.", ""), 0) + t.numel()
        return {"transformer_values_by_dtype": dict(sorted(counts.items())), "torch": torch.__version__}


def load_layerwise_transformer(cls: Any, out: Path, *, dtype: Any, storage: str) -> Any:
    """The card's loading code (:func:`_layerwise_usage`), as a function for validation: built on
    the meta device, layerwise casting on, the stored tensors assigned as they are."""
    import torch
    from safetensors.torch import load_file

    folder = Path(out) / "transformer"
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(folder))
    model.enable_layerwise_casting(storage_dtype=getattr(torch, storage), compute_dtype=dtype)
    state: dict[str, Any] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    model.load_state_dict(state, assign=True)
    return model.eval()


def _layerwise_usage(facts: Any) -> list[str]:
    pipeline, transformer = facts.family.pipeline_class, facts.family.transformer_class
    storage = FLOAT8[facts.scheme][0]
    return [
        "import os",
        "from pathlib import Path",
        "",
        "import torch",
        f"from diffusers import {pipeline}, {transformer}",
        "from huggingface_hub import snapshot_download",
        "from safetensors.torch import load_file",
        "",
        f"repo = {json.dumps(facts.repo)}",
        "path = repo if os.path.isdir(repo) else snapshot_download(repo)",
        f"dtype = torch.{facts.dtype}",
        "# Built empty, layerwise casting on, then the stored tensors assigned as they are: the float8",
        "# weights stay float8 in memory (from_pretrained would upcast them all to dtype first).",
        'folder = Path(path, "transformer")',
        'with torch.device("meta"):',
        f"    transformer = {transformer}.from_config({transformer}.load_config(folder))",
        f"transformer.enable_layerwise_casting(storage_dtype=torch.{storage}, compute_dtype=dtype)",
        "state = {}",
        'for shard in sorted(folder.glob("*.safetensors")):',
        "    state.update(load_file(shard))",
        "transformer.load_state_dict(state, assign=True)",
        "transformer.eval()",
        "",
        f"pipe = {pipeline}.from_pretrained(path, transformer=transformer, dtype=dtype)",
        'pipe.to("cuda" if torch.cuda.is_available() else "cpu")',
    ]


def _single_file_usage(facts: Any, *, bfl: bool) -> list[str]:
    base_imports, base_expr = facts.base_pipeline()
    files = facts.files("transformer")
    if not files:
        raise InputError(f"{facts.out}: qconvert.json lists no transformer .safetensors file", hint="convert again")
    pipeline, transformer = facts.family.pipeline_class, facts.family.transformer_class
    imports = ["import torch", f"from diffusers import {pipeline}, {transformer}" + (", BFLQuantizationConfig" if bfl else "")]
    if facts.repo_id:  # from_single_file takes only huggingface.co URLs: download the file
        imports.append("from huggingface_hub import hf_hub_download")
        path = f"hf_hub_download(repo, {json.dumps(files[0])})"
    else:
        path = f'f"{{repo}}/{files[0]}"'
    lines = imports + base_imports + [
        "",
        f"repo = {json.dumps(facts.repo)}",
        f"base = {base_expr}  # the pipeline that supplies the VAE, text encoders, tokenizers and configs",
        f"dtype = torch.{facts.dtype}",
        f"transformer = {transformer}.from_single_file(",
        f"    {path},",
        "    config=base,",
        '    subfolder="transformer",',
        "    dtype=dtype,",
    ]
    if bfl:
        lines += ["    quantization_config=BFLQuantizationConfig(compute_dtype=dtype),", ")"]
    else:  # diffusers upcasts the file's float8 on load: store it in float8 again, layer by layer
        lines += [")", f"transformer.enable_layerwise_casting(storage_dtype=torch.{FLOAT8[facts.scheme][0]}, compute_dtype=dtype)"]
    return lines + [
        f"pipe = {pipeline}.from_pretrained(base, transformer=transformer, dtype=dtype)",
        'pipe.to("cuda" if torch.cuda.is_available() else "cpu")',
    ]
