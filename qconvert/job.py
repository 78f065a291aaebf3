"""One conversion job: check everything → plan → convert → validate → card → push.

``qconvert flux``, ``qconvert release`` (once per variant) and the Python API all run a
:class:`Job` through :func:`run`, so each gets the same checks before work, in the same order:

1. :func:`check` (no source needed): the backend, scheme, options and its library; the output
   folder (``--overwrite`` replaces only a qconvert output); the validation device and
   thresholds; the push target (repo id, collection title, a token that can write there).
2. :func:`check_source` (headers only): whether the validator can load what this backend would
   write from this source (diffusers reads BFL-layout GGUF only at Flux width 3072).
3. :func:`run`: convert, validate (a failure raises :class:`~qconvert.errors.ValidationFailed`
   and never publishes), write the card, push.

Progress goes to ``on_event(kind, value)``: ``"info"`` (a line of text), ``"converted"``
(:class:`~qconvert.convert.ConvertResult`), ``"validated"`` (the validation report),
``"pushed"`` (:class:`~qconvert.publish.PushResult`); the CLI prints them, a release logs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .families.flux import QUANTIZABLE

EventFn = Callable[[str, Any], None]


def _ignore(kind: str, value: Any) -> None:
    return None


@dataclass(frozen=True)
class PushTarget:
    """Where a passing output is published. ``repo_id`` defaults to ``<namespace>/<out name>``,
    ``namespace`` to the token's user."""

    repo_id: str | None = None
    namespace: str | None = None
    private: bool = False
    collection: str | None = None


@dataclass(frozen=True)
class Job:
    """Everything one conversion needs; :func:`run` does it, :func:`check` checks it."""

    source: str
    backend: str
    scheme: str
    out: Path | None = None  # default: out/<source name>-<backend>-<scheme>
    revision: str | None = None
    base: str | None = None
    source_file: str | None = None  # the file of a Hub repo to convert (``--file``)
    components: tuple[str, ...] = QUANTIZABLE
    options: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    validate: bool = True
    device: str | None = None  # validation device: auto, cpu, cuda
    thresholds_file: Path | None = None
    thresholds: dict[str, Any] = field(default_factory=dict)  # overrides, e.g. {"min_psnr": 30}
    card: bool = False  # write README.md (always when pushing)
    license: str | None = None  # the card's license when the base model has none
    push: PushTarget | None = None
    token: str | None = None
    endpoint: str | None = None
    progress: bool = False

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else default_out(self.source, self.backend, self.scheme)


@dataclass
class JobResult:
    out: Path
    convert: Any  # ConvertResult
    report: Any = None  # ValidationReport, unless validate=False
    pushed: Any = None  # PushResult (its repo_id, commit ...), when pushed


def default_out(source: str, backend: str, scheme: str) -> Path:
    """``out/<source name>-<backend>-<scheme>``: a file's stem, a folder's or repo's last part."""
    name = Path(source).stem if source.endswith(".safetensors") else source.rstrip("/").split("/")[-1]
    return Path("out") / f"{name}-{backend}-{scheme}"


def check(job: Job, *, dry_run: bool = False) -> Job:
    """Everything that can be wrong with ``job`` before its source is read; returns the job with
    its push repo id resolved. ``dry_run``: only what a plan needs (the library, not the GPU)."""
    from .convert import get_backend, parse_components

    if job.push is not None and job.push.collection is not None:  # a typo'd title must not cost a conversion
        from .hubnames import check_collection_title

        check_collection_title(job.push.collection)
    get_backend(job.backend, job.scheme, **job.options).check_environment(device=not dry_run)
    parse_components(",".join(job.components))
    _check_shard_size(job.options.get("max_shard_size"))
    if dry_run:
        return job
    from .output import check_output

    check_output(job.out_dir.absolute(), overwrite=job.overwrite)
    if job.validate:
        from .deps import require_for_validation
        from .validate import check_device
        from .validate.thresholds import load_thresholds

        require_for_validation(job.backend)  # the conversion must not end in a missing torchmetrics
        check_device(job.device)
        load_thresholds(job.backend, job.scheme, file=job.thresholds_file, overrides=job.thresholds)
    if job.push is not None:
        job = replace(job, push=_check_push(job))
    return job


def _check_shard_size(value: Any) -> None:
    if value is None:
        return
    from .convert.writers import parse_size
    from .errors import UsageError, opt

    try:
        if parse_size(value) <= 0:
            raise ValueError
    except ValueError:
        raise UsageError(f"{opt('max_shard_size')} {value!r} is not a size", hint="e.g. 5GB or 500MB") from None


def _check_push(job: Job) -> PushTarget:
    from .errors import opt
    from .publish import check_push_target

    target = job.push
    assert target is not None
    label = opt("repo_id") if target.repo_id else f"the repo id <namespace>/<{opt('out')} folder name>"
    repo_id = target.repo_id or f"{_namespace(target.namespace, job)}/{job.out_dir.name}"
    check_push_target(repo_id, token=job.token, endpoint=job.endpoint, label=label)
    return replace(target, repo_id=repo_id)


def _namespace(namespace: str | None, job: Job) -> str:
    if namespace is not None:
        return namespace
    from huggingface_hub import HfApi

    from .errors import AuthError, opt

    try:
        return HfApi(endpoint=job.endpoint, token=job.token).whoami()["name"]
    except Exception:  # noqa: BLE001 - any failure means no usable token
        raise AuthError("cannot tell whose namespace to push to",
                        hint=f"pass {opt('namespace')} or {opt('repo_id')}, and set HF_TOKEN") from None  # fmt: skip


