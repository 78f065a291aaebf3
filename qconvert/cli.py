"""The ``qconvert`` command line: a thin wrapper over the library functions.

Imports of torch/diffusers/transformers happen inside the commands, so ``qconvert --help``
and ``qconvert flux --help`` are instant.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from . import __version__
from .convert import BACKENDS
from .errors import (
    EXIT_INTERRUPTED,
    EXIT_UNEXPECTED,
    EXIT_USAGE,
    OptionRef,
    QConvertError,
    redact,
    register_secret,
    worded,
)
from .quiet import quiet_libraries

BACKEND_NAMES = tuple(BACKENDS)  # the registry (backend modules import no dependency: --help stays instant)

FLUX_EXAMPLES = """
\b
Examples:
  qconvert flux --source tiny-flux --backend torchao --scheme int8wo --out out/flux-int8
  qconvert flux --source black-forest-labs/FLUX.1-dev --backend bnb --scheme nf4 --out out/nf4
  qconvert flux --source ./my-flux-pipeline --backend gguf --scheme Q4_K_S --out out/gguf
  qconvert flux --source flux1-dev.safetensors --base black-forest-labs/FLUX.1-dev \\
      --backend torchao --scheme fp8wo --out out/fp8
  qconvert flux --source tiny-flux --backend torchao --scheme int8wo --dry-run -v
