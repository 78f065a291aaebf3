"""Validation: load the output exactly as a downstream user would, generate, measure, compare.

``validate(out)`` loads the converted output (``FluxPipeline.from_pretrained`` for pipeline
folders; ``FluxTransformer2DModel.from_single_file`` + the base pipeline for GGUF), generates
images for fixed prompts and seeds, measures load time, memory after load, peak memory and
time per denoising step, then does the same with the reference (the BF16/FP32 source) and
compares: transformer weight bytes, relative error of one transformer forward on fixed
inputs, PSNR/SSIM of the images (torchmetrics). Thresholds come from ``thresholds.toml`` per
backend and scheme, a user file, and flags. Artefacts: ``validation.json``,
``samples/quantized-<i>.png``, ``samples/reference-<i>.png`` and ``samples/grid.png``.

LPIPS (torchmetrics, AlexNet) is measured when torchvision and the AlexNet weights are already
on the machine; otherwise it is reported as skipped with the reason (qconvert downloads nothing
for it). ``max_lpips`` makes it a check, which then fails when LPIPS cannot be measured.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError, ValidationFailed, opt
from .thresholds import Thresholds, load_thresholds

VALIDATION_NAME = "validation.json"
SAMPLES_DIR = "samples"
DEFAULT_PROMPTS = (
    "a photo of a cat sitting on a red car",
    "a detailed painting of a mountain river at night",
)


@dataclass
class RunStats:
    load_s: float = 0.0
    memory_after_load: int = 0
    peak_memory: int = 0
    step_s: float = 0.0
    generate_s: float = 0.0
    transformer_bytes: int = 0
    t5_bytes: int = 0


@dataclass
class Check:
    name: str
    value: float | None
    limit: float | None
    op: str  # ">=" or "<="
    passed: bool
    note: str = ""

    def line(self) -> str:
        if self.value is None and self.note:  # could not be measured: say why
            return f"{self.name}: {self.note}"
        v = "n/a" if self.value is None else self._fmt(self.value)
        lim = "" if self.limit is None else f" (needs {self.op} {self._fmt(self.limit)})"
        return f"{self.name}: {v}{lim}"

    def _fmt(self, x: float) -> str:
        if self.name == "max_memory":
            from ..plan import human_bytes

            return human_bytes(x)
        if self.name == "max_step_time":
            return f"{x:.4g} s"
        return f"{x:.4g}"


def _json_safe(value: Any) -> Any:
    """JSON has no Infinity/NaN (``json.dumps`` would write invalid JSON): null instead.

    PSNR is infinite for images identical to the reference; ``quality.identical_images`` says so.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@dataclass
class ValidationReport:
    out: Path
    passed: bool
    checks: list[Check]
    quantized: RunStats
    reference: RunStats | None
    quality: dict[str, Any]
    settings: dict[str, Any]
    environment: dict[str, Any]
    thresholds: Thresholds
    samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return _json_safe({
            "format": 1,
            "passed": self.passed,
            "failed": [c.name for c in self.checks if not c.passed],
            "checks": [asdict(c) for c in self.checks],
            "quantized": asdict(self.quantized),
            "reference": asdict(self.reference) if self.reference else None,
            "quality": self.quality,
            "settings": self.settings,
            "thresholds": self.thresholds.to_dict(),
            "environment": self.environment,
            "samples": self.samples,
        })

    def table(self) -> str:
        from ..plan import human_bytes

        q, r = self.quantized, self.reference
        rows = [f"{'':<22}{'quantized':>14}{'reference':>14}"]

        def row(label: str, qv: str, rv: str) -> None:
            rows.append(f"{label:<22}{qv:>14}{rv:>14}")

        row("transformer weights", human_bytes(q.transformer_bytes), human_bytes(r.transformer_bytes) if r else "-")
        row("T5 weights", human_bytes(q.t5_bytes), human_bytes(r.t5_bytes) if r else "-")
        row("memory after load", human_bytes(q.memory_after_load), human_bytes(r.memory_after_load) if r else "-")
        row("peak memory", human_bytes(q.peak_memory), human_bytes(r.peak_memory) if r else "-")
        row("time per step", f"{q.step_s:.4f} s", f"{r.step_s:.4f} s" if r else "-")
        row("load time", f"{q.load_s:.2f} s", f"{r.load_s:.2f} s" if r else "-")
        rows.append("")
        for c in self.checks:
            note = c.note if c.note and c.value is not None else ""
            rows.append(f"{'PASS' if c.passed else 'FAIL'}  {c.line()}{('  ' + note) if note else ''}")
        lp = self.quality.get("lpips")
        if not any(c.name == "lpips" for c in self.checks):
            rows.append(f"skip  lpips: {self.quality.get('lpips_note', 'not available')}" if lp is None
                        else f"info  lpips: {lp:.4g}  (no threshold set)")
        rows.append(f"device {self.settings['device']}, {self.settings['steps']} steps at "
                    f"{self.settings['size']}x{self.settings['size']}, dtype {self.settings['dtype']}")
        return "\n".join(rows)