def resolve(job: Job) -> Any:
    """The job's :class:`~qconvert.sources.Source` (downloads only what conversion reads: a Hub
    pipeline's weights are streamed with range requests, unless already in the local cache)."""
    from .sources import resolve_source

    return resolve_source(job.source, revision=job.revision, base=job.base, source_file=job.source_file,
                          token=job.token, endpoint=job.endpoint, stream=True)  # fmt: skip


def check_source(job: Job, source: Any) -> None:
    """What can only be checked with the source's headers in hand, before converting."""
    if job.validate:
        from .validate import check_loadable

        check_loadable(job.backend, job.options, source.components["transformer"].config)


def plan_of(job: Job, source: Any | None = None) -> Any:
    """The :class:`~qconvert.plan.Plan` of ``job`` (``--dry-run``): writes nothing."""
    from .convert import get_backend, make_plan

    check(job, dry_run=True)
    backend = get_backend(job.backend, job.scheme, **job.options)
    return make_plan(source if source is not None else resolve(job), backend, job.components)[0]


def run(job: Job, *, source: Any | None = None, on_event: EventFn = _ignore, checked: bool = False,
        converted: Any = None) -> JobResult:  # fmt: skip
    """Run ``job`` from the checks to the push. ``source``: an already resolved source (a release
    converts one source many times); ``checked``: :func:`check` and :func:`check_source` ran;
    ``converted``: its ``ConvertResult`` when it was converted already (:func:`run_many`)."""
    if not checked:
        job = check(job)
    if source is None:
        on_event("info", f"resolving source {job.source}")
        source = resolve(job)
    if not checked:
        check_source(job, source)
    if converted is None:
        from .convert import convert

        converted = convert(source, job.backend, job.scheme, job.out_dir, components=job.components,
                            overwrite=job.overwrite, progress=job.progress, options=job.options)  # fmt: skip
    on_event("converted", converted)
    result = JobResult(converted.out, converted)
    if job.validate:
        result.report = _validate(job, converted.out, on_event)
    if job.card or job.push is not None:
        from .cards import render_card

        render_card(converted.out, license=job.license, token=job.token, endpoint=job.endpoint)
    if job.push is not None:
        result.pushed = _push(job, converted.out, on_event)
    return result


def run_many(jobs: list[Job], *, on_event: Callable[[int, str, Any], None] | None = None) -> list[JobResult | BaseException]:
    """Run jobs that differ only in backend, scheme, options and output (``qconvert flux
    --scheme a,b,c``): all checked first, the source resolved once and converted into every
    output in one read (:func:`qconvert.convert.shared_read.convert_many`), then each
    validated, carded and pushed in order. A job that fails does not stop the others: its
    exception takes its place in the result."""
    from .convert.shared_read import Variant, convert_many
    from .errors import QConvertError

    events = on_event or (lambda i, kind, value: None)
    jobs = [check(j) for j in jobs]
    first = jobs[0]
    events(0, "info", f"resolving source {first.source}")
    source = resolve(first)
    for j in jobs:
        check_source(j, source)
    variants = [Variant(j.backend, j.scheme, j.out_dir, dict(j.options)) for j in jobs]
    crowded = fit_together(jobs, source)
    if crowded:  # one after the other, each output checked on its own: the source read once per job
        events(0, "info", f"converting one output at a time: {crowded}")
        converted: list[Any] = [None] * len(jobs)
    else:
        converted, reads = convert_many(source, variants, components=first.components, overwrite=first.overwrite)
        events(0, "reads", reads)
    results: list[JobResult | BaseException] = []
    for i, (j, conv) in enumerate(zip(jobs, converted)):
        if isinstance(conv, BaseException):
            results.append(conv)
            continue
        try:
            results.append(run(j, source=source, checked=True, converted=conv,
                               on_event=lambda kind, value, i=i: events(i, kind, value)))  # fmt: skip
        except QConvertError as e:
            results.append(e)
    return results


def fit_together(jobs: list[Job], source: Any) -> str | None:
    """Why ``jobs`` cannot be converted at the same time (all their outputs on disk at once:
    more than the free space), or None when they can."""
    from .errors import DiskSpaceError
    from .output import check_disk_space

    needed = sum(plan_of(j, source).bytes_out for j in jobs)
    try:
        check_disk_space(jobs[0].out_dir.absolute(), needed)
    except DiskSpaceError as e:
        return e.one_line()
    return None


def _validate(job: Job, out: Path, on_event: EventFn) -> Any:
    from .validate import raise_if_failed, validate

    on_event("info", "validating (load as a user would, generate, compare with the source)")
    report = validate(out, device=job.device, thresholds_file=job.thresholds_file, overrides=dict(job.thresholds),
                      token=job.token, endpoint=job.endpoint)  # fmt: skip
    on_event("validated", report)
    raise_if_failed(report, after_convert=not job.overwrite)  # a failed validation never publishes
    return report


def _push(job: Job, out: Path, on_event: EventFn) -> Any:
    from .publish import push

    target = job.push
    assert target is not None and target.repo_id is not None  # resolved by check()
    pushed = push(out, target.repo_id, token=job.token, endpoint=job.endpoint, private=target.private,
                  collection=target.collection, allow_unvalidated=not job.validate,
                  info=lambda line: on_event("info", line))  # fmt: skip
    on_event("pushed", pushed)
    return pushed
