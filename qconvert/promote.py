"""Validate there, then promote: nothing reaches ``main`` unvalidated, nothing is uploaded twice.

After the staging jobs (:mod:`qconvert.staging`), two steps per variant:

* ``qconvert release --validate-staged`` (one GPU runner): download the staging branch's head
  as a user would (``snapshot_download(revision=<head>)``), validate it, render its card for
  the repo id, and commit the measurements (``validation.json``, ``README.md``, ``samples/``)
  to the staging branch -- passing or failing, so the summary and the promotion read them
  there. A re-stage mirrors the new output, which removes an old ``validation.json``; so a
  staged ``validation.json`` is always the one of the staged weights.
* ``qconvert release --promote`` (any runner): a variant whose staged ``validation.json``
  passed gets ONE commit on ``main`` that copies every staged file
  (``CommitOperationCopy``: LFS files are referenced by their oid, nothing is uploaded again;
  main's files the conversion does not have are deleted, GGUF repos keep theirs), is put in
  the release's collection, and its staging branch is deleted. A failing one stays on its
  branch, never on ``main``, and its result says which check failed.

Every step is idempotent: a run killed anywhere is finished by running it again (a variant
validated already is not validated again; one whose ``main`` holds its conversion gets only
what the killed run did not do: the collection item, the branch's deletion).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from . import faults
from .errors import EXIT_VALIDATION, QConvertError
from .staging import STAGING_BRANCH, _api, staged_head

VALIDATION = "validation.json"


def _hub_json(repo_id: str, path: str, revision: str | None, *, token: str | None, endpoint: str | None) -> dict[str, Any] | None:
    """A JSON file of the repo at ``revision``; None when it is not there (or unreadable)."""
    from huggingface_hub import hf_hub_download

    try:
        data = json.loads(Path(hf_hub_download(repo_id, path, revision=revision, token=token, endpoint=endpoint)).read_text())
    except Exception:  # noqa: BLE001 - absent, no repo, no branch, not JSON: not there
        return None
    return data if isinstance(data, dict) else None


def _promoted(v: Any, *, token: str | None, endpoint: str | None) -> dict[str, Any] | None:
    """main's manifest when main already holds this very variant, else None."""
    from .identity import SourceIdentity
    from .release import remote_is_current

    main = _hub_json(v.repo_id, "qconvert.json", None, token=token, endpoint=endpoint)
    if main is None or not isinstance(main.get("source"), dict):
        return None
    current = remote_is_current(v.repo_id, SourceIdentity.from_dict(main["source"]), v, token=token, endpoint=endpoint)
    return main if current else None


def _first_failure(validation: dict[str, Any]) -> str:
    for c in validation.get("checks") or []:
        if isinstance(c, dict) and not c.get("passed", True):
            return f"{c.get('name')}: {c.get('value')} {c.get('op', '')} {c.get('limit')}".strip()
    return "a check failed"


# --- validate (GPU) -------------------------------------------------------------------------------


def validate_release(plan: Any, *, only: str | None, workdir: Path, token: str | None, endpoint: str | None,
                     log: Any = print) -> list[Any]:  # fmt: skip
    """Validate each selected variant from its staging branch; commit the measurements there."""
    return [_validate_one(plan, v, Path(workdir), token=token, endpoint=endpoint, log=log) for v in plan.select(only)]


def _validate_one(plan: Any, v: Any, workdir: Path, *, token: str | None, endpoint: str | None, log: Any) -> Any:
    from .release import VariantResult

    t0 = time.perf_counter()
    try:
        if _promoted(v, token=token, endpoint=endpoint) is not None:
            return VariantResult(v.name, v.repo_id, "skipped", "already promoted")
        head = staged_head(v.repo_id, token=token, endpoint=endpoint)
        if head is None:
            return _nothing_staged(v)
        done = _hub_json(v.repo_id, VALIDATION, head, token=token, endpoint=endpoint)
        if done is not None:  # validated by an earlier (perhaps killed) run
            return _validated(v, done, time.perf_counter() - t0, again=True)
        folder = _download_staged(v.repo_id, head, workdir / v.name, token=token, endpoint=endpoint)
        log(f"{v.name}: validating {v.repo_id}@{STAGING_BRANCH} (loaded as a user would)")
        _validate_folder(plan, v, folder, token=token, endpoint=endpoint)
        faults.point("before-validation-commit")
        _commit_measurements(v.repo_id, head, folder, token=token, endpoint=endpoint)
        report = json.loads((folder / VALIDATION).read_text())
    except QConvertError as e:
        return VariantResult(v.name, v.repo_id, "failed", e.one_line(), time.perf_counter() - t0, exit_code=e.exit_code)
    return _validated(v, report, time.perf_counter() - t0)


