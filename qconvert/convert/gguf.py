"""GGUF backend: single-file GGUF checkpoints for ComfyUI-GGUF, diffusers and transformers.

Output (one folder): ``flux1-<name>-<SCHEME>.gguf`` (the transformer) and, when the T5 encoder
is converted, ``t5xxl-<name>-<SCHEME>.gguf``.

* ``<name>`` is a short name derived from the source: the built-in name (``tiny-flux``), the
  Hub repo's name, the BFL file's stem or the local folder's name, lowercased, with a leading
  ``flux.1-``/``flux1-``/``flux-`` dropped, so ``black-forest-labs/FLUX.1-dev`` and
  ``flux1-dev.safetensors`` both give ``flux1-dev-Q4_K_S.gguf`` (city96's naming).
* Transformer, layout ``bfl`` (default): Black Forest Labs key names (fused ``qkv`` and
  ``linear1``, swapped final adaLN halves), ``general.architecture = "flux"``: what
  ComfyUI-GGUF loads, and what diffusers' ``from_single_file`` converts (diffusers' converter
  hard-codes width 3072, so a BFL-layout file loads in diffusers only at full width). Layout
  ``diffusers`` keeps diffusers' key names and loads in diffusers at any width.
* T5: llama.cpp's ``t5encoder`` architecture and tensor names (``token_embd``,
  ``enc.blk.N.attn_q`` ...), with the ``t5encoder.*`` hyper-parameter keys transformers'
  GGUF loader reads. No tokenizer is embedded (ComfyUI-GGUF and transformers use their own).

Tensor policy (ComfyUI-GGUF's ``tools/convert.py`` and ``lcpp.patch`` conventions), as data:
:func:`transformer_policy` and :func:`t5_policy` return :class:`~qconvert.plan.Policy` objects
over *output* names; :func:`resolve_type` then applies the row-length fallback.

* 1-D tensors and tensors of at most 1024 elements: F32.
* ``img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``guidance_in``, ``final_layer``
  (diffusers: ``x_embedder``, ``context_embedder``, ``time_text_embed``, ``proj_out``,
  ``norm_out``): never quantized; from a BF16 source kept in BF16, as ComfyUI-GGUF's
  ``tools/convert.py`` writes them (lossless), from an F16/F32 source in F32 (exact). These
  tensors are ~1% of FLUX.1-dev. (Chroma's approximator, ``distilled_guidance_layer``, is
  quantized like the blocks, as ComfyUI-GGUF's ``lcpp.patch`` does.)
* ``_S`` schemes: one type for every other 2-D weight. ``_M``: attention qkv (fused) / v
  (separate) and MLP down projections one step up (Q3_K -> Q4_K, Q4_K -> Q5_K,
  Q5_K -> Q6_K): BFL ``img_attn.qkv``, ``txt_attn.qkv``, ``img_mlp.2``, ``txt_mlp.2`` and
  ``single_blocks.N.linear2`` (attention out + MLP down, fused); diffusers ``attn.to_v``,
  ``attn.add_v_proj``, ``ff.net.2``, ``ff_context.net.2``, ``single_transformer_blocks.N.proj_out``;
  T5 ``attn_v``, ``ffn_down``. Q2_K and Q6_K are single-type.
* T5 ``token_embd``: Q6_K for the K and legacy schemes (Q8_0 for Q8_0, the scheme's float
  type for F16/BF16), as llama.cpp does for a model without an output tensor.
  ``attn_rel_b`` (relative attention bias): F32, never quantized (llama.cpp).
* Row length not a multiple of the type's block (256 for K types, 32 for the legacy ones):
  llama.cpp's fallback table (Q2_K, Q3_K -> Q4_0; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0),
  then F16 when even 32 does not divide the row (ComfyUI-GGUF's forced fallback).

Streaming: tensor infos go first (types and sizes are known from the plan), then header, KV
and tensor-info data, then every tensor's data in plan order. The shared scheduler
(:mod:`qconvert.convert.schedule`) reads every tensor in row chunks (the one chunk size, so the
bytes are identical for any ``--jobs``), encodes them on ``--jobs`` workers (default: all
cores) with at most ``jobs + 1`` chunks in flight, and :meth:`GGUFBackend.write_gguf` writes
the chunks of the tensor being written to the file as they come, so memory holds a few chunks
whatever the model size (slim-flux, 1.1 GB bf16: ~70 MB above the process's baseline).

The pool is threads: numpy releases the GIL inside each vectorized pass, and the encoders
share the mmapped source without copies. Measured on a 16-core host (Q4_K, 151M params):
1 thread 13-15 Mparam/s, 16 threads 57 with ``K_CHUNK_BLOCKS = 4096`` (22 with kquants'
default 1024); Q8_0 ~200 Mparam/s. ``QCONVERT_GGUF_POOL=process`` (or ``pool="process"``)
uses spawned processes that read their own rows instead: no GIL, but every worker imports
torch (~370 MB each, 6 GB for 16) and on that host it peaked at ~60 Mparam/s (Q4_K).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .. import __version__
from ..families import flux
from ..errors import InputError, NotAFluxModel, UsageError, opt
from ..identity import SourceIdentity
from ..plan import CAST, KEEP, QUANTIZE, ComponentPlan, Policy, Rule, TensorPlan
from ..sources import Component, FileSegment, SourceTensor, read_safetensors_header
from .base import GGUF_FILES, Backend, ModelFacts, ProgressFn, check_bfl_width
from .schedule import EncodedChunk, Scheduler, rows_per_chunk

if TYPE_CHECKING:  # numpy is imported where arrays are made: importing the backend stays cheap
    import numpy as np

# --- schemes and types (data) ----------------------------------------------------------------

# scheme -> (main type, type of the _M "more bits" tensors or None)
SCHEME_TYPES: dict[str, tuple[str, str | None]] = {
    "F16": ("F16", None),
    "BF16": ("BF16", None),
    "Q8_0": ("Q8_0", None),
    "Q6_K": ("Q6_K", None),
    "Q5_K_M": ("Q5_K", "Q6_K"),
    "Q5_K_S": ("Q5_K", None),
    "Q5_1": ("Q5_1", None),
    "Q5_0": ("Q5_0", None),
    "Q4_K_M": ("Q4_K", "Q5_K"),
    "Q4_K_S": ("Q4_K", None),
    "Q4_1": ("Q4_1", None),
    "Q4_0": ("Q4_0", None),
    "Q3_K_M": ("Q3_K", "Q4_K"),
    "Q3_K_S": ("Q3_K", None),
    "Q2_K": ("Q2_K", None),
}

FLOAT_TYPES = ("F32", "F16", "BF16")
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# (block size, bytes per block) for every type written here; equals gguf.GGML_QUANT_SIZES
# (checked by the tests) so that planning needs no gguf import.
TYPE_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q8_0": (32, 34), "Q5_1": (32, 24), "Q5_0": (32, 22), "Q4_1": (32, 20), "Q4_0": (32, 18),
    "Q6_K": (256, 210), "Q5_K": (256, 176), "Q4_K": (256, 144), "Q3_K": (256, 110),
    "Q2_K": (256, 84),
}  # fmt: skip

# Row length not a multiple of the type's block size -> next type to try (llama.cpp's
# llama-quant.cpp table, with Q4_0 for Q2_K/Q3_K as before IQ4_NL, which gguf-py cannot
# write); legacy types fall back to F16 as ComfyUI-GGUF's patch forces.
FALLBACK: dict[str, str] = {
    "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
    "Q8_0": "F16", "Q5_1": "F16", "Q5_0": "F16", "Q4_1": "F16", "Q4_0": "F16",
}  # fmt: skip

HIGH_PRECISION = "F32"

# llama.cpp's general.file_type values (gguf.LlamaFileType), so planning needs no gguf import.
FILE_TYPES: dict[str, int] = {
    "F16": 1, "BF16": 32, "Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q5_K_S": 16, "Q5_1": 9,
    "Q5_0": 8, "Q4_K_M": 15, "Q4_K_S": 14, "Q4_1": 3, "Q4_0": 2, "Q3_K_M": 12, "Q3_K_S": 11,
    "Q2_K": 10,
}  # fmt: skip

LAYOUTS = ("bfl", "diffusers")

# How the quantized types are searched (option ``gguf_search``): "weighted" (default) is ggml's
# importance-matrix search with all-ones weights, the path stable-diffusion.cpp's converter
# takes (lower error: Q4_0 0.0592 vs 0.0651 rel. on its tensors); "reference" is ggml's
# quantize_row_*_ref, byte-equal to llama.cpp's / gguf-py's unweighted output. Q8_0 has only
# the one path. Implementation: convert/ggml_weighted.py (weighted), gguf-py and kquants.py.
SEARCHES = ("weighted", "reference")
WEIGHTED_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_DTYPE_TO_TYPE = {"F32": "F32", "F16": "F16", "BF16": "BF16"}


def _action(target: str) -> str:
    return CAST if target in FLOAT_TYPES else QUANTIZE


def _small_rules() -> tuple[Rule, ...]:
    return (
        Rule(r"", CAST, "F32", when=("1d",), reason="1-D tensor (bias, norm scale): F32"),
        Rule(r"", CAST, "F32", when=("small",), reason="at most 1024 elements: F32"),
    )


# Output-name patterns per layout.
_HIGH_PRECISION = {
    "bfl": r"^(img_in|txt_in|time_in|vector_in|guidance_in|final_layer)\.",
    "diffusers": r"^(x_embedder|context_embedder|time_text_embed|proj_out|norm_out)\.",
}
_MORE_BITS = {
    "bfl": r"\.(img_attn|txt_attn)\.qkv\.weight$|\.(img_mlp|txt_mlp)\.2\.weight$"
    r"|^single_blocks\.\d+\.linear2\.weight$",
    "diffusers": r"\.attn\.(to_v|add_v_proj)\.weight$|\.(ff|ff_context)\.net\.2\.weight$"
    r"|^single_transformer_blocks\.\d+\.proj_out\.weight$",
    "t5": r"\.(attn_v|ffn_down)\.weight$",
}


def transformer_policy(scheme: str, layout: str = "bfl") -> Policy:
    """Policy over the output names of the Flux transformer (BFL or diffusers layout)."""
    main, more = SCHEME_TYPES[scheme]
    rules = [
        *_small_rules(),
        # A BF16 source keeps them in BF16, as ComfyUI-GGUF's tools/convert.py does (lossless and
        # half the bytes); F16 and F32 sources in F32 (F16 -> F32 is exact too).
        Rule(_HIGH_PRECISION[layout], KEEP, when=("bf16",), reason="input/output layer: the source's BF16"),
        Rule(_HIGH_PRECISION[layout], CAST, HIGH_PRECISION, reason="input/output layer: high precision"),
    ]
    if more:
        rules.append(Rule(_MORE_BITS[layout], _action(more), more, when=("2d",), reason=f"{scheme} mix: one step up"))
    rules.append(Rule(r"\.weight$", _action(main), main, when=("2d",), reason=f"{scheme} weight"))
    return Policy(tuple(rules), default=Rule(r"", KEEP, reason="not a 2-D weight: source dtype"))


def embedding_type(scheme: str) -> str:
    main, _ = SCHEME_TYPES[scheme]
    return main if main in ("F16", "BF16", "Q8_0") else "Q6_K"


def t5_policy(scheme: str) -> Policy:
    """Policy over llama.cpp T5 tensor names."""
    main, more = SCHEME_TYPES[scheme]
    emb = embedding_type(scheme)
    rules = [
        *_small_rules(),
        Rule(r"\.attn_rel_b\.weight$", CAST, "F32", reason="relative attention bias: never quantized"),
        Rule(r"^token_embd\.weight$", _action(emb), emb, when=("2d",), reason="token embedding"),
    ]
    if more:
        rules.append(Rule(_MORE_BITS["t5"], _action(more), more, when=("2d",), reason=f"{scheme} mix: one step up"))
    rules.append(Rule(r"\.weight$", _action(main), main, when=("2d",), reason=f"{scheme} weight"))
    return Policy(tuple(rules), default=Rule(r"", KEEP, reason="not a 2-D weight: source dtype"))


def resolve_type(target: str, shape: tuple[int, ...]) -> str:
    """``target``, or its fallback when the row length is not a multiple of its block size."""
    row = shape[-1] if shape else 1
    while TYPE_SIZES[target][0] > 1 and row % TYPE_SIZES[target][0] != 0:
        target = FALLBACK[target]
    return target


def type_nbytes(ggml_type: str, shape: tuple[int, ...]) -> int:
    block, size = TYPE_SIZES[ggml_type]
    numel = 1
    for d in shape:
        numel *= d
    return numel // block * size


# --- names -------------------------------------------------------------------------------------

_T5_BLOCK = {
    "layer.0.SelfAttention.q": "attn_q",
    "layer.0.SelfAttention.k": "attn_k",
    "layer.0.SelfAttention.v": "attn_v",
    "layer.0.SelfAttention.o": "attn_o",
    "layer.0.SelfAttention.relative_attention_bias": "attn_rel_b",
    "layer.0.layer_norm": "attn_norm",
    "layer.1.DenseReluDense.wi": "ffn_up",  # T5 v1.0 (not gated)
    "layer.1.DenseReluDense.wi_0": "ffn_gate",
    "layer.1.DenseReluDense.wi_1": "ffn_up",
    "layer.1.DenseReluDense.wo": "ffn_down",
    "layer.1.layer_norm": "ffn_norm",
}
_T5_TOP = {
    "shared.weight": "token_embd.weight",
    "encoder.embed_tokens.weight": "token_embd.weight",
    "encoder.final_layer_norm.weight": "enc.output_norm.weight",
}
_T5_BLOCK_RE = re.compile(r"^encoder\.block\.(\d+)\.(.+)\.(weight|bias)$")


def t5_gguf_name(name: str) -> str | None:
    """llama.cpp name of a transformers T5 encoder tensor (None if it has none)."""
    if name in _T5_TOP:
        return _T5_TOP[name]
    m = _T5_BLOCK_RE.match(name)
    if m and m.group(2) in _T5_BLOCK:
        return f"enc.blk.{m.group(1)}.{_T5_BLOCK[m.group(2)]}.{m.group(3)}"
    return None


def short_name(identity: SourceIdentity) -> str:
    """``<name>`` of the output files, from the source's short name (see the module docstring)."""
    raw = identity.short_name
    name = re.sub(r"[^a-z0-9._-]+", "-", raw.lower()).strip("-.")
    return name or "model"


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# --- encoding (runs in workers) -------------------------------------------------------------------


