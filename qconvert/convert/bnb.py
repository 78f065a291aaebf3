"""bitsandbytes backend: NF4 / FP4 (optionally double-quantized) and LLM.int8, written on CPU.

diffusers refuses to quantize with bitsandbytes without a GPU, so this backend writes the
serialized layout directly, one tensor at a time, with bitsandbytes' own functional
quantizer — the same functions ``Params4bit``/``Int8Params`` call when diffusers or
transformers quantize on the fly:

* 4-bit (``nf4``, ``fp4``; ``-dq`` = double quant): ``q, st =
  bitsandbytes.functional.quantize_4bit(w, quant_type=..., blocksize=64,
  compress_statistics=<double quant>)``; ``<m>.weight = q`` (uint8, shape
  ``((out*in+1)//2, 1)``) and ``<m>.weight.<k> = v`` for every item of
  ``st.as_dict(packed=True)``: ``absmax`` (float32, or uint8 plus ``nested_absmax`` and
  ``nested_quant_map`` with double quant), ``quant_map`` and
  ``quant_state.bitsandbytes__nf4|fp4`` (the JSON of quant_type, blocksize, dtype, shape
  [, nested_blocksize, nested_dtype, nested_offset] as uint8 bytes).
* 8-bit (``int8``): ``CB, SCB, _ = bitsandbytes.functional.int8_vectorwise_quant(w.half())``
  (``Int8Params`` quantizes from float16 whatever the model dtype); ``<m>.weight = CB``
  (int8), ``<m>.SCB`` (float32 per output row), ``<m>.weight_format`` (uint8 scalar 0).

All tensors of one Linear are returned as one group, so they always share a shard.

Which Linears: every ``nn.Linear`` of the model, as diffusers' and transformers' bitsandbytes
quantizers do (for Flux: all of them, x_embedder, proj_out and norm_out.linear included),
except the model class's ``_keep_in_fp32_modules`` (T5: the ``wo`` layers), which both
libraries leave unquantized (option ``quantize_keep_fp32=True`` quantizes them too).
Everything else (biases, norms, embeddings, the ``wo`` layers) is written unquantized.

Checkpoint dtype. 16-bit sources (FLUX.1-dev is bf16) are written in their own dtype: Linear
weights are quantized from it and every other tensor is copied unchanged. A float32 source
(the tiny test pipeline) is first cast to the compute dtype (``--compute-dtype``, default
bfloat16), all of it: what diffusers/transformers hold, and save, when the user loads the
float32 source with ``torch_dtype=<compute dtype>`` and quantizes on the fly. Why:

* the quant_state's ``dtype`` field then reads ``bfloat16``, so ``dequantize_4bit`` yields
  the dtype the matmul runs in, not a transient float32 copy twice the size;
* transformers 5 loads a pre-quantized bnb checkpoint's unquantized tensors in their stored
  dtype whatever ``dtype=`` asks for: a float32 T5 stays float32 under
  ``FluxPipeline.from_pretrained(out, torch_dtype=torch.bfloat16)``, its prompt embeddings
  give float32 latents, and the bf16 VAE then fails ("Input type (float) and bias type
  (c10::BFloat16) should be the same");
* the output equals, tensor for tensor and byte for byte, what
  ``from_pretrained(src, torch_dtype=<compute dtype>, quantization_config=...)`` +
  ``save_pretrained`` writes (checked on CPU for every scheme, transformer and T5).

With ``--compute-dtype float32`` a float32 source stays float32. The ``wo`` layers follow
the libraries: stored in the checkpoint dtype, upcast to float32 only when that is float16
(both libraries upcast ``_keep_in_fp32_modules`` for a float16 load only). For ``int8`` the
compute dtype is not part of the config (8-bit has none), but a float32 source is still cast
to it first (and the weights then to float16, as ``Int8Params`` does).

The ``quantization_config`` written into config.json is ``BitsAndBytesConfig(...).to_dict()``
of diffusers (transformer) or transformers (T5), which is exactly what their own
``save_pretrained`` writes (``quant_method: "bitsandbytes"``, ``_load_in_4bit``,
``bnb_4bit_quant_storage: "uint8"`` ... included). Users load the output on a CUDA machine
with a plain ``FluxPipeline.from_pretrained(out, torch_dtype=torch.bfloat16)``. On a
CPU-only machine diffusers refuses bnb models; qconvert's own validation uses
:func:`qconvert.convert.bnb_cpu.allow_bnb_on_cpu`.

Quantized bytes from bitsandbytes' CPU kernels equal its CUDA kernels for nf4 from 16-bit
sources; fp4, double-quant statistics and int8 can differ in a few values (measured on an H200: dequantization error
ratio qconvert/CUDA 1.0000, ``bench/gpu_check_h200.json``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, ClassVar

from ..errors import UsageError, opt
from ..plan import CAST, KEEP, QUANTIZE, ComponentPlan, Policy, Rule, TensorPlan
from ..sources import Component, SourceTensor
from .base import Backend, ModelFacts
from .schedule import EncodedChunk, rows_per_chunk

BLOCKSIZE = 64  # Params4bit's default; what diffusers/transformers use
NESTED_BLOCKSIZE = 256  # quantize_4bit's blocksize for the double-quantized absmax

# scheme -> (quant_type, double_quant); int8 is not listed
_4BIT = {
    "nf4": ("nf4", False),
    "nf4-dq": ("nf4", True),
    "fp4": ("fp4", False),
    "fp4-dq": ("fp4", True),
}

COMPUTE_DTYPES = {
    "float32": "float32", "fp32": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}  # fmt: skip

_ST_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_TORCH_FROM_ST = {v: k for k, v in _ST_NAMES.items()}
_FLOAT_NAMES = ("F64", "F32", "F16", "BF16")

_LIBRARY = {"transformer": "diffusers", "text_encoder_2": "transformers"}


def parse_compute_dtype(value: Any) -> str:
    """'bf16' -> 'bfloat16'; None -> 'bfloat16'; anything unknown -> UsageError."""
    if value is None:
        return "bfloat16"
    text = str(value).strip().lower().removeprefix("torch.")
    if text not in COMPUTE_DTYPES:
        raise UsageError(
            f"unknown compute dtype {value!r}",
            hint=f"{opt('compute_dtype')} takes float32, float16 or bfloat16 (or fp32, fp16, bf16)",
        )
    return COMPUTE_DTYPES[text]


def _transformers_skips(module: str, patterns: tuple[str, ...]) -> bool:
    """transformers' ``should_convert_module`` negated (quantizers_utils, transformers 5)."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{key}){boundary}", module) or module.endswith(key) for key in patterns)


