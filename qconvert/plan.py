"""The conversion plan: every output tensor's fate, computed from headers alone.

A :class:`Policy` is plain data (an ordered list of :class:`Rule`), so which tensors are
quantized, kept or upcast can be unit-tested on key lists without any weights. The plan is
built before any tensor data is read; ``--dry-run`` prints it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

# Actions a rule can take on a tensor.
KEEP = "keep"  # written unchanged (same dtype, same bytes)
QUANTIZE = "quantize"  # quantized to the rule's target
CAST = "cast"  # converted to the rule's target float type (e.g. F32, F16)

# Conditions a rule can require besides its name pattern.
CONDITIONS = {
    "linear": lambda ctx: ctx["is_linear_weight"],
    "not_linear": lambda ctx: not ctx["is_linear_weight"],
    "1d": lambda ctx: len(ctx["shape"]) <= 1,
    "small": lambda ctx: ctx["numel"] <= 1024,
    "2d": lambda ctx: len(ctx["shape"]) == 2,
    "bf16": lambda ctx: ctx.get("dtype") == "BF16",  # the source tensor's safetensors dtype
    # torchao int4wo quantizes in groups of 128 input features and leaves other weights as
    # they are (FLUX.1-dev's x_embedder has 64 inputs)
    "in_features_div_128": lambda ctx: len(ctx["shape"]) == 2 and ctx["shape"][1] % 128 == 0,
}


@dataclass(frozen=True)
class Rule:
    """``pattern`` (regex, searched in the tensor name) + conditions -> action [target]."""

    pattern: str
    action: str
    target: str | None = None
    when: tuple[str, ...] = ()
    reason: str = ""

    def matches(self, name: str, ctx: dict[str, Any]) -> bool:
        if not re.search(self.pattern, name):
            return False
        return all(CONDITIONS[c](ctx) for c in self.when)


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    default: Rule = Rule(r"", KEEP, reason="not a quantizable weight")

    def decide(
        self, name: str, shape: tuple[int, ...], *, is_linear_weight: bool, dtype: str | None = None
    ) -> Rule:
        numel = 1
        for d in shape:
            numel *= d
        ctx = {"shape": tuple(shape), "numel": numel, "is_linear_weight": is_linear_weight, "dtype": dtype}
        for rule in self.rules:
            if rule.matches(name, ctx):
                return rule
        return self.default


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: str
    action: str
    target: str | None
    bytes_in: int
    bytes_out: int
    out_name: str | None = None  # for layouts that rename (GGUF/BFL)


@dataclass
class ComponentPlan:
    name: str
    action: str  # "quantize" | "copy" | "from-base" (GGUF: not written, users load it from the base)
    scheme: str | None
    tensors: list[TensorPlan] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0

    @property
    def quantized_count(self) -> int:
        return sum(t.action == QUANTIZE for t in self.tensors)


@dataclass
class Plan:
    backend: str
    scheme: str
    source: dict[str, Any]
    components: list[ComponentPlan]
    layout: str = "pipeline"
    scheme_text: str = ""  # the backend's one-line description of the scheme
    family: str = ""  # the model family (qconvert.families) and how the plan names it
    family_label: str = ""

    @property
    def bytes_in(self) -> int:
        return sum(c.bytes_in for c in self.components)

    @property
    def bytes_out(self) -> int:
        return sum(c.bytes_out for c in self.components)

    def component(self, name: str) -> ComponentPlan:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self, *, tensors: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "backend": self.backend,
            "scheme": self.scheme,
            "layout": self.layout,
            "family": self.family,
            "source": self.source,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "components": [],
        }
        for c in self.components:
            d = {
                "name": c.name,
                "action": c.action,
                "scheme": c.scheme,
                "tensors": len(c.tensors),
                "quantized": c.quantized_count,
                "bytes_in": c.bytes_in,
                "bytes_out": c.bytes_out,
            }
            if tensors:
                d["tensor_plans"] = [asdict(t) for t in c.tensors]
            out["components"].append(d)
        return out

    def render(self, *, verbose: bool = False) -> str:
        lines = [f"plan: {self.backend} {self.scheme} ({self.layout} layout)"]
        if self.family_label:
            lines.append(f"  model: {self.family_label}")
        if self.scheme_text:
            lines.append(f"  {self.scheme}: {self.scheme_text}")
        lines.append(f"{'component':<16}{'action':<10}{'tensors':>8}{'quant':>7}{'in':>12}{'out':>12}")
        for c in self.components:
            lines.append(
                f"{c.name:<16}{c.action:<10}{len(c.tensors):>8}{c.quantized_count:>7}"
                f"{human_bytes(c.bytes_in):>12}{human_bytes(c.bytes_out):>12}"
            )
            targets: dict[str, int] = {}
            for t in c.tensors:
                if t.action == QUANTIZE and t.target:
                    targets[t.target] = targets.get(t.target, 0) + 1
            if targets and set(targets) != {self.scheme}:  # mixes and fallbacks (K-quants on short rows)
                mix = ", ".join(f"{k} x{n}" for k, n in sorted(targets.items(), key=lambda kv: (-kv[1], kv[0])))
                lines.append(f"    quantized as: {mix}")
            if verbose:
                for t in c.tensors:
                    tgt = f" -> {t.target}" if t.target else ""
                    rename = f" as {t.out_name}" if t.out_name and t.out_name != t.name else ""
                    lines.append(
                        f"    {t.name}{rename} {list(t.shape)} {t.dtype} {t.action}{tgt} "
                        f"{human_bytes(t.bytes_in)} -> {human_bytes(t.bytes_out)}"
                    )
        lines.append(
            f"{'total':<34}{'':>7}{human_bytes(self.bytes_in):>12}{human_bytes(self.bytes_out):>12}"
        )
        lines.append("sizes are tensor data; the files add headers (torchao: per-tensor metadata) and configs")
        return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