"""


def scheme_help() -> str:
    """The epilog's scheme list, from the backends' own declarations (the card's texts too)."""
    lines = ["\b", "Schemes:"]
    for name, backend in BACKENDS.items():
        lines.append(f"  --backend {name}")
        lines += [f"    {scheme:<8} {text}" for scheme, text in backend.schemes.items()]
    return "\n".join(lines) + "\n"


class State:
    # --debug is read by main() itself: it must work even when parsing the options fails
    def __init__(self, verbose: int = 0, quiet: bool = False) -> None:
        self.verbose = verbose
        self.quiet = quiet

    def info(self, msg: str) -> None:
        if not self.quiet:
            click.echo(redact(msg), err=True)


def hub_token() -> str | None:
    """Token from HF_TOKEN or the huggingface_hub login; registered for redaction."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        try:
            from huggingface_hub import get_token

            token = get_token()
        except Exception:  # noqa: BLE001 - no login is fine for public repos
            token = None
    register_secret(token)
    return token


def hub_endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _more_verbose(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value:
        ctx.ensure_object(State).verbose += value
    return value


def _be_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.ensure_object(State).quiet = True
    return value


def output_options(command: Any) -> Any:
    """-v/-q after the command name too (`qconvert flux ... --dry-run -v`), as before it."""
    command = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_be_quiet,
                           help="Only errors and the final result.")(command)  # fmt: skip
    return click.option("-v", "--verbose", count=True, expose_value=False, callback=_more_verbose,
                        help="More output (-vv: library logs too).")(command)  # fmt: skip


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="qconvert")
@click.option("-v", "--verbose", count=True, help="More output (-vv: library logs too).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and the final result.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, debug: bool) -> None:
    """Turn a Flux text-to-image checkpoint into pre-quantized checkpoints.

    Run `qconvert COMMAND --help` for examples.
    """
    ctx.obj = State(verbose, quiet)


@cli.command(epilog=FLUX_EXAMPLES + "\n" + scheme_help(), short_help="Convert a Flux pipeline (bnb, torchao or GGUF).")
@output_options
@click.option("--source", required=True, help="tiny-flux, a pipeline folder, a Hub repo id, or a BFL .safetensors file.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of --source (of --base for a local single file).")
@click.option("--base", default=None, help="Pipeline supplying the other components for a single-file --source.")
@click.option("--file", "source_file", default=None, help="The .safetensors file of a Hub --source repo to convert (also: --source org/name/<file>).")
@click.option("--backend", required=True, type=click.Choice(BACKEND_NAMES), help="Quantization backend.")
@click.option("--scheme", required=True, help="Scheme of the backend (see below); several, comma-separated: one read of the source for all.")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None, help="Output folder [out/<source>-<backend>-<scheme>].")
@click.option("--components", default=None, help="Comma list to quantize [transformer,text_encoder_2].")
@click.option("--compute-dtype", default=None, help="bnb: compute dtype in the config, and the dtype a float32 source is written in [bfloat16].")
@click.option("--layout", type=click.Choice(["bfl", "diffusers", "comfyui"]), default=None, help="gguf: tensor names, bfl or diffusers [bfl]; fp8: diffusers (layerwise casting), bfl (fp8r) or comfyui [diffusers].")
@click.option("--gguf-search", type=click.Choice(["weighted", "reference"]), default=None, help="gguf: ggml's weighted search (all-ones importance matrix, lower error) or its reference path (llama.cpp's unweighted bytes) [weighted].")
@click.option("--jobs", type=int, default=None, help="Tensors quantized in parallel [all cores]; never changes the output.")
@click.option("--max-shard-size", default=None, help="Largest safetensors shard, e.g. 5GB [diffusers: 10GB].")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--dry-run", is_flag=True, help="Print the plan (every component; -v: every tensor) and stop.")
@click.option("--no-validate", is_flag=True, help="Skip the validation run after converting.")
@click.option("--device", default=None, help="Validation device: auto, cpu, cuda [auto].")
@click.option("--thresholds", "thresholds_file", type=click.Path(path_type=Path), default=None, help="Validation thresholds TOML.")
@click.option("--push", "do_push", is_flag=True, help="Write the card and push to the Hub after a passing validation.")
@click.option("--namespace", default=None, help="--push: user or org [the token's user].")
@click.option("--repo-id", default=None, help="--push: repo [<namespace>/<name of the --out folder>].")
@click.option("--private", is_flag=True, help="--push: create the repo private.")
@click.option("--collection", default=None, help="--push: add the repo to this collection (created if needed).")
@click.option("--license", "license_", default=None, help="--push: license id when the base model has none.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
@click.pass_obj
def flux(
    state: State,
    source: str,
    revision: str | None,
    base: str | None,
    source_file: str | None,
    backend: str,
    scheme: str,
    out: Path | None,
    components: str | None,
    compute_dtype: str | None,
    layout: str | None,
    gguf_search: str | None,
    jobs: int | None,
    max_shard_size: str | None,
    overwrite: bool,
    dry_run: bool,
    no_validate: bool,
    device: str | None,
    thresholds_file: Path | None,
    do_push: bool,
    namespace: str | None,
    repo_id: str | None,
    private: bool,
    collection: str | None,
    license_: str | None,
    as_json: bool,
) -> None:
    """Convert a Flux pipeline: quantize the transformer and T5, keep the rest.

    The output is validated afterwards (load as a user would, generate, compare with the
    source) unless --no-validate; a failed validation exits 4.
    """
    from .convert import parse_components
    from .job import Job, PushTarget, plan_of, run
    from .errors import UsageError

    push_only = {"--namespace": namespace, "--repo-id": repo_id, "--collection": collection,
                 "--private": private or None, "--license": license_}  # fmt: skip
    stray = [flag for flag, value in push_only.items() if value is not None]
    if stray and not do_push:
        raise UsageError(f"{stray[0]} only applies with --push", hint=f"add --push, or drop {stray[0]}")
    options = {"compute_dtype": compute_dtype, "layout": layout, "jobs": jobs, "max_shard_size": max_shard_size,
               "gguf_search": gguf_search}  # fmt: skip
    target = PushTarget(repo_id, namespace, private, collection) if do_push else None
    schemes = _schemes(scheme, out, repo_id, dry_run)
    job = Job(
        source, backend, schemes[0], out=out, revision=revision, base=base, source_file=source_file,
        components=parse_components(components),
        options={k: v for k, v in options.items() if v is not None}, overwrite=overwrite, validate=not no_validate,
        device=device, thresholds_file=thresholds_file, license=license_, push=target, token=hub_token(),
        endpoint=hub_endpoint(), progress=not state.quiet and not as_json,
    )  # fmt: skip
    quiet_libraries(state.verbose)
    if dry_run:
        state.info(f"resolving source {source}")
        plan = plan_of(job)
        click.echo(json.dumps(plan.to_dict(tensors=state.verbose > 0), indent=2) if as_json else plan.render(verbose=state.verbose > 0))
        return
    if len(schemes) > 1:
        _run_schemes(state, job, schemes, out, as_json)
        return
    run(job, on_event=_FluxOutput(state, job, as_json))


def _schemes(scheme: str, out: Path | None, repo_id: str | None, dry_run: bool) -> list[str]:
    """``--scheme a,b,c`` -> the schemes, checked for what a single output would allow."""
    from .errors import UsageError

    schemes = [s.strip() for s in scheme.split(",") if s.strip()]
    if not schemes:
        raise UsageError("--scheme is empty", hint="name a scheme, e.g. --scheme int8wo")
    if len(set(schemes)) != len(schemes):
        raise UsageError(f"--scheme {scheme} names a scheme twice", hint="name each scheme once")
    if len(schemes) > 1 and repo_id:
        raise UsageError("--repo-id takes one scheme", hint="drop --repo-id: each output's repo is named after it")
    if len(schemes) > 1 and dry_run:
        raise UsageError("--dry-run takes one scheme", hint="run --dry-run once per scheme")
    return schemes


def _run_schemes(state: State, job: Any, schemes: list[str], out: Path | None, as_json: bool) -> None:
    """Several schemes: one output each (``--out`` is then their parent folder), one read."""
    from dataclasses import replace

    from .job import default_out, run_many

    jobs = [replace(job, scheme=s, out=(out / default_out(job.source, job.backend, s).name) if out else None)
            for s in schemes]  # fmt: skip
    outputs = [_FluxOutput(state, j, as_json) for j in jobs]

    def on_event(i: int, kind: str, value: Any) -> None:
        if kind == "reads":
            gb = 1e9
            state.info(f"read {value['bytes_read'] / gb:.2f} GB of source for {value['bytes_served'] / gb:.2f} GB of tensors ({len(jobs)} outputs)")
        else:
            outputs[i](kind, value)

    results = run_many(jobs, on_event=on_event)
    failures = [r for r in results if isinstance(r, BaseException)]
    for j, r in zip(jobs, results):
        if isinstance(r, BaseException):
            state.info(f"{j.scheme}: failed: {r}")
    if failures:
        raise failures[0]


class _FluxOutput:
    """Prints a job's events as `qconvert flux` shows them: the summary once converted (and
    validated), then the validation table, then what happened on the Hub."""

    def __init__(self, state: State, job: Any, as_json: bool) -> None:
        self.state, self.job, self.as_json = state, job, as_json
        self.t0 = time.perf_counter()
        self.summary: dict[str, Any] = {}

    def __call__(self, kind: str, value: Any) -> None:
        if kind == "info":
            self.state.info(value)
        elif kind == "converted":
            self.summary = _summary(value, self.job, time.perf_counter() - self.t0)
            if not self.job.validate:
                self.show(None)
        elif kind == "validated":
            self.summary["validation"] = {"passed": value.passed, "failed": [c.name for c in value.checks if not c.passed]}
            self.show(value)
        elif kind == "pushed" and not self.state.quiet:  # stderr under --json: stdout is the summary
            click.echo("\n".join(value.outcome_lines()), err=self.as_json)

    def show(self, report: Any) -> None:
        if self.as_json:
            click.echo(json.dumps(self.summary, indent=2))
        elif not self.state.quiet:
            click.echo(_summary_table(self.summary))
            if report is not None:
                click.echo(report.table())
        else:
            click.echo(self.summary["out"])


def _summary(result: Any, job: Any, elapsed: float) -> dict[str, Any]:
    components = {
        name: {"action": c["action"], "scheme": c["scheme"], "bytes_in": c["bytes_in"], "bytes_out": c["bytes_out"],
               "seconds": round(result.seconds.get(name, 0.0), 3)}
        for name, c in result.manifest["components"].items()
    }  # fmt: skip
    return {"out": str(result.out), "backend": job.backend, "scheme": job.scheme, "seconds": round(elapsed, 3),
            "bytes_in": result.manifest["bytes_in"], "bytes_out": result.manifest["bytes_out"], "components": components}  # fmt: skip


@cli.command("validate", short_help="Load an output as a user would, generate, compare with the source.")
@output_options
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--reference", default=None, help="Reference source [the source recorded in qconvert.json].")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None, help="Text file, one prompt per line.")
@click.option("--steps", type=int, default=None, help="Denoising steps [4].")
@click.option("--size", type=int, default=None, help="Image size in pixels [1024 on CUDA, 32 on CPU].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the first prompt (+1 per prompt).")
@click.option("--device", default=None, help="auto, cpu or cuda [auto].")
@click.option("--thresholds", "thresholds_file", type=click.Path(path_type=Path), default=None, help="TOML file of thresholds.")
@click.option("--max-memory", default=None, help="Peak memory budget, e.g. 12GiB.")
@click.option("--max-step-time", type=float, default=None, help="Budget in seconds per denoising step.")
@click.option("--min-psnr", type=float, default=None, help="Override the scheme's PSNR floor (dB).")
@click.option("--min-ssim", type=float, default=None, help="Override the scheme's SSIM floor.")
@click.option("--max-forward-error", type=float, default=None, help="Override the forward relative-error ceiling.")
@click.option("--min-memory-reduction", type=float, default=None, help="Override the memory-reduction floor.")
@click.option("--max-lpips", type=float, default=None, help="LPIPS ceiling; fails when LPIPS cannot be measured.")
@click.option("--json", "as_json", is_flag=True, help="Print validation.json to stdout.")
@click.pass_obj
def validate_cmd(
    state: State, out: Path, reference: str | None, prompts_file: Path | None, steps: int | None,
    size: int | None, seed: int, device: str | None, thresholds_file: Path | None, max_memory: str | None,
    max_step_time: float | None, min_psnr: float | None, min_ssim: float | None,
    max_forward_error: float | None, min_memory_reduction: float | None, max_lpips: float | None, as_json: bool,
) -> None:
    """Load OUT as a user would, generate with fixed seeds, measure and compare with the source.

    \b
    Examples:
      qconvert validate out/flux-int8
      qconvert validate out/nf4 --steps 28 --size 1024 --max-memory 12GiB --max-step-time 0.5
    Writes OUT/validation.json and OUT/samples/; exits 4 naming the first failed check.
    """
    from .errors import UsageError

    prompts = None
    if prompts_file is not None:
        try:
            prompts = [p.strip() for p in prompts_file.read_text().splitlines() if p.strip()]
        except OSError as e:
            raise UsageError(f"cannot read --prompts {prompts_file}: {e.strerror}") from None
        if not prompts:
            raise UsageError(f"--prompts {prompts_file} holds no prompt")
    overrides: dict[str, Any] = {
        "min_psnr": min_psnr, "min_ssim": min_ssim, "max_forward_rel_error": max_forward_error,
        "min_memory_reduction": min_memory_reduction, "max_step_time": max_step_time, "max_lpips": max_lpips,
        "max_memory": max_memory,  # a size string, parsed and checked with the other thresholds
    }  # fmt: skip
    quiet_libraries(state.verbose)
    from .validate import raise_if_failed, validate

    token = hub_token()
    report = validate(
        out, reference=reference, prompts=prompts, steps=steps, size=size, seed=seed, device=device,
        thresholds_file=thresholds_file, overrides=overrides, token=token, endpoint=hub_endpoint(),
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.table())
    raise_if_failed(report)


@cli.command("card", short_help="Write the model card (README.md) of an output.")
@output_options
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--base-model", default=None, help="Hub repo id of the base model [the source's repo].")
@click.option("--license", "license_id", default=None, help="License id, e.g. apache-2.0 or other [the base model's].")
@click.option("--license-name", default=None, help="With --license other: the license's name.")
@click.option("--license-link", default=None, help="With --license other: URL or file of the license text.")
@click.option("--repo-id", default=None, help="Repo id to use in the usage snippet [the folder's path].")
@click.pass_obj
def card_cmd(
    state: State, out: Path, base_model: str | None, license_id: str | None, license_name: str | None,
    license_link: str | None, repo_id: str | None,
) -> None:
    """Write OUT/README.md: a Hub model card for a conversion output.

    \b
    Examples:
      qconvert card out/flux-int8
      qconvert card out/my-flux-nf4 --base-model black-forest-labs/FLUX.1-dev
      qconvert card out/x --license other --license-name my-license --license-link LICENSE.md
    The metadata (base model, license, tags), what was quantized, a usage snippet, the
    validation results and how to reproduce come from qconvert.json and validation.json.
    Re-rendering the same output gives identical bytes.
    """
    quiet_libraries(state.verbose)
    from .cards import render_card

    path = render_card(
        out, base_model=base_model, license=license_id, license_name=license_name, license_link=license_link,
        repo_id=repo_id, token=hub_token(), endpoint=hub_endpoint(),
    )  # fmt: skip
    click.echo(str(path))


@cli.command("push", short_help="Publish an output to the Hub in one commit.")
@output_options
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, help="Model repo to push to: NAMESPACE/NAME (created if missing).")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--collection", default=None, help="Also add the repo to this collection (title; created if missing).")
@click.option("--dry-run", is_flag=True, help="Print the plan (files, commit message, collection); change nothing.")
@click.option("--no-validate", is_flag=True, help="Publish an output without a passing validation (the card says so).")
@click.option("--keep-remote-files/--delete-remote-files", default=None,
              help="Keep repo files the output lacks [keep for GGUF, delete for pipeline folders].")
@click.option("-m", "--message", default=None, help="Commit message [qconvert VERSION: BACKEND SCHEME of SOURCE].")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result on stdout.")
@click.pass_obj
def push_cmd(
    state: State, out: Path, repo_id: str, private: bool, collection: str | None, dry_run: bool,
    no_validate: bool, keep_remote_files: bool | None, message: str | None, as_json: bool,
) -> None:
    """Publish OUT to the Hugging Face Hub as one commit (needs a write token in HF_TOKEN).

    \b
    Examples:
      qconvert push out/flux-int8 --repo-id me/FLUX.1-dev-torchao-int8 --dry-run
      qconvert push out/flux-int8 --repo-id my-org/FLUX.1-dev-torchao-int8 --collection "FLUX quants"
      qconvert push out/nf4 --repo-id me/flux-nf4 --private
    The output must have passed `qconvert validate` (exit 4 otherwise) unless --no-validate.
    README.md is (re-)rendered with the repo id. A pipeline repo mirrors OUT (files OUT lacks
    are deleted); a GGUF repo keeps its other files (one .gguf per scheme side by side).
    Pushing an unchanged output makes no commit, nor does one whose only changes are
    measurements (a re-validation: validation.json, README.md, samples/), which is then not
    published. Failures exit 5 and leave the repo as it was.
    """
    if collection is not None:
        from .hubnames import check_collection_title

        check_collection_title(collection)
    quiet_libraries(state.verbose)
    from .publish import push

    token = hub_token()
    result = push(
        out, repo_id, token=token, endpoint=hub_endpoint(), private=private, collection=collection,
        dry_run=dry_run, allow_unvalidated=no_validate, commit_message=message,
        keep_remote_files=keep_remote_files, info=state.info,
    )  # fmt: skip
    if as_json:
        click.echo(redact(json.dumps(result.to_dict(), indent=2)))
    else:
        click.echo(result.render(verbose=state.verbose > 0))


def _summary_table(summary: dict[str, Any]) -> str:
    from .plan import human_bytes

    rows = [f"{'component':<16}{'scheme':<10}{'before':>12}{'after':>12}{'time':>9}"]
    for name, c in summary["components"].items():
        rows.append(
            f"{name:<16}{(c['scheme'] or c['action']):<10}{human_bytes(c['bytes_in']):>12}"
            f"{human_bytes(c['bytes_out']):>12}{c['seconds']:>8.1f}s"
        )
    rows.append(
        f"{'total':<26}{human_bytes(summary['bytes_in']):>12}{human_bytes(summary['bytes_out']):>12}"
        f"{summary['seconds']:>8.1f}s"
    )
    rows.append(f"wrote {summary['out']}")
    return "\n".join(rows)


@cli.command("release", short_help="Run a release plan (many variants), resumable.")
@output_options
@click.argument("plan_file", type=click.Path(path_type=Path))
@click.option("--only", default=None, help="Comma list of variant names to run.")
@click.option("--matrix", "as_matrix", is_flag=True, help="Print the variants as a JSON list (CI matrix) and stop.")
@click.option("--dry-run", is_flag=True, help="Print what would run and stop.")
@click.option("--push", is_flag=True, help="Push each validated variant to the Hub.")
@click.option("--stage", is_flag=True, help="Convert (no validation) and push each variant to its repo's qconvert-staging branch.")
@click.option("--validate-staged", is_flag=True, help="Validate each staged variant as downloaded from the Hub (GPU runner).")
@click.option("--promote", is_flag=True, help="Promote each staged variant that passed validation to main (no upload).")
@click.option("--workdir", type=click.Path(path_type=Path), default=None, help="Outputs and resumable state [release-<plan>].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_obj
def release_cmd(state: State, plan_file: Path, only: str | None, as_matrix: bool, dry_run: bool, push: bool,
                stage: bool, validate_staged: bool, promote: bool, workdir: Path | None, as_json: bool) -> None:
    """Run a release plan: convert, validate, card and push many variants.

    \b
    Examples:
      qconvert release releases/flux1-dev.toml --dry-run
      qconvert release releases/flux1-dev.toml --only nf4,Q4_K_S --push
      qconvert release releases/flux1-dev.toml --matrix      # for a CI matrix
    Re-running continues where an interrupted run stopped; variants already on the Hub
    with the same source revision and qconvert version are skipped. A failed variant
    does not stop the others; the exit code is the first failure's (4 validation, 5 push).
    --stage (CPU runners), --validate-staged (one GPU runner) and --promote split a release:
    nothing reaches main unvalidated, and promoting uploads nothing again.
    """
    from .release import load_plan, matrix, summary_table

    plan = load_plan(plan_file)
    if as_matrix:
        click.echo(json.dumps(matrix(plan, only)))
        return
    quiet_libraries(state.verbose)
    token = hub_token()
    workdir = workdir or Path(f"release-{plan_file.stem}")
    modes = {"push": push, "stage": stage, "validate_staged": validate_staged, "promote": promote}
    results = _release_results(plan, only, workdir, modes=modes, dry_run=dry_run, token=token, state=state)
    if as_json:
        from dataclasses import asdict

        click.echo(json.dumps([asdict(r) for r in results], indent=2))
    else:
        click.echo(summary_table(results))
    failed = [r for r in results if r.status == "failed"]
    if failed:
        from .errors import QConvertError

        error = QConvertError(f"{len(failed)} of {len(results)} variants failed (first: {failed[0].name}: {failed[0].detail})")
        error.exit_code = failed[0].exit_code or 1  # the first failure's own code: 4 validation, 5 push, ...
        raise error


def _release_results(plan: Any, only: str | None, workdir: Path, *, modes: dict[str, bool], dry_run: bool,
                     token: str | None, state: State) -> list[Any]:  # fmt: skip
    """One of the release's modes: all in one (run_release, ``--push``), stage, validate-staged, promote."""
    from .errors import UsageError
    from .release import run_release

    chosen = [m for m, on in modes.items() if on]
    if len(chosen) > 1 or (dry_run and chosen and chosen[0] in ("validate_staged", "promote")):
        raise UsageError("--push, --stage, --validate-staged and --promote are separate modes of a release", hint="pass one of them")
    hub = {"only": only, "token": token, "endpoint": hub_endpoint()}
    if modes["stage"]:
        from . import staging

        if dry_run:  # what each staging job needs: download, disk, memory, time
            return staging.stage_costs(plan, workdir=workdir, **hub)
        return staging.stage_release(plan, workdir=workdir, log=state.info, progress=not state.quiet, **hub)
    if modes["validate_staged"] or modes["promote"]:
        from . import promote

        if modes["validate_staged"]:
            return promote.validate_release(plan, workdir=workdir, log=state.info, **hub)
        return promote.promote_release(plan, log=state.info, **hub)
    return run_release(plan, only=only, workdir=workdir, push=modes["push"], dry_run=dry_run, token=token,
                       endpoint=hub_endpoint(), log=state.info, progress=not state.quiet)  # fmt: skip


