"""Publishing a conversion output to the Hugging Face Hub: one commit, idempotent, token-safe.

``push(out, repo_id, ...)``:

1. Refuses an output that has no passing ``validation.json`` (``ValidationFailed``, exit 4)
   unless ``allow_unvalidated``; the card then says so ("not validated" / "failed").
2. (Re-)renders ``README.md`` with the repo id in the usage snippet when the folder has no
   README.md or one qconvert generated (marker ``<!-- qconvert:card -->``); a hand-written
   README.md is published as it is.
3. Checks the token first (``whoami``): none, rejected (401) or read-only -> ``AuthError``
   (exit 5) naming the token problem; a namespace the token's user cannot write to -> a
   ``PublishError`` naming it.
4. Compares the folder with the repo (``model_info(files_metadata=True)``: sha256 of LFS
   files, git blob id of the others). Identical -> no commit, and the result says so.
5. Otherwise ``create_repo(exist_ok=True)`` and ONE ``create_commit`` holding an add for
   every new or changed file and a delete for every remote file the folder does not have
   (the repo mirrors the output; ``.gitattributes`` is kept; ``keep_remote_files=True``
   keeps extra remote files instead, and is the default for GGUF outputs, whose repos
   commonly hold one file per scheme side by side). ``parent_commit`` is the head the plan was made
   against, so a concurrent change fails instead of being overwritten.
6. The commit POST is retried with backoff on 408/429/5xx, timeouts and dropped
   connections (huggingface_hub itself already retries preupload and LFS transfers, so
   failures there are not retried again); before each retry the repo is re-read, and a
   commit that landed although its answer was lost counts as done. 401/403 are never
   retried. A failed push leaves the repo as it was (a commit is atomic on the Hub): run it
   again and it uploads only what is missing.
7. Only measurements differ (``validation.json``, the card, ``samples/``; same weights and
   ``qconvert.json``): a re-validation of the same conversion is not a new release, so no
   commit is made and the published files stay (``measurements_kept``).
8. ``collection``: ``create_collection(title, namespace=<repo namespace>, exists_ok=True)``,
   then the repo is added with a note (backend, scheme, size, memory), or its note is
   updated, or nothing changes (``collection_action``). The note is made from what the repo
   holds after the push: when the measurements were kept, from the *published*
   ``validation.json``, so the card, the repo and the collection never disagree. Idempotent.

``dry_run=True`` makes only read requests (whoami, repo info) and returns the plan: repo,
files with sizes and what would happen to each, commit message, collection. Nothing is
written, locally or remotely.

The token is registered for redaction before anything else; it is never printed, logged
into a message, or written into the folder (only README.md is ever written there).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .identity import SourceIdentity
from .manifest import read_manifest
from .output import PUBLIC_FILES, public_file, sha256_of
from .errors import (
    AuthError,
    InputError,
    PublishError,
    UsageError,
    ValidationFailed,
    redact,
    register_secret,
    transport_errors,
)

RETRY_STATUSES = (408, 429, 500, 502, 503, 504)
RETRY_WAITS = (1.0, 2.0, 4.0)  # seconds before the 2nd, 3rd and 4th try of the commit
KEEP_REMOTE = (".gitattributes",)
TOKEN_HINT = "set HF_TOKEN to a write token (https://huggingface.co/settings/tokens) or run `hf auth login`"


@dataclass
class FileEntry:
    path: str
    size: int
    action: str  # "upload" | "unchanged" | "delete"


@dataclass
class PushResult:
    repo_id: str
    url: str
    private: bool
    dry_run: bool
    commit_message: str
    files: list[FileEntry]
    committed: bool = False
    commit: str | None = None  # the new commit, or the head when nothing changed
    repo_exists: bool = True
    collection: str | None = None
    collection_slug: str | None = None
    collection_action: str | None = None  # "added" | "note updated" | "unchanged"
    collection_note: str | None = None  # the note the item has now
    measurements_kept: bool = False  # only measurements differed: the published ones were kept
    validated: str = "passed"  # "passed" | "failed" | "not validated"
    notes: list[str] = field(default_factory=list)

    @property
    def uploads(self) -> list[FileEntry]:
        return [f for f in self.files if f.action == "upload"]

    @property
    def deletions(self) -> list[FileEntry]:
        return [f for f in self.files if f.action == "delete"]

    @property
    def unchanged(self) -> list[FileEntry]:
        return [f for f in self.files if f.action == "unchanged"]

    @property
    def up_to_date(self) -> bool:
        return self.repo_exists and not self.uploads and not self.deletions

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        d = asdict(self)
        d["up_to_date"] = self.up_to_date
        return d

    def render(self, verbose: bool = False) -> str:
        from .plan import human_bytes

        vis = "private" if self.private else "public"
        lines = [f"repo: {self.repo_id} ({vis}{'' if self.repo_exists else ', will be created' if self.dry_run else ', created'})"]
        lines.append(f"url: {self.url}")
        local = [f for f in self.files if f.action != "delete"]
        up = self.uploads
        lines.append(
            f"files: {len(local)} ({human_bytes(sum(f.size for f in local))}): {len(up)} to upload "
            f"({human_bytes(sum(f.size for f in up))}), {len(self.unchanged)} unchanged, "
            f"{len(self.deletions)} to delete from the repo"
        )
        for f in self.files:
            if self.dry_run or verbose or f.action != "unchanged":
                lines.append(f"  {f.action:<9} {f.path}  {human_bytes(f.size)}")
        lines.append(f"commit message: {self.commit_message}")
        lines.append(f"validation: {self.validated}")
        return redact("\n".join(lines + self.outcome_lines()))

    def outcome_lines(self) -> list[str]:
        """What the push did: notes, the collection, the commit (``qconvert flux --push`` prints these)."""
        lines = [f"note: {n}" for n in self.notes]
        if self.measurements_kept:
            lines.append(
                "note: only measurements differ from the repo (validation.json, README.md, samples/): not published; "
                "the repo, its card and the collection note keep the published run (a new validation is published "
                "only together with a changed conversion, i.e. new weights or qconvert.json; no option forces it)"
            )
        if self.collection:
            slug = f" ({self.collection_slug})" if self.collection_slug else ""
            did = {
                "added": "added to it",
                "note updated": "already in it, note updated",
                "unchanged": "already in it, note unchanged",
            }.get(self.collection_action or "", "")
            note = f' [note: "{self.collection_note}"]' if did and self.collection_note else ""
            lines.append(f"collection: {self.collection}{slug}{': ' + did if did else ''}{note}")
        if self.dry_run:
            lines.append("dry run: nothing was changed")
        elif self.committed:
            lines.append(f"pushed: commit {self.commit} ({self.url})")
        else:
            lines.append(f"already up to date (head {self.commit}): no commit made")
        return [redact(line) for line in lines]


# --- local side ----------------------------------------------------------------------------


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def local_files(out: Path) -> list[str]:
    """Every file of the folder, relative POSIX paths, sorted; hidden files/folders are skipped."""
    files = []
    for p in sorted(Path(out).rglob("*")):
        rel = p.relative_to(out)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        files.append(rel.as_posix())
    return files


def _manifest_hashes(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = dict(manifest.get("files") or {})
    for comp in (manifest.get("components") or {}).values():
        entries.update(comp.get("files") or {})
    return entries


def validation_state(out: Path, *, allow_unvalidated: bool) -> str:
    from .cards.data import read_validation
    from .validate import VALIDATION_NAME

    report = read_validation(out)
    if report is None:
        if not allow_unvalidated:
            raise ValidationFailed(
                f"{out} was not validated (no {VALIDATION_NAME})",
                hint=f"run `qconvert validate {out}` first, or pass --no-validate to publish it marked as not validated",
            )
        return "not validated"
    if not report.get("passed"):
        failed = ", ".join(str(x) for x in report.get("failed") or []) or "see validation.json"
        if not allow_unvalidated:
            raise ValidationFailed(
                f"{out} failed validation ({failed})",
                hint="fix the conversion, or pass --no-validate to publish it marked as failed",
            )
        return "failed"
    return "passed"


# --- Hub errors ----------------------------------------------------------------------------


def _http_status(e: BaseException) -> int | None:
    resp = getattr(e, "response", None)
    status = getattr(resp, "status_code", None)
    return int(status) if isinstance(status, int) else None


def _root_cause(e: BaseException) -> BaseException:
    """The HTTP or transport error behind ``e`` (huggingface_hub wraps LFS failures in RuntimeError)."""
    from huggingface_hub.errors import HfHubHTTPError

    seen = set()
    cur: BaseException | None = e
    transport = transport_errors()
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, HfHubHTTPError) or isinstance(cur, transport):
            return cur
        cur = cur.__cause__ or cur.__context__
    return e


def _request_url(e: BaseException) -> str:
    def attr(obj: Any, name: str) -> Any:
        try:
            return getattr(obj, name, None)
        except RuntimeError:  # httpx: "The .request property has not been set."
            return None

    for obj in (attr(e, "request"), attr(attr(e, "response"), "request")):
        url = attr(obj, "url")
        if url is not None:
            return str(url)
    return ""


def _is_retryable_commit_error(e: BaseException) -> bool:
    """A failure of the commit POST itself that may go away (not an upload the client retried)."""
    from huggingface_hub.errors import HfHubHTTPError

    cause = _root_cause(e)
    url = _request_url(cause)
    if url and "/commit/" not in url:
        return False  # preupload / LFS: huggingface_hub already retried these
    if isinstance(cause, HfHubHTTPError):
        return _http_status(cause) in RETRY_STATUSES
    return isinstance(cause, transport_errors())


def hub_error(e: BaseException, action: str, *, repo_id: str, endpoint: str | None) -> PublishError:
    """Turn a huggingface_hub/transport exception into a one-line PublishError/AuthError."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    cause = _root_cause(e)
    ns = repo_id.split("/")[0]
    if isinstance(cause, OfflineModeIsEnabled):
        return PublishError("HF_HUB_OFFLINE is set: pushing needs the Hub", hint="unset HF_HUB_OFFLINE and run it again")
    if isinstance(cause, HfHubHTTPError):
        status = _http_status(cause)
        server = " ".join(str(getattr(cause, "server_message", "") or "").split())[:200]
        detail = f": {server}" if server else ""
        if status == 401:
            return AuthError(f"the Hub rejected the token (HTTP 401) while {action}", hint=TOKEN_HINT)
        if status == 403:
            return AuthError(
                f"the token may not write to {repo_id} (HTTP 403 while {action}{detail})",
                hint=f"set HF_TOKEN to a write token of a user who can write to the namespace {ns}",
            )
        if status == 404:
            return PublishError(
                f"not found (HTTP 404) while {action}{detail}",
                hint=f"check that the namespace {ns} exists and that your token's user belongs to it",
            )
        if status == 412:
            return PublishError(
                f"{repo_id} changed on the Hub while pushing (HTTP 412)", hint="run the push again"
            )
        return PublishError(
            f"the Hub answered HTTP {status} while {action}{detail}; nothing was committed",
            hint="retry later: a re-run uploads only what is missing",
        )
    if isinstance(cause, transport_errors()):
        where = endpoint or "the Hub"
        return PublishError(
            f"lost the connection to {where} while {action} ({type(cause).__name__}); nothing was committed",
            hint="check the network or HF_ENDPOINT and run the push again",
        )
    return PublishError(f"{action} failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}")


