"""optimum-quanto backend: int8, int4, int2 and float8 weights (quanto's weight qtypes).

Streaming: each row chunk of a Linear weight is put in a bare ``nn.Linear`` and turned into
quanto's ``QLinear`` with ``QLinear.from_module`` (what quanto's ``quantize`` does to every
Linear); 8-bit chunks are frozen with ``freeze()`` and their ``state_dict()`` is written under
the Linear's name, 2/4-bit ones go through the same optimizer and ``quantize_affine`` that
``freeze()`` calls and are packed per weight (below). That is what diffusers' and quanto's own
``save_pretrained`` write. Layout per Linear ``<m>`` (every tensor in the weight's dtype
except the data):

* int8 / fp8 (``WeightQBytesTensor``): ``<m>.weight._data`` int8 / float8_e4m3fn
  ``(out, in)``, ``<m>.weight._scale`` ``(out, 1)`` (per row: absmax / qmax);
* int4 / int2 (``WeightQBitsTensor``, affine): the values are grouped in groups of
  128 inputs (96, 64 when 128 does not divide ``in``; per row when ``in`` <= 128 or nothing
  divides), giving ``R = out * in / g`` group rows, ``<m>.weight._scale`` and
  ``<m>.weight._shift`` ``(R, 1)``, and ``<m>.weight._data._data`` uint8 ``(ceil(R / k), g)``
  with ``k = 8 / bits`` values per byte, packed *across* the rows: byte row ``i`` holds group
  rows ``i, i + ceil(R/k), ...`` in its bit fields. Groups lie inside a row, so the values,
  scales and shifts are computed in row chunks; the packing, which ties distant rows
  together, runs once over the whole weight's uint8 values (1 byte per value) when its
  chunks are finished. (``freeze()`` on a CPU would also build torch's int4 "tinygemm"
  packing for bf16 groups of 128 and unpack it again for saving; the values are the same.)
* ``<m>.input_scale`` and ``<m>.output_scale``: 0-d ones (QLinear's activation buffers).

Biases and every other tensor are written unchanged.

Loading. The transformer goes through diffusers' ``QuantoConfig`` (every qtype, float8
included: diffusers 0.42.1 with optimum-quanto 0.2.7 loads a pre-quantized float8
checkpoint with a plain ``from_pretrained``; the source post's "fp8 needs quanto directly"
no longer holds for the transformer). The T5 encoder cannot go through transformers'
``QuantoConfig``: transformers 5 cannot save quanto models (``is_serializable`` is False) and,
given a quanto checkpoint, builds unfrozen ``QLinear`` layers that do not read
``weight._data``/``weight._scale``: the weights are left *randomly initialized* (checked:
relative error 1.27 against the source, with only a "MISSING" table printed). So T5 is
written in quanto's own transformers layout (``QuantizedTransformersModel.save_pretrained``:
``model.safetensors`` + ``quanto_qmap.json``, no ``quantization_config``), and the card loads
it with quanto's ``requantize`` into a T5 built on the meta device, then hands it to the
pipeline (``text_encoder_2=``).

Two torch 2.13 CPU kernels that quanto calls for bfloat16 weights have limits of their own:

* int8: quanto's CPU ``qbytes_mm`` calls ``torch._weight_int8pack_mm`` for bf16 activations
  when ``in_features % 4 == 0``. On an AVX512 CPU that kernel *segfaults* when the int8 rows are
  not 16-byte aligned: a weight whose data starts at an unaligned address (safetensors maps
  each tensor at its file offset, which is only 2-byte aligned after bf16 scales), or
  ``in_features % 16 != 0``. Loading on a CPU therefore copies each quantized weight once
  (``realign_int8_weights``: torch's allocator aligns to 64 bytes), as the card's snippet does;
  a layer with ``in_features % 16 != 0`` cannot run in bf16 on a CPU at all (a DeviceError at
  validation; FLUX.1 and T5-XXL have none).
* int4: bf16 weights in groups of 128 load as quanto's ``TinyGemmWeightQBitsTensor``, whose
  ``torch._convert_weight_to_int4pack`` needs ``out_features % 16 == 0``; such a layer is refused
  when planning (FLUX.1 and T5-XXL have none).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from ..errors import DeviceError, InputError, MissingDependency, opt
from ..plan import QUANTIZE, ComponentPlan, Rule, TensorPlan
from ..sources import DTYPE_SIZES, Component, SourceTensor
from .base import Backend, ModelFacts, ProgressFn
from .schedule import EncodedChunk, Scheduler, rows_per_chunk

# scheme -> (quanto qtype name, QuantoConfig weights_dtype, bits)
_QTYPES = {
    "int8": ("qint8", "int8", 8),
    "int4": ("qint4", "int4", 4),
    "int2": ("qint2", "int2", 2),
    "fp8": ("qfloat8", "float8", 8),
}
QMAP_NAME = "quanto_qmap.json"  # QuantizedTransformersModel's quantization map


def group_size(in_features: int) -> int | None:
    """QModuleMixin's group size for the 2/4-bit qtypes (optimum-quanto 0.2.7, nn/qmodule.py)."""
    size = 128
    if in_features <= size:
        return None
    while in_features % size != 0 and size > 32:
        size -= 32
    return size if in_features % size == 0 else None