def _to_f32(raw: np.ndarray, src: str) -> np.ndarray:
    import numpy as np

    if src == "BF16":  # exact either way; torch's conversion is ~3x numpy's shift-and-view
        return _source_tensor(raw, src).float().numpy()
    return np.ascontiguousarray(raw, dtype=np.float32)


def _source_tensor(raw: np.ndarray, src: str) -> Any:
    """The source values as a torch tensor without a copy (bfloat16 from its uint16 bits)."""
    import numpy as np
    import torch

    t = torch.from_numpy(np.ascontiguousarray(raw))
    return t.view(torch.bfloat16) if src == "BF16" else t


def encode_array(raw: np.ndarray, src: str, target: str, search: str = "weighted") -> np.ndarray:
    """Encode rows of a source tensor as GGML type ``target``.

    ``raw`` holds the source values: float32 or float16, or bfloat16 as uint16 bits. The
    result's bytes are the tensor data exactly as GGUF stores it. ``search`` (see
    :data:`SEARCHES`): ``weighted`` = ggml's importance-matrix search with all-ones weights for
    the types that have one (:data:`WEIGHTED_TYPES`), ``reference`` = ggml's ``*_ref`` bytes.
    """
    import numpy as np

    if target == src:
        return np.ascontiguousarray(raw)
    if target == "BF16" and src != "BF16":
        import gguf

        return gguf.quants.quantize(_to_f32(raw, src), gguf.GGMLQuantizationType.BF16)
    if target == "Q8_0" and raw.shape[-1] % 32 == 0:
        from .kernels import quantize_q8_0  # gguf-py's Q8_0 bytes, ~7x faster (tests/test_kernels.py)

        return quantize_q8_0(_source_tensor(raw, src)).numpy()
    x = _to_f32(raw, src)
    if target == "F32":
        return x
    if target == "F16":
        return x.astype(np.float16)
    import gguf

    qtype = gguf.GGMLQuantizationType[target]
    if search == "weighted" and target in WEIGHTED_TYPES:
        from .ggml_weighted import quantize_weighted

        return quantize_weighted(x, target)
    if target in K_TYPES:
        return _quantize_k(x, qtype)
    return gguf.quants.quantize(x, qtype)