# --- remote side ---------------------------------------------------------------------------


@dataclass
class RemoteState:
    exists: bool
    head: str | None = None
    private: bool | None = None
    files: dict[str, Any] = field(default_factory=dict)  # path -> RepoSibling


def remote_state(api: Any, repo_id: str, *, endpoint: str | None, revision: str | None = None) -> RemoteState:
    """The repo at ``revision`` (default: main); a branch not created yet is an existing repo
    with no head."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = api.model_info(repo_id, files_metadata=True, revision=revision)
    except RepositoryNotFoundError:
        return RemoteState(False)
    except RevisionNotFoundError:  # a repo without a main branch yet, or a new branch
        return RemoteState(True)
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, f"reading {repo_id}", repo_id=repo_id, endpoint=endpoint) from None
    files = {s.rfilename: s for s in (info.siblings or [])}
    return RemoteState(True, info.sha, bool(info.private), files)


@dataclass(frozen=True)
class LocalFile:
    """One file as it will be published: on disk (``path``) or rendered in memory (``data``)."""

    size: int
    sha256: str | None  # from qconvert.json where it lists the file
    path: Path | None = None
    data: bytes | None = None


def _same(local: LocalFile, sibling: Any) -> bool:
    """Is the local file identical to the remote sibling (sha256 for LFS, git blob id otherwise)?"""
    if sibling is None:
        return False
    if sibling.size is not None and sibling.size != local.size:
        return False
    lfs = getattr(sibling, "lfs", None)
    if lfs is not None:
        remote = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        sha256 = local.sha256
        if sha256 is None:
            sha256 = hashlib.sha256(local.data).hexdigest() if local.data is not None else sha256_of(local.path)  # type: ignore[arg-type]
        return remote == sha256
    if sibling.blob_id is None or (local.data is None and local.path is None):  # an uploaded shard is LFS
        return False
    data = local.data
    if data is None:
        assert local.path is not None
        data = local.path.read_bytes()
    return git_blob_id(data) == sibling.blob_id


# --- push ----------------------------------------------------------------------------------


def _source_label(manifest: dict[str, Any]) -> str:
    return SourceIdentity.from_dict(manifest.get("source") or {}).label


def _keeps_siblings(manifest: dict[str, Any]) -> bool:
    """Whether a push keeps the repo's other files: a repo of files only (GGUF) commonly holds
    many quantizations side by side (one file per scheme); a pipeline folder repo mirrors the
    output exactly. The backend's ``container`` declaration says which."""
    from .convert import container_of
    from .convert.base import PIPELINE_FOLDER

    return container_of(manifest) != PIPELINE_FOLDER