@cli.command("report", short_help="Compare the variants of a release: an HTML page + Markdown table.")
@output_options
@click.argument("inputs", nargs=-1, required=True, metavar="WORKDIR_OR_COLLECTION...")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Report folder [<workdir>/report, report-<collection> or ./report]; an earlier report is replaced.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result on stdout.")
@click.pass_obj
def report_cmd(state: State, inputs: tuple[str, ...], out: Path | None, as_json: bool) -> None:
    """Write a comparison report of validated variants of one model.

    \b
    INPUTS: a release workdir, output folders, or one Hub collection
    (NAMESPACE/SLUG as in its URL, or NAMESPACE/Title). Writes index.html
    (table, Pareto plots, image grid, blind comparison), report.md and report.json.
    \b
    Examples:
      qconvert report release-flux1-dev
      qconvert report out/nf4 out/int8 --out report-flux
      qconvert report my-org/flux1-dev-quantized-65a1b2c3d4 --out report
    """
    from .report import build_report

    result = build_report(list(inputs), out, token=hub_token(), endpoint=hub_endpoint())
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo(f"report of {len(result.variants)} variants of {result.source}: {result.html}")


# click >= 8.2 raises this for a bare group call; click 8.1 prints the help and exits 0 itself
_NO_ARGS_IS_HELP: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