class QuantoBackend(Backend):
    name = "quanto"
    schemes: ClassVar[dict[str, str]] = {
        "int8": "int8 weights, per-row scales (optimum-quanto qint8; diffusers QuantoConfig weights_dtype int8)",
        "int4": "int4 weights, affine, groups of 128 inputs (optimum-quanto qint4; QuantoConfig int4)",
        "int2": "int2 weights, affine, groups of 128 inputs (optimum-quanto qint2; QuantoConfig int2)",
        "fp8": "float8 e4m3 weights, per-row scales (optimum-quanto qfloat8; QuantoConfig float8)",
    }
    accepted_options = ("jobs", "max_shard_size")
    cli_flags = ("jobs", "max_shard_size")
    extra = "quanto"
    import_names = ("optimum.quanto",)
    pip_package = "optimum-quanto"
    version_packages = ("optimum-quanto",)
    warm_up_modules = ("optimum.quanto", "diffusers.quantizers.quanto.quanto_quantizer")

    @classmethod
    def require_library(cls) -> None:
        # find_spec("optimum.quanto") imports the parent package: without ``optimum`` at all it
        # raises ModuleNotFoundError instead of returning None.
        try:
            super().require_library()
        except ModuleNotFoundError:
            raise MissingDependency(cls.import_names[0], cls.extra) from None

    @property
    def bits(self) -> int:
        return _QTYPES[self.scheme][2]

    # --- planning --------------------------------------------------------------------------

    def estimate_bytes(self, rule: Rule, tensor: SourceTensor) -> int:
        if rule.action != QUANTIZE:
            return super().estimate_bytes(rule, tensor)
        out_features, in_features = tensor.shape
        float_size = DTYPE_SIZES[tensor.dtype]  # scales, shifts and activation scales: the weight's dtype
        activation_scales = 2 * float_size
        if self.bits == 8:
            return tensor.numel + out_features * float_size + activation_scales
        g = group_size(in_features)
        rows, cols = (out_features * in_features // g, g) if g else (out_features, in_features)
        per_byte = 8 // self.bits
        packed = -(-rows // per_byte) * cols
        return packed + 2 * rows * float_size + activation_scales

    def plan_component(self, comp: Component, facts: ModelFacts | None) -> ComponentPlan:
        plan = super().plan_component(comp, facts)
        if self.scheme == "int4":
            check_int4_loadable(comp.name, plan)
        return plan

    # --- the codec -------------------------------------------------------------------------

    def chunk_rows(self, plan: TensorPlan) -> int | None:
        # Scales (8-bit) and scale/shift (2/4-bit: groups lie inside a row) are per row or
        # group: any rows. The 2/4-bit packing, which mixes distant rows, is done in
        # finish_tensor over the whole weight's values.
        if plan.action != QUANTIZE:
            return None
        return rows_per_chunk(plan.shape)

    def qtype(self) -> Any:
        import optimum.quanto as quanto

        return getattr(quanto, _QTYPES[self.scheme][0])

    def _qlinear(self, rows: Any) -> Any:
        """quanto's QLinear for a bare Linear holding ``rows`` (its group size, optimizer, buffers)."""
        import torch
        from optimum.quanto import QLinear

        out_features, in_features = rows.shape
        linear = torch.nn.Linear(in_features, out_features, bias=False, device="meta", dtype=rows.dtype)
        linear.weight = torch.nn.Parameter(rows, requires_grad=False)
        return QLinear.from_module(linear, weights=self.qtype())

    def encode_chunk(self, component: str, plan: TensorPlan, rows: Any) -> EncodedChunk:
        """Rows of a Linear weight as quanto quantizes them. 8-bit: ``QLinear.freeze()``, the
        parts are the frozen module's state dict under the Linear's name. 2/4-bit: the
        unpacked values, scale and shift that ``freeze()`` computes (packed in finish_tensor)."""
        if plan.action != QUANTIZE:
            return super().encode_chunk(component, plan, rows)
        prefix = plan.name.removesuffix("weight")
        qlinear = self._qlinear(rows)
        if self.bits != 8:
            return EncodedChunk(self._affine_parts(qlinear, rows, prefix))
        qlinear.freeze()
        parts = {prefix + k: v.detach() for k, v in qlinear.state_dict().items()}
        scale = prefix + "weight._scale"
        if rows.shape[0] == 1 < plan.shape[0] and parts[scale].dim() == 0:
            # quanto quantizes a 1-row module per tensor (0-d scale): for the last row of a
            # chunked weight that is the row's own per-row scale, shaped as the others
            parts[scale] = parts[scale].reshape(1, 1)
        qlinear._parameters.clear()  # break the module's reference to the quantized tensor now
        return EncodedChunk(parts)

    def _affine_parts(self, qlinear: Any, rows: Any, prefix: str) -> dict[str, Any]:
        """What ``QModuleMixin.qweight`` computes for qint4/qint2 (MaxOptimizer scale and shift
        per group row, ``quanto::quantize_affine``), before packing. ``optimize(axis=0)``
        rather than the optimizer's ``__call__``, whose single-row shortcut (per tensor) would
        give a 1-row chunk other scales than the same row of the whole weight; for two or more
        rows the two are the same call."""
        import torch
        from optimum.quanto.tensor.grouped import group

        g = qlinear.weight_group_size
        base = group(rows, axis=0, group_size=g) if g else rows
        scale, shift = qlinear.optimizer.optimize(base, qlinear.weight_qtype, 0)
        data = torch.ops.quanto.quantize_affine(rows, bits=self.bits, axis=0, group_size=g, scale=scale, shift=shift)
        return {
            "values": data,
            prefix + "weight._scale": scale,
            prefix + "weight._shift": shift,
            prefix + "input_scale": qlinear.input_scale,
            prefix + "output_scale": qlinear.output_scale,
        }

    def finish_tensor(self, component: str, plan: TensorPlan, chunks: list[EncodedChunk]) -> list[tuple[str, Any]]:
        """Row chunks joined on dim 0; the 0-d activation scales (equal in every chunk) once;
        2/4-bit values packed over the whole weight with quanto's ``PackedTensor.pack``."""
        if plan.action != QUANTIZE:
            return super().finish_tensor(component, plan, chunks)
        import torch

        first = chunks[0].parts
        joined = {n: t if t.dim() == 0 or len(chunks) == 1 else torch.cat([c.parts[n] for c in chunks])
                  for n, t in first.items()}  # fmt: skip
        if self.bits == 8:
            return list(joined.items())
        from optimum.quanto.tensor.packed import PackedTensor

        packed = PackedTensor.pack(joined.pop("values"), bits=self.bits)._data
        return [(plan.name + "._data._data", packed), *joined.items()]

    # --- config and the T5's quantization map ---------------------------------------------

    def begin_component(self, comp: Component, facts: ModelFacts) -> None:
        self._library = comp.library

    def quantization_config(self, component: str) -> dict[str, Any] | None:
        if getattr(self, "_library", "diffusers") != "diffusers":
            return None  # transformers cannot load quanto weights: quanto's own layout (module docstring)
        from diffusers import QuantoConfig

        return QuantoConfig(weights_dtype=_QTYPES[self.scheme][1]).to_dict()

    def write_component(
        self,
        comp: Component,
        plan: ComponentPlan,
        facts: ModelFacts,
        out_dir: Path,
        scheduler: Scheduler,
        progress: ProgressFn,
    ) -> list[Path]:
        files = super().write_component(comp, plan, facts, out_dir, scheduler, progress)
        if comp.library == "diffusers":
            return files
        # quanto's quantization_map(): module name -> its qtypes, for requantize() on load
        quantized = sorted(t.name.removesuffix(".weight") for t in plan.tensors if t.action == QUANTIZE)
        qmap = {name: {"weights": self.qtype().name, "activations": "none"} for name in quantized}
        path = out_dir / comp.name / QMAP_NAME
        path.write_text(json.dumps(qmap, indent=4))
        return [*files, path]

    # --- cards ------------------------------------------------------------------------------

    @classmethod
    def card_method(cls, manifest: dict[str, Any]) -> str:
        version = (manifest.get("versions") or {}).get("optimum-quanto", "")
        return (
            f"The weights were quantized ahead of time with optimum-quanto {version} (`QLinear` + `freeze`, "
            "one Linear at a time) and saved in the layout quanto's own `save_pretrained` writes. The transformer "
            "carries diffusers' `QuantoConfig` in its `config.json`, so `from_pretrained` loads it; transformers "
            "cannot load quanto weights, so the T5 encoder is in quanto's transformers layout (`model.safetensors` + "
            "`quanto_qmap.json`) and the snippet loads it with quanto's `requantize`. diffusers marks its Quanto "
            "backend as deprecated (to be removed in diffusers 1.0)."
        )

    @classmethod
    def _t5_quantized(cls, facts: Any) -> bool:
        t5 = facts.family.t5()
        return f"{t5}/{QMAP_NAME}" in facts.files(t5)

    @classmethod
    def usage_lines(cls, facts: Any) -> list[str]:
        lines = cls._t5_usage_lines(facts) if cls._t5_quantized(facts) else super().usage_lines(facts)
        if facts.scheme == "int8":
            lines += cls._realign_lines(facts)
        return lines

    @classmethod
    def _realign_lines(cls, facts: Any) -> list[str]:
        """``realign_int8_weights`` for both models, inline, on a CPU (module docstring)."""
        return [
            "if not torch.cuda.is_available():",
            "    # quanto runs bf16 int8 weights on a CPU through torch's _weight_int8pack_mm, which crashes on",
            "    # rows that are not 16-byte aligned, as the weights mapped from safetensors are: copy them once",
            "    from optimum.quanto import QTensor",
            "",
            f"    for model in (pipe.transformer, pipe.{facts.family.t5()}):",
            "        for module in model.modules():",
            '            if isinstance(getattr(module, "weight", None), QTensor):',
            '                module.weight = torch.nn.Parameter(module.weight.to("cpu", copy=True), requires_grad=False)',
        ]

    @classmethod
    def _t5_usage_lines(cls, facts: Any) -> list[str]:
        pipeline, t5 = facts.family.pipeline_class, facts.family.t5()
        lines = [
            "import json",
            "import os",
            "from pathlib import Path",
            "",
            "import torch",
            f"from diffusers import {pipeline}",
            "from huggingface_hub import snapshot_download",
            "from optimum.quanto import requantize",
            "from safetensors.torch import load_file",
            "from transformers import T5Config, T5EncoderModel",
            "",
            f"repo = {json.dumps(facts.repo)}",
            "path = repo if os.path.isdir(repo) else snapshot_download(repo)",
            f"dtype = torch.{facts.dtype}",
            "# transformers cannot load quanto weights: build the T5 empty, let quanto fill it",
            f'folder = Path(path, "{t5}")',
            'with torch.device("meta"):',
            "    text_encoder_2 = T5EncoderModel(T5Config.from_pretrained(folder)).to(dtype)",
            "state = {}",
            'for shard in sorted(folder.glob("*.safetensors")):',
            "    state.update(load_file(shard))",
            f'qmap = json.loads((folder / "{QMAP_NAME}").read_text())',
            'requantize(text_encoder_2, state, qmap, device=torch.device("cpu"))',
            "text_encoder_2.tie_weights()  # the token embeddings are stored once, as `shared`",
            "text_encoder_2.eval()",
            "",
            f"pipe = {pipeline}.from_pretrained(path, {t5}=text_encoder_2, dtype=dtype)",
            'pipe.to("cuda" if torch.cuda.is_available() else "cpu")',
        ]
        return lines

    # --- validation: load as the card does ---------------------------------------------------

    @classmethod
    def load_for_validation(cls, out: Path, manifest: dict[str, Any], ref_root: Path, *, dtype: Any, device: str) -> Any:
        from ..manifest import manifest_family

        family = manifest_family(manifest)
        t5 = family.t5()
        parts = {}
        if (Path(out) / t5 / QMAP_NAME).is_file():
            parts[t5] = load_text_encoder(Path(out) / t5, dtype=dtype)
        pipe = family.pipeline_type().from_pretrained(out, dtype=dtype, **parts)
        if device == "cpu" and manifest.get("scheme") == "int8":
            for name in ("transformer", t5):
                model = getattr(pipe, name, None)
                if model is not None:
                    realign_int8_weights(model)
                    check_int8_cpu_runnable(model, name, dtype)
        return pipe if device == "cpu" else pipe.to(device)


def load_text_encoder(folder: Path, *, dtype: Any) -> Any:
    """The card's T5 loading code (``usage_lines``), as a function for validation."""
    import torch
    from optimum.quanto import requantize
    from safetensors.torch import load_file
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        model = T5EncoderModel(T5Config.from_pretrained(folder)).to(dtype)
    state: dict[str, Any] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(shard))
    qmap = json.loads((Path(folder) / QMAP_NAME).read_text())
    requantize(model, state, qmap, device=torch.device("cpu"))
    model.tie_weights()
    return model.eval()


def realign_int8_weights(model: Any) -> Any:
    """Copy every quanto-quantized weight of ``model`` into fresh (64-byte aligned) memory.

    torch 2.13's ``_weight_int8pack_mm`` (quanto's CPU kernel for bf16 int8 weights) segfaults on
    int8 rows that are not 16-byte aligned, and weights loaded from safetensors lie at their
    file offsets (module docstring). ``Tensor.to(copy=True)`` goes through quanto's own
    ``_to_copy``, which copies the data and scale. The card's snippet runs the same loop."""
    import torch
    from optimum.quanto import QTensor

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, QTensor):
            module.weight = torch.nn.Parameter(weight.to("cpu", copy=True), requires_grad=False)
    return model