def default_commit_message(manifest: dict[str, Any]) -> str:
    return (
        f"qconvert {manifest.get('qconvert_version', __version__)}: {manifest['backend']} "
        f"{manifest['scheme']} of {_source_label(manifest)}"
    )


def collection_note(manifest: dict[str, Any], validation: dict[str, Any] | None) -> str:
    from .plan import human_bytes

    note = f"{manifest['backend']} {manifest['scheme']}, {human_bytes(int(manifest.get('bytes_out') or 0))} on disk"
    q = (validation or {}).get("quantized") or {}
    env = (validation or {}).get("environment") or {}
    if validation and q.get("memory_after_load") is not None:
        note += f", {human_bytes(int(q['memory_after_load']))} after load ({env.get('device', '?')})"
    if not validation:
        note += ", not validated"
    elif not validation.get("passed"):
        note += ", failed validation"
    return note


def check_push_target(repo_id: str, *, token: str | None, endpoint: str | None, label: str = "--repo-id") -> None:
    """Fail now, before hours of converting, if ``repo_id`` is malformed or the token cannot push there."""
    from huggingface_hub import HfApi

    _check_repo_id(repo_id, label)
    _check_token(HfApi(endpoint=endpoint, token=token), token, repo_id, endpoint=endpoint)


def _check_repo_id(repo_id: str, label: str) -> None:
    from .sources import looks_like_repo_id

    if not looks_like_repo_id(repo_id):
        raise UsageError(f"{label} {repo_id!r} is not a Hub repo id", hint="use the form namespace/name")