# --- loading -------------------------------------------------------------------------------


def reference_source(manifest: dict[str, Any], spec: str | None, *, token: str | None, endpoint: str | None) -> Any:
    """The source the output was converted from (or ``spec``), resolved again."""
    from ..identity import SourceIdentity
    from ..sources import resolve_again, resolve_source

    ident = SourceIdentity.from_dict(manifest["source"])
    if spec and spec.lower().endswith(".safetensors"):
        # a single transformer file needs a base pipeline: the one the output was converted with
        if ident.base is None:
            raise UsageError(
                f"{opt('reference')} {spec} is a single file, and the output was not converted from one with a base pipeline",
                hint=f"pass a pipeline folder or Hub repo id as {opt('reference')}",
            )
        return resolve_again(ident.base, transformer=spec, token=token, endpoint=endpoint)
    if spec:
        return resolve_source(spec, token=token, endpoint=endpoint)
    return resolve_again(ident, token=token, endpoint=endpoint)


def source_dtype(source: Any) -> Any:
    import torch

    dtypes = {t.dtype for t in source.components["transformer"].tensors.values()}
    return torch.float32 if dtypes == {"F32"} else torch.bfloat16 if "BF16" in dtypes else torch.float16


def check_loadable(backend: str, options: dict[str, Any], transformer_config: dict[str, Any]) -> None:
    """Raise if diffusers cannot load this output for validation (checked before converting too)."""
    from ..convert import backend_class

    backend_class(backend).check_loadable(options, transformer_config)


def load_quantized(out: Path, manifest: dict[str, Any], ref_root: Path, *, dtype: Any, device: str) -> Any:
    """Load the output the way its card tells users to (the backend's ``load_for_validation``)."""
    from ..convert import backend_class

    loader = backend_class(manifest["backend"]).load_for_validation
    return loader(Path(out), manifest, Path(ref_root), dtype=dtype, device=device)


def load_reference(source: Any, *, dtype: Any, device: str) -> Any:
    """The source as its users load it: the family's pipeline, a single file through diffusers."""
    parts = {}
    if source.identity.base is not None:  # a single transformer file
        comp = source.components["transformer"]
        width = int(comp.config.get("num_attention_heads", 0)) * int(comp.config.get("attention_head_dim", 0))
        # what a diffusers user would load; diffusers' BFL converter assumes width 3072 and
        # does not apply ComfyUI's fp8 scales: read those through qconvert's own mapping
        if width == 3072 and not source.identity.to_dict().get("float8"):
            parts["transformer"] = source.family.transformer_type().from_single_file(
                source.identity.local_path, config=str(source.root), subfolder="transformer", dtype=dtype
            )
        else:
            parts["transformer"] = _transformer_from_source(source.family, comp, dtype)
    pipe = source.family.pipeline_type().from_pretrained(source.root, dtype=dtype, **parts)
    return pipe.to(device)


