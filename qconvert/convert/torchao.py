"""torchao backend: weight-only int8/fp8, dynamic int8, int4 (GPU).

Streaming: each Linear weight is quantized on its own, in a bare ``nn.Linear`` holding just
that weight, with torchao's own ``quantize_`` and config objects, then flattened with
torchao's ``flatten_tensor_state_dict`` (the helper diffusers' own ``save_pretrained`` uses).
The per-tensor JSON metadata it returns is merged, with a ``tensor_names`` list, into every
shard header. The result equals, tensor for tensor, what diffusers writes after on-the-fly
``TorchAoConfig`` quantization, and loads with a plain ``from_pretrained``.

torchao checkpoints are tied to the torchao version that wrote them; the manifest and card
record it.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from ..errors import DeviceError
from ..plan import KEEP, QUANTIZE, Policy, Rule, TensorPlan
from ..sources import Component, SourceTensor
from .base import Backend, ModelFacts
from .schedule import EncodedChunk, rows_per_chunk

# scheme -> torchao config class name
_CONFIGS = {
    "int8wo": "Int8WeightOnlyConfig",
    "fp8wo": "Float8WeightOnlyConfig",
    "int8dq": "Int8DynamicActivationInt8WeightConfig",
    "int4wo": "Int4WeightOnlyConfig",
}


SLAB_VALUES = 1 << 19  # values per quantize_ call of a per-row scheme (see encode_chunk)


class TorchAOBackend(Backend):
    name = "torchao"
    schemes: ClassVar[dict[str, str]] = {
        "int8wo": "int8 weight-only, per-row scales (torchao Int8WeightOnlyConfig; CPU and GPU)",
        "fp8wo": "float8 e4m3 weight-only, per-row scales (torchao Float8WeightOnlyConfig)",
        "int8dq": "int8 dynamic activations + int8 weights, W8A8 (torchao Int8DynamicActivationInt8WeightConfig)",
        "int4wo": "int4 weight-only, group size 128 (torchao Int4WeightOnlyConfig; CUDA only)",
    }
    accepted_options = ("jobs", "max_shard_size")
    cli_flags = ("jobs", "max_shard_size")
    extra = "torchao"
    import_names = ("torchao",)
    pip_package = "torchao"
    pin_version = True  # torchao checkpoints are tied to the torchao version that wrote them
    version_packages = ("torchao",)
    warm_up_modules = ("torchao.quantization", "diffusers.quantizers.torchao.torchao_quantizer")

    def __init__(self, scheme: str, **options: Any) -> None:
        super().__init__(scheme, **options)
        self._metadata: dict[str, str] = {}
        self._names: list[str] = []

    def check_environment(self, *, device: bool = True) -> None:
        super().check_environment(device=device)
        if self.scheme == "int4wo" and device:
            import torch

            if not torch.cuda.is_available():
                raise DeviceError(
                    "torchao int4wo needs a CUDA GPU to quantize (its int4 packing has no CPU kernel here)",
                    hint="run on a GPU machine, or pick int8wo/fp8wo/int8dq",
                )

    def torchao_config(self) -> Any:
        import torchao.quantization as q

        return getattr(q, _CONFIGS[self.scheme])()

    def policy(self, component: str, facts: ModelFacts) -> Policy:
        if self.scheme == "int4wo":
            return Policy((
                Rule(r"\.weight$", QUANTIZE, self.scheme, when=("linear", "in_features_div_128")),
                Rule(r"\.weight$", KEEP, when=("linear",),
                     reason="input features not a multiple of int4wo's group size 128 (torchao keeps it)"),
            ))  # fmt: skip
        return Policy((Rule(r"\.weight$", QUANTIZE, self.scheme, when=("linear",)),))

    def estimate_bytes(self, rule: Rule, tensor: SourceTensor) -> int:
        if rule.action != QUANTIZE:
            return super().estimate_bytes(rule, tensor)
        out_features, in_features = tensor.shape
        if self.scheme == "int4wo":
            return tensor.numel // 2 + 2 * (tensor.numel // 128) * 2
        scale = out_features * 4  # per-row float32 scales, whatever the source dtype
        zero_points = out_features if self.scheme in ("int8wo", "int8dq") else 0  # int8, one per row
        return tensor.numel + scale + zero_points

    def chunk_rows(self, plan: TensorPlan) -> int | None:
        # Per-row schemes: rows quantize independently, so chunks give identical bytes.
        # int4wo packs tiles on the GPU: quantize it whole.
        if self.scheme == "int4wo" or plan.action != QUANTIZE:
            return None
        return rows_per_chunk(plan.shape)

    def begin_component(self, comp: Component, facts: ModelFacts) -> None:
        self._metadata = {}
        self._names = []
        self._config = self.torchao_config()

    def encode_chunk(self, component: str, plan: TensorPlan, tensor: Any) -> EncodedChunk:
        """Rows of a Linear weight quantized with ``quantize_`` and flattened; ``meta``: the
        per-tensor JSON of the shard header (the same for every chunk: no shapes in it)."""
        if plan.action != QUANTIZE:
            return super().encode_chunk(component, plan, tensor)
        import torch

        if self.scheme == "int4wo":
            return self._quantize_rows(plan, tensor)
        # Per-row schemes: quantize_ in slabs of rows that fit in the core's cache (the same
        # bytes: every row is quantized on its own). One 3072x3072 bf16 weight on one core:
        # int8wo 151-157 Mparam/s in slabs of 128-256 rows against 27-34 at once; fp8wo 147 vs 44.
        slab = max(1, SLAB_VALUES // max(1, tensor.shape[1]))
        parts = [self._quantize_rows(plan, tensor[r : r + slab]) for r in range(0, tensor.shape[0], slab)]
        if len(parts) == 1:
            return parts[0]
        joined = {k: torch.cat([p.parts[k] for p in parts]) for k in parts[0].parts}
        return EncodedChunk(joined, meta=parts[0].meta)

    def _quantize_rows(self, plan: TensorPlan, tensor: Any) -> EncodedChunk:
        import torch
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
        from torchao.quantization import quantize_

        out_features, in_features = tensor.shape
        linear = torch.nn.Linear(in_features, out_features, bias=False, device="meta")
        linear.weight = torch.nn.Parameter(tensor, requires_grad=False)
        if self.scheme == "int4wo":
            linear.to("cuda")
        quantize_(linear, self._config)
        if type(linear.weight) in (torch.Tensor, torch.nn.Parameter):  # the policy should have kept it
            raise RuntimeError(f"torchao left {plan.name} {tuple(tensor.shape)} unquantized under {self.scheme}")
        flat, metadata = flatten_tensor_state_dict({plan.name: linear.weight})
        # quantize_ leaves a reference cycle through the module; break it so the quantized
        # tensor is freed now rather than at the next garbage collection (bounded memory).
        linear._parameters.clear()
        return EncodedChunk({k: v.cpu() for k, v in flat.items()}, meta=metadata[plan.name])

    def finish_tensor(self, component: str, plan: TensorPlan, chunks: list[EncodedChunk]) -> list[tuple[str, Any]]:
        # Runs in plan order on one thread: the place to record the shard header's JSON.
        if plan.name not in self._metadata:
            self._names.append(plan.name)
        quantized = plan.action == QUANTIZE
        self._metadata[plan.name] = chunks[0].meta if quantized else json.dumps({"_type": "Tensor"})
        return super().finish_tensor(component, plan, chunks)

    def shard_metadata(self, component: str) -> dict[str, str]:
        # In name order (the plan's order, in which finish_tensor records them) so the header
        # is the same for any --jobs.
        names = sorted(self._names)
        meta = {"format": "pt", **{n: self._metadata[n] for n in names}}
        meta["tensor_names"] = json.dumps(names)
        return meta

    def quantization_config(self, component: str) -> dict[str, Any]:
        if component == "transformer":
            from diffusers import TorchAoConfig
        else:
            from transformers import TorchAoConfig
        return TorchAoConfig(self.torchao_config()).to_dict()

    # --- cards ------------------------------------------------------------------------------

    @classmethod
    def card_method(cls, manifest: dict[str, Any]) -> str:
        version = (manifest.get("versions") or {}).get("torchao", "")
        return (
            f"The weights were quantized ahead of time with torchao {version} and saved as "
            "safetensors in the layout diffusers and transformers write for torchao models, so a plain "
            "`from_pretrained` loads them: nothing is quantized at load time. torchao checkpoints are tied to "
            "the torchao version that wrote them: install exactly that version (below)."
        )