def _check_token(api: Any, token: str | None, repo_id: str, *, endpoint: str | None) -> dict[str, Any]:
    if not token:
        raise AuthError("no Hub token found: pushing needs one", hint=TOKEN_HINT)
    try:
        me = api.whoami(token=token)
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, "checking the token", repo_id=repo_id, endpoint=endpoint) from None
    role = (((me.get("auth") or {}).get("accessToken") or {}).get("role")) if isinstance(me, dict) else None
    if role == "read":
        raise AuthError(f"the token of {me.get('name')} is read-only: it cannot push", hint=TOKEN_HINT)
    ns = repo_id.split("/")[0]
    names = {me.get("name")} | {o.get("name") for o in me.get("orgs") or [] if isinstance(o, dict)}
    if ns not in names:
        yours = ", ".join(sorted(n for n in names if n))
        raise PublishError(
            f"the token's user {me.get('name')} cannot create repos in the namespace {ns} (it can in: {yours})",
            hint=f"check --repo-id, or use a token of a member of {ns}",
        )
    return me


def _commit_with_retries(
    api: Any,
    repo_id: str,
    operations: list[Any],
    *,
    message: str,
    description: str,
    parent: str | None,
    target: dict[str, LocalFile],
    deletions: list[str],
    endpoint: str | None,
    info: Any,
    revision: str | None = None,
) -> str:
    """create_commit (on branch ``revision``, default main), retried on transient failures of
    the commit POST; returns the commit oid."""
    waits = list(RETRY_WAITS)
    while True:
        try:
            res = api.create_commit(repo_id, operations, commit_message=message, commit_description=description,
                                    parent_commit=parent, revision=revision)  # fmt: skip
            return str(res.oid)
        except Exception as e:  # noqa: BLE001
            if isinstance(e, ValueError) and "metadata" in str(e).lower():
                raise PublishError(
                    f"the Hub refused the model card: {' '.join(str(e).split())[:300]}",
                    hint="fix README.md (or delete it to let qconvert render one)",
                ) from None
            if not waits or not _is_retryable_commit_error(e):
                raise hub_error(e, f"committing to {repo_id}", repo_id=repo_id, endpoint=endpoint) from None
            info(f"the Hub did not take the commit ({type(_root_cause(e)).__name__}); retrying in {waits[0]:.0f} s")
            time.sleep(waits.pop(0))
            now = remote_state(api, repo_id, endpoint=endpoint, revision=revision)
            if now.head != parent:
                # The commit may have landed even though its answer was lost.
                done = all(_same(f, now.files.get(path)) for path, f in target.items())
                done = done and not any(path in now.files for path in deletions)
                if done:
                    return str(now.head)
                raise PublishError(
                    f"{repo_id} changed on the Hub while pushing (head is now {now.head})",
                    hint="run the push again",
                ) from None


