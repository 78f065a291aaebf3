"""Model cards: ``OUT/README.md`` for a conversion output, ready for the Hub.

``render_card(out)`` reads ``qconvert.json`` (what was converted, how, file sizes, versions)
and ``validation.json`` (if present) and renders ``template.md`` with huggingface_hub's
``ModelCard.from_template``. The card has:

* metadata: ``base_model`` + ``base_model_relation: quantized`` (when the base is a Hub
  repo), the base model's ``license``/``license_name``/``license_link``, ``library_name``
  (``diffusers``; ``gguf`` for GGUF outputs), ``pipeline_tag: text-to-image`` and tags
  ``[quantized, <backend>, <scheme>, flux, qconvert]``;
* what was quantized (per component: scheme, bytes before/after) and how;
* a usage snippet for exactly this output (fenced ```python after the marker comment
  ``<!-- qconvert:usage -->``) with the ``pip install`` line it needs, and what to run on a
  CPU instead (after ``<!-- qconvert:usage-cpu -->``): a small image and few steps for a
  full-size model, and for bitsandbytes qconvert's CPU loader (diffusers refuses bnb
  models without a GPU);
* the validation table (memory, speed, PSNR/SSIM/forward error vs the source, device,
  versions) and the sample grid, or a clear "not validated" statement;
* how to reproduce it (the ``qconvert flux`` command) and the license.

Rendering is deterministic (no timestamps, sorted inputs): re-rendering the same output
gives identical bytes. The card starts with the marker ``<!-- qconvert:card -->`` after its
front matter; ``qconvert push`` re-renders such a card with the repo id (and leaves a
hand-written README.md without the marker alone).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..families import input_image_code
from ..identity import SourceIdentity
from ..manifest import read_manifest
from .data import (
    CARD_MARKER,
    CARD_NAME,
    DEFAULT_PROMPT,
    HUB_URL,
    USAGE_MARKER,
    CardFacts,
    component_files,
    existing_card_metadata,
    generation_args,
    install_line,
    is_generated_card,
    ordered_components,
    read_validation,
    reproduce_command,
    resolve_license,
)

__all__ = [
    "CARD_MARKER",
    "CARD_NAME",
    "USAGE_MARKER",
    "CPU_USAGE_MARKER",
    "TEMPLATE_PATH",
    "card_text",
    "extract_usage",
    "is_generated_card",
    "render_card",
]

TEMPLATE_PATH = Path(__file__).with_name("template.md")
CPU_USAGE_MARKER = "<!-- qconvert:usage-cpu -->"
# What a CPU can do with a full-size model: a 256x256 image has 1/16 of the image tokens of a
# 1024x1024 one. Measured (issue 14): one 1024x1024 step of FLUX.1-dev had not finished after
# 9 minutes on a 2-core CPU, at 19.8 GB of resident memory.
CPU_SIZE = 256
CPU_STEPS = 4

def _human(n: Any) -> str:
    from ..plan import human_bytes

    return human_bytes(int(n)) if isinstance(n, (int, float)) else "—"


def _fmt(value: Any, fmt: str) -> str:
    return "—" if not isinstance(value, (int, float)) else format(value, fmt)


# --- facts ---------------------------------------------------------------------------------


def gather(
    out: Path,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    license_name: str | None = None,
    license_link: str | None = None,
    command: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> CardFacts:
    from ..sources import looks_like_repo_id

    out = Path(out)
    manifest = read_manifest(out)
    validation = read_validation(out)
    for label, value in (("--base-model", base_model), ("--repo-id", repo_id)):
        if value is not None and not looks_like_repo_id(value):
            raise UsageError(f"{label} {value!r} is not a Hub repo id", hint="use the form org/name")
    if base_model is None:
        prev = existing_card_metadata(out).get("base_model")
        base_model = prev if isinstance(prev, str) and prev else SourceIdentity.from_dict(manifest.get("source") or {}).hub_repo
    lic = resolve_license(
        out, manifest, base_model, license=license, license_name=license_name, license_link=license_link,
        token=token, endpoint=endpoint,
    )  # fmt: skip
    if command is None:
        out_name = repo_id.split("/")[-1] if repo_id else out.resolve().name
        command = reproduce_command(manifest, out_name)
    from ..errors import redact

    return CardFacts(out, manifest, validation, base_model, lic, repo_id, redact(command))


def card_metadata(facts: CardFacts) -> Any:
    from huggingface_hub import ModelCardData

    tags = list(dict.fromkeys(["quantized", facts.backend, facts.scheme, *facts.family.tags, "qconvert"]))
    kwargs: dict[str, Any] = {}
    if facts.base_model:
        kwargs["base_model_relation"] = "quantized"
    return ModelCardData(
        base_model=facts.base_model,
        license=facts.license.license,
        license_name=facts.license.name,
        license_link=facts.license.link,
        library_name=facts.backend_class.hub_library_name,
        pipeline_tag=facts.family.pipeline_tag,
        tags=tags,
        **kwargs,
    )


# --- sections ------------------------------------------------------------------------------


def _source_phrase(facts: CardFacts) -> str:
    ident = facts.source
    if ident.builtin:
        return (
            f"qconvert's built-in `{ident.builtin}` demo pipeline (random weights: it draws noise; "
            "it exists to show and test the tooling end to end)"
        )
    if facts.base_model:
        return f"[{facts.base_model}]({HUB_URL}/{facts.base_model})"
    if ident.local_path:
        return f"the {facts.family.label} pipeline `{ident.label}`"
    return f"a {facts.family.label} pipeline"


def _float8_note(facts: CardFacts) -> str:
    """One sentence when the source file stored its weights in float8 (read upcast, exactly
    for unscaled weights: see ``qconvert.singlefile.upcast``)."""
    data = facts.manifest.get("source") or {}
    if not data.get("float8"):
        return ""
    scaled = " with per-tensor scales (ComfyUI's scaled fp8)" if data.get("scaled") else ""
    return f" The source was float8 ({data['float8']}){scaled}, read upcast to bfloat16 before quantizing."


def _components(facts: CardFacts) -> list[dict[str, str]]:
    rows = []
    for name, c in ordered_components(facts.manifest):
        if c.get("action") == "quantize":
            what = facts.backend_class.schemes.get(facts.scheme, f"{facts.backend} {facts.scheme}")
            if facts.files_only:
                files = ", ".join(f"`{f}`" for f in component_files(facts.manifest, name))
                what = f"{facts.scheme} ({what}): {files}"
            n, total = c.get("quantized_tensors"), c.get("tensors")
            if isinstance(n, int) and isinstance(total, int) and total:
                what += f"; {n} of {total} tensors quantized"
            after = _human(c.get("bytes_out"))
        elif facts.files_only:
            what, after = "not included: comes from the base pipeline", "—"
        else:
            what, after = "copied unchanged", _human(c.get("bytes_out"))
        rows.append({"name": name, "what": what, "before": _human(c.get("bytes_in")), "after": after})
    return rows


def usage_snippet(facts: CardFacts) -> str:
    """The backend's loading code (its ``usage_lines`` hook) + one ``pipe(...)`` call."""
    return "\n".join(facts.backend_class.usage_lines(facts) + _generate_call(facts, generation_args(facts)))


