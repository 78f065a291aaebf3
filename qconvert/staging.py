"""Convert here, validate there: a staging branch per repo, promoted to main only when valid.

The release workflow converts on stock CPU runners (``qconvert release --stage``): each
variant's output is pushed, unvalidated, to the branch :data:`STAGING_BRANCH` of its repo
(``main`` is not touched). One GPU job (``qconvert release --promote``) then, per variant,
downloads that branch as a user would (``snapshot_download(revision=<branch head>)``),
validates it, renders the card, and

* passing: makes ONE commit on ``main`` that *copies* the staged files
  (``CommitOperationCopy``: the commit references the LFS objects the staging push stored,
  nothing is uploaded again) plus the measurements (``validation.json``, ``README.md``,
  ``samples/``), puts the repo in the release's collection, and deletes the branch;
* failing: commits ``validation.json`` (+ card and samples) to the staging branch, never to
  ``main``, and the summary says which check failed.

Every step is idempotent, so a run killed anywhere is finished by running it again: a
variant whose ``main`` already holds this conversion (its ``qconvert.json``) is not staged or
validated again (the collection item is still ensured), one whose staging branch holds it
is not converted again, and promoting files ``main`` already has makes no commit.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import faults
from .errors import EXIT_VALIDATION, QConvertError, register_secret

STAGING_BRANCH = "qconvert-staging"


def _api(token: str | None, endpoint: str | None) -> Any:
    from huggingface_hub import HfApi

    register_secret(token)
    return HfApi(endpoint=endpoint, token=token)


def staged_head(repo_id: str, *, token: str | None, endpoint: str | None, branch: str = STAGING_BRANCH) -> str | None:
    """The staging branch's head commit, None when the repo or the branch does not exist."""
    from .publish import remote_state

    return remote_state(_api(token, endpoint), repo_id, endpoint=endpoint, revision=branch).head


# --- convert jobs: stage --------------------------------------------------------------------------


def stage_release(plan: Any, *, only: str | None, workdir: Path, token: str | None, endpoint: str | None,
                  log: Any = print, progress: bool = False) -> list[Any]:  # fmt: skip
    """Convert each selected variant (source streamed, no validation: no GPU here) and push it
    to its repo's staging branch; the local output is deleted once pushed."""
    from .job import check, check_source, resolve
    from .release import variant_job

    jobs, source, costs = _staged_jobs(plan, only, workdir=Path(workdir), token=token, endpoint=endpoint, progress=progress)
    from .costs import check_fits

    for (v, _), c in zip(jobs, costs):  # every variant, before the first weight is read
        log(f"{v.name}: {c.line()}")
        check_fits(v.name, c, Path(workdir))
    Path(workdir).mkdir(parents=True, exist_ok=True)
    return [_stage_one(v, job, source, log) for v, job in jobs]


def _staged_jobs(plan: Any, only: str | None, *, workdir: Path, token: str | None, endpoint: str | None,
                 progress: bool = False) -> tuple[list[tuple[Any, Any]], Any, list[Any]]:  # fmt: skip
    """(variant, checked job) pairs, the source (streamed: headers and small files only) and
    each variant's :class:`~qconvert.costs.Costs` on the standard runner."""
    from .convert import get_backend
    from .costs import estimate
    from .job import check, check_source, plan_of, resolve
    from .release import variant_job

    jobs = [(v, check(replace(variant_job(plan, v, workdir=workdir, push=False, token=token, endpoint=endpoint,
                                          progress=progress), validate=False, card=False)))
            for v in plan.select(only)]  # fmt: skip
    source = resolve(jobs[0][1])
    costs = []
    for v, job in jobs:
        check_source(job, source)
        backend = get_backend(job.backend, job.scheme, **job.options)
        costs.append(estimate(plan_of(job, source), backend, streamed=source.kind == "hub", staged=True, runner=v.runner))
    return jobs, source, costs


def stage_costs(plan: Any, *, only: str | None, workdir: Path, token: str | None, endpoint: str | None) -> list[Any]:
    """``--stage --dry-run``: what each variant's staging job needs (nothing written but the
    Hub cache's small files), as release results."""
    from .release import VariantResult

    jobs, _, costs = _staged_jobs(plan, only, workdir=Path(workdir), token=token, endpoint=endpoint)
    return [VariantResult(v.name, v.repo_id, "dry-run", c.line()) for (v, _), c in zip(jobs, costs)]


