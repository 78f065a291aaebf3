"""SDNQ backend (the ``sdnq`` package, SD.Next's quantizer): int8, float8 e4m3fn, uint4 and int4
weights, loaded by a plain ``from_pretrained`` once ``import sdnq`` has registered it.

What to quantize is sdnq's own decision, reproduced exactly by asking sdnq's quantizer about a
meta-device build of the component, as diffusers' and transformers' ``from_pretrained`` do
before loading weights (``SDNQQuantizer._process_model_before_weight_loading``: the model's
keep-in-fp32 and tied modules, transformers' default skips, sdnq's per-class skip list, e.g.
FLUX.1's ``x_embedder``, ``context_embedder``, ``time_text_embed``, ``norm_out``, the top-level
``proj_out`` and ``single_transformer_blocks.0.norm.linear``), then
``check_if_quantized_param`` for every weight (Linear only, at least 16,384 values and 32
input channels). Every weight it leaves alone, the norms included, lands in the config's
``modules_to_not_convert`` as it does in the library's own save; qconvert writes those lists
sorted (sdnq dedupes them through a set, so its own order changes from run to run).

Streaming: each Linear weight goes through sdnq's ``sdnq_quantize_layer_weight`` (what its
quantizer calls per parameter while loading, with the same ``get_quant_kwargs``), upcast to
float32 first as the quantizer does, in row chunks: every scale and zero point belongs to a
group of inputs inside one row. Layout per Linear ``<m>`` (sdnq 0.2.8, defaults):

* int8 / float8_e4m3fn: ``<m>.weight`` int8 / float8 ``(out, in)``, ``<m>.scale`` float32
  ``(out, 1)`` (absmax per row); for ``in`` > 1024: groups of 1024 inputs (fewer, equal ones
  when 1024 does not divide ``in``), ``(out, groups, g)`` and ``(out, groups, 1)``;
* uint4: ``<m>.weight`` uint8 ``(out * in / 2,)`` (two values per byte, low nibble first, in
  row-major order, so chunks are cut at even row counts), ``<m>.scale`` and ``<m>.zero_point``
  float32 ``(out, groups, 1)``, groups of 64 inputs; int4: the same without a zero point
  (values stored offset by 8).

Biases and the weights sdnq skips are written unchanged.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, ClassVar

from ..errors import InputError, MissingDependency, opt
from ..plan import KEEP, QUANTIZE, Policy, Rule, TensorPlan
from ..sources import Component, SourceTensor
from .base import Backend, ModelFacts
from .schedule import EncodedChunk, rows_per_chunk

# keys get_quant_kwargs returns that sdnq_quantize_layer pops before quantizing the weight
_LAYER_ONLY_KWARGS = ("return_device", "quantization_device", "non_blocking", "use_dynamic_quantization")
_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class SDNQBackend(Backend):
    name = "sdnq"
    # scheme names are sdnq's own weights_dtype names
    schemes: ClassVar[dict[str, str]] = {
        "int8": "int8 weights, absmax scale per row (groups of 1024 inputs) (sdnq weights_dtype int8)",
        "float8_e4m3fn": "float8 e4m3 weights, scale per row (groups of 1024 inputs) (sdnq float8_e4m3fn)",
        "uint4": "4-bit weights, scale and zero point per 64 inputs (sdnq weights_dtype uint4)",
        "int4": "4-bit symmetric weights, scale per 64 inputs (sdnq weights_dtype int4)",
    }
    accepted_options = ("jobs", "max_shard_size")
    cli_flags = ("jobs", "max_shard_size")
    extra = "sdnq"
    import_names = ("sdnq",)
    pip_package = "sdnq"
    pin_version = True  # the layout is sdnq's own (the config records sdnq_version)
    version_packages = ("sdnq",)
    warm_up_modules = ("sdnq",)
    card_loader: ClassVar[str] = "`import sdnq` and one `{pipeline}.from_pretrained` call"

    def __init__(self, scheme: str, **options: Any) -> None:
        super().__init__(scheme, **options)
        self._configs: dict[str, Any] = {}  # component -> its SDNQConfig after sdnq's decisions
        self._kwargs: dict[str, dict[str, dict[str, Any]]] = {}  # component -> weight -> quant kwargs
        self._component = ""

    # --- sdnq's decisions -------------------------------------------------------------------

    def decide(self, comp: Component) -> None:
        """sdnq's decisions for ``comp``'s weights (module docstring), once per component."""
        if comp.name not in self._configs:
            dtypes = {name: t.dtype for name, t in comp.tensors.items()}
            self._configs[comp.name], self._kwargs[comp.name] = sdnq_decisions(
                self.scheme, comp.library, comp.class_name, comp.config, dtypes
            )

    @classmethod
    def check_loadable(cls, options: dict[str, Any], transformer_config: dict[str, Any]) -> None:
        # Checked before converting when the output is to be validated: a transformer sdnq
        # leaves whole (every Linear under its 16,384 values / 32 inputs, as in tiny-flux) would
        # fail validation's memory check after the conversion.
        class_name = transformer_config.get("_class_name", "FluxTransformer2DModel")
        model = _meta_model("diffusers", class_name, transformer_config)
        dtypes = {name: "BF16" for name in model.state_dict()}
        del model
        _, quantized = sdnq_decisions("int8", "diffusers", class_name, transformer_config, dtypes)
        if not quantized:
            width = transformer_config.get("num_attention_heads", 0) * transformer_config.get("attention_head_dim", 0)
            raise InputError(
                f"sdnq quantizes none of this transformer's layers (width {width}: every Linear is under sdnq's "
                "16,384 values or 32 inputs, or on its skip list), so validation's memory check would fail",
                hint=f"convert a wider model (e.g. {opt('source', 'slim-flux')}) or pass {opt('validate', False)}",
            )

    def policy(self, component: str, facts: ModelFacts) -> Policy:
        names = self._kwargs.get(component, {})
        if not names:
            return Policy(())
        exact = "^(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")$"
        return Policy((
            Rule(exact, QUANTIZE, self.scheme, reason="sdnq quantizes it"),
            Rule(r"\.weight$", KEEP, when=("linear",),
                 reason="sdnq leaves it (its skip list, or under 16,384 values or 32 inputs)"),
        ))  # fmt: skip

    def plan_component(self, comp: Component, facts: ModelFacts | None) -> Any:
        self.decide(comp)
        self._component = comp.name
        return super().plan_component(comp, facts)

    def estimate_bytes(self, rule: Rule, tensor: SourceTensor) -> int:
        """Exact: sdnq's own quantizer run on a meta tensor of the weight's shape."""
        if rule.action != QUANTIZE:
            return super().estimate_bytes(rule, tensor)
        import torch

        meta = torch.empty(tensor.shape, dtype=torch.float32, device="meta")
        parts = self._quantize(self._component, tensor.name, meta)
        return sum(t.numel() * t.element_size() for t in parts.values())

    # --- the codec -------------------------------------------------------------------------

    def _quantize(self, component: str, name: str, rows: Any) -> dict[str, Any]:
        import torch
        from sdnq.quantizer import sdnq_quantize_layer_weight

        # sdnq's quantizer upcasts the loaded weight to float32 before quantizing it
        weight = rows.to(torch.float32) if rows.dtype != torch.float64 else rows
        _, parts = sdnq_quantize_layer_weight(weight, **self._kwargs[component][name])
        return {k: v for k, v in parts.items() if v is not None}

    def chunk_rows(self, plan: TensorPlan) -> int | None:
        if plan.action != QUANTIZE:
            return None
        return rows_per_chunk(plan.shape, align=2)  # even rows: 4-bit pairs never straddle a cut

    def encode_chunk(self, component: str, plan: TensorPlan, rows: Any) -> EncodedChunk:
        if plan.action != QUANTIZE:
            return super().encode_chunk(component, plan, rows)
        prefix = plan.name.removesuffix("weight")
        parts = self._quantize(component, plan.name, rows)
        return EncodedChunk({prefix + k: v.contiguous() for k, v in parts.items()})

    # --- config ----------------------------------------------------------------------------

    def begin_component(self, comp: Component, facts: ModelFacts) -> None:
        self.decide(comp)

    def quantization_config(self, component: str) -> dict[str, Any] | None:
        return sorted_config(self._configs[component].to_dict())

    # --- cards ------------------------------------------------------------------------------

    @classmethod
    def card_method(cls, manifest: dict[str, Any]) -> str:
        version = (manifest.get("versions") or {}).get("sdnq", "")
        return (
            f"The weights were quantized ahead of time with sdnq {version} (SD.Next's quantizer: its own "
            "`sdnq_quantize_layer_weight`, one Linear at a time, with the layers it chooses) and saved in the layout "
            "sdnq's `save_pretrained` writes, its `SDNQConfig` in each `config.json`. `import sdnq` registers the "
            "format with diffusers and transformers; then a plain `from_pretrained` loads it."
        )

    @classmethod
    def usage_lines(cls, facts: Any) -> list[str]:
        pipeline = facts.family.pipeline_class
        return [
            "import sdnq  # noqa: F401  (registers SDNQ with diffusers and transformers)",
            "import torch",
            f"from diffusers import {pipeline}",
            "",
            f"pipe = {pipeline}.from_pretrained({json.dumps(facts.repo)}, dtype=torch.{facts.dtype})",
            'pipe.to("cuda" if torch.cuda.is_available() else "cpu")',
        ]

    # --- validation --------------------------------------------------------------------------

    @classmethod
    def load_for_validation(cls, out: Path, manifest: dict[str, Any], ref_root: Path, *, dtype: Any, device: str) -> Any:
        import sdnq  # noqa: F401  (as the card's snippet: transformers knows SDNQ only then)

        return super().load_for_validation(out, manifest, ref_root, dtype=dtype, device=device)

    @classmethod
    def require_library(cls) -> None:
        try:
            super().require_library()
        except ModuleNotFoundError:
            raise MissingDependency(cls.import_names[0], cls.extra) from None


def sorted_config(config: dict[str, Any]) -> dict[str, Any]:
    """``SDNQConfig.to_dict()`` with its set-deduplicated lists sorted (deterministic bytes)."""
    out = dict(config)
    for key in ("modules_to_not_convert", "modules_to_not_use_matmul"):
        if out.get(key) is not None:
            out[key] = sorted(out[key])
    if out.get("modules_dtype_dict"):
        out["modules_dtype_dict"] = {k: sorted(v) for k, v in sorted(out["modules_dtype_dict"].items())}
    return out


def sdnq_decisions(
    scheme: str, library: str, class_name: str, config: dict[str, Any], dtypes: dict[str, str]
) -> tuple[Any, dict[str, dict[str, Any]]]:
    """What sdnq's quantizer decides for a model of ``class_name`` whose tensors are ``dtypes``
    (name -> safetensors dtype): its SDNQConfig afterwards (the skip lists filled in) and, per
    weight it quantizes, the keyword arguments of ``sdnq_quantize_layer_weight``.

    The steps of diffusers' / transformers' ``from_pretrained`` with an SDNQConfig, on a
    meta-device build: ``_process_model_before_weight_loading`` (diffusers passes the class's
    keep-in-fp32 modules), then ``check_if_quantized_param`` and ``get_quant_kwargs`` per
    parameter, as ``create_quantized_param`` calls them."""
    import sdnq
    import torch
    from sdnq.utils import get_module_from_name, get_quant_kwargs

    quantizer = sdnq.SDNQQuantizer(sdnq.SDNQConfig(weights_dtype=scheme), pre_quantized=False)
    model = _meta_model(library, class_name, config)
    if library == "diffusers":
        keep = model._keep_in_fp32_modules if quantizer.use_keep_in_fp32_modules else None
        keep = list(keep) if isinstance(keep, (list, tuple)) else ([keep] if keep else [])
        quantizer._process_model_before_weight_loading(model, None, keep_in_fp32_modules=keep)
    else:
        quantizer._process_model_before_weight_loading(model, None)
    kwargs: dict[str, dict[str, Any]] = {}
    for name in sorted(dtypes):  # the order only reaches the lists, which are written sorted
        if quantizer.check_if_quantized_param(model, None, name):
            layer = get_module_from_name(model, name)[0]
            dtype = getattr(torch, _TORCH_DTYPES.get(dtypes[name], "float32"))
            found = get_quant_kwargs(layer, quantizer.quantization_config, torch_dtype=dtype, param_name=name)
            kwargs[name] = {k: v for k, v in found.items() if k not in _LAYER_ONLY_KWARGS}
    return quantizer.quantization_config, kwargs


def _meta_model(library: str, class_name: str, config: dict[str, Any]) -> Any:
    """A model of ``class_name`` built from ``config`` on the meta device."""
    import torch

    with torch.device("meta"):
        if library == "diffusers":
            import diffusers

            return getattr(diffusers, class_name).from_config(config)
        import transformers

        cls = getattr(transformers, class_name)
        return cls(cls.config_class.from_dict(config))