MEASUREMENT_FILES = ("validation.json", "README.md")


def _is_measurement(path: str) -> bool:
    """Files that hold a validation run's measurements rather than the model."""
    return path in MEASUREMENT_FILES or path.startswith("samples/")


def push(
    out: Path | str,
    repo_id: str,
    *,
    token: str | None,
    endpoint: str | None,
    private: bool = False,
    collection: str | None = None,
    dry_run: bool = False,
    allow_unvalidated: bool = False,
    commit_message: str | None = None,
    keep_remote_files: bool | None = None,
    info: Any = None,
    branch: str | None = None,
) -> PushResult:
    """Publish the output folder ``out`` as the model repo ``repo_id`` (see the module docstring);
    ``branch``: to that branch (created from main when missing) instead of main, for a
    staging branch that :func:`qconvert.staging.promote` later makes main."""
    register_secret(token)
    log = info or (lambda msg: None)
    out = Path(out)
    _check_repo_id(repo_id, "--repo-id")
    if collection is not None:
        from .hubnames import check_collection_title

        check_collection_title(collection)
    manifest = read_manifest(out)
    if keep_remote_files is None:
        keep_remote_files = _keeps_siblings(manifest)
    validated = validation_state(out, allow_unvalidated=allow_unvalidated)
    notes: list[str] = []
    card = _card(out, repo_id, notes, token=token, endpoint=endpoint)
    target = _local_files(out, manifest, card)

    from huggingface_hub import HfApi, constants

    api = HfApi(endpoint=endpoint, token=token)
    _check_token(api, token, repo_id, endpoint=endpoint)
    remote = remote_state(api, repo_id, endpoint=endpoint, revision=branch)
    if remote.exists and remote.private is not None and remote.private != private:
        notes.append(f"the repo exists and is {'private' if remote.private else 'public'}; its visibility was left as it is")
    files, kept = _plan_files(target, remote, keep_remote_files)
    result = PushResult(
        repo_id=repo_id, url=f"{(endpoint or constants.ENDPOINT).rstrip('/')}/{repo_id}",
        private=remote.private if remote.exists and remote.private is not None else private, dry_run=dry_run,
        commit_message=redact(commit_message or default_commit_message(manifest)), files=files,
        repo_exists=remote.exists, collection=collection, validated=validated, notes=notes, commit=remote.head,
        measurements_kept=kept,
    )  # fmt: skip
    if dry_run:
        return result
    _write_card(out, card, target)
    if not remote.exists or (branch and remote.head is None):
        remote = _create_repo(api, result, target, keep_remote_files, private=private, endpoint=endpoint, log=log,
                              branch=branch)  # fmt: skip
    if result.uploads or result.deletions:
        _commit(api, out, manifest, result, target, remote, endpoint=endpoint, log=log, branch=branch)
    result.repo_exists = True
    if collection:
        from .cards.data import read_validation

        _update_collection(api, result, manifest, read_validation(out), endpoint=endpoint)
    return result