def _generate_call(facts: CardFacts, gen: dict[str, Any]) -> list[str]:
    fam, size = facts.family, gen["size"]
    inputs = [line for arg, kind in fam.inputs.items() for line in input_image_code(arg, kind, size)]
    extras = [f"    {k}={v!r}," for k, v in fam.call_extras(size).items()]
    return [
        *(["from PIL import Image", *inputs] if inputs else []),
        "image = pipe(",
        f"    prompt={json.dumps(DEFAULT_PROMPT)},",
        *[f"    {arg}={arg}," for arg in fam.inputs],
        f"    num_inference_steps={gen['steps']},",
        f"    guidance_scale={gen['guidance']},",
        f"    height={gen['size']},",
        f"    width={gen['size']},",
        *([f"    max_sequence_length={gen['max_sequence_length']},"] if "max_sequence_length" in gen else []),
        *extras,
        "    generator=torch.Generator().manual_seed(0),",
        ").images[0]",
        f'image.save("{fam.name}-{facts.scheme}.png")',
    ]


def _cpu_args(gen: dict[str, Any]) -> dict[str, Any]:
    """Generation settings a CPU can finish: the card's own if already small (the demos)."""
    return {**gen, "size": min(gen["size"], CPU_SIZE), "steps": min(gen["steps"], CPU_STEPS)}