# Super-blocks per vectorized K-quant pass. kquants' own default (1024) keeps temporaries at
# 1 MiB; 4096 cuts the Python/GIL share of each pass, which is what limits a thread pool:
# Q4_K on 16 threads (H200 host, 16 cores) ran at 57 Mparam/s instead of 22, same bytes.
K_CHUNK_BLOCKS = 4096


def _quantize_k(x: np.ndarray, qtype: Any) -> np.ndarray:
    from .kquants import KQUANTS

    return KQUANTS[qtype].quantize(x, chunk_blocks=K_CHUNK_BLOCKS)


def _raw_numpy(tensor: Any) -> tuple[np.ndarray, str]:
    """A torch tensor's values as numpy without a copy (bfloat16 as uint16 bits)."""
    import numpy as np
    import torch

    t = tensor.detach().contiguous()
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), "BF16"
    if t.dtype == torch.float16:
        return t.numpy(), "F16"
    if t.dtype == torch.float32:
        return t.numpy(), "F32"
    raise InputError(f"tensor of dtype {t.dtype} cannot be written to GGUF", hint="convert from a float checkpoint")


class _Streamed:
    """Duck-typed array for ``GGUFWriter.write_tensor_data``: writes chunks as they finish."""

    def __init__(self, nbytes: int, chunks: Iterator[np.ndarray]) -> None:
        self.nbytes = nbytes
        self._chunks = chunks
        self.written = 0

    def tofile(self, fh: Any) -> None:
        import numpy as np

        for arr in self._chunks:
            fh.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # through _HashingFile
            self.written += arr.nbytes


