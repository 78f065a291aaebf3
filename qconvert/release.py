"""Release plans: convert -> validate -> card -> push for many variants, resumable.

A plan is a TOML file (see ``releases/flux1-dev.toml``)::

    [release]
    source = "black-forest-labs/FLUX.1-dev"   # Hub id, folder or tiny-flux
    revision = "main"                          # pin a commit for reproducible releases
    namespace = "my-org"
    collection = "FLUX.1-dev quantized"
    repo_pattern = "{source_name}-{backend}-{scheme}"
    private = false

    [[variant]]
    name = "nf4"
    backend = "bnb"
    scheme = "nf4"
    # components = ["transformer"]; [variant.thresholds] min_psnr = 18 ...

State lives in ``<workdir>/release-state.json``: a variant that finished is not redone when
the run is restarted. Before converting, the remote repo's ``qconvert.json`` is compared with
what this run would write (source revision, qconvert version, backend, scheme, options): a
variant that is already published identically is skipped without converting.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__, faults
from .errors import EXIT_UNEXPECTED, QConvertError, UsageError, redact
from .identity import SourceIdentity
from .job import Job, PushTarget, check, check_source, fit_together, resolve, run

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STATE_NAME = "release-state.json"
REPORT_NAME = "release-report.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RELEASE_KEYS = {"source", "revision", "base", "namespace", "collection", "repo_pattern", "private",
                 "components", "device", "thresholds", "license"}  # fmt: skip
_VARIANT_KEYS = {"name", "backend", "scheme", "components", "thresholds", "options", "repo_id", "private", "runner"}
# where a variant's staging job runs: GitHub's standard runner, or the workflow's large-runner
# input for one that does not fit there (`qconvert release PLAN --stage --dry-run` says which)
RUNNER_KINDS = ("standard", "large")


@dataclass
class Variant:
    name: str
    backend: str
    scheme: str
    repo_id: str
    components: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)
    private: bool = False
    runner: str = "standard"

    def matrix_entry(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "scheme": self.scheme, "repo_id": self.repo_id,
                "runner": self.runner}  # fmt: skip


@dataclass
class ReleasePlan:
    path: Path
    source: str
    revision: str | None
    base: str | None
    namespace: str
    collection: str | None
    device: str | None
    license: str | None
    variants: list[Variant]

    def select(self, only: str | None) -> list[Variant]:
        if not only:
            return list(self.variants)
        names = [n.strip() for n in only.split(",") if n.strip()]
        known = {v.name for v in self.variants}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UsageError(f"--only names unknown variant {unknown[0]!r}", hint=f"variants: {', '.join(sorted(known))}")
        return [v for v in self.variants if v.name in names]

    def fingerprint(self, v: Variant) -> str:
        """Identity of what a variant's run would produce (for resumption)."""
        data = {"source": self.source, "revision": self.revision, "base": self.base, "variant": asdict(v),
                "qconvert": __version__}  # fmt: skip
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _plan_error(path: Path, text: str, msg: str, key: str | None = None, variant: int | None = None) -> UsageError:
    """A one-line error naming the plan file and the line of ``key`` (in variant ``variant``)."""
    line = ""
    if key:
        lines = text.splitlines()
        start = 0
        if variant is not None:
            headers = [i for i, raw in enumerate(lines) if raw.strip() == "[[variant]]"]
            start = headers[variant] if variant < len(headers) else 0
        for i in range(start, len(lines)):
            if re.search(rf"(^|\s|\"){re.escape(key)}(\"|\s|=|$)", lines[i]):
                line = f" (line {i + 1})"
                break
    return UsageError(f"{path.name}{line}: {msg}")


def _check_thresholds(path: Path, text: str, table: Any, where: str, variant: int | None) -> None:
    """Known keys and valid values: a typo must not leave a variant gated by the defaults, and a
    bad value must not surface only after converting."""
    from .validate.thresholds import check_thresholds

    if not isinstance(table, dict):
        raise _plan_error(path, text, f"{where} must be a table, e.g. thresholds = {{ min_psnr = 20 }}", "thresholds", variant)
    for key, value in table.items():
        try:
            check_thresholds({key: value}, where)
        except UsageError as e:
            raise _plan_error(path, text, f"{e.message} ({e.hint})" if e.hint else e.message, key, variant) from None