def _diffusers_skips(module: str, patterns: tuple[str, ...]) -> bool:
    """diffusers' ``_replace_with_bnb_linear`` test for modules_to_not_convert."""
    leaf = module.rsplit(".", 1)[-1]
    return any(leaf == key or key + "." in module or key == module for key in patterns)


class BitsAndBytesBackend(Backend):
    name = "bnb"
    schemes: ClassVar[dict[str, str]] = {
        "nf4": "4-bit NormalFloat (bitsandbytes nf4, QLoRA's NF4), blocks of 64 with float32 scales",
        "nf4-dq": "4-bit NormalFloat with double quantization (bitsandbytes nf4, scales quantized to 8 bit)",
        "fp4": "4-bit float e2m1 (bitsandbytes fp4), blocks of 64 with float32 scales",
        "fp4-dq": "4-bit float with double quantization (bitsandbytes fp4, scales quantized to 8 bit)",
        "int8": "8-bit LLM.int8 (bitsandbytes): int8 weights, per-row float32 scales",
    }
    accepted_options = ("jobs", "max_shard_size", "compute_dtype", "quantize_keep_fp32")
    cli_flags = ("jobs", "compute_dtype", "max_shard_size")
    extra = "bnb"
    import_names = ("bitsandbytes",)
    pip_package = "bitsandbytes"
    version_packages = ("bitsandbytes",)
    warm_up_modules = ("bitsandbytes", "diffusers.quantizers.bitsandbytes.bnb_quantizer")

    def __init__(self, scheme: str, **options: Any) -> None:
        super().__init__(scheme, **options)
        self.compute_dtype = parse_compute_dtype(options.get("compute_dtype"))
        self.quantize_keep_fp32 = bool(options.get("quantize_keep_fp32", False))
        self._library: dict[str, str] = dict(_LIBRARY)

    @property
    def is_4bit(self) -> bool:
        return self.scheme in _4BIT

    # --- planning --------------------------------------------------------------------------

    def plan_component(self, comp: Component, facts: ModelFacts) -> ComponentPlan:
        self._library[comp.name] = comp.library
        cp = super().plan_component(comp, facts)
        # Unquantized float tensors are written in the checkpoint dtype (see the module
        # docstring): a float32 source's are cast to the compute dtype.
        keep_modules = {w.removesuffix(".weight") for w in self.skipped_linears(comp.name, facts)}
        for tp in cp.tensors:
            if tp.action != KEEP or tp.dtype not in _FLOAT_NAMES:
                continue
            target = self.storage_dtype(tp.dtype)
            if target == "F16" and tp.name.rsplit(".", 1)[0] in keep_modules:
                target = "F32"  # _keep_in_fp32_modules: upcast for a float16 load, as the libraries do
            if target != tp.dtype:
                tp.action, tp.target = CAST, target
                tp.bytes_out = self.estimate_bytes(Rule("", CAST, target), comp.tensors[tp.name])
        cp.bytes_out = sum(p.bytes_out for p in cp.tensors)
        return cp

    def storage_dtype(self, source_dtype: str) -> str:
        """Safetensors dtype of the checkpoint: 16-bit sources as they are, else the compute dtype."""
        return source_dtype if source_dtype in ("BF16", "F16") else _ST_NAMES[self.compute_dtype]

    def skipped_linears(self, component: str, facts: ModelFacts) -> set[str]:
        """Linear weights the libraries leave unquantized (``_keep_in_fp32_modules``)."""
        keep = tuple(facts.keep_in_fp32_modules)
        if self.quantize_keep_fp32 or not keep:
            return set()
        test = _diffusers_skips if self._library.get(component) == "diffusers" else _transformers_skips
        return {w for w in facts.linear_weights if test(w.removesuffix(".weight"), keep)}

    def policy(self, component: str, facts: ModelFacts) -> Policy:
        rules = []
        skipped = self.skipped_linears(component, facts)
        if skipped:
            names = "|".join(re.escape(n) for n in sorted(skipped))
            rules.append(Rule(rf"^(?:{names})$", KEEP, reason="_keep_in_fp32_modules: not quantized"))
        rules.append(Rule(r"\.weight$", QUANTIZE, self.scheme, when=("linear",)))
        return Policy(tuple(rules))

    def quant_dtype_name(self, source_dtype: str) -> str:
        """The torch dtype name a weight of safetensors dtype ``source_dtype`` is quantized from."""
        return _TORCH_FROM_ST[self.storage_dtype(source_dtype)]

    def estimate_bytes(self, rule: Rule, tensor: SourceTensor) -> int:
        if rule.action != QUANTIZE:
            return super().estimate_bytes(rule, tensor)
        n = tensor.numel
        if not self.is_4bit:
            return n + 4 * tensor.shape[0] + 1  # weight int8 + SCB float32 + weight_format
        quant_type, double = _4BIT[self.scheme]
        blocks = -(-n // BLOCKSIZE)
        size = (n + 1) // 2 + 16 * 4  # packed weight + quant_map
        meta: dict[str, Any] = {
            "quant_type": quant_type,
            "blocksize": BLOCKSIZE,
            "dtype": self.quant_dtype_name(tensor.dtype),
            "shape": list(tensor.shape),
        }
        if double:
            size += blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 256 * 4
            # nested_offset is the mean absmax; its JSON length varies by a few characters
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=0.0519155487418174)
        else:
            size += 4 * blocks
        return size + len(json.dumps(meta))

    # --- encoding --------------------------------------------------------------------------

    def _quant_input(self, tensor: Any) -> Any:
        import torch

        if tensor.dtype in (torch.float32, torch.float64):
            return tensor.to(getattr(torch, self.compute_dtype))
        return tensor

    # The codec. bitsandbytes' CPU quantizer makes several float32/int64 temporaries of its
    # whole input (~20 bytes per value for fp4), so big weights are quantized in row chunks
    # whose 4-bit blocks of 64 consecutive values never straddle two chunks. Blocks and rows
    # are independent, so the bytes equal one ``quantize_4bit``/``int8_vectorwise_quant`` call
    # on the whole weight; with double quant the absmax statistics are then quantized over
    # the whole weight (finish_tensor) exactly as ``quantize_4bit`` does (mean offset,
    # ``quantize_blockwise`` with blocksize 256).

    def chunk_rows(self, plan: TensorPlan) -> int | None:
        """Big Linear weights in row chunks of whole 4-bit blocks (64 values; int8: any rows)."""
        if plan.action != QUANTIZE or len(plan.shape) != 2:
            return None
        cols = plan.shape[1]
        return rows_per_chunk(plan.shape, align=BLOCKSIZE // math.gcd(cols, BLOCKSIZE) if self.is_4bit else 1)

    def encode_chunk(self, component: str, plan: TensorPlan, rows: Any) -> EncodedChunk:
        """Quantize whole rows; 4-bit: parts ``q`` (packed) and ``absmax`` (float32), int8:
        ``cb`` and ``scb``. :meth:`finish_tensor` builds the serialized layout from them."""
        if plan.action != QUANTIZE:
            return super().encode_chunk(component, plan, rows)
        if rows.dim() != 2:
            raise ValueError(f"{plan.name}: a Linear weight must be 2-D, got shape {tuple(rows.shape)}")
        from . import kernels

        # kernels.* return exactly what bitsandbytes' own int8_vectorwise_quant (of the float16
        # values: Int8Params quantizes from float16) and quantize_4bit return (tests/test_kernels.py)
        w = self._quant_input(rows).contiguous()
        if not self.is_4bit:
            cb, scb = kernels.quantize_int8(w)
            return EncodedChunk({"cb": cb, "scb": scb})
        quant_type, _ = _4BIT[self.scheme]
        q, absmax = kernels.quantize_4bit(w, quant_type)
        return EncodedChunk({"q": q, "absmax": absmax})

    def finish_tensor(self, component: str, plan: TensorPlan, chunks: list[EncodedChunk]) -> list[tuple[str, Any]]:
        """Join the row chunks into the serialized layout of one Linear, in save order."""
        if plan.action != QUANTIZE:
            return super().finish_tensor(component, plan, chunks)
        import bitsandbytes.functional as F
        import torch

        def cat(key: str) -> Any:
            return chunks[0].parts[key] if len(chunks) == 1 else torch.cat([c.parts[key] for c in chunks])

        name = plan.name
        if not self.is_4bit:
            prefix = name.removesuffix(".weight")
            weight_format = torch.tensor(0, dtype=torch.uint8)  # 0 = row-major, the only format bnb writes now
            return [(name, cat("cb")), (f"{prefix}.SCB", cat("scb")), (f"{prefix}.weight_format", weight_format)]
        quant_type, double = _4BIT[self.scheme]
        q, absmax = cat("q"), cat("absmax")
        # What quantize_4bit builds (bitsandbytes.functional, 0.50): same code, same order.
        common = dict(
            shape=torch.Size(plan.shape),
            dtype=getattr(torch, self.quant_dtype_name(plan.dtype)),
            blocksize=BLOCKSIZE,
            code=F.get_4bit_type(quant_type, device=absmax.device),
            quant_type=quant_type,
        )
        if double:
            offset = absmax.mean()
            qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
            state = F.QuantState(absmax=qabsmax, offset=offset, state2=state2, **common)
        else:
            state = F.QuantState(absmax=absmax, **common)
        return [(name, q)] + [(f"{name}.{k}", v) for k, v in state.as_dict(packed=True).items()]

    # --- config ----------------------------------------------------------------------------

    def bnb_config_kwargs(self) -> dict[str, Any]:
        import torch

        if not self.is_4bit:
            return {"load_in_8bit": True}
        quant_type, double = _4BIT[self.scheme]
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": quant_type,
            "bnb_4bit_use_double_quant": double,
            "bnb_4bit_compute_dtype": getattr(torch, self.compute_dtype),
        }

    def bnb_config(self, component: str) -> Any:
        if self._library.get(component) == "diffusers":
            from diffusers import BitsAndBytesConfig
        else:
            from transformers import BitsAndBytesConfig
        return BitsAndBytesConfig(**self.bnb_config_kwargs())

    def quantization_config(self, component: str) -> dict[str, Any]:
        return self.bnb_config(component).to_dict()

    # --- cards: diffusers loads bitsandbytes weights only on a CUDA GPU ----------------------

    @classmethod
    def card_method(cls, manifest: dict[str, Any]) -> str:
        version = (manifest.get("versions") or {}).get("bitsandbytes", "")
        return (
            f"The weights were quantized ahead of time with bitsandbytes {version} and "
            "saved in the layout diffusers and transformers write after on-the-fly bitsandbytes quantization "
            "(the quantization config is in each component's `config.json`), so a plain `from_pretrained` loads "
            "them. diffusers loads bitsandbytes weights only on a CUDA GPU; on a CPU-only machine, see "
            "*On a CPU-only machine* below."
        )

    @classmethod
    def usage_lines(cls, facts: Any) -> list[str]:
        lines = super().usage_lines(facts)
        lines[-1] = 'pipe.to("cuda")  # diffusers loads bitsandbytes weights on a CUDA GPU (no GPU: see below)'
        return lines

    cpu_usage_note = (
        "diffusers refuses bitsandbytes models on a machine without a CUDA GPU (`RuntimeError: No GPU found`), "
        "although bitsandbytes runs these layers on a CPU. qconvert's `load_pipeline_on_cpu` lifts that check "
        "while loading and picks bitsandbytes' CPU kernel for each layer (`pip install qconvert`):"
    )
    cpu_validation_note = (
        " diffusers refuses bitsandbytes models without a GPU: this CPU check loaded the weights with "
        "qconvert's `load_pipeline_on_cpu` (bitsandbytes' own CPU kernels), as shown under Usage."
    )

    @classmethod
    def cpu_usage_lines(cls, facts: Any) -> list[str] | None:
        return [
            "import torch",
            "from qconvert.convert.bnb_cpu import load_pipeline_on_cpu",
            "",
            f"pipe = load_pipeline_on_cpu({json.dumps(facts.repo)}, dtype=torch.{facts.dtype})",
        ]

    # --- validation --------------------------------------------------------------------------

    @classmethod
    def validation_dtype(cls, manifest: dict[str, Any], family: Any, source_dtype: Any) -> Any:
        # The image-conditioned pipelines (Kontext, Fill, Control) VAE-encode their input image
        # in the prompt embeddings' dtype, which is the T5's compute dtype here: a float32 demo
        # pipeline loaded in float32 would feed a bf16 image to a float32 VAE. Load in the
        # compute dtype then, as users of a bf16 checkpoint do anyway.
        import torch

        compute = getattr(torch, parse_compute_dtype((manifest.get("options") or {}).get("compute_dtype")))
        return compute if family.inputs and source_dtype == torch.float32 else source_dtype

    @classmethod
    def load_for_validation(cls, out: Path, manifest: dict[str, Any], ref_root: Path, *, dtype: Any, device: str) -> Any:
        if device == "cpu":  # diffusers refuses bnb without a GPU: what the card's CPU part does
            from .bnb_cpu import load_pipeline_on_cpu

            return load_pipeline_on_cpu(out, dtype=dtype)
        from ..manifest import manifest_family

        pipe = manifest_family(manifest).pipeline_type().from_pretrained(out, dtype=dtype)
        for name in ("text_encoder", "vae"):  # the bnb components are placed on the GPU already
            getattr(pipe, name).to(device)
        return pipe

    @classmethod
    def validation_environment(cls, pipe: Any, device: str) -> dict[str, Any]:
        if device.startswith("cuda"):
            return {}
        from .bnb_cpu import describe_cpu_paths

        return {"bnb_cpu_kernels": describe_cpu_paths(pipe)}  # which of bitsandbytes' CPU kernels ran