def cpu_usage(facts: CardFacts) -> str:
    """Markdown for CPU users (empty when the main snippet already suits a CPU).

    A backend whose output the main snippet cannot load on a CPU (bitsandbytes: diffusers
    refuses it without a GPU) gives other loading code (its ``cpu_usage_lines`` hook).
    Full-size models: a small image and few steps.
    """
    gen = generation_args(facts)
    small = _cpu_args(gen)
    slow = small != gen
    backend = facts.backend_class
    loading = backend.cpu_usage_lines(facts)
    if loading is None and not slow:
        return ""
    lines: list[str] = []
    if slow:
        lines.append(
            f"On a CPU, {gen['size']}×{gen['size']} with {gen['steps']} steps is far too slow: one 1024×1024 step "
            "of FLUX.1-dev had not finished after 9 minutes on a 2-core CPU (19.8 GB resident memory). Try "
            f"{small['size']}×{small['size']} with {small['steps']} steps first "
            f"(1/{round((gen['size'] / small['size']) ** 2)} of the image tokens); the whole pipeline must fit in RAM."
        )
    if loading is not None:
        lines.append(backend.cpu_usage_note)
        code = [*loading, *_generate_call(facts, small)]
    else:
        lines.append("Replace the `pipe(...)` call above with:")
        code = _generate_call(facts, small)
    title = "On a CPU" if loading is None else "On a CPU-only machine"
    block = "\n".join(code)
    return f"### {title}\n\n" + "\n\n".join(lines) + f"\n\n{CPU_USAGE_MARKER}\n```python\n{block}\n```\n"


def _usage_note(facts: CardFacts) -> str:
    if facts.repo_id:
        return ""
    return (
        "The snippet loads this folder from disk; once it is on the Hub, `qconvert push` rewrites it "
        "with the repo id."
    )


_CHECK_LABELS = {
    "finite_images": "finite images",
    "memory_reduction": "transformer memory reduction",
    "forward_rel_error": "transformer forward error (relative)",
    "t5_rel_error": "T5 output error (relative)",
    "psnr": "PSNR vs reference",
    "ssim": "SSIM vs reference",
    "max_memory": "peak memory",
    "max_step_time": "time per step",
    "lpips": "LPIPS vs reference (AlexNet)",
}