def _card(out: Path, repo_id: str, notes: list[str], *, token: str | None, endpoint: str | None) -> str | None:
    """The card to publish, rendered for ``repo_id``; None when the folder has a hand-written one."""
    from .cards import CARD_NAME, card_text, is_generated_card

    readme = out / CARD_NAME
    if readme.is_file() and not is_generated_card(readme):
        notes.append("README.md is hand-written (no qconvert marker): published as it is")
        return None
    return card_text(out, repo_id=repo_id, token=token, endpoint=endpoint)


def _local_files(out: Path, manifest: dict[str, Any], card: str | None) -> dict[str, LocalFile]:
    """Every file to publish, checked against the sizes qconvert.json recorded."""
    from .cards import CARD_NAME

    from .output import uploaded_entry

    known = _manifest_hashes(manifest)
    names = local_files(out)
    if card is not None and CARD_NAME not in names:
        names = sorted([*names, CARD_NAME])
    # shards uploaded while converting (a staging push): committed by their recorded sha256
    uploaded = {n: e for n in sorted(set(known) - set(names)) if (e := uploaded_entry(out / n)) is not None}
    names = sorted([*names, *uploaded])
    missing = sorted(set(known) - set(names))
    if missing:
        raise InputError(f"{out} is incomplete: {missing[0]} is listed in qconvert.json but missing", hint="convert again")
    target: dict[str, LocalFile] = {}
    for name in names:
        if name in uploaded:
            target[name] = LocalFile(int(uploaded[name]["size"]), str(uploaded[name]["sha256"]))
            continue
        if name == CARD_NAME and card is not None:
            data = card.encode("utf-8")
        elif name in PUBLIC_FILES:  # local source paths reduced to folder/file names
            data = public_file(name, (out / name).read_bytes())
        else:
            size, entry = (out / name).stat().st_size, known.get(name)
            if entry is not None and entry.get("size") != size:
                raise InputError(f"{out / name} changed after conversion (its size differs from qconvert.json)", hint="convert again")
            target[name] = LocalFile(size, entry.get("sha256") if entry else None, path=out / name)
            continue
        target[name] = LocalFile(len(data), None, data=data)
    return target