# Options the CLI names in other words than a flag of its own
_CLI_PHRASES = {
    "thresholds": "the --min-*/--max-* flags of `qconvert validate`",
    "overrides": "the command line",  # validate()'s threshold overrides: those flags
}


def _flags() -> dict[str, str]:
    """Python name of an option -> its flag (``thresholds_file`` -> ``--thresholds``)."""
    flags: dict[str, str] = {}
    for command in (flux, *cli.commands.values()):
        for p in command.params:
            if isinstance(p, click.Option) and p.name:
                flags.setdefault(p.name, max(p.opts, key=len))
    return flags


def cli_wording(ref: OptionRef) -> str:
    """How the CLI names an option in an error: ``--overwrite``, ``--no-validate``,
    ``--layout diffusers``, ``--thresholds FILE`` (see :func:`qconvert.errors.opt`)."""
    if ref.name in _CLI_PHRASES:
        return _CLI_PHRASES[ref.name]
    flag = _flags().get(ref.name) or "--" + ref.name.replace("_", "-")
    if ref.value is True:
        return flag
    if ref.value is False:
        return "--no-" + flag.removeprefix("--")
    if ref.value is not None or ref.metavar:
        return f"{flag} {ref.metavar if ref.value is None else ref.value}"
    return flag


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the CLI and turns every expected failure into one line + exit code,
    its options worded as flags (:func:`cli_wording`), in messages and in what a release records."""
    with worded(cli_wording):
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="qconvert", standalone_mode=False)
    except click.exceptions.Exit as e:
        return int(e.exit_code or 0)
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        return EXIT_INTERRUPTED
    except _NO_ARGS_IS_HELP as e:  # bare `qconvert` (click >= 8.2): the help, not an error
        click.echo(e.ctx.get_help() if e.ctx else str(e))
        return 0
    except click.ClickException as e:
        click.echo(f"error: {redact(e.format_message())}", err=True)
        return EXIT_USAGE if isinstance(e, click.UsageError) else e.exit_code
    except QConvertError as e:
        if debug:
            import traceback

            traceback.print_exc()
        click.echo(f"error: {e.one_line()}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("error: interrupted (the output folder was not written)", err=True)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the last line of defence: never a bare traceback
        if debug:
            import traceback

            traceback.print_exc()
        mapped = _last_resort(e)
        if mapped is not None:
            click.echo(f"error: {mapped.one_line()}", err=True)
            return mapped.exit_code
        msg = redact(" ".join(f"{type(e).__name__}: {e}".split()))[:400]
        click.echo(f"error: unexpected failure: {msg} (rerun with --debug and report it)", err=True)
        return EXIT_UNEXPECTED
    return 0


def _last_resort(e: Exception) -> QConvertError | None:
    """A file-system failure of a user's making (a full disk, permissions, a read-only mount)
    that escaped the function doing the I/O: still one line naming the path and the fix.
    Everything else that reaches here is a bug."""
    from .errors import os_error

    return os_error(e, "reading or writing files", fix="fix that path (or choose another --out) and run the command again")


def run() -> None:
    """Console entry point: ``main()`` as the process's exit status."""
    code = main()
    if code == EXIT_INTERRUPTED:
        # A Ctrl-C that arrives while a C extension runs Python code through PyRun_* (imports
        # of torch and friends do) sets CPython's "unhandled KeyboardInterrupt" flag even
        # though it was handled here, and the interpreter then ends the process by SIGINT
        # (status -2) instead of 130. Everything is cleaned up and flushed by now: leave
        # without the interpreter's finalization.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
