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
from .errors import EXIT_INTERRUPTED, EXIT_UNEXPECTED, EXIT_USAGE, QConvertError, redact, register_secret

BACKEND_NAMES = ("bnb", "torchao", "gguf")

FLUX_EXAMPLES = """
\b
Examples:
  qconvert flux --source tiny-flux --backend torchao --scheme int8wo --out out/flux-int8
  qconvert flux --source black-forest-labs/FLUX.1-dev --backend bnb --scheme nf4 --out out/nf4
  qconvert flux --source ./my-flux-pipeline --backend gguf --scheme Q4_K_S --out out/gguf
  qconvert flux --source flux1-dev.safetensors --base black-forest-labs/FLUX.1-dev \\
      --backend torchao --scheme fp8wo --out out/fp8
  qconvert flux --source tiny-flux --backend torchao --scheme int8wo --dry-run -v

\b
Schemes:
  torchao  int8wo fp8wo int8dq int4wo(GPU only)
  bnb      nf4 nf4-dq fp4 fp4-dq int8
  gguf     F16 BF16 Q8_0 Q6_K Q5_K_M Q5_K_S Q5_1 Q5_0 Q4_K_M Q4_K_S Q4_1 Q4_0
           Q3_K_M Q3_K_S Q2_K
"""


class State:
    def __init__(self, verbose: int = 0, quiet: bool = False, debug: bool = False) -> None:
        self.verbose = verbose
        self.quiet = quiet
        self.debug = debug

    def info(self, msg: str) -> None:
        if not self.quiet:
            click.echo(redact(msg), err=True)


def _quiet_libraries(verbose: int) -> None:
    """Keep third-party chatter (torchao's optional kernels, HF warnings) off the terminal."""
    if verbose >= 2:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import logging
    import warnings

    import torch  # noqa: F401 - torch configures its loggers on import; override after

    for name in ("torchao", "torch", "transformers", "diffusers", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="qconvert")
@click.option("-v", "--verbose", count=True, help="More output (-vv: library logs too).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and the final result.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, debug: bool) -> None:
    """Turn a Flux text-to-image checkpoint into pre-quantized checkpoints.

    \b
    Commands:
      flux      convert a Flux pipeline (bnb, torchao or GGUF)
    Run `qconvert COMMAND --help` for examples.
    """
    ctx.obj = State(verbose, quiet, debug)


@cli.command(epilog=FLUX_EXAMPLES)
@click.option("--source", required=True, help="tiny-flux, a pipeline folder, a Hub repo id, or a BFL .safetensors file.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of --source/--base.")
@click.option("--base", default=None, help="Pipeline supplying the other components for a single-file --source.")
@click.option("--backend", required=True, type=click.Choice(BACKEND_NAMES), help="Quantization backend.")
@click.option("--scheme", required=True, help="Scheme of the backend (see below).")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None, help="Output folder [out/<source>-<backend>-<scheme>].")
@click.option("--components", default=None, help="Comma list to quantize [transformer,text_encoder_2].")
@click.option("--compute-dtype", default=None, help="bnb: compute dtype stored in the config [bfloat16].")
@click.option("--layout", type=click.Choice(["bfl", "diffusers"]), default=None, help="gguf: tensor names [bfl].")
@click.option("--jobs", type=int, default=None, help="gguf: parallel quantization workers [all cores].")
@click.option("--max-shard-size", default=None, help="Largest safetensors shard, e.g. 5GB [diffusers: 10GB].")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--dry-run", is_flag=True, help="Print the plan (every component; -v: every tensor) and stop.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
@click.pass_obj
def flux(
    state: State,
    source: str,
    revision: str | None,
    base: str | None,
    backend: str,
    scheme: str,
    out: Path | None,
    components: str | None,
    compute_dtype: str | None,
    layout: str | None,
    jobs: int | None,
    max_shard_size: str | None,
    overwrite: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Convert a Flux pipeline: quantize the transformer and T5, keep the rest."""
    from .convert import SCHEMES, parse_components

    if scheme not in SCHEMES[backend]:
        from .errors import UsageError

        raise UsageError(
            f"unknown {backend} scheme {scheme!r}", hint=f"choose one of: {', '.join(SCHEMES[backend])}"
        )
    comps = parse_components(components)
    options: dict[str, Any] = {
        "compute_dtype": compute_dtype,
        "layout": layout,
        "jobs": jobs,
        "max_shard_size": max_shard_size,
    }
    options = {k: v for k, v in options.items() if v is not None}
    if out is None:
        name = Path(source).stem if source.endswith(".safetensors") else source.rstrip("/").split("/")[-1]
        out = Path("out") / f"{name}-{backend}-{scheme}"

    _quiet_libraries(state.verbose)
    from .convert import convert, get_backend, make_plan
    from .sources import resolve_source

    from .output import check_output

    backend_obj = get_backend(backend, scheme, **options)
    backend_obj.check_environment()
    if not dry_run:
        check_output(out.absolute(), overwrite=overwrite)
    token = hub_token()
    t0 = time.perf_counter()
    state.info(f"resolving source {source}")
    src = resolve_source(source, revision=revision, base=base, token=token, endpoint=hub_endpoint())
    if dry_run:
        plan, _ = make_plan(src, backend_obj, comps)
        if as_json:
            click.echo(json.dumps(plan.to_dict(tensors=state.verbose > 0), indent=2))
        else:
            click.echo(plan.render(verbose=state.verbose > 0))
        return
    result = convert(
        src, backend, scheme, out, components=comps, overwrite=overwrite,
        progress=not state.quiet and not as_json, options=options,
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    summary = {
        "out": str(result.out),
        "backend": backend,
        "scheme": scheme,
        "seconds": round(elapsed, 3),
        "bytes_in": result.manifest["bytes_in"],
        "bytes_out": result.manifest["bytes_out"],
        "components": {
            name: {
                "action": c["action"],
                "scheme": c["scheme"],
                "bytes_in": c["bytes_in"],
                "bytes_out": c["bytes_out"],
                "seconds": round(result.seconds.get(name, 0.0), 3),
            }
            for name, c in result.manifest["components"].items()
        },
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif not state.quiet:
        click.echo(_summary_table(summary))
    else:
        click.echo(str(result.out))


def _summary_table(summary: dict[str, Any]) -> str:
    from .plan import human_bytes

    rows = [f"{'component':<16}{'scheme':<10}{'before':>12}{'after':>12}{'time':>9}"]
    for name, c in summary["components"].items():
        rows.append(
            f"{name:<16}{(c['scheme'] or 'copy'):<10}{human_bytes(c['bytes_in']):>12}"
            f"{human_bytes(c['bytes_out']):>12}{c['seconds']:>8.1f}s"
        )
    rows.append(
        f"{'total':<26}{human_bytes(summary['bytes_in']):>12}{human_bytes(summary['bytes_out']):>12}"
        f"{summary['seconds']:>8.1f}s"
    )
    rows.append(f"wrote {summary['out']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the CLI and turns every expected failure into one line + exit code."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="qconvert", standalone_mode=False)
    except click.exceptions.Exit as e:
        return int(e.exit_code or 0)
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        return EXIT_INTERRUPTED
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
        msg = redact(" ".join(f"{type(e).__name__}: {e}".split()))[:400]
        click.echo(f"error: unexpected failure: {msg} (rerun with --debug and report it)", err=True)
        return EXIT_UNEXPECTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