def check_int8_cpu_runnable(model: Any, name: str, dtype: Any) -> None:
    """Raise DeviceError for a bf16 int8 layer the CPU kernel crashes on whatever its alignment
    (``in_features`` a multiple of 4 but not of 16: quanto picks ``_weight_int8pack_mm``)."""
    import torch
    from optimum.quanto import QLinear

    if dtype != torch.bfloat16:
        return  # quanto's CPU int8 kernel is only used for bf16 activations
    for layer, module in model.named_modules():
        if isinstance(module, QLinear) and module.in_features % 4 == 0 and module.in_features % 16:
            raise DeviceError(
                f"{name}.{layer} (in_features {module.in_features}) cannot run as quanto int8 in bfloat16 on a CPU: "
                "torch's _weight_int8pack_mm crashes when in_features is not a multiple of 16",
                hint=f"validate on a GPU ({opt('device', 'cuda')}) or choose another quanto scheme "
                f"({opt('scheme', 'fp8')})",
            )


def check_int4_loadable(component: str, plan: ComponentPlan) -> None:
    """Refuse a bf16 int4 plan that quanto could not load: bf16 groups of 128 load through
    torch's int4 packing (TinyGemmWeightQBitsTensor), which needs out_features % 16 == 0."""
    for tp in plan.tensors:
        if tp.action != QUANTIZE or tp.dtype != "BF16":
            continue
        out_features, in_features = tp.shape
        if group_size(in_features) == 128 and out_features % 16:
            raise InputError(
                f"quanto int4 cannot load {component}'s {tp.name} ({out_features}x{in_features}) in bfloat16: torch's "
                "int4 packing, which quanto uses for groups of 128, needs out_features to be a multiple of 16",
                hint=f"quantize the other components only, e.g. {opt('components', 'transformer')}, "
                f"or choose {opt('scheme', 'int8')}",
            )