def _plan_files(target: dict[str, LocalFile], state: RemoteState, keep_remote_files: bool) -> tuple[list[FileEntry], bool]:
    """Each file's action, and whether only measurements differ (then all are kept)."""
    entries = [FileEntry(path, f.size, "unchanged" if _same(f, state.files.get(path)) else "upload")
               for path, f in target.items()]  # fmt: skip
    if not keep_remote_files:
        for path, sib in sorted(state.files.items()):
            if path not in target and path not in KEEP_REMOTE:
                entries.append(FileEntry(path, int(sib.size or 0), "delete"))
    changed = [e for e in entries if e.action != "unchanged"]
    if any(e.path == "validation.json" for e in changed) and all(
        e.action == "upload" and _is_measurement(e.path) and e.path in state.files for e in changed
    ):
        # Same weights and manifest; only a re-validation's timings (and the card and samples
        # that show them) differ. That is not a new release: keep the published files, so
        # re-running an identical conversion changes nothing on the Hub.
        return [FileEntry(e.path, e.size, "unchanged") for e in entries], True
    return entries, False


def _write_card(out: Path, card: str | None, target: dict[str, LocalFile]) -> None:
    from .cards import CARD_NAME

    readme = out / CARD_NAME
    if card is not None and (not readme.is_file() or readme.read_text(encoding="utf-8") != card):
        readme.write_text(card, encoding="utf-8")
        target[CARD_NAME] = LocalFile(len(card.encode("utf-8")), None, path=readme)


def _create_repo(api: Any, result: PushResult, target: dict[str, LocalFile], keep_remote_files: bool, *,
                 private: bool, endpoint: str | None, log: Any, branch: str | None = None) -> RemoteState:
    log(f"creating {'private' if private else 'public'} repo {result.repo_id}" + (f", branch {branch}" if branch else ""))
    try:
        api.create_repo(result.repo_id, private=private, exist_ok=True)
        if branch:
            api.create_branch(result.repo_id, branch=branch, exist_ok=True)
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, f"creating {result.repo_id}", repo_id=result.repo_id, endpoint=endpoint) from None
    remote = remote_state(api, result.repo_id, endpoint=endpoint, revision=branch)
    result.files, result.measurements_kept = _plan_files(target, remote, keep_remote_files)
    result.private = remote.private if remote.private is not None else private
    return remote


def _commit(api: Any, out: Path, manifest: dict[str, Any], result: PushResult, target: dict[str, LocalFile],
            remote: RemoteState, *, endpoint: str | None, log: Any, branch: str | None = None) -> None:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ops: list[Any] = []
    for f in result.uploads:
        local = target[f.path]
        if local.path is None and local.data is None:  # uploaded while converting
            ops.append(uploaded_addition(f.path, local.sha256, local.size))  # type: ignore[arg-type]
            continue
        op = CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(local.path) if local.path is not None else local.data)
        if local.sha256 is not None and op.upload_info.sha256.hex() != local.sha256:
            raise InputError(f"{out / f.path} changed after conversion (its sha256 differs from qconvert.json)", hint="convert again")
        ops.append(op)
    ops += [CommitOperationDelete(path_in_repo=f.path) for f in result.deletions]
    log(f"pushing {len(result.uploads)} file(s) to {result.repo_id} in one commit")
    result.commit = _commit_with_retries(
        api, result.repo_id, ops, message=result.commit_message, description=_commit_description(manifest, result.validated, result),
        parent=remote.head, target=target, deletions=[f.path for f in result.deletions], endpoint=endpoint, info=log,
        revision=branch,
    )  # fmt: skip
    result.committed = True