def _nothing_staged(v: Any) -> Any:
    from .release import VariantResult

    return VariantResult(v.name, v.repo_id, "failed", f"nothing staged: {v.repo_id} has no {STAGING_BRANCH} branch "
                         "(run the convert job first)", exit_code=2)  # fmt: skip


def _validated(v: Any, report: dict[str, Any], seconds: float, again: bool = False) -> Any:
    from .release import VariantResult

    when = " (earlier run)" if again else ""
    if report.get("passed"):
        return VariantResult(v.name, v.repo_id, "validated", f"validation passed{when}; ready to promote", seconds)
    return VariantResult(v.name, v.repo_id, "failed", f"validation failed{when} ({_first_failure(report)}); kept on {STAGING_BRANCH}",
                         seconds, exit_code=EXIT_VALIDATION)  # fmt: skip


def _download_staged(repo_id: str, head: str, folder: Path, *, token: str | None, endpoint: str | None) -> Path:
    """The staged commit as a user downloads it, into a fresh ``folder``."""
    import shutil

    from huggingface_hub import snapshot_download

    from .publish import hub_error

    if folder.exists():
        shutil.rmtree(folder)
    try:
        snapshot_download(repo_id, revision=head, local_dir=folder, token=token, endpoint=endpoint)
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, f"downloading {repo_id}@{head[:12]}", repo_id=repo_id, endpoint=endpoint) from None
    return folder


def _validate_folder(plan: Any, v: Any, folder: Path, *, token: str | None, endpoint: str | None) -> None:
    """validation.json + samples, and the card rendered for the repo (its snippet loads repo_id)."""
    from .cards import CARD_NAME, card_text
    from .validate import validate

    validate(folder, device=plan.device, overrides=dict(v.thresholds), token=token, endpoint=endpoint)
    card = card_text(folder, license=plan.license, repo_id=v.repo_id, token=token, endpoint=endpoint)
    (folder / CARD_NAME).write_text(card, encoding="utf-8")


def _measurements(folder: Path) -> dict[str, bytes]:
    """What validation adds to the staged files: validation.json (path-free), card, samples."""
    from .output import public_file

    out: dict[str, bytes] = {}
    for name in (VALIDATION, "README.md"):
        if (folder / name).is_file():
            out[name] = public_file(name, (folder / name).read_bytes())
    for p in sorted((folder / "samples").glob("*")) if (folder / "samples").is_dir() else []:
        out[f"samples/{p.name}"] = p.read_bytes()
    return out


def _commit_measurements(repo_id: str, head: str, folder: Path, *, token: str | None, endpoint: str | None) -> None:
    from huggingface_hub import CommitOperationAdd

    from .publish import hub_error

    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=data) for p, data in _measurements(folder).items()]
    try:
        _api(token, endpoint).create_commit(repo_id, ops, commit_message="qconvert: validation of the staged conversion",
                                            revision=STAGING_BRANCH, parent_commit=head)  # fmt: skip
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, f"committing the validation of {repo_id} to {STAGING_BRANCH}", repo_id=repo_id, endpoint=endpoint) from None


# --- promote --------------------------------------------------------------------------------------


def promote_release(plan: Any, *, only: str | None, token: str | None, endpoint: str | None, log: Any = print) -> list[Any]:
    """Promote each selected variant whose staged validation passed."""
    return [_promote_one(plan, v, token=token, endpoint=endpoint, log=log) for v in plan.select(only)]


def _promote_one(plan: Any, v: Any, *, token: str | None, endpoint: str | None, log: Any) -> Any:
    from .release import VariantResult

    t0 = time.perf_counter()
    try:
        head = staged_head(v.repo_id, token=token, endpoint=endpoint)
        main = _promoted(v, token=token, endpoint=endpoint)
        if main is not None:  # promoted by a run killed before its collection or cleanup step
            _after_commit(plan, v.repo_id, head, token=token, endpoint=endpoint)
            return VariantResult(v.name, v.repo_id, "skipped", "already promoted")
        if head is None:
            return _nothing_staged(v)
        report = _hub_json(v.repo_id, VALIDATION, head, token=token, endpoint=endpoint)
        if report is None:
            return VariantResult(v.name, v.repo_id, "failed", "not validated yet (run --validate-staged on a GPU runner)", exit_code=2)
        if not report.get("passed"):
            return _validated(v, report, time.perf_counter() - t0)
        commit = promote(v.repo_id, head, token=token, endpoint=endpoint, log=log)
        _after_commit(plan, v.repo_id, head, token=token, endpoint=endpoint)
    except QConvertError as e:
        return VariantResult(v.name, v.repo_id, "failed", e.one_line(), time.perf_counter() - t0, exit_code=e.exit_code)
    return VariantResult(v.name, v.repo_id, "done", "validated and promoted to main", time.perf_counter() - t0, commit)