class _HashingFile:
    """The GGUF file as ``GGUFWriter`` sees it: every byte it writes also goes into a sha256.
    The writer only appends (header, KV, tensor infos, padding, data), so that is the sha256
    of the file, with no second read. A large write is hashed on a helper thread while the
    file write runs (both release the GIL): sha256 runs at ~1 GB/s, as slow as the disk, and
    was a third of a BF16 conversion's wall time when done in turn."""

    OVERLAP = 1 << 20  # bytes: below this the hand-off costs more than it saves

    def __init__(self, fh: Any) -> None:
        import hashlib
        from concurrent.futures import ThreadPoolExecutor

        self.fh, self.sha256 = fh, hashlib.sha256()
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="qconvert-sha256")

    def write(self, data: Any) -> int:
        if memoryview(data).nbytes < self.OVERLAP:
            self.sha256.update(data)
            return self.fh.write(data)
        hashed = self._hasher.submit(self.sha256.update, data)
        try:
            return self.fh.write(data)
        finally:
            hashed.result()  # in order: the next write's bytes go in after these

    def tell(self) -> int:
        return self.fh.tell()

    def flush(self) -> None:
        self.fh.flush()

    def close(self) -> None:
        self._hasher.shutdown()
        self.fh.close()


# --- backend ---------------------------------------------------------------------------------------