def _transformer_from_source(family: Any, comp: Any, dtype: Any) -> Any:
    """The source transformer as diffusers names it (single files: renamed and split the way
    the conversion reads them), loaded into the family's transformer class."""
    import torch

    from ..sources import TensorReader

    # Built on the CPU, not the meta device: non-persistent buffers (Chroma's modulation index
    # table) are not in the file. Only small models come here (width != 3072).
    model = family.transformer_type().from_config(comp.config).to(dtype)
    with TensorReader() as reader:
        state = {name: reader.load(t).to(dtype) for name, t in comp.tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# --- measuring -----------------------------------------------------------------------------


class _Meter:
    """Memory after load / peak and synchronized timing, on CUDA or CPU."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._sampler: Any = None

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats()

    def current(self) -> int:
        if self.device.startswith("cuda"):
            import torch

            return int(torch.cuda.memory_allocated())
        from ..memory import read_status

        return read_status().get("VmRSS", 0)

    def start_peak(self) -> None:
        self.reset_peak()
        if not self.device.startswith("cuda"):
            from ..memory import PeakSampler

            self._sampler = PeakSampler().__enter__()

    def peak(self) -> int:
        if self.device.startswith("cuda"):
            import torch

            return int(torch.cuda.max_memory_allocated())
        assert self._sampler is not None
        self._sampler.__exit__(None, None, None)
        return self._sampler.peak_rss


def _generate(pipe: Any, prompts: list[str], *, steps: int, size: int, seed: int, meter: _Meter,
              family: Any) -> tuple[Any, float, float]:
    """Images (N,3,H,W) in [0,1], median seconds per step (first step excluded), total seconds."""
    import torch

    step_times: list[float] = []
    last = [0.0]

    def on_step(pipeline: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        meter.sync()
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now
        return kwargs

    images = []
    t0 = time.perf_counter()
    for k, prompt in enumerate(prompts):
        gen = torch.Generator("cpu").manual_seed(seed + k)
        meter.sync()
        last[0] = time.perf_counter()
        args = family.validation_args(steps=steps, size=size)
        out = pipe(prompt=prompt, generator=gen, output_type="pt", callback_on_step_end=on_step, **args).images
        images.append(out.float().cpu())
    meter.sync()
    total = time.perf_counter() - t0
    # exclude each prompt's first step (warm-up: compilation, caches, text encoding)
    steady = [t for i, t in enumerate(step_times) if i % steps != 0] or step_times
    steady.sort()
    return torch.cat(images), steady[len(steady) // 2], total


# diffusers' denoising progress bars: off unless asked for (`qconvert -vv`), like library logs
_LIBRARY_PROGRESS = [False]


def show_library_progress(show: bool) -> None:
    _LIBRARY_PROGRESS[0] = show


def _run(load: Any, prompts: list[str], *, steps: int, size: int, seed: int, device: str,
         family: Any) -> tuple[Any, RunStats, Any]:
    import gc

    from .metrics import module_bytes

    meter = _Meter(device)
    gc.collect()
    before = meter.current()
    t0 = time.perf_counter()
    pipe = load()
    pipe.set_progress_bar_config(disable=not _LIBRARY_PROGRESS[0])
    meter.sync()
    stats = RunStats(load_s=time.perf_counter() - t0)
    stats.memory_after_load = max(0, meter.current() - before) if not device.startswith("cuda") else meter.current()
    stats.transformer_bytes = module_bytes(pipe.transformer)
    stats.t5_bytes = module_bytes(getattr(pipe, family.t5()))  # the T5 encoder, whatever its folder
    meter.start_peak()
    images, stats.step_s, stats.generate_s = _generate(pipe, prompts, steps=steps, size=size, seed=seed, meter=meter,
                                                       family=family)  # fmt: skip
    stats.peak_memory = meter.peak() - (0 if device.startswith("cuda") else before)
    return pipe, stats, images


_WARM: set[str] = set()


def _warm_up_cpu_libraries(backend: str) -> None:
    """Pay the libraries' one-time costs before measuring CPU memory.

    On CPU, memory is the growth of the process's RSS. Importing the backend's library on first
    use (torchao: ~280 MB of code and kernels), the first ``from_pretrained`` (tokenizers,
    config parsing: ~14 MB) and the first denoising step would all be counted against the
    quantized pipeline, which is measured first, and they dwarf the tiny demo. Importing the
    library and loading + running the built-in tiny pipeline once (0.6 MB, a fraction of a
    second) moves them out of the measurement. CUDA's allocator counters need no such step.
    """
    import gc
    import importlib

    import torch
    from diffusers import FluxPipeline

    from ..convert import backend_class
    from ..tiny import builtin_path

    if backend not in _WARM:
        _WARM.add(backend)
        for module in backend_class(backend).warm_up_modules:
            with contextlib.suppress(ImportError):
                importlib.import_module(module)
    if "pipeline" in _WARM:
        return
    _WARM.add("pipeline")
    try:
        pipe = FluxPipeline.from_pretrained(builtin_path("tiny-flux"), dtype=torch.float32)
    except OSError:  # no writable cache to build it in: measure without the warm-up
        return
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe("warm-up", num_inference_steps=2, height=32, width=32, max_sequence_length=16, output_type="pt")
    del pipe
    gc.collect()


def _forward(transformer: Any, inputs: dict[str, Any]) -> Any:
    import torch

    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0].float().cpu()


# --- the command -----------------------------------------------------------------------------


def check_device_name(device: Any) -> None:
    """auto, cpu, cuda or cuda:N (whether this machine has it is check_device's business)."""
    if not (isinstance(device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", device)):
        raise UsageError(f"device {device!r} is not a device", hint="use auto, cpu, cuda or cuda:N")


def check_device(device: str | None) -> None:
    """Refuse a device this machine cannot give. Only a named GPU can be missing, so torch (~1 s
    to import) is imported only for one."""
    if device is None:
        return
    check_device_name(device)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            from ..errors import DeviceError

            raise DeviceError(f"{opt('device', 'cuda')} was asked for, but no CUDA GPU is available", hint=f"use {opt('device', 'cpu')}")


def pick_device(device: str | None) -> str:
    """The device to validate on: ``auto`` (or None) is CUDA where there is one."""
    check_device(device)
    if device in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def validate(
    out: Path | str,
    *,
    reference: str | None = None,
    prompts: list[str] | None = None,
    steps: int | None = None,
    size: int | None = None,
    seed: int = 0,
    device: str | None = None,
    thresholds_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    write: bool = True,
) -> ValidationReport:
    """Validate a conversion output. Writes validation.json and samples; returns the report.

    Raises nothing for failed checks: the report's ``passed`` says; callers decide (the CLI
    exits 4 naming the first failed check).
    """
    out = Path(out)
    from ..convert import backend_class
    from ..manifest import read_manifest

    manifest = read_manifest(out)
    from ..deps import require_for_validation

    require_for_validation(manifest["backend"])  # before minutes of loading and generating
    dev = pick_device(device)
    steps, size = _run_settings(steps, size, on_gpu=dev.startswith("cuda"))
    prompts = list(prompts or DEFAULT_PROMPTS)
    thresholds = load_thresholds(manifest["backend"], manifest["scheme"], file=thresholds_file, overrides=overrides)
    src = reference_source(manifest, reference, token=token, endpoint=endpoint)
    backend = backend_class(manifest["backend"])
    dtype = backend.validation_dtype(manifest, src.family, source_dtype(src))
    run = _Settings(dev, dtype, steps, size, seed, prompts, src.family)
    if not dev.startswith("cuda"):
        _warm_up_cpu_libraries(manifest["backend"])
    quantized, tconfig, loaded_env = _measure(lambda: load_quantized(out, manifest, src.root, dtype=run.dtype, device=dev),
                                              run, backend=backend)  # fmt: skip
    reference_run = _reference_run(src, run, tconfig)
    quality = _quality(quantized, reference_run)
    checks = _checks(quality, quantized.stats, thresholds)
    env = _environment(dev, backend, loaded_env)
    settings = {"device": dev, "dtype": str(run.dtype).replace("torch.", ""), "steps": steps, "size": size,
                "seed": seed, "prompts": prompts, "reference": src.identity.to_dict()}  # fmt: skip
    report = ValidationReport(out, all(c.passed for c in checks), checks, quantized.stats, reference_run.stats,
                              quality, settings, env, thresholds)  # fmt: skip
    if write:
        report.samples = _write_samples(out, quantized.images, reference_run.images)
        from ..output import write_json

        write_json(out / VALIDATION_NAME, report.to_dict())
    return report


@dataclass(frozen=True)
class _Settings:
    device: str
    dtype: Any
    steps: int
    size: int
    seed: int
    prompts: list[str]
    family: Any


@dataclass
class _Measured:
    """One pipeline's run: its stats, images, one transformer forward and the text encoding."""

    stats: RunStats
    images: Any
    forward: Any
    text: Any


def _run_settings(steps: int | None, size: int | None, *, on_gpu: bool) -> tuple[int, int]:
    steps = 4 if steps is None else steps
    size = (1024 if on_gpu else 32) if size is None else size
    if steps < 2:
        raise UsageError(f"{opt('steps')} must be at least 2, not {steps}", hint=f"the first step is excluded from timing: e.g. {opt('steps', 4)}")
    if size < 16 or size % 16:
        raise UsageError(f"{opt('size')} must be a multiple of 16 of at least 16, not {size}", hint=f"e.g. {opt('size', 1024)} (Flux: VAE 8 x patch 2)")
    return steps, size


def _measure(load: Any, run: _Settings, *, backend: Any = None,
             tconfig: dict[str, Any] | None = None) -> tuple[_Measured, dict[str, Any], dict[str, Any]]:
    """Load, generate, one forward on fixed inputs, encode the first prompt; then free the pipeline."""
    pipe, stats, images = _run(load, run.prompts, steps=run.steps, size=run.size, seed=run.seed, device=run.device,
                               family=run.family)  # fmt: skip
    tconfig = tconfig or dict(pipe.transformer.config)
    loaded_env = backend.validation_environment(pipe, run.device) if backend is not None else {}
    inputs = run.family.forward_inputs(tconfig, device=run.device, dtype=run.dtype)
    measured = _Measured(stats, images.cpu(), _forward(pipe.transformer, inputs).cpu(),
                         _encode_text(pipe, run.family, run.prompts[0], run.device).cpu())  # fmt: skip
    del pipe
    _free(run.device)
    return measured, tconfig, loaded_env


def _reference_run(src: Any, run: _Settings, tconfig: dict[str, Any]) -> _Measured:
    """The source's run, memoized per process (see ``_REFERENCE_RUNS``)."""
    # the architecture, not where it was loaded from or how it was quantized
    arch = {k: v for k, v in tconfig.items() if not k.startswith("_") and k != "quantization_config"}
    key = json.dumps([src.identity.to_dict(), run.device, str(run.dtype), run.steps, run.size, run.seed, run.prompts, arch],
                     sort_keys=True, default=str)  # fmt: skip
    if key not in _REFERENCE_RUNS:
        measured, _, _ = _measure(lambda: load_reference(src, dtype=run.dtype, device=run.device), run, tconfig=tconfig)
        _REFERENCE_RUNS.clear()  # keep one: bounded memory
        _REFERENCE_RUNS[key] = measured
    return _REFERENCE_RUNS[key]


def _quality(q: _Measured, r: _Measured) -> dict[str, Any]:
    import torch

    from .metrics import image_quality, lpips, relative_error

    quality: dict[str, Any] = image_quality(q.images, r.images)
    quality["identical_images"] = bool(torch.equal(q.images, r.images))
    quality["forward_rel_error"] = relative_error(q.forward, r.forward)
    quality["t5_rel_error"] = relative_error(q.text, r.text)
    quality["finite"] = bool(torch.isfinite(q.images).all())
    quality["lpips"], quality["lpips_note"] = lpips(q.images, r.images)
    quality["memory_reduction"] = r.stats.transformer_bytes / max(1, q.stats.transformer_bytes)
    return quality


def _checks(quality: dict[str, Any], q_stats: RunStats, thresholds: Thresholds) -> list[Check]:
    reduction = quality["memory_reduction"]
    checks = [
        Check("finite_images", 1.0 if quality["finite"] else 0.0, 1.0, ">=", quality["finite"],
              "" if quality["finite"] else "the quantized pipeline produced NaN/Inf"),
        Check("memory_reduction", reduction, thresholds.min_memory_reduction, ">=",
              reduction >= thresholds.min_memory_reduction, "transformer weights, reference / quantized"),
        Check("forward_rel_error", quality["forward_rel_error"], thresholds.max_forward_rel_error, "<=",
              quality["forward_rel_error"] <= thresholds.max_forward_rel_error, "one transformer forward on fixed inputs"),
        Check("t5_rel_error", quality["t5_rel_error"], thresholds.max_forward_rel_error, "<=",
              quality["t5_rel_error"] <= thresholds.max_forward_rel_error, "T5 encoder output for the first prompt"),
        Check("psnr", quality["psnr"], thresholds.min_psnr, ">=", quality["psnr"] >= thresholds.min_psnr, "dB vs reference"),
        Check("ssim", quality["ssim"], thresholds.min_ssim, ">=", quality["ssim"] >= thresholds.min_ssim),
    ]  # fmt: skip
    if thresholds.max_lpips is not None:
        measured = quality["lpips"] is not None
        checks.append(Check("lpips", quality["lpips"], thresholds.max_lpips, "<=",
                            measured and quality["lpips"] <= thresholds.max_lpips,
                            "" if measured else quality["lpips_note"].replace("skipped: ", "not measured: ")))
    if thresholds.max_memory is not None:
        checks.append(Check("max_memory", q_stats.peak_memory, thresholds.max_memory, "<=",
                            q_stats.peak_memory <= thresholds.max_memory, "peak memory during generation"))
    if thresholds.max_step_time is not None:
        checks.append(Check("max_step_time", q_stats.step_s, thresholds.max_step_time, "<=",
                            q_stats.step_s <= thresholds.max_step_time, "seconds per denoising step"))
    return checks


def _environment(device: str, backend: Any, loaded_env: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ..manifest import library_versions

    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine()
    return {"device": device, "device_name": name,
            "versions": library_versions(*backend.version_packages, "torchmetrics"), **loaded_env}  # fmt: skip


# The reference run (load the source, generate, forward) of the last validation in this
# process, keyed by everything it depends on: several variants of one source (a release
# plan, bench/gpu_check.py) validate against one reference run instead of reloading the
# full-precision model each time.
_REFERENCE_RUNS: dict[str, _Measured] = {}


def _encode_text(pipe: Any, family: Any, prompt: str, device: str) -> Any:
    """The family's compared text encoder's output for ``prompt`` (Flux: T5, 64 tokens)."""
    import torch

    encoder, tokenizer = (getattr(pipe, name) for name in family.text_encoder)
    ids = tokenizer(prompt, padding="max_length", max_length=64, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids.to(device))[0].float().cpu()


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _write_samples(out: Path, q_images: Any, r_images: Any) -> list[str]:
    """PNG per image and a grid: quantized row over reference row."""
    import numpy as np
    from PIL import Image

    folder = out / SAMPLES_DIR
    folder.mkdir(exist_ok=True)
    names = []

    def to_pil(t: Any) -> Any:
        arr = (t.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        return Image.fromarray(arr)

    tiles_q = [to_pil(t) for t in q_images]
    tiles_r = [to_pil(t) for t in r_images]
    for i, (q, r) in enumerate(zip(tiles_q, tiles_r)):
        q.save(folder / f"quantized-{i}.png")
        r.save(folder / f"reference-{i}.png")
        names += [f"{SAMPLES_DIR}/quantized-{i}.png", f"{SAMPLES_DIR}/reference-{i}.png"]
    w, h = tiles_q[0].size
    scale = max(1, 256 // max(w, h))  # tiny demo images are 64 px: enlarge for the card
    grid = Image.new("RGB", (w * scale * len(tiles_q), h * scale * 2), "white")
    for i, (q, r) in enumerate(zip(tiles_q, tiles_r)):
        grid.paste(q.resize((w * scale, h * scale), Image.NEAREST), (i * w * scale, 0))
        grid.paste(r.resize((w * scale, h * scale), Image.NEAREST), (i * w * scale, h * scale))
    grid.save(folder / "grid.png")
    names.append(f"{SAMPLES_DIR}/grid.png")
    return names


def raise_if_failed(report: ValidationReport, *, after_convert: bool = False) -> None:
    failed = [c for c in report.checks if not c.passed]
    if failed:
        c = failed[0]
        more = f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""
        kept = f"the output is kept for inspection (convert again with {opt('overwrite', True)}); " if after_convert else ""
        raise ValidationFailed(
            f"validation failed: {c.line()}{more}",
            hint=f"see {report.out / VALIDATION_NAME}; {kept}"
            f"limits: {opt('thresholds_file', metavar='FILE')} or {opt('thresholds')}",
        )