def promote(repo_id: str, head: str, *, token: str | None, endpoint: str | None, log: Any = print) -> str | None:
    """ONE commit on main holding exactly the staged commit ``head``'s files, copied (no upload);
    main's head afterwards (no commit when main holds them already)."""
    from .publish import remote_state

    api = _api(token, endpoint)
    staged = remote_state(api, repo_id, endpoint=endpoint, revision=head)
    main = remote_state(api, repo_id, endpoint=endpoint)
    manifest = _hub_json(repo_id, "qconvert.json", head, token=token, endpoint=endpoint) or {}
    ops, target = _promotion_ops(staged, main, head, keep=_keeps(manifest))
    if not ops:
        return main.head
    log(f"promoting {repo_id}@{head[:12]} to main ({len(ops)} operation(s), nothing uploaded again)")
    faults.point("before-promote-commit")
    commit = _commit_promotion(api, repo_id, ops, target, main, manifest, endpoint=endpoint, log=log)
    faults.point("after-promote-commit")
    return commit


def _keeps(manifest: dict[str, Any]) -> bool:
    from .publish import _keeps_siblings

    return bool(manifest) and _keeps_siblings(manifest)


def _lfs_sha(sib: Any) -> str | None:
    lfs = getattr(sib, "lfs", None) if sib is not None else None
    if lfs is None:
        return None
    return lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)


def _same_sibling(a: Any, b: Any) -> bool:
    if b is None:
        return False
    if _lfs_sha(a) is not None or _lfs_sha(b) is not None:
        return _lfs_sha(a) == _lfs_sha(b)
    return a.blob_id is not None and a.blob_id == b.blob_id


def _promotion_ops(staged: Any, main: Any, head: str, *, keep: bool) -> tuple[list[Any], dict[str, Any]]:
    """(operations, path -> LocalFile of the LFS files main must then hold: the check of a
    commit whose answer was lost)."""
    from huggingface_hub import CommitOperationCopy, CommitOperationDelete

    from .publish import KEEP_REMOTE, LocalFile

    ops: list[Any] = []
    target: dict[str, Any] = {}
    for path, sib in sorted(staged.files.items()):
        if path in KEEP_REMOTE:
            continue
        if _lfs_sha(sib) is not None:
            target[path] = LocalFile(int(sib.size or 0), _lfs_sha(sib))
        if not _same_sibling(sib, main.files.get(path)):
            ops.append(CommitOperationCopy(src_path_in_repo=path, path_in_repo=path, src_revision=head))
    if not keep:
        ops += [CommitOperationDelete(path_in_repo=p) for p in sorted(main.files) if p not in staged.files and p not in KEEP_REMOTE]
    return ops, target


def _commit_promotion(api: Any, repo_id: str, ops: list[Any], target: dict[str, Any], main: Any,
                      manifest: dict[str, Any], *, endpoint: str | None, log: Any) -> str:  # fmt: skip
    from huggingface_hub import CommitOperationDelete

    from .publish import _commit_with_retries, default_commit_message

    deletions = [op.path_in_repo for op in ops if isinstance(op, CommitOperationDelete)]
    message = default_commit_message(manifest) if manifest else "qconvert: promote the validated conversion"
    return _commit_with_retries(api, repo_id, ops, message=message,
                                description=f"Validated on the {STAGING_BRANCH} branch, then promoted: the files are the staged ones.",
                                parent=main.head, target=target, deletions=deletions, endpoint=endpoint, info=log)  # fmt: skip


def _after_commit(plan: Any, repo_id: str, head: str | None, *, token: str | None, endpoint: str | None) -> None:
    """The collection item (note from main's published files) and the staging branch's deletion."""
    from .publish import _add_to_collection, collection_note, hub_error

    api = _api(token, endpoint)
    if plan.collection:
        manifest = _hub_json(repo_id, "qconvert.json", None, token=token, endpoint=endpoint) or {}
        validation = _hub_json(repo_id, VALIDATION, None, token=token, endpoint=endpoint)
        _add_to_collection(api, plan.collection, repo_id, collection_note(manifest, validation), endpoint=endpoint)
    if head is not None:
        try:
            api.delete_branch(repo_id, branch=STAGING_BRANCH)
        except Exception as e:  # noqa: BLE001
            raise hub_error(e, f"deleting {repo_id}@{STAGING_BRANCH} after promoting it", repo_id=repo_id, endpoint=endpoint) from None