def _stage_one(v: Any, job: Any, source: Any, log: Any) -> Any:
    from .release import VariantResult, remote_is_current

    t0 = time.perf_counter()
    args = {"token": job.token, "endpoint": job.endpoint}
    try:
        if remote_is_current(v.repo_id, source.identity, v, **args):
            return VariantResult(v.name, v.repo_id, "skipped", "main already holds this variant")
        if remote_is_current(v.repo_id, source.identity, v, revision=STAGING_BRANCH, **args):
            return VariantResult(v.name, v.repo_id, "skipped", f"{STAGING_BRANCH} already holds this variant")
        log(f"{v.name}: converting ({v.backend} {v.scheme}) for {v.repo_id}@{STAGING_BRANCH}")
        commit = _convert_and_stage(v, job, source, log)
    except QConvertError as e:
        return VariantResult(v.name, v.repo_id, "failed", e.one_line(), time.perf_counter() - t0, exit_code=e.exit_code)
    return VariantResult(v.name, v.repo_id, "staged", f"pushed to {STAGING_BRANCH}", time.perf_counter() - t0, commit)


def _convert_and_stage(v: Any, job: Any, source: Any, log: Any) -> str | None:
    """Convert with every finished shard uploaded at once (and deleted), then ONE commit on the
    staging branch that makes them visible."""
    import shutil

    from .convert import convert
    from .publish import push
    from .uploads import ShardUploader

    _ensure_branch(v.repo_id, private=v.private, token=job.token, endpoint=job.endpoint)
    sink = ShardUploader(v.repo_id, revision=STAGING_BRANCH, token=job.token, endpoint=job.endpoint,
                         log=lambda msg: log(f"{v.name}: {msg}"))  # fmt: skip
    result = convert(source, job.backend, job.scheme, job.out_dir, components=job.components, overwrite=job.overwrite,
                     progress=job.progress, options=job.options, shard_sink=sink)  # fmt: skip
    from .cards import render_card

    render_card(result.out, license=job.license, token=job.token, endpoint=job.endpoint)  # says: not validated
    faults.point("before-stage-commit")
    pushed = push(result.out, v.repo_id, token=job.token, endpoint=job.endpoint, private=v.private, branch=STAGING_BRANCH,
                  allow_unvalidated=True, info=lambda msg: log(f"{v.name}: {msg}"))  # fmt: skip
    shutil.rmtree(result.out)  # on the Hub now; the runner's disk is for the next variant
    return pushed.commit


def _ensure_branch(repo_id: str, *, private: bool, token: str | None, endpoint: str | None) -> None:
    """The repo and its staging branch, before the first shard is uploaded to them."""
    from .publish import hub_error

    api = _api(token, endpoint)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.create_branch(repo_id, branch=STAGING_BRANCH, exist_ok=True)
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, f"creating {repo_id}@{STAGING_BRANCH}", repo_id=repo_id, endpoint=endpoint) from None


# --- the GPU job: validate from staging, promote -------------------------------------------------


def promote_release(plan: Any, *, only: str | None, workdir: Path, token: str | None, endpoint: str | None,
                    log: Any = print) -> list[Any]:  # fmt: skip
    """Validate each selected variant from its staging branch; promote the passing ones."""
    return [_promote_one(plan, v, Path(workdir), token=token, endpoint=endpoint, log=log) for v in plan.select(only)]


def _promote_one(plan: Any, v: Any, workdir: Path, *, token: str | None, endpoint: str | None, log: Any) -> Any:
    from .identity import SourceIdentity
    from .release import VariantResult, remote_is_current

    t0 = time.perf_counter()
    try:
        head = staged_head(v.repo_id, token=token, endpoint=endpoint)
        main = _main_manifest(v.repo_id, token=token, endpoint=endpoint)
        if main is not None and remote_is_current(v.repo_id, SourceIdentity.from_dict(main["source"]), v,
                                                  token=token, endpoint=endpoint):  # fmt: skip
            # promoted already (perhaps by a run killed before its collection or cleanup step)
            _finish_promoted(plan, v, main, head, token=token, endpoint=endpoint)
            return VariantResult(v.name, v.repo_id, "skipped", "already promoted")
        if head is None:
            return VariantResult(v.name, v.repo_id, "failed", f"nothing staged: {v.repo_id} has no {STAGING_BRANCH} branch "
                                 "(run the convert job first)", exit_code=2)  # fmt: skip
        folder = _download_staged(v.repo_id, head, workdir / v.name, token=token, endpoint=endpoint)
        report = _validate(plan, v, folder, token=token, endpoint=endpoint, log=log)
        if not report.passed:
            _keep_on_staging(v.repo_id, head, folder, token=token, endpoint=endpoint)
            first = next(c for c in report.checks if not c.passed)
            detail = f"validation failed ({first.name}: {first.value} {first.op} {first.limit}); kept on {STAGING_BRANCH}"
            return VariantResult(v.name, v.repo_id, "failed", detail, time.perf_counter() - t0, exit_code=EXIT_VALIDATION)
        commit = promote(folder, v.repo_id, head, collection=plan.collection, token=token, endpoint=endpoint, log=log)
    except QConvertError as e:
        return VariantResult(v.name, v.repo_id, "failed", e.one_line(), time.perf_counter() - t0, exit_code=e.exit_code)
    return VariantResult(v.name, v.repo_id, "done", "validated and promoted to main", time.perf_counter() - t0, commit)