class GGUFBackend(Backend):
    name = "gguf"
    schemes: ClassVar[dict[str, str]] = {
        "F16": "float16 (1-D and small tensors F32)",
        "BF16": "bfloat16 (1-D and small tensors F32)",
        "Q8_0": "8-bit, blocks of 32",
        "Q6_K": "6.56-bit K-quant",
        "Q5_K_M": "Q5_K, attention qkv/v and MLP down in Q6_K",
        "Q5_K_S": "5.5-bit K-quant",
        "Q5_1": "5-bit + min, blocks of 32",
        "Q5_0": "5-bit, blocks of 32",
        "Q4_K_M": "Q4_K, attention qkv/v and MLP down in Q5_K",
        "Q4_K_S": "4.5-bit K-quant",
        "Q4_1": "4-bit + min, blocks of 32",
        "Q4_0": "4-bit, blocks of 32",
        "Q3_K_M": "Q3_K, attention qkv/v and MLP down in Q4_K",
        "Q3_K_S": "3.44-bit K-quant",
        "Q2_K": "2.63-bit K-quant",
    }
    accepted_options = ("jobs", "layout", "pool", "gguf_search")  # one .gguf file per model: no shards
    cli_flags = ("jobs", "layout", "gguf_search")
    recorded_defaults: ClassVar[dict[str, Any]] = {"gguf_search": SEARCHES[0]}
    extra = "gguf"
    import_names = ("gguf",)
    pip_package = "gguf"
    version_packages = ("gguf",)
    warm_up_modules = ("gguf", "diffusers.quantizers.gguf.utils")
    container = GGUF_FILES
    hub_library_name = "gguf"
    card_loader = "`{transformer}.from_single_file`"

    def __init__(self, scheme: str, **options: Any) -> None:
        if scheme not in self.schemes:
            unsupported = scheme.upper().startswith(("IQ", "TQ", "MXFP", "NVFP", "Q1_", "Q8_1", "Q8_K"))
            raise UsageError(
                f"gguf scheme {scheme!r} is not supported (diffusers cannot load it or it cannot be written here)"
                if unsupported
                else f"unknown gguf scheme {scheme!r}",
                hint=f"choose one of: {', '.join(self.schemes)}",
            )
        super().__init__(scheme, **options)
        layout = options.get("layout") or "bfl"
        if layout not in LAYOUTS:
            raise UsageError(f"unknown gguf layout {layout!r}", hint="choose bfl or diffusers")
        self.gguf_layout = layout
        search = options.get("gguf_search") or SEARCHES[0]
        if search not in SEARCHES:
            raise UsageError(
                f"unknown gguf search {search!r}",
                hint=f"{opt('gguf_search', 'weighted')} (default) or {opt('gguf_search', 'reference')}",
            )
        self.gguf_search = search
        # "thread" (default) or "process": where chunks are encoded.
        self.pool = str(options.get("pool") or os.environ.get("QCONVERT_GGUF_POOL") or "thread")
        if self.pool not in ("thread", "process"):
            raise UsageError(f"unknown pool {self.pool!r}", hint="thread or process")

    # --- planning -----------------------------------------------------------------------------

    def policy(self, component: str, facts: ModelFacts | None = None) -> Policy:
        if component == "transformer":
            return transformer_policy(self.scheme, self.gguf_layout)
        return t5_policy(self.scheme)

    def estimate_bytes(self, rule: Rule, tensor: SourceTensor) -> int:
        return type_nbytes(self.target_type(rule, tensor.dtype, tensor.shape), tensor.shape)

    @staticmethod
    def target_type(rule: Rule, dtype: str, shape: tuple[int, ...]) -> str:
        if rule.action == KEEP:
            if dtype not in _DTYPE_TO_TYPE:
                raise InputError(f"a {dtype} tensor cannot be written to GGUF", hint="convert from a float checkpoint")
            return _DTYPE_TO_TYPE[dtype]
        return resolve_type(str(rule.target), shape)

    def output_tensors(self, comp: Component, facts: ModelFacts | None = None) -> dict[str, tuple[SourceTensor, bool]]:
        """Output name -> (lazy source tensor, is a Linear weight), in file order."""
        linear = facts.linear_weights if facts else set()
        out: dict[str, tuple[SourceTensor, bool]] = {}
        if comp.name == "transformer" and self.gguf_layout == "bfl":
            shapes = {n: t.shape for n, t in comp.tensors.items()}
            try:
                recipes = flux.diffusers_to_bfl(shapes)
            except KeyError as e:
                raise NotAFluxModel(f"transformer: {e.args[0]}") from None
            headers: dict[Path, dict[str, Any]] = {}
            for bfl in sorted(recipes, key=_natural_key):
                recipe = recipes[bfl]
                parts = [comp.tensors[s.key] for s in recipe]
                dtypes = {p.dtype for p in parts}
                if len(dtypes) != 1:
                    raise InputError(f"transformer: the parts of {bfl} have different dtypes {sorted(dtypes)}")
                segs: list[FileSegment] = []
                rows = 0
                for s in recipe:
                    t = comp.tensors[s.key]
                    lo = s.start or 0
                    hi = t.shape[0] if s.stop is None else s.stop
                    segs.extend(_slice_segments(t, lo, hi, headers))
                    rows += hi - lo
                shape = (rows, *parts[0].shape[1:])
                tensor = SourceTensor(bfl, shape, parts[0].dtype, tuple(_merge_segments(segs, headers)))
                out[bfl] = (tensor, all(s.key in linear for s in recipe))
            return out
        if comp.name == "transformer":
            for name in sorted(comp.tensors, key=_natural_key):
                out[name] = (comp.tensors[name], name in linear)
            return out
        # T5 encoder
        names = set(comp.tensors)
        for name in sorted(names):
            if name == "encoder.embed_tokens.weight" and "shared.weight" in names:
                continue  # tied to shared.weight
            g = t5_gguf_name(name)
            if g is None:
                raise NotAFluxModel(
                    f"{comp.name}: tensor {name} is not part of a T5 encoder",
                    hint="the GGUF backend converts T5EncoderModel text encoders",
                )
            out[g] = (comp.tensors[name], name in linear)
        return dict(sorted(out.items(), key=lambda kv: _natural_key(kv[0])))

    # The base planning (Backend.plan_component) over GGUF's own output tensors and names.

    def tensor_sources(self, comp: Component, facts: ModelFacts | None) -> dict[str, tuple[SourceTensor, bool]]:
        return self.output_tensors(comp, facts)

    def plan_action(self, rule: Rule, tensor: SourceTensor) -> tuple[str, Any]:
        # The GGML type after the row-length fallback, which may turn a quantization into a cast.
        target = self.target_type(rule, tensor.dtype, tensor.shape)
        return (KEEP if rule.action == KEEP else _action(target)), target

    def output_name(self, component: str, key: str) -> str | None:
        return key  # tensor_sources is keyed by the output name already

    # The family being written (write_output sets the source's): its GGUF architecture and file names.
    family: Any = flux.Flux

    def file_name(self, component: str, name: str) -> str:
        return f"{self.family.gguf_stem(component, name)}-{self.scheme}.gguf"

    # --- encoding -----------------------------------------------------------------------------

    reference_cycles = False  # numpy arrays only: nothing for the cyclic collector

    def chunk_rows(self, plan: TensorPlan) -> int | None:
        # Every GGML type's blocks run along a row (resolve_type makes the row a whole number
        # of blocks or super-blocks), so any whole rows are whole blocks.
        return rows_per_chunk(plan.shape)

    def encode_chunk(self, component: str, plan: TensorPlan, rows: Any) -> EncodedChunk:
        """Rows (torch) -> one part, the numpy array of their GGUF data, under the GGUF name."""
        raw, src = _raw_numpy(rows)
        data = encode_array(raw, src, str(plan.target), search=self.gguf_search)
        return EncodedChunk({str(plan.out_name or plan.name): data})

    def finish_tensor(self, component: str, plan: TensorPlan, chunks: list[EncodedChunk]) -> list[tuple[str, Any]]:
        # Only for a whole tensor in memory (encode): write_gguf streams the chunks instead.
        import numpy as np

        return [(n, np.concatenate([c.parts[n] for c in chunks])) for n in chunks[0].parts]

    def metadata(self, component: str, name: str, comp: Component, identity: SourceIdentity) -> dict[str, Any]:
        """KV pairs besides general.architecture: key -> (value, gguf value type name)."""
        src = identity.public().to_dict()
        kv: dict[str, Any] = {
            "general.name": (self.family.gguf_stem(component, name), "STRING"),
            "general.file_type": (FILE_TYPES[self.scheme], "UINT32"),
            "general.quantization_version": (2, "UINT32"),
            "qconvert.version": (__version__, "STRING"),
            "qconvert.scheme": (self.scheme, "STRING"),
            "qconvert.gguf_search": (self.gguf_search, "STRING"),
            "qconvert.source": (json.dumps(src, sort_keys=True), "STRING"),
        }
        if component == "transformer":
            kv["qconvert.layout"] = (self.gguf_layout, "STRING")
            return kv
        cfg = comp.config
        arch = self.family.gguf_arch[component]
        d_kv = int(cfg.get("d_kv", 64))
        eps = float(cfg.get("layer_norm_epsilon", 1e-6))
        kv.update(
            {
                f"{arch}.context_length": (int(cfg.get("n_positions", 512)), "UINT32"),
                f"{arch}.embedding_length": (int(cfg["d_model"]), "UINT32"),
                f"{arch}.feed_forward_length": (int(cfg["d_ff"]), "UINT32"),
                f"{arch}.block_count": (int(cfg["num_layers"]), "UINT32"),
                f"{arch}.attention.head_count": (int(cfg["num_heads"]), "UINT32"),
                f"{arch}.attention.key_length": (d_kv, "UINT32"),
                f"{arch}.attention.value_length": (d_kv, "UINT32"),
                f"{arch}.attention.layer_norm_epsilon": (eps, "FLOAT32"),
                f"{arch}.attention.layer_norm_rms_epsilon": (eps, "FLOAT32"),
                f"{arch}.attention.relative_buckets_count": (
                    int(cfg.get("relative_attention_num_buckets", 32)),
                    "UINT32",
                ),
                f"{arch}.vocab_size": (int(cfg["vocab_size"]), "UINT32"),
            }
        )
        if cfg.get("decoder_start_token_id") is not None:
            kv[f"{arch}.decoder_start_token_id"] = (int(cfg["decoder_start_token_id"]), "UINT32")
        return kv

    # --- writing ------------------------------------------------------------------------------

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
        from ..output import copy_license_files

        self.family = source.family
        name = short_name(source.identity)
        written: dict[str, list[Path]] = {}
        for cp in plan.components:
            if cp.action != "quantize":
                continue  # GGUF output holds only the converted components
            t0 = time.perf_counter()
            comp = source.components[cp.name]
            path = tmp / self.file_name(cp.name, name)
            self.write_gguf(path, comp, cp, facts.get(cp.name), source.identity, name, scheduler, progress)
            written[cp.name] = [path]
            seconds[cp.name] = time.perf_counter() - t0
        written["_root"] = copy_license_files(source.root, tmp)
        return written

    def write_gguf(
        self,
        path: Path,
        comp: Component,
        cp: ComponentPlan,
        facts: ModelFacts | None,
        identity: SourceIdentity,
        name: str,
        scheduler: Scheduler,
        progress: ProgressFn,
    ) -> None:
        """One .gguf file: tensor infos first (types and sizes are known from the plan), then
        header, KV and tensor-info data, then every tensor's data in plan order, each tensor's
        chunks written as the scheduler hands them over (never a whole tensor in memory)."""
        import gguf
        import numpy as np

        writer = gguf.GGUFWriter(path=None, arch=self.family.gguf_arch[comp.name])
        for key, (value, vtype) in self.metadata(comp.name, name, comp, identity).items():
            writer.add_key_value(key, value, gguf.GGUFValueType[vtype])
        for tp in cp.tensors:
            writer.add_tensor_info(
                str(tp.out_name),
                tp.shape,
                np.dtype(np.float32),
                tp.bytes_out,
                raw_dtype=gguf.GGMLQuantizationType[str(tp.target)],
            )
        writer.open_output_file(path)  # write_header_to_file then keeps this (wrapped) file
        assert writer.fout is not None and len(writer.fout) == 1
        hashing = writer.fout[0] = _HashingFile(writer.fout[0])
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        items = self.planned_sources(comp, facts, cp)
        try:
            with contextlib.closing(scheduler.chunks(self, comp.name, items)) as tensors:
                for tp, chunks in tensors:
                    stream = _Streamed(tp.bytes_out, (arr for chunk in chunks for arr in chunk.parts.values()))
                    writer.write_tensor_data(stream)  # type: ignore[arg-type]
                    if stream.written != tp.bytes_out:
                        raise RuntimeError(f"{tp.out_name}: wrote {stream.written} bytes, planned {tp.bytes_out}")
                    progress(tp.bytes_in)
        finally:
            writer.close()
        from ..output import note_hashed

        note_hashed(path, hashing.sha256.hexdigest())

    # --- cards: a single-file GGUF transformer (and T5) + the base pipeline ------------------

    @classmethod
    def card_method(cls, manifest: dict[str, Any]) -> str:
        layout = (manifest.get("options") or {}).get("layout") or "bfl"
        names = (
            "diffusers tensor names (loads in diffusers at any model width)"
            if layout == "diffusers"
            else "Black Forest Labs tensor names, as ComfyUI-GGUF expects (diffusers converts them on load)"
        )
        text = (
            f"Single-file GGUF {manifest.get('scheme')} with {names}, following ComfyUI-GGUF's conventions (1-D and "
            "small tensors and the input/output layers kept in F32). The files hold only the quantized models: the "
            "VAE, the CLIP text encoder, the tokenizers and the configs come from the base pipeline."
        )
        text += _search_sentence(manifest)
        from ..manifest import manifest_family

        t5 = manifest_family(manifest).t5()
        if ((manifest.get("components") or {}).get(t5) or {}).get("files"):
            text += " transformers dequantizes the T5 GGUF when it loads it (a smaller download, not less memory)."
        return text

    @classmethod
    def usage_lines(cls, facts: Any) -> list[str]:
        base_imports, base_expr = facts.base_pipeline()
        t5 = facts.family.t5()
        flux_files, t5_files = facts.files("transformer"), facts.files(t5)
        if not flux_files:
            raise InputError(f"{facts.out}: qconvert.json lists no transformer .gguf file", hint="convert again")
        pipeline, transformer = facts.family.pipeline_class, facts.family.transformer_class
        imports = ["import torch", f"from diffusers import {pipeline}, {transformer}, GGUFQuantizationConfig"]
        if t5_files:
            imports.append("from transformers import T5Config, T5EncoderModel")
        if facts.repo_id:  # from_single_file takes only huggingface.co URLs: download the file
            imports.append("from huggingface_hub import hf_hub_download")
            gguf_path = f"hf_hub_download(repo, {json.dumps(flux_files[0])})"
        else:
            gguf_path = f'f"{{repo}}/{flux_files[0]}"'
        lines = imports + base_imports + [
            "",
            f"repo = {json.dumps(facts.repo)}",
            f"base = {base_expr}  # the pipeline that supplies the VAE, CLIP, tokenizers and configs",
            f"dtype = torch.{facts.dtype}",
            f"transformer = {transformer}.from_single_file(",
            f"    {gguf_path},",
            "    quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),",
            "    config=base,",
            '    subfolder="transformer",',
            "    dtype=dtype,",
            ")",
        ]
        parts = "transformer=transformer"
        if t5_files:
            lines += [
                f"{t5} = T5EncoderModel.from_pretrained(",
                f"    repo, gguf_file={json.dumps(t5_files[0])},",
                f'    config=T5Config.from_pretrained(base, subfolder="{t5}"), dtype=dtype,',
                ")",
            ]
            parts += f", {t5}={t5}"
        lines += [
            f"pipe = {pipeline}.from_pretrained(base, {parts}, dtype=dtype)",
            'pipe.to("cuda" if torch.cuda.is_available() else "cpu")',
        ]
        return lines

    # --- validation ---------------------------------------------------------------------------

    @classmethod
    def check_loadable(cls, options: dict[str, Any], transformer_config: dict[str, Any]) -> None:
        if (options.get("layout") or "bfl") == "bfl":
            check_bfl_width(transformer_config, "BFL-layout GGUF files")

    @classmethod
    def load_for_validation(cls, out: Path, manifest: dict[str, Any], ref_root: Path, *, dtype: Any, device: str) -> Any:
        from diffusers import GGUFQuantizationConfig

        from ..manifest import manifest_family

        fam = manifest_family(manifest)
        tcfg = json.loads((Path(ref_root) / "transformer" / "config.json").read_text())
        cls.check_loadable(manifest.get("options", {}), tcfg)
        ggufs = sorted(Path(out).glob("*.gguf"))
        t5 = fam.t5()
        t5_files = [p for p in ggufs if p.name.startswith(fam.gguf_file_prefix[t5] + "-")]
        flux_files = [p for p in ggufs if p not in t5_files]
        if not flux_files:
            raise InputError(f"{out} has no transformer .gguf file", hint="convert again")
        transformer = fam.transformer_type().from_single_file(
            str(flux_files[0]),
            quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
            config=str(ref_root),
            subfolder="transformer",
            dtype=dtype,
        )
        parts: dict[str, Any] = {"transformer": transformer}
        if t5_files:
            from transformers import T5Config, T5EncoderModel

            parts[t5] = T5EncoderModel.from_pretrained(
                str(out), gguf_file=t5_files[0].name,
                config=T5Config.from_pretrained(ref_root / t5), dtype=dtype,
            )  # fmt: skip
        pipe = fam.pipeline_type().from_pretrained(ref_root, dtype=dtype, **parts)
        return pipe if device == "cpu" else pipe.to(device)


