"""The backend base class: a small set of defaulted hooks.

A backend knows how to turn one source tensor (and its name) into output tensors — its
*codec*: :meth:`~Backend.chunk_rows`, :meth:`~Backend.encode_chunk`,
:meth:`~Backend.finish_tensor` — and how to describe itself in config.json, the card and
validation. Reading sources, planning, chunking, the worker pool and plan order
(:mod:`qconvert.convert.schedule`), sharding, manifests and atomic output belong to the
shared layer (:mod:`qconvert.convert`), so a new backend is one module: subclass
:class:`Backend`, fill its declarations (``name``, ``schemes``, ``accepted_options``,
``extra``, ``import_names`` ...), override the hooks that differ (:meth:`policy`, the codec,
:meth:`quantization_config`, :meth:`usage_lines` ...), and list it in ``BACKENDS``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .. import faults
from ..errors import InputError, MissingDependency, UsageError, opt
from ..output import record_uploaded
from ..plan import CAST, KEEP, QUANTIZE, ComponentPlan, Policy, Rule, TensorPlan
from ..sources import DTYPE_SIZES, FLOAT_DTYPES, Component, SourceTensor, TensorReader
from .schedule import EncodedChunk, Scheduler, row_ranges
from .writers import ShardedSafetensorsWriter, parse_size

# diffusers' and transformers' save_pretrained defaults.
DIFFUSERS_SHARD = "10GB"
TRANSFORMERS_SHARD = "50GB"


@dataclass
class ModelFacts:
    """What a component's model class says about its weights (from a meta-device build)."""

    linear_weights: set[str] = field(default_factory=set)
    keep_in_fp32_modules: tuple[str, ...] = ()
    # parameter/buffer name -> shape the config implies
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


# Bump when ModelFacts or how it is built changes: old cache entries are then never read.
FACTS_FORMAT = 1


def model_facts(comp: Component) -> ModelFacts:
    """The component's facts, from the cache or built (and cached) from its model class.

    Building means importing the library's model classes: ~3 s for diffusers (its
    ``models.transformers`` package imports every transformer it has), which was half of a
    small conversion's wall time, for a few KB that depend only on the library's version, the
    class and the config. The cache key holds all three, so an upgraded library or another
    config builds afresh. The cache is ``$QCONVERT_CACHE/facts``; it is only an optimization,
    so an unreadable or unwritable one is ignored.
    """
    path = _facts_path(comp)
    facts = _read_facts(path) if path is not None else None
    if facts is None:
        facts = build_model_facts(comp)
        if path is not None:
            _write_facts(path, facts)
    return facts


def _facts_path(comp: Component) -> Path | None:
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    from ..tiny import cache_root

    try:
        library_version = version(comp.library)
    except PackageNotFoundError:
        return None
    key = json.dumps([FACTS_FORMAT, comp.library, library_version, comp.class_name, comp.config],
                     sort_keys=True, default=str)  # fmt: skip
    return cache_root() / "facts" / f"{hashlib.sha256(key.encode()).hexdigest()}.json"


def _read_facts(path: Path) -> ModelFacts | None:
    try:
        data = json.loads(path.read_text())
        return ModelFacts(set(data["linear_weights"]), tuple(data["keep_in_fp32_modules"]),
                          {k: tuple(v) for k, v in data["shapes"].items()})  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_facts(path: Path, facts: ModelFacts) -> None:
    import threading

    data = {"linear_weights": sorted(facts.linear_weights), "keep_in_fp32_modules": list(facts.keep_in_fp32_modules),
            "shapes": {k: list(v) for k, v in facts.shapes.items()}}  # fmt: skip
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # one per writer
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the whole entry or none
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def build_model_facts(comp: Component) -> ModelFacts:
    """Build the component's model on the meta device and list its nn.Linear weights."""
    import torch

    # torch.device("meta") puts parameters *and* buffers on the meta device (accelerate's
    # init_empty_weights leaves buffers, e.g. RoPE tables, allocated: ~100 MB here).
    init_empty_weights = lambda: torch.device("meta")  # noqa: E731
    if comp.library == "diffusers":
        import diffusers

        cls = getattr(diffusers, comp.class_name)
        with init_empty_weights():
            model = cls.from_config(comp.config)
    else:
        import transformers

        cls = getattr(transformers, comp.class_name)
        cfg = cls.config_class.from_dict(comp.config)
        with init_empty_weights():
            model = cls(cfg)
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    keep = tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return ModelFacts(linear, keep, shapes)