def _check_value(name: str, value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    if name == "finite_images":
        return "yes" if value >= 1 else "no"
    if name == "memory_reduction":
        return f"{value:.2f}×"
    if name == "psnr":
        return f"{value:.2f} dB"
    if name == "max_memory":
        return _human(value)
    if name == "max_step_time":
        return f"{value:.4f} s"
    return f"{value:.4f}"


def _validation(facts: CardFacts) -> dict[str, Any] | None:
    v = facts.validation
    if not v:
        return None
    q = v.get("quantized") or {}
    r = v.get("reference") or {}
    stats = []
    for label, key, kind in (
        ("transformer weights in memory", "transformer_bytes", "bytes"),
        ("T5 weights in memory", "t5_bytes", "bytes"),
        ("memory after load", "memory_after_load", "bytes"),
        ("peak memory while generating", "peak_memory", "bytes"),
        ("time per denoising step", "step_s", "s"),
        ("load time", "load_s", "s"),
    ):
        f = _human if kind == "bytes" else (lambda x: f"{_fmt(x, '.4f')} s" if isinstance(x, (int, float)) else "—")
        stats.append({"label": label, "quantized": f(q.get(key)), "reference": f(r.get(key)) if r else "—"})
    checks = []
    identical = bool((v.get("quality") or {}).get("identical_images"))
    for c in v.get("checks") or []:
        name = str(c.get("name"))
        limit = c.get("limit")
        op = {">=": "≥", "<=": "≤"}.get(str(c.get("op")), str(c.get("op")))
        checks.append({
            "name": _CHECK_LABELS.get(name, name),
            "value": "∞ (identical images)" if name == "psnr" and identical else _check_value(name, c.get("value")),
            "limit": "" if limit is None or name == "finite_images" else f"{op} {_check_value(name, limit)}",
            "result": "pass" if c.get("passed") else "**FAIL**",
        })  # fmt: skip
    quality = v.get("quality") or {}
    if not any(c.get("name") == "lpips" for c in v.get("checks") or []):  # measured or not, but no limit set
        lp = quality.get("lpips")
        checks.append({
            "name": _CHECK_LABELS["lpips"], "value": _check_value("lpips", lp), "limit": "",
            "result": str(quality.get("lpips_note") or "not measured") if lp is None else "measured (no limit set)",
        })  # fmt: skip
    s = v.get("settings") or {}
    env = v.get("environment") or {}
    device = str(env.get("device") or s.get("device") or "?")
    dev_name = env.get("device_name")
    mem_note = (
        " Memory is CUDA allocated memory."
        if device.startswith("cuda")
        else " On CPU, memory is the growth of the process's resident memory (RSS), a rough measure."
    )
    if not device.startswith("cuda"):
        mem_note += facts.backend_class.cpu_validation_note
    n_prompts = len(s.get("prompts") or [])
    setup = (
        f"Measured on {device}{f' ({dev_name})' if dev_name else ''} in {s.get('dtype', '?')}: "
        f"{n_prompts} prompt{'s' if n_prompts != 1 else ''}, seed {s.get('seed', 0)}, {s.get('steps', '?')} steps at "
        f"{s.get('size', '?')}×{s.get('size', '?')}, against the unquantized source; time per step is the median "
        f"without each prompt's first step.{mem_note}"
    )
    versions = env.get("versions") or {}
    keep = ["torch", "diffusers", "transformers", *facts.backend_class.version_packages, "qconvert"]
    vtext = ", ".join(f"{k} {versions[k]}" for k in keep if versions.get(k))
    passed = bool(v.get("passed"))
    failed = [str(x) for x in v.get("failed") or []]
    summary = (
        "**Passed**: every check below holds." if passed
        else f"**Failed** ({', '.join(failed) or 'see below'}): this output did not meet qconvert's thresholds."
    )  # fmt: skip
    return {"summary": summary, "stats": stats, "checks": checks, "setup": setup, "versions": f"Versions: {vtext}."}


def _warning(facts: CardFacts) -> str:
    v = facts.validation
    if not v:
        return (
            "This output was **not validated**: qconvert did not load it, generate with it and compare it with "
            "the source. Use it with care."
        )
    if not v.get("passed"):
        failed = ", ".join(str(x) for x in v.get("failed") or []) or "see the table"
        return f"This output **failed validation** ({failed}). Use it with care."
    return ""


def _license_text(facts: CardFacts) -> str:
    lic = facts.license
    builtin = facts.source.builtin
    files = sorted(p.name for p in facts.out.glob("LICENSE*") if p.is_file())
    if builtin:
        name = "the Apache License 2.0 (`apache-2.0`)" if lic.license == "apache-2.0" else f"`{lic.license}`"
        text = (
            f"The weights of the built-in `{builtin}` demo are random numbers generated by qconvert; "
            f"this output is released under {name}."
        )
    else:
        of = f" of {facts.base_model}" if facts.base_model else ""
        text = f"These weights are a quantized derivative{of} and are distributed under its license: `{lic.license}`"
        if lic.name:
            text += f" ({lic.name})"
        text += "."
        if lic.link and lic.link not in files:  # an included file is linked once, below
            text += f" See [{lic.link}]({lic.link})."
    if files:
        text += " The license file" + ("s" if len(files) > 1 else "") + " of the base model "
        text += ("are" if len(files) > 1 else "is") + " included: " + ", ".join(f"[{f}]({f})" for f in files) + "."
    return text


def _other_variants(out: Path) -> str:
    """The release report's "Other variants of this model" section, kept in the folder by
    ``qconvert release --push`` (see ``qconvert.report.hub``); empty when there is none."""
    path = Path(out) / ".qconvert-variants.md"
    return path.read_text(encoding="utf-8").strip() if path.is_file() else ""


# --- rendering -----------------------------------------------------------------------------


def card_text(
    out: Path | str,
    *,
    base_model: str | None = None,
    license: str | None = None,
    license_name: str | None = None,
    license_link: str | None = None,
    command: str | None = None,
    repo_id: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> str:
    """The card for ``out`` as text (nothing written)."""
    from huggingface_hub import ModelCard

    from .. import __version__

    facts = gather(
        Path(out), repo_id=repo_id, base_model=base_model, license=license, license_name=license_name,
        license_link=license_link, command=command, token=token, endpoint=endpoint,
    )  # fmt: skip
    m = facts.manifest
    builtin = facts.source.builtin is not None
    title = repo_id.split("/")[-1] if repo_id else f"{facts.source.short_name} ({facts.backend} {facts.scheme})"
    t = (m.get("components") or {}).get("transformer") or {}
    ratio = ""
    if isinstance(t.get("bytes_in"), int) and t.get("bytes_out"):
        ratio = (
            f" The transformer's weights shrink from {_human(t['bytes_in'])} to {_human(t['bytes_out'])} "
            f"({t['bytes_in'] / t['bytes_out']:.1f}× smaller on disk)."
        )
    fam = facts.family
    loader = facts.backend_class.card_loader.format(pipeline=fam.pipeline_class, transformer=fam.transformer_class)
    intro = (
        f"A **{facts.backend} {facts.scheme}** pre-quantized version of {_source_phrase(facts)}, a {fam.label} "
        f"{fam.pipeline_tag} pipeline, made with qconvert {m.get('qconvert_version', __version__)}. It loads with "
        f"{loader}.{ratio}{_float8_note(facts)}"
    )
    grid = "samples/grid.png" if (facts.out / "samples" / "grid.png").is_file() else ""
    out_label = repo_id.split("/")[-1] if repo_id else Path(out).resolve().name
    reproduce = facts.command + f"\nqconvert validate {out_label}"
    not_validated = (
        "**Not validated.** `qconvert validate` was not run on this output (or it was skipped with "
        f"`--no-validate`), so there are no memory, speed or quality measurements. Run `qconvert validate "
        f"{out_label}` to load it as a user would, generate, and compare it with the source."
    )
    card = ModelCard.from_template(
        card_metadata(facts),
        template_path=str(TEMPLATE_PATH),
        title=title,
        intro=intro,
        warning=_warning(facts),
        components=_components(facts),
        total_before=_human(m.get("bytes_in")),
        total_after=_human(m.get("bytes_out")),
        method=facts.backend_class.card_method(m),
        install=install_line(m, builtin_base=facts.files_only and builtin and "builtin_path" in facts.base_pipeline()[1]),
        usage=usage_snippet(facts),
        usage_note=_usage_note(facts),
        cpu_usage=cpu_usage(facts),
        validation=_validation(facts),
        grid=grid,
        not_validated=not_validated,
        reproduce=reproduce,
        qconvert_version=m.get("qconvert_version", __version__),
        license_text=_license_text(facts),
        other_variants=_other_variants(facts.out),
    )
    text = str(card).rstrip("\n") + "\n"
    check_card(text)
    return text


def check_card(text: str) -> None:
    """The Hub's metadata rules, checked locally: YAML parses, round-trips, types are right."""
    import yaml
    from huggingface_hub import ModelCard

    card = ModelCard(text)
    data = card.data.to_dict()
    if yaml.safe_load(card.data.to_yaml()) != data:  # pragma: no cover - a bug in the card data
        raise AssertionError("card metadata does not round-trip")
    for key in ("library_name", "pipeline_tag", "license", "license_name", "license_link", "base_model", "base_model_relation"):
        if key in data and not isinstance(data[key], str):  # pragma: no cover
            raise AssertionError(f"card metadata {key} must be a string")
    if not isinstance(data.get("tags"), list) or not all(isinstance(t, str) for t in data["tags"]):  # pragma: no cover
        raise AssertionError("card metadata tags must be a list of strings")
    if data.get("base_model_relation") not in (None, "quantized"):  # pragma: no cover
        raise AssertionError("base_model_relation must be 'quantized'")


def render_card(
    out: Path | str,
    *,
    base_model: str | None = None,
    license: str | None = None,
    license_name: str | None = None,
    license_link: str | None = None,
    command: str | None = None,
    repo_id: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> Path:
    """Write ``out/README.md`` (see the module docstring); returns its path.

    A README.md that qconvert did not write (no card marker) is never overwritten.
    """
    path = Path(out) / CARD_NAME
    if path.is_file() and not is_generated_card(path):
        raise UsageError(
            f"{path} was not written by qconvert; not overwriting it",
            hint="move it away to let qconvert render the card",
        )
    text = card_text(
        out, base_model=base_model, license=license, license_name=license_name, license_link=license_link,
        command=command, repo_id=repo_id, token=token, endpoint=endpoint,
    )  # fmt: skip
    tmp = path.with_name(f".{CARD_NAME}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def extract_usage(text: str, marker: str = USAGE_MARKER) -> str:
    """The usage snippet of a rendered card (the ```python block after ``marker``: the usage
    marker, or ``CPU_USAGE_MARKER`` for the CPU one)."""
    i = text.find(marker)
    if i < 0:
        raise ValueError("the card has no usage snippet" if marker == USAGE_MARKER else f"the card has no {marker}")
    start = text.index("```python\n", i) + len("```python\n")
    return text[start : text.index("\n```", start)] + "\n"