def load_plan(path: Path | str) -> ReleasePlan:
    """Read and check a release plan: every mistake is one line naming the plan's line."""
    path = Path(path)
    text, data = _read_toml(path)
    rel = _release_table(path, text, data)
    raw_variants = data.get("variant")
    if not isinstance(raw_variants, list) or not raw_variants:
        raise _plan_error(path, text, "no [[variant]] entries", "variant")
    variants: list[Variant] = []
    for i, rv in enumerate(raw_variants):
        v = _variant(path, text, rel, rv, i)
        if any(v.name == seen.name for seen in variants):
            raise _plan_error(path, text, f"duplicate variant name {v.name!r}", "name", i)
        variants.append(v)
    return ReleasePlan(path, str(rel["source"]), rel.get("revision"), rel.get("base"), rel["namespace"],
                       rel.get("collection"), rel.get("device"), rel.get("license"), variants)  # fmt: skip


def _read_toml(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"cannot read release plan {path}: {e.strerror}") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path.name} is not valid TOML: {e}") from None


def _release_table(path: Path, text: str, data: dict[str, Any]) -> dict[str, Any]:
    """The checked ``[release]`` table."""
    rel = data.get("release")
    if not isinstance(rel, dict):
        raise _plan_error(path, text, "missing [release] table", "release")
    for k in rel:
        if k not in _RELEASE_KEYS:
            raise _plan_error(path, text, f"unknown key {k!r} in [release]", k)
    if not rel.get("source"):
        raise _plan_error(path, text, "[release] needs source = \"<Hub id, folder or tiny-flux>\"", "release")
    if not rel.get("namespace"):
        raise _plan_error(path, text, "[release] needs namespace = \"<user or org>\"", "release")
    if not isinstance(rel.get("repo_pattern", ""), str):
        raise _plan_error(path, text, "repo_pattern must be a string", "repo_pattern")
    _check_thresholds(path, text, rel.get("thresholds", {}), "[release] thresholds", None)
    from .hubnames import check_collection_title
    from .validate import check_device_name

    for key, checker in (("collection", lambda v: check_collection_title(v, "collection")), ("device", check_device_name)):
        if rel.get(key) is not None:
            try:
                checker(rel[key])
            except UsageError as e:
                raise _plan_error(path, text, f"{e.message} ({e.hint})", key) from None
    return rel


def _variant(path: Path, text: str, rel: dict[str, Any], rv: dict[str, Any], i: int) -> Variant:
    """One checked ``[[variant]]`` (``i``: its index in the plan)."""
    from .convert import SCHEMES, check_options, parse_components

    for k in rv:
        if k not in _VARIANT_KEYS:
            raise _plan_error(path, text, f"unknown key {k!r} in variant {i + 1}", k, i)
    name = rv.get("name")
    if not name or not _NAME_RE.match(str(name)):
        raise _plan_error(path, text, f"variant {i + 1} needs a name of letters, digits, '.', '_' or '-'", "name", i)
    backend, scheme = rv.get("backend"), rv.get("scheme")
    if backend not in SCHEMES:
        raise _plan_error(path, text, f"variant {name!r}: unknown backend {backend!r} (choose {', '.join(SCHEMES)})", "backend", i)
    if scheme not in SCHEMES[backend]:
        raise _plan_error(path, text, f"variant {name!r}: unknown {backend} scheme {scheme!r}", "scheme", i)
    comps = rv.get("components", rel.get("components"))
    try:
        components = parse_components(",".join(comps) if isinstance(comps, list) else comps)
    except UsageError as e:
        raise _plan_error(path, text, f"variant {name!r}: {e.message} (components)", "components", i) from None
    repo_id = _repo_id(path, text, rel, rv, i)
    options = rv.get("options", {})
    if not isinstance(options, dict):
        raise _plan_error(path, text, f"variant {name!r}: options must be a table, e.g. options = {{ jobs = 2 }}", "options", i)
    try:
        check_options(backend, options)
    except UsageError as e:
        raise _plan_error(path, text, f"variant {name!r}: {e.message} ({e.hint})", "options", i) from None
    _check_thresholds(path, text, rv.get("thresholds", {}), f"variant {name!r} thresholds", i)
    thresholds = {**rel.get("thresholds", {}), **rv.get("thresholds", {})}
    runner = rv.get("runner", "standard")
    if runner not in RUNNER_KINDS:
        raise _plan_error(path, text, f"variant {name!r}: runner must be one of {', '.join(RUNNER_KINDS)}", "runner", i)
    return Variant(name, backend, scheme, repo_id, components, dict(options), thresholds,
                   bool(rv.get("private", rel.get("private", False))), runner)  # fmt: skip