def check_against_config(comp: Component, facts: ModelFacts) -> None:
    """Refuse weights whose shapes or dtypes do not fit the component's config.

    Checked from headers before any tensor is read, so a mismatched checkpoint fails in
    seconds with the tensor's name instead of half-way through the conversion.
    """
    from ..errors import CorruptCheckpoint

    for name, t in comp.tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise CorruptCheckpoint(
                f"{comp.name}: tensor {name} has dtype {t.dtype}; expected F32, F16 or BF16 weights",
                hint="convert from the original floating-point checkpoint",
            )
        want = facts.shapes.get(name)
        if want is not None and tuple(want) != tuple(t.shape):
            raise CorruptCheckpoint(
                f"{comp.name}: tensor {name} has shape {list(t.shape)} but its config implies {list(want)}",
                hint="the weights and config.json do not belong together",
            )
    linear_missing = sorted(n for n in facts.linear_weights if n not in comp.tensors)
    if linear_missing:
        raise CorruptCheckpoint(
            f"{comp.name}: weight {linear_missing[0]} is missing ({len(linear_missing)} missing in all)",
            hint="the checkpoint is incomplete or for another model",
        )


ProgressFn = Callable[[int], None]


def default_jobs() -> int:
    """Worker threads when --jobs is not given: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# What a backend writes (``Backend.container``; recorded as the manifest's ``layout``).
PIPELINE_FOLDER = "pipeline"  # a diffusers pipeline folder: safetensors shards + configs, the rest copied
GGUF_FILES = "gguf"  # .gguf files of the converted models only; the rest comes from the base pipeline
SINGLE_FILES = "files"  # single .safetensors files of the converted models only (fp8's bfl/comfyui layouts)
CONTAINERS = (PIPELINE_FOLDER, GGUF_FILES, SINGLE_FILES)


class Backend:
    """One quantization backend, declared in one place.

    Class attributes are declarations the rest of qconvert reads without building a backend
    (``--help``, release plans, cards, validation): keep them plain data, and keep a backend's
    module free of module-level imports of torch, numpy or any other dependency (``qconvert
    release --matrix`` runs where only qconvert is installed). Methods are hooks with
    defaults; the class methods under *cards* and *validation* describe an existing output
    from its manifest and need no conversion state.
    """

    name: ClassVar[str] = ""
    # scheme -> one-line description: the one text --help, the plan and the card show
    schemes: ClassVar[dict[str, str]] = {}
    # options it reads (CLI flags, release-plan ``options``, API keywords), and which are flags
    accepted_options: ClassVar[tuple[str, ...]] = ("jobs",)
    cli_flags: ClassVar[tuple[str, ...]] = ("jobs",)
    # where finished shards go instead of staying on disk (qconvert.uploads.ShardUploader), if anywhere
    shard_sink: Any = None
    # values of options the manifest records even when not given (a default that changes bytes)
    recorded_defaults: ClassVar[dict[str, Any]] = {}
    extra: ClassVar[str] = ""  # pip extra that installs the library: pip install 'qconvert[<extra>]'
    import_names: ClassVar[tuple[str, ...]] = ()  # modules that must be importable to convert or load
    pip_package: ClassVar[str] = ""  # distribution on the card's install line
    pin_version: ClassVar[bool] = False  # the card pins ==version (checkpoints tied to the version)
    version_packages: ClassVar[tuple[str, ...]] = ()  # distributions recorded in "versions"
    warm_up_modules: ClassVar[tuple[str, ...]] = ()  # imported before CPU memory is measured
    # what it writes; a backend whose container depends on an option sets it per instance too (the
    # manifest records the instance's as "layout", which cards and push read)
    container: ClassVar[str] = PIPELINE_FOLDER
    # what it quantizes, by role (Family.role): the transformer and the T5 encoder, whatever the
    # family's folder names (text_encoder_2 in FLUX.1, text_encoder in Chroma)
    supported_roles: ClassVar[tuple[str, ...]] = ("transformer", "t5")
    hub_library_name: ClassVar[str] = "diffusers"  # the card's ``library_name``
    # "It loads with ..." on the card; {pipeline} and {transformer}: the family's class names
    card_loader: ClassVar[str] = "one `{pipeline}.from_pretrained` call"

    def __init__(self, scheme: str, **options: Any) -> None:
        if scheme not in self.schemes:
            raise UsageError(
                f"unknown {self.name} scheme {scheme!r}",
                hint=f"choose one of: {', '.join(self.schemes)}",
            )
        self.check_options(options)
        self.scheme = scheme
        self.options = options
        jobs = options.get("jobs")
        if jobs is not None and int(jobs) < 1:
            raise UsageError(f"{opt('jobs')} must be at least 1 (got {jobs})", hint=f"e.g. {opt('jobs', 2)}")
        # Chunks encoded at once. Output bytes never depend on it: results are written in
        # plan order whatever order they finish in.
        self.jobs = int(jobs) if jobs else default_jobs()
        # Where chunks are encoded: "thread" (every backend) or "process" (GGUF's pool option).
        self.pool = "thread"

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Refuse an option the backend does not read: silently ignored, it would still be
        recorded in the manifest and the card's reproduce command, and a release would
        republish for it."""
        unknown = sorted(k for k, v in options.items() if v is not None and k not in cls.accepted_options)
        if unknown:
            flags = ", ".join(opt(k) if k in cls.cli_flags else k for k in cls.accepted_options)
            raise UsageError(
                f"the {cls.name} backend does not take {unknown[0]!r} ({opt(unknown[0])})",
                hint=f"its options: {flags}",
            )

    # --- environment -----------------------------------------------------------------------

    @classmethod
    def require_library(cls) -> None:
        """Raise :class:`MissingDependency` naming the extra if the backend's library is missing."""
        for module in cls.import_names:
            try:
                found = importlib.util.find_spec(module) is not None
            except ValueError:  # in sys.modules without a spec (a stub): importable
                found = True
            if not found:
                raise MissingDependency(module, cls.extra or cls.name)

    def check_environment(self, *, device: bool = True) -> None:
        """Raise if the backend's library (or, unless ``device=False``: only planning, a device
        the scheme needs) is missing."""
        self.require_library()

    # --- planning --------------------------------------------------------------------------

    def policy(self, component: str, facts: ModelFacts) -> Policy:
        """Per-tensor policy for one component. Default: quantize every Linear weight."""
        return Policy((Rule(r"\.weight$", QUANTIZE, self.scheme, when=("linear",)),))

    def estimate_bytes(self, rule: Rule, tensor: SourceTensor) -> int:
        """Bytes the output of ``tensor`` takes under ``rule`` (exact where cheap)."""
        if rule.action == KEEP:
            return tensor.nbytes
        if rule.action == CAST:
            return tensor.numel * DTYPE_SIZES[str(rule.target)]
        raise NotImplementedError

    def plan_component(self, comp: Component, facts: ModelFacts | None) -> ComponentPlan:
        """Decide every tensor of :meth:`tensor_sources` by :meth:`policy`, in that order."""
        policy = self.policy(comp.name, facts)
        plans = []
        for key, (t, is_linear) in self.tensor_sources(comp, facts).items():
            rule = policy.decide(key, t.shape, is_linear_weight=is_linear, dtype=t.dtype)
            action, target = self.plan_action(rule, t)
            plans.append(
                TensorPlan(
                    name=t.name,
                    shape=t.shape,
                    dtype=t.dtype,
                    action=action,
                    target=target,
                    bytes_in=t.nbytes,
                    bytes_out=self.estimate_bytes(rule, t),
                    out_name=self.output_name(comp.name, key),
                )
            )
        cp = ComponentPlan(comp.name, "quantize", self.scheme, plans)
        cp.bytes_in = sum(p.bytes_in for p in plans)
        cp.bytes_out = sum(p.bytes_out for p in plans)
        return cp

    def tensor_sources(self, comp: Component, facts: ModelFacts | None) -> dict[str, tuple[SourceTensor, bool]]:
        """The tensors to write, in output order, keyed by the name the policy matches, each
        with whether it is a Linear weight. Default: the component's own, by name (GGUF: its
        output names, BFL-fused tensors included)."""
        linear = facts.linear_weights if facts else set()
        return {name: (comp.tensors[name], name in linear) for name in sorted(comp.tensors)}

    def plan_action(self, rule: Rule, tensor: SourceTensor) -> tuple[str, Any]:
        """The (action, target) planned for ``tensor`` under ``rule`` (default: the rule's)."""
        return rule.action, rule.target

    def output_name(self, component: str, key: str) -> str | None:
        """The tensor's name in the output, when it is not its source name (default None)."""
        return None

    def planned_sources(
        self, comp: Component, facts: ModelFacts | None, plan: ComponentPlan
    ) -> list[tuple[TensorPlan, SourceTensor]]:
        """Each planned tensor with the lazy source tensor the scheduler reads it from."""
        by_name = {t.name: t for t, _ in self.tensor_sources(comp, facts).values()}
        return [(tp, by_name[tp.name]) for tp in plan.tensors]

    # --- encoding --------------------------------------------------------------------------

    def begin_component(self, comp: Component, facts: ModelFacts) -> None:
        """Hook: called before a component's first tensor."""

    # --- the tensor codec (driven by convert/schedule.py's Scheduler) ------------------------

    # Quantizer libraries leave reference cycles (torchao's tensor subclasses, module
    # parametrizations): the scheduler collects them after every chunk and tensor. False for
    # an encoder that makes none (GGUF's numpy), which saves those collections.
    reference_cycles: ClassVar[bool] = True

    def chunk_rows(self, plan: TensorPlan) -> int | None:
        """Rows per chunk for ``plan``'s tensor, or None to encode it whole (default).

        Return :func:`~qconvert.convert.schedule.rows_per_chunk` of the shape with the rows
        alignment the encoding needs (the one chunk size is shared); only for encodings whose
        chunks, finished together, give the bytes of encoding the whole tensor at once.
        """
        return None

    def encode_chunk(self, component: str, plan: TensorPlan, rows: Any) -> EncodedChunk:
        """Encode rows of one source tensor (a torch tensor; runs on the worker pool, so it
        must not change the backend's state: record what the output needs in ``meta`` and
        keep it in :meth:`finish_tensor`). Default: keep or cast."""
        if plan.action == KEEP:
            return EncodedChunk({plan.name: rows})
        if plan.action == CAST:
            import torch

            return EncodedChunk({plan.name: rows.to(getattr(torch, _TORCH_NAMES[str(plan.target)]))})
        raise NotImplementedError(f"{self.name} cannot {plan.action} {plan.name}")

    def finish_tensor(self, component: str, plan: TensorPlan, chunks: list[EncodedChunk]) -> list[tuple[str, Any]]:
        """One tensor's encoded chunks (row order) -> its output tensors, which share a shard
        (runs in plan order). Default: each part concatenated on dim 0."""
        if len(chunks) == 1:
            return list(chunks[0].parts.items())
        import torch

        return [(n, torch.cat([c.parts[n] for c in chunks], dim=0)) for n in chunks[0].parts]

    def encode(self, component: str, plan: TensorPlan, tensor: Any) -> list[tuple[str, Any]]:
        """A whole tensor in memory through the codec, in the same row chunks (tests, tools)."""
        ranges = row_ranges(tensor.shape[0] if tensor.dim() else 0, self.chunk_rows(plan))
        chunks = [self.encode_chunk(component, plan, tensor if r is None else tensor[r[0] : r[1]]) for r in ranges]
        return self.finish_tensor(component, plan, chunks)

    def scheduler(self, reader: TensorReader, check_tensor: Callable[[str, Any], None]) -> Scheduler:
        """The conversion's scheduler: ``--jobs`` workers of the backend's pool kind."""
        return Scheduler(reader, check_tensor, jobs=self.jobs, pool=self.pool, name=self.name)

    def shard_metadata(self, component: str) -> dict[str, str]:
        """``__metadata__`` of every shard of a component (known after all tensors)."""
        return {"format": "pt"}

    def quantization_config(self, component: str) -> dict[str, Any] | None:
        """The ``quantization_config`` entry of the component's config.json; None (default)
        writes none: a storage format that a plain ``from_pretrained`` loads without a
        quantizer has no such entry."""
        return None

    def config_updates(self, component: str) -> dict[str, Any]:
        """Other config.json changes besides quantization_config (default none)."""
        return {}

    # --- writing ---------------------------------------------------------------------------

    def write_component(
        self,
        comp: Component,
        plan: ComponentPlan,
        facts: ModelFacts,
        out_dir: Path,
        scheduler: Scheduler,
        progress: ProgressFn,
    ) -> list[Path]:
        """Default: a diffusers/transformers component folder with safetensors shards."""
        folder = out_dir / comp.name
        folder.mkdir(parents=True, exist_ok=True)
        diffusers_lib = comp.library == "diffusers"
        base_name = "diffusion_pytorch_model" if diffusers_lib else "model"
        shard = self.options.get("max_shard_size") or (
            DIFFUSERS_SHARD if diffusers_lib else TRANSFORMERS_SHARD
        )
        # Room for the header: each source tensor adds at most ~1 KB of entries and metadata
        # (torchao's per-tensor JSON, bnb's six quant-state entries); 1.5 KB leaves margin.
        reserve = 4096 + 1536 * len(plan.tensors)
        # upload as you go (a staging push): a shard leaves the disk when full where its header's
        # metadata is the default (known up front), else when the component ends
        early = self.shard_metadata(comp.name) if type(self).shard_metadata is Backend.shard_metadata else None
        writer = ShardedSafetensorsWriter(folder, base_name, parse_size(shard), header_reserve=reserve,
                                          sink=self.shard_sink, early_metadata=early)  # fmt: skip
        self.begin_component(comp, facts)
        try:
            # closing(): on an error, stop the workers now, not when the generator is collected
            items = self.planned_sources(comp, facts, plan)
            with contextlib.closing(scheduler.tensors(self, comp.name, items)) as encoded:
                for tp, tensors in encoded:
                    faults.tensor_written()
                    writer.add_group(tensors)
                    del tensors
                    progress(tp.bytes_in)
            files = writer.finish(self.shard_metadata(comp.name))
            record_uploaded(folder, writer.uploaded)
        except BaseException:
            writer.abort()
            raise
        config = dict(comp.config)
        config.update(self.config_updates(comp.name))
        quantization_config = self.quantization_config(comp.name)
        if quantization_config is not None:
            config["quantization_config"] = quantization_config
        cfg_path = folder / "config.json"
        cfg_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return [cfg_path, *files]

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
        """Write a container other than a pipeline folder (which the shared layer writes
        through :meth:`write_component`): files per component, plus ``"_root"``. Take the
        tensors from ``scheduler`` (:meth:`Scheduler.chunks` to stream them)."""
        raise NotImplementedError(f"the {self.name} backend declares container {self.container!r} but writes none")

    # --- cards: how a user loads the output --------------------------------------------------
    # ``facts`` is the card's :class:`qconvert.cards.data.CardFacts`: ``repo`` (the repo id or
    # folder the snippet loads), ``dtype``, ``files(component)``, ``base_pipeline()``.

    @classmethod
    def card_method(cls, manifest: dict[str, Any]) -> str:
        """The card's paragraph on how the weights were made and what loads them."""
        version = (manifest.get("versions") or {}).get(cls.pip_package, "")
        return (
            f"The weights were quantized ahead of time with {cls.pip_package} {version} and saved as safetensors "
            "in the layout diffusers and transformers load with a plain `from_pretrained`."
        )

    @classmethod
    def usage_lines(cls, facts: Any) -> list[str]:
        """The usage snippet up to a ``pipe`` on its device (the card adds the ``pipe(...)`` call)."""
        pipeline = facts.family.pipeline_class
        return [
            "import torch",
            f"from diffusers import {pipeline}",
            "",
            f"pipe = {pipeline}.from_pretrained({json.dumps(facts.repo)}, dtype=torch.{facts.dtype})",
            'pipe.to("cuda" if torch.cuda.is_available() else "cpu")',
        ]

    # Shown before cpu_usage_lines: why a CPU-only machine loads the output another way.
    cpu_usage_note: ClassVar[str] = ""
    # Added to the card's validation setup when the output was validated on a CPU.
    cpu_validation_note: ClassVar[str] = ""

    @classmethod
    def cpu_usage_lines(cls, facts: Any) -> list[str] | None:
        """Loading code for a CPU-only machine when :meth:`usage_lines` cannot load there
        (None, the default: the main snippet loads on a CPU too)."""
        return None

    # --- validation: load the output as its card tells users to -----------------------------

    @classmethod
    def check_loadable(cls, options: dict[str, Any], transformer_config: dict[str, Any]) -> None:
        """Raise if diffusers cannot load an output of these options (checked before converting)."""

    @classmethod
    def load_for_validation(cls, out: Path, manifest: dict[str, Any], ref_root: Path, *, dtype: Any, device: str) -> Any:
        """The output as a pipeline on ``device`` (default: the family's ``from_pretrained``)."""
        from ..manifest import manifest_family

        pipe = manifest_family(manifest).pipeline_type().from_pretrained(out, dtype=dtype)
        return pipe if device == "cpu" else pipe.to(device)

    @classmethod
    def validation_dtype(cls, manifest: dict[str, Any], family: Any, source_dtype: Any) -> Any:
        """The dtype validation loads output and source in (default: the source's)."""
        return source_dtype

    @classmethod
    def validation_environment(cls, pipe: Any, device: str) -> dict[str, Any]:
        """Facts about the loaded output for ``validation.json``'s environment (default none)."""
        return {}


def check_bfl_width(transformer_config: dict[str, Any], what: str) -> None:
    """diffusers' converter of BFL-named files hard-codes FLUX.1's width 3072: ``what`` (a file
    kind, e.g. "BFL-layout GGUF files") loads in diffusers only at that width."""
    cfg = transformer_config
    width = int(cfg.get("num_attention_heads", 0)) * int(cfg.get("attention_head_dim", 0))
    if width != 3072:
        raise InputError(
            f"diffusers loads {what} only at Flux width 3072 (this model is {width} wide)",
            hint=f"convert with {opt('layout', 'diffusers')} to validate it, or pass {opt('validate', False)}",
        )


_TORCH_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
