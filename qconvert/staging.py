"""Convert here, validate there: a staging branch per repo, promoted to main only when valid.

The release workflow converts on stock CPU runners (``qconvert release --stage``, this
module): each variant's output is pushed, unvalidated, to the branch :data:`STAGING_BRANCH`
of its repo (``main`` is not touched), its shards uploaded as they are finished
(:mod:`qconvert.uploads`) and made visible by one commit. One GPU job then validates every
variant from that branch, and a CPU job promotes the passing ones to ``main``
(:mod:`qconvert.promote`).

Idempotent: a variant whose ``main`` or staging branch already holds this conversion (its
``qconvert.json``) is not converted again, and a staging run killed anywhere is finished by
running it again, uploading nothing the repo already stores.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import faults
from .errors import QConvertError, register_secret

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