def _repo_id(path: Path, text: str, rel: dict[str, Any], rv: dict[str, Any], i: int) -> str:
    """The variant's ``repo_id``, or ``namespace/`` + ``repo_pattern`` filled in."""
    from .sources import looks_like_repo_id

    source_name = str(rel["source"]).rstrip("/").split("/")[-1].removesuffix(".safetensors")
    pattern = rel.get("repo_pattern", "{source_name}-{backend}-{scheme}")
    try:
        repo_id = rv.get("repo_id") or f"{rel['namespace']}/" + pattern.format(
            source_name=source_name, backend=rv["backend"], scheme=rv["scheme"], name=rv["name"])
    except (KeyError, IndexError, ValueError) as e:
        raise _plan_error(path, text, f"repo_pattern {pattern!r} cannot be filled ({e}): it may use "
                          "{source_name}, {backend}, {scheme} and {name}", "repo_pattern") from None  # fmt: skip
    if not looks_like_repo_id(str(repo_id)):
        raise _plan_error(path, text, f"variant {rv['name']!r}: {repo_id!r} is not a Hub repo id (namespace/name)",
                          "repo_id" if rv.get("repo_id") else "namespace", i if rv.get("repo_id") else None)  # fmt: skip
    return str(repo_id)


def matrix(plan: ReleasePlan, only: str | None = None) -> list[dict[str, Any]]:
    return [v.matrix_entry() for v in plan.select(only)]


# --- running -------------------------------------------------------------------------------


@dataclass
class VariantResult:
    name: str
    repo_id: str
    status: str  # done | skipped | failed | dry-run
    detail: str = ""
    seconds: float = 0.0
    commit: str | None = None
    exit_code: int = 0  # a failed variant's: 4 validation, 5 publishing, 3 input, ...


def _load_state(workdir: Path) -> dict[str, Any]:
    p = workdir / STATE_NAME
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return {}
    return {}