def _search_sentence(manifest: dict[str, Any]) -> str:
    """The card's words for the recorded ``gguf_search`` (none for float/Q8_0 schemes, which
    have one path, and for manifests from before the option)."""
    search = (manifest.get("options") or {}).get("gguf_search")
    main = SCHEME_TYPES.get(str(manifest.get("scheme")), ("F16", None))[0]
    if main not in WEIGHTED_TYPES or search not in SEARCHES:
        return ""
    if search == "weighted":
        return (" The blocks were searched with ggml's weighted quantizers and an all-ones importance matrix "
                "(what stable-diffusion.cpp's converter does; lower error than ggml's reference path).")
    return " The blocks were searched with ggml's reference quantizers (llama.cpp's unweighted bytes)."


# --- segment helpers -------------------------------------------------------------------------------


def _file_rows(path: Path, key: str, headers: dict[Path, dict[str, Any]]) -> int:
    if path not in headers:
        headers[path] = read_safetensors_header(path)[0]
    return headers[path][key].shape[0]


def _slice_segments(t: SourceTensor, start: int, stop: int, headers: dict[Path, dict[str, Any]]) -> list[FileSegment]:
    """Rows [start, stop) of a lazy tensor as file segments."""
    out = []
    pos = 0
    for seg in t.segments:
        lo = seg.start or 0
        hi = _file_rows(seg.path, seg.key, headers) if seg.stop is None else seg.stop
        n = hi - lo
        a, b = max(start, pos), min(stop, pos + n)
        if a < b:
            out.append(FileSegment(seg.path, seg.key, lo + a - pos, lo + b - pos))
        pos += n
    return out


def _merge_segments(segs: list[FileSegment], headers: dict[Path, dict[str, Any]]) -> list[FileSegment]:
    """Join contiguous pieces of the same file tensor; a whole tensor gets open bounds."""
    merged: list[FileSegment] = []
    for s in segs:
        if merged and merged[-1].path == s.path and merged[-1].key == s.key and merged[-1].stop == s.start:
            merged[-1] = FileSegment(s.path, s.key, merged[-1].start, s.stop)
        else:
            merged.append(s)
    out = []
    for s in merged:
        if s.start == 0 and s.stop == _file_rows(s.path, s.key, headers):
            s = FileSegment(s.path, s.key)
        out.append(s)
    return out
