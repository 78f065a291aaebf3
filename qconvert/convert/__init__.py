"""Conversion: plan from headers, then stream tensor by tensor into an atomic output folder.

``BACKENDS`` is the explicit registry: name -> backend class (see :mod:`qconvert.convert.base`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import faults
from ..families import flux
from ..errors import CorruptCheckpoint, UsageError, opt
from ..manifest import MANIFEST_NAME, build_manifest
from ..output import atomic_folder, check_disk_space, check_output, copy_file, copy_license_files, copy_tree, write_json
from ..plan import ComponentPlan, Plan
from ..remote import copy_files
from ..sources import Source, TensorReader
from . import bnb, fp8, gguf, quanto, sdnq, torchao
from .base import PIPELINE_FOLDER, Backend
from .schedule import Scheduler

# The registry, like diffusers' quantizers/auto.py: one explicit mapping name -> backend class.
# Each backend's module declares everything about it (schemes, options, extra, how users and
# validation load its output); the tables below are derived from those declarations. The
# modules import no dependency at module level, so this stays cheap (`qconvert --help`,
# `qconvert release --matrix` where only qconvert is installed).
BACKENDS: dict[str, type[Backend]] = {
    "torchao": torchao.TorchAOBackend,
    "bnb": bnb.BitsAndBytesBackend,
    "gguf": gguf.GGUFBackend,
    "quanto": quanto.QuantoBackend,
    "fp8": fp8.FP8Backend,
    "sdnq": sdnq.SDNQBackend,
}

SCHEMES: dict[str, tuple[str, ...]] = {name: tuple(cls.schemes) for name, cls in BACKENDS.items()}
OPTIONS: dict[str, tuple[str, ...]] = {name: cls.accepted_options for name, cls in BACKENDS.items()}
# Options that are `qconvert flux` flags; the rest are for release plans and the API only.
CLI_OPTIONS = frozenset(flag for cls in BACKENDS.values() for flag in cls.cli_flags)


def check_options(backend: str, options: dict[str, Any]) -> None:
    """Refuse an option the backend does not read (see :meth:`Backend.check_options`)."""
    backend_class(backend).check_options(options)


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}", hint=f"choose one of: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def container_of(manifest: dict[str, Any]) -> str:
    """What an output is (``Backend.container``): the manifest's recorded ``layout`` (a backend's
    container may depend on its options: fp8's layouts), else its backend's declaration."""
    return str(manifest.get("layout") or backend_class(str(manifest["backend"])).container)


def get_backend(name: str, scheme: str, **options: Any) -> Any:
    return backend_class(name)(scheme, **options)


def parse_components(text: str | None) -> tuple[str, ...]:
    if text is None:
        return flux.QUANTIZABLE
    from ..families import quantizable_names

    names = tuple(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))
    bad = [c for c in names if c not in quantizable_names()]
    if bad or not names:
        raise UsageError(
            f"cannot quantize component {bad[0]!r}" if bad else f"{opt('components')} is empty",
            hint=f"{opt('components')} takes a comma list of: {', '.join(quantizable_names())}",
        )
    return names


def make_plan(source: Source, backend: Any, components: tuple[str, ...]) -> tuple[Plan, dict[str, Any]]:
    """Plan every component from headers alone. Returns the plan and per-component facts."""
    from .base import check_against_config, model_facts

    comp_plans: list[ComponentPlan] = []
    facts: dict[str, Any] = {}
    components = source.family.resolve_components(components)
    unknown = [c for c in components if c not in source.family.quantizable]
    if unknown:
        raise UsageError(f"a {source.family.label} pipeline has no component {unknown[0]!r} to quantize",
                         hint=f"{opt('components')} takes: {', '.join(source.family.quantizable)}")  # fmt: skip
    for name in source.family.components:
        comp = source.components[name]
        if name in components and source.family.role(name) in backend.supported_roles:
            facts[name] = model_facts(comp)
            check_against_config(comp, facts[name])
            comp_plans.append(backend.plan_component(comp, facts[name]))
        elif backend.container != PIPELINE_FOLDER:
            # The files hold only the quantized models; users take the rest from the base.
            size = comp.nbytes if comp.tensors else 0
            comp_plans.append(ComponentPlan(name, "from-base", None, [], size, 0))
        else:
            if comp.folder is None:
                raise UsageError(
                    f"the {name} of a single-file source must be converted",
                    hint=f"include {name} in {opt('components')}",
                )
            size = sum(p.stat().st_size for p in comp.folder.rglob("*") if p.is_file())
            size += sum(f.size for f in comp.remote_files)  # streamed from the Hub into the output
            comp_plans.append(ComponentPlan(name, "copy", None, [], size, size))
    plan = Plan(
        backend.name, backend.scheme, source.identity.to_dict(), comp_plans,
        layout=backend.container, scheme_text=backend.schemes[backend.scheme],
        family=source.family.name, family_label=f"{source.family.label} ({source.family.pipeline_class})",
    )  # fmt: skip
    return plan, facts


@dataclass
class ConvertResult:
    out: Path
    plan: Plan
    manifest: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)


def _check_finite(name: str, tensor: Any) -> None:
    import torch

    # aminmax is one pass with no temporary and propagates NaN (and shows +-Inf as an
    # extreme): ~20x cheaper than isfinite(t).all(), which allocates a bool tensor.
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    low, high = torch.aminmax(tensor)
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
        raise CorruptCheckpoint(
            f"tensor {name} contains NaN or Inf values", hint="the source checkpoint is damaged; re-download it"
        )


def convert(
    source: Source,
    backend_name: str,
    scheme: str,
    out: Path | str,
    *,
    components: tuple[str, ...] = flux.QUANTIZABLE,
    overwrite: bool = False,
    progress: bool = True,
    options: dict[str, Any] | None = None,
    shard_sink: Any = None,
    reader: Any = None,
) -> ConvertResult:
    """Convert ``source`` with one backend/scheme into the folder ``out`` (atomically);
    ``shard_sink``: where a pipeline's finished shards go instead of staying in ``out``
    (:class:`qconvert.uploads.ShardUploader`: uploaded, committed later by push); ``reader``:
    a reader shared with conversions running beside this one (:func:`convert_many`)."""
    from ..memory import tune_heap

    tune_heap()
    options = dict(options or {})
    backend = get_backend(backend_name, scheme, **options)
    backend.check_environment()
    backend.shard_sink = shard_sink
    out = Path(out)
    check_output(out.absolute(), overwrite=overwrite)
    components = source.family.resolve_components(components)
    plan, facts = make_plan(source, backend, components)
    check_disk_space(out.absolute(), plan.bytes_out)
    faults.point("after-plan")
    if reader is not None:
        reader.expect(_planned_reads(source, plan, facts, backend))

    from tqdm.auto import tqdm

    total = sum(c.bytes_in for c in plan.components if c.action == "quantize")
    seconds: dict[str, float] = {}
    with atomic_folder(out, overwrite=overwrite, needed=plan.bytes_out) as tmp:
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not progress, leave=False)
        try:
            # One scheduler (and worker pool) for the whole conversion, whatever the container.
            with _reader(reader) as reader, backend.scheduler(reader, _check_finite) as scheduler:
                if backend.container == PIPELINE_FOLDER:
                    written = _write_pipeline(source, plan, facts, backend, tmp, scheduler, bar.update, seconds)
                else:
                    written = backend.write_output(source, plan, facts, tmp, scheduler, bar.update, seconds)
        finally:
            bar.close()  # clears its line, so an error message starts on a clean line
        manifest = build_manifest(source, plan, backend, tmp, written, components, options)
        write_json(tmp / MANIFEST_NAME, manifest)
        faults.point("before-rename")
    return ConvertResult(out, plan, manifest, seconds)


def _reader(shared: Any) -> Any:
    """A new reader (closed at the end), or the shared one (closed by its owner)."""
    return TensorReader() if shared is None else contextlib.nullcontext(shared)


def _planned_reads(source: Source, plan: Plan, facts: dict[str, Any], backend: Any) -> list[Any]:
    """The source tensors a conversion will read (a shared reader counts its readers)."""
    reads = []
    for cp in plan.components:
        if cp.action == "quantize" and cp.name in facts:
            comp = source.components[cp.name]
            reads += [src for _, src in backend.planned_sources(comp, facts[cp.name], cp)]
    return reads


def _write_pipeline(
    source: Source,
    plan: Plan,
    facts: dict[str, Any],
    backend: Any,
    tmp: Path,
    scheduler: Scheduler,
    progress: Any,
    seconds: dict[str, float],
) -> dict[str, list[Path]]:
    written: dict[str, list[Path]] = {}
    for cp in plan.components:
        t0 = time.perf_counter()
        comp = source.components[cp.name]
        if cp.action == "copy":
            assert comp.folder is not None
            written[cp.name] = copy_tree(comp.folder, tmp / cp.name) + copy_files(comp.remote_files, tmp / cp.name)
        else:
            written[cp.name] = backend.write_component(comp, cp, facts[cp.name], tmp, scheduler, progress)
        seconds[cp.name] = time.perf_counter() - t0
    copy_file(source.root / "model_index.json", tmp / "model_index.json")
    written["_root"] = [tmp / "model_index.json"]
    written["_root"] += copy_license_files(source.root, tmp)
    return written