def _save_state(workdir: Path, state: dict[str, Any]) -> None:
    tmp = workdir / (STATE_NAME + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    tmp.replace(workdir / STATE_NAME)  # atomic: a kill never leaves a torn state file


def remote_is_current(repo_id: str, source_identity: SourceIdentity, v: Variant, *, token: str | None,
                      endpoint: str | None, revision: str | None = None) -> bool:
    """True when the remote repo's manifest (at ``revision``, default main) says it holds this
    very variant already."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, EntryNotFoundError, RepositoryNotFoundError

    try:
        path = hf_hub_download(repo_id, "qconvert.json", token=token, endpoint=endpoint, revision=revision)
    except (EntryNotFoundError, RepositoryNotFoundError):
        return False
    except HfHubHTTPError:
        return False
    from .convert import backend_class
    from .manifest import manifest_options

    try:
        remote = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # unreadable: not a manifest this version wrote, so convert again
        return False
    if not isinstance(remote, dict):
        return False
    return (
        remote.get("qconvert_version") == __version__
        and remote.get("source") == source_identity.public().to_dict()  # published without local paths
        and remote.get("backend") == v.backend
        and remote.get("scheme") == v.scheme
        and remote.get("options")
        == manifest_options(v.options, v.components, backend_class(v.backend).recorded_defaults)
    )


def _record_failure(state: dict[str, Any], workdir: Path, v: Variant, key: str, detail: str, exit_code: int,
                    t0: float, log: Any) -> VariantResult:
    state[v.name] = {"fingerprint": key, "status": "failed", "error": detail}
    _save_state(workdir, state)
    log(f"{v.name}: FAILED: {detail}")
    return VariantResult(v.name, v.repo_id, "failed", detail, time.perf_counter() - t0, exit_code=exit_code)


def variant_job(plan: ReleasePlan, v: Variant, *, workdir: Path, push: bool, token: str | None,
                endpoint: str | None, progress: bool) -> Job:
    """The :class:`~qconvert.job.Job` of one variant: what `qconvert flux` would run for it."""
    target = PushTarget(repo_id=v.repo_id, private=v.private, collection=plan.collection) if push else None
    return Job(plan.source, v.backend, v.scheme, out=workdir / v.name, revision=plan.revision, base=plan.base,
               components=v.components, options=dict(v.options), overwrite=True, device=plan.device,
               thresholds=dict(v.thresholds), card=True, license=plan.license, push=target, token=token,
               endpoint=endpoint, progress=progress)  # fmt: skip


def run_release(
    plan: ReleasePlan,
    *,
    only: str | None = None,
    workdir: Path,
    push: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    log: Any = print,
    progress: bool = False,
) -> list[VariantResult]:
    """Run every selected variant; the checks of all of them come before the first conversion."""
    variants = plan.select(only)
    workdir = Path(workdir)
    if dry_run:  # writes nothing, not even the work folder
        todo = "convert, validate, card" + (", push" if push else "")
        return [VariantResult(v.name, v.repo_id, "dry-run", f"would {todo}: {v.backend} {v.scheme} of {','.join(v.components)}")
                for v in variants]  # fmt: skip
    todo = [(v, check(variant_job(plan, v, workdir=workdir, push=push, token=token, endpoint=endpoint,
                                  progress=progress))) for v in variants]  # fmt: skip
    source = resolve(todo[0][1])
    for _, job in todo:
        check_source(job, source)
    workdir.mkdir(parents=True, exist_ok=True)
    state = _load_state(workdir)
    done = {v.name: _skipped(plan, v, job, source, state, workdir, log) for v, job in todo}
    pending = [(v, job) for v, job in todo if done[v.name] is None]
    converted = _convert_together(pending, source, log) if len(pending) > 1 else {}
    for v, job in pending:
        faults.counted("variant")  # QCONVERT_KILL_AT=variant-<n>: before the n-th's validation and push
        done[v.name] = _run_variant(plan, v, job, source, state, workdir, log, converted.get(v.name))
    results = [done[v.name] for v, _ in todo]
    report_data = {"plan": str(plan.path), "qconvert_version": __version__, "source": source.identity.to_dict(),
                   "variants": [asdict(r) for r in results]}  # fmt: skip
    (workdir / REPORT_NAME).write_text(json.dumps(report_data, indent=2, sort_keys=True) + "\n")
    from .report.release import after_release  # the comparison page of every variant (+ its Hub links)

    after_release(plan, workdir, push=push, token=token, endpoint=endpoint, log=log)
    return results


def _skipped(plan: ReleasePlan, v: Variant, job: Job, source: Any, state: dict[str, Any], workdir: Path,
             log: Any) -> VariantResult | None:
    """The result of a variant with nothing to do (done before, or already on the Hub), else None."""
    key = plan.fingerprint(v)
    entry = state.get(v.name, {})
    pushing = job.push is not None
    if entry.get("fingerprint") == key and entry.get("status") == "done" and (entry.get("pushed") or not pushing):
        log(f"{v.name}: already done, skipping")
        return VariantResult(v.name, v.repo_id, "skipped", "already done (state file)", 0.0, entry.get("commit"))
    t0 = time.perf_counter()
    try:
        current = pushing and remote_is_current(v.repo_id, source.identity, v, token=job.token, endpoint=job.endpoint)
    except QConvertError as e:
        return _record_failure(state, workdir, v, key, e.one_line(), e.exit_code, t0, log)
    if current:
        state[v.name] = {"fingerprint": key, "status": "done", "pushed": True}
        _save_state(workdir, state)
        log(f"{v.name}: {v.repo_id} is up to date, skipping")
        return VariantResult(v.name, v.repo_id, "skipped", "remote already holds this variant")
    return None


def _convert_together(pending: list[tuple[Variant, Job]], source: Any, log: Any) -> dict[str, Any]:
    """Every pending variant converted in one read of the source (per set of components):
    variant name -> its ConvertResult, or the exception its conversion raised."""
    from .convert.shared_read import Variant as Output, convert_many

    groups: dict[tuple[str, ...], list[tuple[Variant, Job]]] = {}
    for v, job in pending:
        groups.setdefault(tuple(job.components), []).append((v, job))
    converted: dict[str, Any] = {}
    for components, members in groups.items():
        if len(members) < 2:  # converted on its own by _run_variant
            continue
        crowded = fit_together([j for _, j in members], source)
        if crowded:
            log(f"converting {', '.join(v.name for v, _ in members)} one at a time: {crowded}")
            continue
        log(f"converting {', '.join(v.name for v, _ in members)} in one read of the source")
        outputs = [Output(j.backend, j.scheme, j.out_dir, dict(j.options)) for _, j in members]
        results, reads = convert_many(source, outputs, components=components, overwrite=True)
        log(f"read {reads['bytes_read'] / 1e9:.2f} GB of source for {reads['bytes_served'] / 1e9:.2f} GB of tensors")
        converted.update({v.name: r for (v, _), r in zip(members, results)})
    return converted


def _run_variant(plan: ReleasePlan, v: Variant, job: Job, source: Any, state: dict[str, Any], workdir: Path,
                 log: Any, converted: Any = None) -> VariantResult:
    """Convert (unless ``converted``: its result, or the exception its conversion raised),
    validate, card and push one variant, recording the outcome in the state file."""
    t0 = time.perf_counter()
    key = plan.fingerprint(v)
    pushing = job.push is not None
    try:
        if isinstance(converted, BaseException):
            raise converted
        log(f"{v.name}: converting ({v.backend} {v.scheme})" if converted is None else f"{v.name}: converted")
        result = run(job, source=source, checked=True, converted=converted,
                     on_event=lambda kind, value: _log_event(log, v, kind, value))  # fmt: skip
        commit = result.pushed.commit if result.pushed is not None else None
    except QConvertError as e:
        return _record_failure(state, workdir, v, key, e.one_line(), e.exit_code, t0, log)
    except Exception as e:  # noqa: BLE001 - a bug in one variant must not stop the others
        detail = redact(" ".join(f"unexpected failure: {type(e).__name__}: {e}".split()))[:400]
        detail += f" (rerun with --only {v.name} --debug and report it)"
        return _record_failure(state, workdir, v, key, detail, EXIT_UNEXPECTED, t0, log)
    state[v.name] = {"fingerprint": key, "status": "done", "pushed": pushing, "commit": commit}
    _save_state(workdir, state)
    return VariantResult(v.name, v.repo_id, "done", "pushed" if pushing else "converted + validated",
                         time.perf_counter() - t0, commit)  # fmt: skip


def _log_event(log: Any, v: Variant, kind: str, value: Any) -> None:
    if kind == "info":
        log(f"{v.name}: {value}")
    elif kind == "converted":
        log(f"{v.name}: converted")
    elif kind == "pushed":
        log(f"{v.name}: pushed to {v.repo_id}")


def summary_table(results: list[VariantResult]) -> str:
    rows = [f"{'variant':<14}{'status':<10}{'time':>8}  repo / detail"]
    for r in results:
        rows.append(f"{r.name:<14}{r.status:<10}{r.seconds:>7.1f}s  {r.repo_id}: {r.detail}")
    return "\n".join(rows)