def _main_manifest(repo_id: str, *, token: str | None, endpoint: str | None) -> dict[str, Any] | None:
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(repo_id, "qconvert.json", token=token, endpoint=endpoint)).read_text())
    except Exception:  # noqa: BLE001 - no repo, no main manifest, unreadable: nothing promoted
        return None


def _download_staged(repo_id: str, head: str, folder: Path, *, token: str | None, endpoint: str | None) -> Path:
    """The staged commit as a user downloads it, into ``folder`` (stale measurements removed)."""
    import shutil

    from huggingface_hub import snapshot_download

    from .publish import hub_error

    if folder.exists():
        shutil.rmtree(folder)
    try:
        snapshot_download(repo_id, revision=head, local_dir=folder, token=token, endpoint=endpoint,
                          ignore_patterns=["validation.json", "samples/*"])  # fmt: skip
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, f"downloading {repo_id}@{head[:12]}", repo_id=repo_id, endpoint=endpoint) from None
    return folder


def _validate(plan: Any, v: Any, folder: Path, *, token: str | None, endpoint: str | None, log: Any) -> Any:
    from .cards import render_card
    from .validate import validate

    log(f"{v.name}: validating {v.repo_id}@{STAGING_BRANCH} (loaded as a user would)")
    report = validate(folder, device=plan.device, overrides=dict(v.thresholds), token=token, endpoint=endpoint)
    render_card(folder, license=plan.license, token=token, endpoint=endpoint)
    return report


def _measurements(folder: Path) -> dict[str, bytes]:
    """What validation added to the staged files: validation.json (path-free), card, samples."""
    from .output import public_file

    out: dict[str, bytes] = {}
    for name in ("validation.json", "README.md"):
        if (folder / name).is_file():
            out[name] = public_file(name, (folder / name).read_bytes())
    for p in sorted((folder / "samples").glob("*")) if (folder / "samples").is_dir() else []:
        out[f"samples/{p.name}"] = p.read_bytes()
    return out


def _keep_on_staging(repo_id: str, head: str, folder: Path, *, token: str | None, endpoint: str | None) -> None:
    """A failed variant's validation.json (+ card, samples) on its staging branch, never on main."""
    from huggingface_hub import CommitOperationAdd

    from .publish import hub_error

    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=data) for p, data in _measurements(folder).items()]
    try:
        _api(token, endpoint).create_commit(repo_id, ops, commit_message="qconvert: validation failed (kept on staging)",
                                            revision=STAGING_BRANCH, parent_commit=head)  # fmt: skip
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, f"committing the validation of {repo_id} to {STAGING_BRANCH}", repo_id=repo_id, endpoint=endpoint) from None


def promote(folder: Path, repo_id: str, head: str, *, collection: str | None, token: str | None,
            endpoint: str | None, log: Any = print) -> str | None:  # fmt: skip
    """ONE commit on main: the staged files copied from commit ``head`` (no upload) + the
    measurements in ``folder``; main's other files deleted (GGUF repos keep theirs). Returns
    main's head afterwards (no commit when main already holds exactly this)."""
    from .manifest import read_manifest
    from .publish import hub_error, remote_state

    api = _api(token, endpoint)
    staged = remote_state(api, repo_id, endpoint=endpoint, revision=head)
    main = remote_state(api, repo_id, endpoint=endpoint)
    manifest = read_manifest(folder)
    ops, target = _promotion_ops(staged, main, _measurements(folder), head, keep=_keeps(manifest))
    commit = main.head
    if ops:
        log(f"promoting {repo_id}@{head[:12]} to main ({len(ops)} operation(s), nothing uploaded again)")
        faults.point("before-promote-commit")
        commit = _commit_promotion(api, repo_id, ops, target, main, manifest, endpoint=endpoint, log=log)
    faults.point("after-promote-commit")
    if collection:
        _collection(api, collection, repo_id, manifest, folder, endpoint=endpoint)
    _delete_staging(api, repo_id, endpoint=endpoint)
    return commit