def _update_collection(api: Any, result: PushResult, manifest: dict[str, Any], validation: Any, *,
                       endpoint: str | None) -> None:
    # The note describes what the repo holds now: the kept (published) measurements when the
    # local ones were not published, so it never shows numbers the card does not.
    published = _published_validation(api, result.repo_id, result.commit) if result.measurements_kept else validation
    note = None if published is _UNREADABLE else collection_note(manifest, published)
    result.collection_slug, result.collection_action, result.collection_note = _add_to_collection(
        api, result.collection, result.repo_id, note, endpoint=endpoint
    )


_UNREADABLE: Any = object()


def _published_validation(api: Any, repo_id: str, revision: str | None) -> Any:
    """The repo's own ``validation.json`` at ``revision``; ``_UNREADABLE`` if it cannot be read."""
    import json

    from .validate import VALIDATION_NAME

    try:
        path = api.hf_hub_download(repo_id, VALIDATION_NAME, revision=revision)
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - unreadable: leave the note as it is rather than guess
        return _UNREADABLE
    return data if isinstance(data, dict) else _UNREADABLE


def _commit_description(manifest: dict[str, Any], validated: str, result: PushResult) -> str:
    lines = [
        f"Converted with qconvert {manifest.get('qconvert_version', __version__)}: backend {manifest['backend']}, "
        f"scheme {manifest['scheme']}, source {_source_label(manifest)}.",
        f"Validation: {validated}.",
        f"{len(result.uploads)} file(s) added or changed, {len(result.deletions)} deleted.",
    ]
    return redact("\n".join(lines))


def _add_to_collection(
    api: Any, title: str, repo_id: str, note: str | None, *, endpoint: str | None
) -> tuple[str, str, str | None]:
    """Put ``repo_id`` in the collection ``title`` with ``note`` (None: leave an existing note).

    Returns the slug, what was done ("added" | "note updated" | "unchanged") and the item's note.
    """
    ns = repo_id.split("/")[0]

    def item_of(coll: Any) -> Any:
        return next((i for i in coll.items or [] if i.item_type == "model" and i.item_id == repo_id), None)

    try:
        coll = api.create_collection(title, namespace=ns, exists_ok=True)  # the existing one, with its items
        item = item_of(coll)
        if item is None:
            # exists_ok: added meanwhile by someone else is fine too
            item = item_of(api.add_collection_item(coll.slug, repo_id, "model", note=note, exists_ok=True))
            return str(coll.slug), "added", getattr(item, "note", note)
        if note is None or item.note == note:
            return str(coll.slug), "unchanged", item.note
        api.update_collection_item(coll.slug, item.item_object_id, note=note)
        return str(coll.slug), "note updated", note
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, f"adding {repo_id} to the collection {title!r}", repo_id=repo_id, endpoint=endpoint) from None


def uploaded_addition(path_in_repo: str, sha256: str, size: int) -> Any:
    """A ``CommitOperationAdd`` for an LFS object the repo already stores (pre-uploaded, its
    local file gone): ``create_commit`` then sends its ``lfsFile`` line and uploads nothing.

    huggingface_hub keeps this state in the operation (``upload_info``, ``_upload_mode``,
    ``_is_uploaded``: what ``preupload_lfs_files`` sets); an operation built from the
    recorded sha256 and size carries the same state across processes (a re-run commits what
    an earlier, killed run uploaded)."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.lfs import UploadInfo

    op = CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=b"")
    op.upload_info = UploadInfo(sha256=bytes.fromhex(sha256), size=size, sample=b"")
    op._upload_mode = "lfs"
    op._is_uploaded = True
    return op