def _delete_staging(api: Any, repo_id: str, *, endpoint: str | None) -> None:
    from .publish import hub_error

    try:
        api.delete_branch(repo_id, branch=STAGING_BRANCH)
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, f"deleting {repo_id}@{STAGING_BRANCH} after promoting it", repo_id=repo_id, endpoint=endpoint) from None


def _keeps(manifest: dict[str, Any]) -> bool:
    from .publish import _keeps_siblings

    return _keeps_siblings(manifest)


def _promotion_ops(staged: Any, main: Any, measured: dict[str, bytes], head: str, *, keep: bool) -> tuple[list[Any], dict[str, Any]]:
    """(operations, path -> LocalFile of what main must then hold, for the lost-answer check)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationCopy, CommitOperationDelete

    from .publish import KEEP_REMOTE, LocalFile, _is_measurement, _same

    ops: list[Any] = []
    target: dict[str, Any] = {}
    for path, sib in sorted(staged.files.items()):
        if path in KEEP_REMOTE or _is_measurement(path):
            continue
        lfs = getattr(sib, "lfs", None)
        sha = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs is not None else None
        if sha is not None:
            target[path] = LocalFile(int(sib.size or 0), sha)
        if not _same_sibling(sib, main.files.get(path)):
            ops.append(CommitOperationCopy(src_path_in_repo=path, path_in_repo=path, src_revision=head))
    for path, data in measured.items():
        target[path] = LocalFile(len(data), None, data=data)
        if not _same(target[path], main.files.get(path)):
            ops.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=data))
    if not keep:
        wanted = {p for p in staged.files if not _is_measurement(p)} | set(measured)
        ops += [CommitOperationDelete(path_in_repo=p) for p in sorted(main.files) if p not in wanted and p not in KEEP_REMOTE]
    return ops, target


def _same_sibling(a: Any, b: Any) -> bool:
    if b is None:
        return False
    la, lb = getattr(a, "lfs", None), getattr(b, "lfs", None)
    if la is not None or lb is not None:
        sha = [(x.get("sha256") if isinstance(x, dict) else getattr(x, "sha256", None)) if x is not None else None for x in (la, lb)]
        return sha[0] is not None and sha[0] == sha[1]
    return a.blob_id is not None and a.blob_id == b.blob_id


def _commit_promotion(api: Any, repo_id: str, ops: list[Any], target: dict[str, Any], main: Any,
                      manifest: dict[str, Any], *, endpoint: str | None, log: Any) -> str:  # fmt: skip
    from huggingface_hub import CommitOperationDelete

    from .publish import _commit_with_retries, default_commit_message

    deletions = [op.path_in_repo for op in ops if isinstance(op, CommitOperationDelete)]
    return _commit_with_retries(api, repo_id, ops, message=default_commit_message(manifest),
                                description=f"Validated on the {STAGING_BRANCH} branch, then promoted: the weights are the staged files.",
                                parent=main.head, target=target, deletions=deletions, endpoint=endpoint, info=log)  # fmt: skip


def _collection(api: Any, title: str, repo_id: str, manifest: dict[str, Any], folder: Path, *, endpoint: str | None) -> None:
    from .cards.data import read_validation
    from .publish import _add_to_collection, collection_note

    _add_to_collection(api, title, repo_id, collection_note(manifest, read_validation(folder)), endpoint=endpoint)


def _finish_promoted(plan: Any, v: Any, manifest: dict[str, Any], head: str | None, *, token: str | None,
                     endpoint: str | None) -> None:  # fmt: skip
    """A promotion killed between its commit and the collection or the branch's deletion:
    do those now (the note from main's published validation.json)."""
    from .publish import _add_to_collection, _published_validation, collection_note

    api = _api(token, endpoint)
    if plan.collection:
        published = _published_validation(api, v.repo_id, None)
        note = collection_note(manifest, published if isinstance(published, dict) else None)
        _add_to_collection(api, plan.collection, v.repo_id, note, endpoint=endpoint)
    if head is not None:
        _delete_staging(api, v.repo_id, endpoint=endpoint)
