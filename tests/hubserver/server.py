"""A small Hugging Face Hub for tests: real HTTP on 127.0.0.1, spoken to by the real client.

``HubServer`` answers the requests that ``huggingface_hub`` 2.4 sends (with
``HF_HUB_DISABLE_XET=1``): auth/whoami, repo create/delete/settings, repo info, tree,
paths-info, refs, commits, preupload, git-LFS batch + upload + verify, NDJSON commits,
validate-yaml, collections and file downloads (``/resolve``), so tests drive it with
``HfApi(endpoint=hub.endpoint, token=hub.token)``, ``snapshot_download``, ``hf_hub_download``
or ``from_pretrained`` and nothing is mocked. Standard library only (``http.server``
ThreadingHTTPServer, one thread per connection) plus the ``git`` CLI; starts in well under a
second, ``stop()`` shuts it down and closes its socket.

Why reads are served here and not by olah 0.5.4 (checked against a real olah-cli with its
offline config and a git repo in its mirrors folder): olah does serve ``snapshot_download``,
``hf_hub_download`` and ``list_repo_tree``, but ``model_info()`` without a revision answers
401 (only ``/revision/{rev}`` is routed), ``siblings`` never carry ``lfs``/``size`` so
``model_info(files_metadata=True)`` cannot give ``lfs.sha256``, it has no auth so private repos
are readable by anyone, it wants non-bare repos with ``.git/lfs/objects``, reads whole LFS
files into memory, and a client has one endpoint so a proxy would be needed in front of the
two servers. Serving reads from the same process is fewer moving parts and gives
consistent auth and private-repo behaviour.

Storage: see ``gitstore`` (one bare git repo per Hub repo, one git commit per Hub commit,
LFS pointer files + the git-lfs object layout). As on the real Hub, a new repo gets an
initial commit holding a default ``.gitattributes``, so ``commit_count`` is 1 right after
``create_repo`` and every listing includes ``.gitattributes``.

Protocol subtleties (learned from the huggingface_hub 2.4 client code; the real Hub behaves
the same way as far as the client can tell):

* Errors are JSON ``{"error": msg}`` plus ``X-Error-Message``; ``X-Error-Code`` picks the
  exception class: ``RepoNotFound`` -> RepositoryNotFoundError, ``RevisionNotFound`` ->
  RevisionNotFoundError, ``EntryNotFound`` -> RemoteEntryNotFoundError. A 401 on a repo URL
  is reported as "repo not found" unless the message is exactly ``Invalid credentials in
  Authorization header``, which is what a bad token gets here (on every endpoint).
  Private repos: 401 + RepoNotFound without a token, 404 + RepoNotFound with a valid token
  that has no access (the repo's existence is not revealed).
* ``create_repo(exist_ok=True)`` reads ``url`` from the **409** body: the conflict answer must
  carry ``{"error", "url"}``. Likewise ``create_collection(exists_ok=True)`` reads ``slug``
  from its 409 body, then GETs the collection.
* Repo info: ``siblings`` only carry ``size``/``blobId``/``lfs{sha256,size,pointerSize}`` when
  the client asks ``?blobs=true`` (``files_metadata=True``). Tree/paths-info entries use a
  different LFS shape: ``lfs{oid,size,pointerSize}``; folders are ``type: "directory"``.
  ``snapshot_download`` calls repo info (for ``sha``), then ``/tree/{sha}?recursive=true``
  (paginated by ``Link: rel="next"``; one page here), then HEAD + GET ``/resolve/{sha}/{path}``
  per file. ``get_paths_info`` POSTs a *form* (``paths=a&paths=b&expand=False``).
* ``/resolve`` HEAD must carry ``X-Repo-Commit`` and an ETag (``X-Linked-Etag`` wins over
  ``ETag``; quotes are stripped). The ETag is the git blob id for regular files and the
  sha256 for LFS files (the client re-hashes local files to compare with a 64-hex ETag);
  size comes from ``X-Linked-Size`` or ``Content-Length``. The real Hub redirects LFS files to
  a CDN (302); here they are served directly (200) with the same headers, which the client
  treats identically. Range requests (``bytes=a-b``, ``bytes=a-``) get 206 for resumes.
  A missing file is 404 ``EntryNotFound`` *with* ``X-Repo-Commit`` (the client caches the
  absence per commit).
* Preupload answers per file ``uploadMode`` (``lfs`` when the path matches an LFS pattern in
  the repo's ``.gitattributes``, the size is >= 10 MiB, or the 512-byte sample holds a NUL
  byte or is not UTF-8; else ``regular``), ``shouldIgnore`` and ``oid``: the *remote* oid of
  the path (git blob id for regular files, sha256 for LFS files). The client compares it
  with its local oid and drops unchanged files from the commit; if nothing is left it
  makes no commit at all and returns the current head.
* LFS: the batch answer has ``actions.upload.href`` only for objects the repo lacks (objects
  already stored come back without ``actions`` and are not uploaded again) plus an
  ``actions.verify`` the client POSTs after the PUT. The PUT carries **no auth header**, so
  the href is a signed URL (HMAC over repo/oid/size; tokens never appear in URLs). The PUT
  body is checked against sha256 and size before it enters the store. With
  ``multipart_chunk_size`` set, larger objects get the multipart form (``header.chunk_size``
  + one URL per part named ``00001``..., each part PUT must answer an ``ETag``, then the
  client POSTs ``{"oid","parts":[{partNumber,etag}]}`` to the href).
* Commit: NDJSON ``header`` line (``summary``, ``description``, optional ``parentCommit`` ->
  412 when it is not the head), then ``file`` (base64), ``lfsFile`` (the object must already
  be stored: 400 otherwise), ``deletedFile`` (404 EntryNotFound "A file with this name
  doesn't exist" if absent), ``deletedFolder``. Applied in order to the head tree and written
  as one git commit; answer ``{"commitOid","commitUrl","pullRequestUrl": null}``.
  ``create_pr`` is refused (400): pull requests are not emulated.
* Client retries: preupload, LFS batch, the LFS PUT/verify go through ``http_backoff``
  (retried on 408/429/500/502/503/504 and dropped connections, 5 retries, sleeping 1, 2, 4,
  8, 8 s), while the commit POST and the ``/resolve`` HEAD are **not** retried. So one
  injected 500 or drop on a PUT is absorbed by the client (one commit, after ~1 s), whereas
  the same fault on ``/commit/`` fails the push. To make an upload fail for good without
  waiting ~23 s, inject a status the client does not retry (e.g. 403 or 507), or pass
  ``times=6``.
* ``validate-yaml`` is called whenever README.md is in a commit; ``warnings`` are turned into
  Python warnings by the client (an empty/missing front matter warns, as on the Hub), a 400
  with ``errors`` becomes ``ValueError("Invalid metadata in README.md. ...")``.
* Settings read at import by huggingface_hub (``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET``,
  ``HF_HUB_OFFLINE``, ``HF_HOME`` and the cache paths) must be patched in
  ``huggingface_hub.constants`` when the library is already imported: see ``fixtures.hub_env``.
  ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` is built from ``ENDPOINT`` at import too, and
  ``hf_hub_url`` only substitutes an explicit ``endpoint=`` when the template starts with
  ``constants.ENDPOINT``: patching ENDPOINT alone sends every file HEAD to huggingface.co.
  ``HF_HUB_DISABLE_PROGRESS_BARS`` is also read at import (env only reaches subprocesses).

Test hooks: ``commit_count(repo_id)``, ``commits(repo_id)``, ``files(repo_id)``,
``read_file(repo_id, path)``, ``lfs_objects(repo_id)``, ``seed_repo(repo_id, folder)``,
``fail_next(path_substring, status=500 | "drop", times=1, method=None)``, ``requests`` (a log
of (method, path, status); no headers, no query strings, so no secrets) and ``errors``
(tracebacks of unexpected server exceptions: a test can assert it stays empty).

Run it by hand: ``python tests/hubserver/server.py --port 8765`` prints the endpoint and the
tokens (fake ones, built in).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import html
import io
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

try:  # package import (tests) or script run (python tests/hubserver/server.py)
    from .gitstore import GitRepo, lfs_pointer
except ImportError:  # pragma: no cover
    from gitstore import GitRepo, lfs_pointer  # type: ignore

import yaml

LFS_THRESHOLD = 10 * 1024 * 1024
REPO_TYPES = ("model", "dataset", "space")
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_BODY = 256 * 1024 * 1024  # in-memory bodies (JSON, NDJSON); LFS PUTs are streamed to disk

DEFAULT_GITATTRIBUTES = """\
*.7z filter=lfs diff=lfs merge=lfs -text
*.arrow filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.bz2 filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.ftz filter=lfs diff=lfs merge=lfs -text
*.gguf filter=lfs diff=lfs merge=lfs -text
*.gz filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.joblib filter=lfs diff=lfs merge=lfs -text
*.lfs.* filter=lfs diff=lfs merge=lfs -text
*.mlmodel filter=lfs diff=lfs merge=lfs -text
*.model filter=lfs diff=lfs merge=lfs -text
*.msgpack filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.npz filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.ot filter=lfs diff=lfs merge=lfs -text
*.parquet filter=lfs diff=lfs merge=lfs -text
*.pb filter=lfs diff=lfs merge=lfs -text
*.pickle filter=lfs diff=lfs merge=lfs -text
*.pkl filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.rar filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
saved_model/**/* filter=lfs diff=lfs merge=lfs -text
*.tar.* filter=lfs diff=lfs merge=lfs -text
*.tar filter=lfs diff=lfs merge=lfs -text
*.tflite filter=lfs diff=lfs merge=lfs -text
*.tgz filter=lfs diff=lfs merge=lfs -text
*.wasm filter=lfs diff=lfs merge=lfs -text
*.xz filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
*.zst filter=lfs diff=lfs merge=lfs -text
*tfevents* filter=lfs diff=lfs merge=lfs -text
"""

# Fake credentials for tests (not secrets): token -> (user, orgs, role)
DEFAULT_TOKENS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "hf_test_alice_write": ("alice", ("acme",), "write"),
    "hf_test_alice_read": ("alice", ("acme",), "read"),
    "hf_test_bob_write": ("bob", (), "write"),
}


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, extra=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}


@dataclass(frozen=True)
class User:
    name: str
    orgs: tuple[str, ...]
    role: str  # "write" | "read"

    def can_write_ns(self, ns: str) -> bool:
        return self.role == "write" and (ns == self.name or ns in self.orgs)

    def member_of(self, ns: str) -> bool:
        return ns == self.name or ns in self.orgs


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    git: GitRepo
    created: int
    gated: bool | str = False

    @property
    def ns(self) -> str:
        return self.repo_id.split("/", 1)[0]


@dataclass
class Fault:
    """A scheduled failure (see ``HubServer.fail_next``); ``hits`` counts requests it broke."""

    substring: str
    action: int | str  # HTTP status or "drop"
    times: int = 1
    method: str | None = None
    hits: int = 0

    @property
    def pending(self) -> bool:
        return self.hits < self.times


@dataclass
class Collection:
    slug: str
    title: str
    owner: str
    description: str | None
    private: bool
    position: int
    items: list[dict] = field(default_factory=list)
    updated: int = 0
    theme: str = "default"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _split_front_matter(text: str) -> tuple[str | None, str]:
    m = re.match(r"^\s*---\r?\n(.*?)\r?\n---\s*(?:\r?\n|$)", text, flags=re.S)
    if not m:
        return None, text
    return m.group(1), text[m.end():]


def _gitattributes_lfs_patterns(text: str) -> list[str]:
    pats = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
            pats.append(parts[0])
    return pats


def _matches_pattern(path: str, pattern: str) -> bool:
    if "/" not in pattern.strip("/"):
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)
    regex = re.escape(pattern.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
    regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
    return re.fullmatch(regex, path) is not None


def _check_path(path: Any) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or path.endswith("/"):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..", ".git") for p in parts) or "\0" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


class HubServer:
    """The test Hub. ``start()`` binds 127.0.0.1:``port`` (0 = a free port) and serves in a thread."""

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        tokens: dict[str, tuple[str, tuple[str, ...] | list[str], str]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        multipart_chunk_size: int | None = None,
    ):
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="testhub-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.tokens: dict[str, User] = {
            tok: User(user, tuple(orgs), role) for tok, (user, orgs, role) in (tokens or DEFAULT_TOKENS).items()
        }
        self.host = host
        self.port = port
        self.multipart_chunk_size = multipart_chunk_size
        self._secret = os.urandom(32)
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._collections: dict[str, Collection] = {}
        self._collection_counter = 0
        self._faults: list[Fault] = []
        self.requests: list[tuple[str, str, int]] = []
        self.errors: list[str] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def endpoint(self) -> str:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return f"http://{self.host}:{self.port}"

    def token_for(self, user: str, role: str = "write") -> str:
        for tok, u in self.tokens.items():
            if u.name == user and u.role == role:
                return tok
        raise KeyError(f"no {role} token for {user}")

    @property
    def token(self) -> str:
        """Write token of user ``alice`` (member of org ``acme``)."""
        return self.token_for("alice", "write")

    @property
    def read_token(self) -> str:
        """Read-only token of ``alice``."""
        return self.token_for("alice", "read")

    @property
    def other_token(self) -> str:
        """Write token of ``bob``, who is in no org (cannot see alice's or acme's private repos)."""
        return self.token_for("bob", "write")

    def start(self) -> "HubServer":
        hub = self

        class Handler(_Handler):
            server_hub = hub

        httpd = _Server((self.host, self.port), Handler)
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="test-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.close_connections()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ test hooks
    def fail_next(self, path_substring: str, status: int | str = 500, *, times: int = 1, method: str | None = None) -> Fault:
        """Make the next ``times`` requests whose path contains ``path_substring`` fail.

        ``status`` is an HTTP status (the body is read, then a JSON error is sent and the
        connection closed), ``"drop"`` (half the body is read, then the connection is cut
        without an answer) or ``"cut"`` (a ``/resolve`` GET is answered, but the connection is
        cut after half of the response body: what a resumed download sees). ``method`` restricts the match (e.g. ``"PUT"``). Paths are matched
        without the query string, e.g. ``"/commit/"``, ``"/preupload/"``, ``"/_lfs/"`` (LFS
        upload hrefs), ``"/info/lfs/objects/batch"``, ``"/resolve/"``.
        """
        if status not in ("drop", "cut") and not (isinstance(status, int) and 400 <= status <= 599):
            raise ValueError("status must be an HTTP error status or 'drop'")
        fault = Fault(path_substring, status, times, method.upper() if method else None)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.pending and fault.substring in path and (fault.method in (None, method)):
                    fault.hits += 1
                    if not fault.pending:
                        self._faults.remove(fault)
                    return fault
        return None

    def count_requests(self, method: str | None = None, substring: str = "") -> int:
        return sum(1 for m, p, _ in list(self.requests) if (method is None or m == method) and substring in p)

    def _repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id}")
        return repo

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        return (repo_type, repo_id) in self._repos

    def commit_count(self, repo_id: str, repo_type: str = "model", branch: str = "main") -> int:
        """Number of commits on ``branch`` (0 if the repo does not exist; 1 after create_repo)."""
        repo = self._repos.get((repo_type, repo_id))
        return repo.git.commit_count(branch) if repo is not None else 0

    def commits(self, repo_id: str, repo_type: str = "model", branch: str = "main") -> list[dict]:
        """Newest first: ``{"id", "author", "timestamp", "title", "message"}``."""
        return self._repo(repo_id, repo_type).git.log(branch)

    def head(self, repo_id: str, repo_type: str = "model", branch: str = "main") -> str | None:
        return self._repo(repo_id, repo_type).git.resolve(branch)

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, dict]:
        """``{path: {"size", "lfs", "sha256" (LFS only), "blob_id"}}`` of a revision (files only)."""
        repo = self._repo(repo_id, repo_type)
        sha = repo.git.resolve(revision)
        if sha is None:
            raise KeyError(revision)
        return {
            e.path: {"size": e.size, "lfs": e.is_lfs, "sha256": e.lfs_oid, "blob_id": e.oid}
            for e in repo.git.tree(sha).values()
            if e.type == "file"
        }

    def read_file(self, repo_id: str, path: str, repo_type: str = "model", revision: str = "main") -> bytes:
        repo = self._repo(repo_id, repo_type)
        sha = repo.git.resolve(revision)
        entry = repo.git.tree(sha).get(path) if sha else None
        if entry is None or entry.type != "file":
            raise FileNotFoundError(path)
        if entry.is_lfs:
            return repo.git.lfs_path(entry.lfs_oid).read_bytes()
        return repo.git.read_blob(entry.oid)

    def lfs_objects(self, repo_id: str, repo_type: str = "model") -> set[str]:
        return self._repo(repo_id, repo_type).git.lfs_oids()

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False, exist_ok: bool = False) -> Repo:
        """Server-side repo creation (no token needed), with the initial .gitattributes commit."""
        ns, _, name = repo_id.partition("/")
        if not (_NAME_RE.match(ns) and _NAME_RE.match(name)):
            raise ValueError(f"invalid repo id {repo_id!r}")
        with self._lock:
            existing = self._repos.get((repo_type, repo_id))
            if existing is not None:
                if exist_ok:
                    return existing
                raise FileExistsError(repo_id)
            path = self.root / f"{repo_type}s" / ns / f"{name}.git"
            if path.exists():
                shutil.rmtree(path)
            git = GitRepo.init(path)
            blob = git.write_blob(DEFAULT_GITATTRIBUTES.encode())
            git.commit("main", {".gitattributes": blob}, "initial commit", None, author="hub")
            repo = Repo(repo_type, repo_id, private, git, created=git.root_timestamp() or 0)
            self._repos[(repo_type, repo_id)] = repo
            return repo

    def delete_repo(self, repo_id: str, repo_type: str = "model") -> None:
        with self._lock:
            repo = self._repos.pop((repo_type, repo_id))
        shutil.rmtree(repo.git.path, ignore_errors=True)

    def seed_repo(
        self,
        repo_id: str,
        folder: str | os.PathLike,
        private: bool = False,
        repo_type: str = "model",
        message: str = "Upload folder (seed)",
    ) -> str:
        """Create the repo if needed and commit every file under ``folder`` in one commit.

        Files are stored as LFS exactly when an upload through the client would be (see
        ``upload_mode``). Existing files not in ``folder`` are kept. Returns the commit id.
        """
        repo = self.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        folder = Path(folder)
        ops: list[dict] = []
        with repo.git.lock:
            head = repo.git.resolve("main")
            for p in sorted(folder.rglob("*")):
                if not p.is_file() or ".git" in p.relative_to(folder).parts:
                    continue
                rel = p.relative_to(folder).as_posix()
                size = p.stat().st_size
                with open(p, "rb") as f:
                    sample = f.read(512)
                if self.upload_mode(repo, head, rel, size, sample) == "lfs":
                    h = hashlib.sha256()
                    with open(p, "rb") as f:
                        for chunk in iter(lambda: f.read(1 << 20), b""):
                            h.update(chunk)
                    oid = h.hexdigest()
                    if not repo.git.has_lfs(oid, size):
                        tmp = repo.git.tmp_dir() / f"seed-{uuid.uuid4().hex}"
                        shutil.copyfile(p, tmp)
                        repo.git.store_lfs_file(tmp, oid)
                    ops.append({"key": "lfsFile", "value": {"path": rel, "oid": oid, "size": size}})
                else:
                    ops.append({"key": "file", "value": {"path": rel, "data": p.read_bytes()}})
            return self._apply_commit(repo, "main", head, ops, message, author="hub")

    # ------------------------------------------------------------------ core logic
    def authenticate(self, authorization: str | None) -> User | None:
        if not authorization:
            return None
        scheme, _, tok = authorization.partition(" ")
        user = self.tokens.get(tok.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def can_read(self, repo: Repo, user: User | None) -> bool:
        return not repo.private or (user is not None and user.member_of(repo.ns))

    def get_repo_for(self, repo_type: str, repo_id: str, user: User | None, write: bool = False) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or not self.can_read(repo, user):
            status = 401 if user is None else 404
            raise HubError(status, "Repository not found", code="RepoNotFound")
        if write:
            if user is None:
                raise HubError(401, "You must be authenticated to write to this repo")
            if not user.can_write_ns(repo.ns):
                what = "read-only token" if user.member_of(repo.ns) else f"user {user.name}"
                raise HubError(403, f"You don't have the rights to write to {repo_id} ({what})")
        return repo

    def resolve_rev(self, repo: Repo, rev: str) -> str:
        sha = repo.git.resolve(rev)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        return sha

    def upload_mode(self, repo: Repo, head: str | None, path: str, size: int, sample: bytes) -> str:
        if size >= LFS_THRESHOLD or b"\0" in sample:
            return "lfs"
        try:
            sample.decode("utf-8")
        except UnicodeDecodeError:
            # the sample may cut a multi-byte character: only its last 3 bytes may be partial
            try:
                sample[:-3].decode("utf-8")
            except UnicodeDecodeError:
                return "lfs"
        patterns = self._lfs_patterns(repo, head)
        return "lfs" if any(_matches_pattern(path, pat) for pat in patterns) else "regular"

    def _lfs_patterns(self, repo: Repo, head: str | None) -> list[str]:
        if head is None:
            return []
        entry = repo.git.tree(head).get(".gitattributes")
        if entry is None or entry.type != "file" or entry.is_lfs:
            return []
        return _gitattributes_lfs_patterns(repo.git.read_blob(entry.oid).decode("utf-8", "replace"))

    def _apply_commit(
        self, repo: Repo, branch: str, parent: str | None, ops: list[dict], message: str, author: str
    ) -> str:
        """Apply operations in order to ``parent``'s tree and write one commit (lock held by caller)."""
        files: dict[str, str] = {}
        if parent is not None:
            files = {e.path: e.oid for e in repo.git.tree(parent).values() if e.type == "file"}
        for op in ops:
            key, value = op.get("key"), op.get("value") or {}
            if key == "file":
                path = _check_path(value.get("path"))
                if "data" in value:
                    data = value["data"]
                else:
                    enc = value.get("encoding", "base64")
                    content = value.get("content", "")
                    if enc == "base64":
                        try:
                            data = base64.b64decode(content, validate=True)
                        except Exception:
                            raise HubError(400, f"Invalid base64 content for {path}")
                    elif enc in ("utf-8", "utf8"):
                        data = content.encode()
                    else:
                        raise HubError(400, f"Unknown encoding {enc!r}")
                files[path] = repo.git.write_blob(data)
            elif key == "lfsFile":
                path = _check_path(value.get("path"))
                oid = value.get("oid")
                if value.get("algo", "sha256") != "sha256" or not isinstance(oid, str) or not _SHA256_RE.match(oid):
                    raise HubError(400, f"Invalid LFS oid for {path}")
                size = value.get("size")
                if not repo.git.has_lfs(oid):
                    raise HubError(
                        400,
                        f"Your push was rejected because an LFS pointer pointed to a file that does not exist ({path})",
                    )
                actual = repo.git.lfs_path(oid).stat().st_size
                if size is not None and int(size) != actual:
                    raise HubError(400, f"LFS object size mismatch for {path}: {size} != {actual}")
                files[path] = repo.git.write_blob(lfs_pointer(oid, actual))
            elif key == "deletedFile":
                path = _check_path(value.get("path"))
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                folder = str(value.get("path", "")).strip("/")
                prefix = folder + "/" if folder else ""
                doomed = [p for p in files if p.startswith(prefix)]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {folder}", code="EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        paths = set(files)
        for p in paths:
            parts = p.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in paths:
                    raise HubError(400, f"Path conflict: {'/'.join(parts[:i])} is both a file and a folder")
        return repo.git.commit(branch, files, message, parent, author=author)

    # collections ----------------------------------------------------------------
    def _collection_json(self, c: Collection) -> dict:
        return {
            "slug": c.slug,
            "title": c.title,
            "description": c.description,
            "owner": {"name": c.owner, "type": "org" if self._is_org(c.owner) else "user"},
            "items": [dict(item) for item in c.items],
            "lastUpdated": _iso(c.updated),
            "position": c.position,
            "private": c.private,
            "theme": c.theme,
            "upvotes": 0,
            "isUpvotedByUser": False,
            "shareUrl": f"{self.endpoint}/collections/{c.slug}",
        }

    def _is_org(self, ns: str) -> bool:
        return any(ns in u.orgs for u in self.tokens.values())

    def _known_namespace(self, ns: str) -> bool:
        return any(ns == u.name or ns in u.orgs for u in self.tokens.values())


# ====================================================================== HTTP layer
class _Server(ThreadingHTTPServer):
    """Thread per connection; remembers open connections so ``stop()`` can cut keep-alives."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args, **kwargs):
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


_ROUTES: list[tuple[str, re.Pattern, str]] = []


def route(method: str, pattern: str):
    def deco(fn):
        _ROUTES.append((method, re.compile("^" + pattern + "$"), fn.__name__))
        return fn

    return deco


_T = r"(?P<t>models|datasets|spaces)"
_RID = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "testhub/1"
    timeout = 120
    server_hub: HubServer  # set by HubServer.start

    # never log (the default logs request lines to stderr)
    def log_message(self, format, *args):  # noqa: A002
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass

    # -- plumbing --------------------------------------------------------------------
    @property
    def hub(self) -> HubServer:
        return self.server_hub

    def _dispatch(self, method: str) -> None:
        self._status = 0
        self._body_consumed = False
        split = urlsplit(self.path)
        raw_path = split.path
        self.query = {k: v for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        try:
            fault = self.hub._take_fault(method, raw_path)
            self._cut = fault is not None and fault.action == "cut"
            if fault is not None and not self._cut:
                self._inject(fault)
                return
            self.user = self.hub.authenticate(self.headers.get("Authorization"))
            for m, regex, name in _ROUTES:
                if m != method and not (m == "GET" and method == "HEAD"):
                    continue
                match = regex.match(raw_path)
                if match:
                    args = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
                    getattr(self, name)(**args)
                    break
            else:
                raise HubError(404, f"Not found: {method} {raw_path}")
        except HubError as e:
            self._send_error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # a bug in the test server: report it as 500 and keep the traceback
            self.hub.errors.append(traceback.format_exc())
            try:
                self._send_error(HubError(500, "Internal test-hub error"))
            except OSError:
                self.close_connection = True
        finally:
            self.hub.requests.append((method, raw_path, self._status))

    def _inject(self, fault: Fault) -> None:
        if fault.action == "drop":
            length = self.headers.get("Content-Length")
            if length is not None and int(length) > 0:
                self._read_exact(max(1, int(length) // 2))
            elif "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                self.rfile.readline()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.read_body(limit=None, discard=True)
        self.close_connection = True
        self._send_error(HubError(int(fault.action), f"Injected failure ({fault.action})"), close=True)

    def _read_exact(self, n: int) -> bytes:
        chunks = []
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def iter_body(self):
        """Yield the request body in chunks (Content-Length or chunked transfer encoding)."""
        if self._body_consumed:
            return
        self._body_consumed = True
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                line = self.rfile.readline(1024)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if not chunk:
                        raise ConnectionResetError("client went away")
                    remaining -= len(chunk)
                    yield chunk
                self.rfile.readline(16)
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    raise ConnectionResetError("client went away")
                remaining -= len(chunk)
                yield chunk

    def read_body(self, limit: int | None = _MAX_BODY, discard: bool = False) -> bytes:
        out = []
        total = 0
        for chunk in self.iter_body():
            total += len(chunk)
            if limit is not None and total > limit:
                self.close_connection = True
                raise HubError(413, "Request body too large")
            if not discard:
                out.append(chunk)
        return b"".join(out)

    def json_body(self) -> Any:
        body = self.read_body()
        if not body:
            return {}
        try:
            return json.loads(body)
        except ValueError:
            raise HubError(400, "Invalid JSON body")

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str = "application/json", close: bool = False):
        if not self._body_consumed and self.command not in ("GET", "HEAD"):
            # keep the connection usable: the unread body would be taken for the next request
            try:
                self.read_body(limit=None, discard=True)
            except (HubError, OSError):
                close = True
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if close or self.close_connection:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def send_json(self, obj: Any, status: int = 200, headers: dict | None = None):
        headers = dict(headers or {})
        ctype = headers.pop("Content-Type", "application/json")
        self._send(status, _json_bytes(obj), headers, content_type=ctype)

    def _send_error(self, e: HubError, close: bool = False):
        headers = {"X-Error-Message": e.message.replace("\n", " ")[:500]}
        if e.code:
            headers["X-Error-Code"] = e.code
        headers.update(e.headers)
        self._send(e.status, _json_bytes({"error": e.message, **e.extra}), headers, close=close)

    def base_url(self) -> str:
        return self.hub.endpoint

    def require_user(self) -> User:
        if self.user is None:
            raise HubError(401, "You must be authenticated to access this resource")
        return self.user

    def flag(self, name: str) -> bool:
        v = self.query.get(name, [""])[-1].lower()
        return v in ("1", "true", "yes")

    # -- auth --------------------------------------------------------------------------
    @route("GET", r"/api/whoami-v2")
    def whoami(self):
        user = self.require_user()
        self.send_json(
            {
                "type": "user",
                "id": hashlib.sha1(user.name.encode()).hexdigest()[:24],
                "name": user.name,
                "fullname": user.name.title(),
                "email": f"{user.name}@users.localhost",
                "emailVerified": True,
                "isPro": False,
                "canPay": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [
                    {
                        "type": "org",
                        "id": hashlib.sha1(o.encode()).hexdigest()[:24],
                        "name": o,
                        "fullname": o.title(),
                        "email": None,
                        "canPay": False,
                        "periodEnd": None,
                        "avatarUrl": "",
                        "roleInOrg": "write" if user.role == "write" else "read",
                        "isEnterprise": False,
                    }
                    for o in user.orgs
                ],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "test-token", "role": user.role, "createdAt": _iso(0)},
                },
            }
        )

    # -- repos ---------------------------------------------------------------------------
    def _repo_url(self, repo: Repo | None = None, repo_type: str = "model", repo_id: str = "") -> str:
        if repo is not None:
            repo_type, repo_id = repo.repo_type, repo.repo_id
        return f"{self.base_url()}/{URL_PREFIX[repo_type]}{repo_id}"

    @route("POST", r"/api/repos/create")
    def repo_create(self):
        body = self.json_body()
        user = self.require_user()
        repo_type = body.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        name = body.get("name")
        ns = body.get("organization") or user.name
        if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith(".git") or "--" in name:
            raise HubError(400, f"Invalid repo name {name!r}")
        if not user.can_write_ns(ns):
            raise HubError(403, f'You don\'t have the rights to create a {repo_type} under the namespace "{ns}"')
        visibility = body.get("visibility")
        private = visibility == "private" if visibility is not None else bool(body.get("private", False))
        repo_id = f"{ns}/{name}"
        with self.hub._lock:
            existing = self.hub._repos.get((repo_type, repo_id))
            if existing is not None:
                raise HubError(
                    409, f"You already created this {repo_type} repo", extra={"url": self._repo_url(existing)}
                )
            repo = self.hub.create_repo(repo_id, repo_type=repo_type, private=private)
        self.send_json({"url": self._repo_url(repo), "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    @route("DELETE", r"/api/repos/delete")
    def repo_delete(self):
        body = self.json_body()
        user = self.require_user()
        repo_type = body.get("type") or "model"
        ns = body.get("organization") or user.name
        repo_id = f"{ns}/{body.get('name')}"
        self.hub.get_repo_for(repo_type, repo_id, user, write=True)
        self.hub.delete_repo(repo_id, repo_type)
        self.send_json({})

    @route("PUT", rf"/api/{_T}/{_RID}/settings")
    def repo_settings(self, t, ns, name):
        body = self.json_body()
        repo = self.hub.get_repo_for(t[:-1], f"{ns}/{name}", self.user, write=True)
        if "visibility" in body:
            repo.private = body["visibility"] == "private"
        elif "private" in body:
            repo.private = bool(body["private"])
        if "gated" in body:
            repo.gated = body["gated"]
        self.send_json({"private": repo.private, "gated": repo.gated})

    def _repo_info_json(self, repo: Repo, sha: str, blobs: bool) -> dict:
        tree = repo.git.tree(sha)
        siblings = []
        for e in sorted(tree.values(), key=lambda e: e.path):
            if e.type != "file":
                continue
            s: dict = {"rfilename": e.path}
            if blobs:
                s["size"] = e.size
                s["blobId"] = e.oid
                if e.is_lfs:
                    s["lfs"] = {"sha256": e.lfs_oid, "size": e.size, "pointerSize": e.pointer_size}
            siblings.append(s)
        card: dict | None = None
        readme = tree.get("README.md")
        if readme is not None and readme.type == "file" and not readme.is_lfs:
            fm, _ = _split_front_matter(repo.git.read_blob(readme.oid).decode("utf-8", "replace"))
            if fm is not None:
                try:
                    loaded = yaml.safe_load(fm)
                    card = loaded if isinstance(loaded, dict) else None
                except yaml.YAMLError:
                    card = None
        tags = list(card.get("tags") or []) if card and isinstance(card.get("tags"), list) else []
        info: dict = {
            "_id": hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.ns,
            "sha": sha,
            "lastModified": _iso(repo.git.commit_timestamp(sha)),
            "createdAt": _iso(repo.created),
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "siblings": siblings,
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            if card:
                for key in ("library_name", "pipeline_tag"):
                    if isinstance(card.get(key), str):
                        info[key] = card[key]
        if card is not None:
            info["cardData"] = card
        if blobs:
            info["usedStorage"] = sum(e.size for e in tree.values() if e.type == "file")
        return info

    @route("GET", rf"/api/{_T}/{_RID}(?:/revision/(?P<rev>[^/]+))?")
    def repo_info(self, t, ns, name, rev=None):
        repo = self.hub.get_repo_for(t[:-1], f"{ns}/{name}", self.user)
        sha = self.hub.resolve_rev(repo, rev or "main")
        self.send_json(self._repo_info_json(repo, sha, blobs=self.flag("blobs")))

    @route("GET", rf"/api/{_T}/{_RID}/auth-check")
    def auth_check(self, t, ns, name):
        self.hub.get_repo_for(t[:-1], f"{ns}/{name}", self.user)
        self.send_json({})

    @route("GET", rf"/api/{_T}/{_RID}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?")
    def tree(self, t, ns, name, rev, path=None):
        repo = self.hub.get_repo_for(t[:-1], f"{ns}/{name}", self.user)
        sha = self.hub.resolve_rev(repo, rev)
        entries = repo.git.tree(sha)
        folder = (path or "").strip("/")
        if folder and (folder not in entries or entries[folder].type != "directory"):
            raise HubError(404, f"Entry not found: {folder}", code="EntryNotFound", headers={"X-Repo-Commit": sha})
        prefix = folder + "/" if folder else ""
        recursive = self.flag("recursive")
        out = []
        for e in sorted(entries.values(), key=lambda e: e.path):
            if not e.path.startswith(prefix):
                continue
            if not recursive and "/" in e.path[len(prefix):]:
                continue
            out.append(e.api_json())
        self.send_json(out, headers={"X-Repo-Commit": sha})

    @route("POST", rf"/api/{_T}/{_RID}/paths-info/(?P<rev>[^/]+)")
    def paths_info(self, t, ns, name, rev):
        body = self.read_body()
        ctype = self.headers.get("Content-Type") or ""
        if "json" in ctype:
            try:
                paths = json.loads(body or b"{}").get("paths") or []
            except ValueError:
                raise HubError(400, "Invalid JSON body")
        else:
            paths = parse_qs(body.decode(), keep_blank_values=True).get("paths", [])
        repo = self.hub.get_repo_for(t[:-1], f"{ns}/{name}", self.user)
        sha = self.hub.resolve_rev(repo, rev)
        entries = repo.git.tree(sha)
        out = [entries[p.strip("/")].api_json() for p in paths if p.strip("/") in entries]
        self.send_json(out, headers={"X-Repo-Commit": sha})

    @route("GET", rf"/api/{_T}/{_RID}/refs")
    def refs(self, t, ns, name):
        repo = self.hub.get_repo_for(t[:-1], f"{ns}/{name}", self.user)
        out = repo.git.refs()
        if self.flag("include_prs"):
            out["pullRequests"] = []
        self.send_json(out)

    @route("GET", rf"/api/{_T}/{_RID}/commits/(?P<rev>[^/]+)")
    def commits(self, t, ns, name, rev):
        repo = self.hub.get_repo_for(t[:-1], f"{ns}/{name}", self.user)
        self.hub.resolve_rev(repo, rev)
        self.send_json(
            [
                {
                    "id": c["id"],
                    "title": c["title"],
                    "message": c["message"],
                    "authors": [{"user": c["author"], "avatar": None}],
                    "date": _iso(c["timestamp"]),
                }
                for c in repo.git.log(rev)
            ]
        )

    @route("POST", rf"/api/{_T}/{_RID}/branch/(?P<branch>[^/]+)")
    def create_branch(self, t, ns, name, branch):
        body = self.json_body()
        repo = self.hub.get_repo_for(t[:-1], f"{ns}/{name}", self.user, write=True)
        start = self.hub.resolve_rev(repo, body.get("startingPoint") or "main")
        if repo.git.is_branch(branch):
            raise HubError(409, f"Branch {branch} already exists")
        if not _NAME_RE.match(branch):
            raise HubError(400, f"Invalid branch name {branch!r}")
        repo.git.git("update-ref", f"refs/heads/{branch}", start, "0" * 40)
        self.send_json({})

    @route("DELETE", rf"/api/{_T}/{_RID}/branch/(?P<branch>[^/]+)")
    def delete_branch(self, t, ns, name, branch):
        repo = self.hub.get_repo_for(t[:-1], f"{ns}/{name}", self.user, write=True)
        if branch == "main":
            raise HubError(403, "The main branch cannot be deleted")
        if not repo.git.is_branch(branch):
            raise HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
        repo.git.git("update-ref", "-d", f"refs/heads/{branch}")
        self.send_json({})

    @route("POST", rf"/api/{_T}/{_RID}/tag/(?P<rev>[^/]+)")
    def create_tag(self, t, ns, name, rev):
        body = self.json_body()
        repo = self.hub.get_repo_for(t[:-1], f"{ns}/{name}", self.user, write=True)
        sha = self.hub.resolve_rev(repo, rev)
        tag = body.get("tag")
        if not isinstance(tag, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", tag):
            raise HubError(400, f"Invalid tag name {tag!r}")
        if repo.git.resolve(f"refs/tags/{tag}") is not None:
            raise HubError(409, f"Tag {tag} already exists")
        repo.git.git("update-ref", f"refs/tags/{tag}", sha, "0" * 40)
        self.send_json({})

    # -- upload ----------------------------------------------------------------------------
    @route("POST", r"/api/validate-yaml")
    def validate_yaml(self):
        body = self.json_body()
        content = body.get("content") or ""
        fm, _ = _split_front_matter(content)
        if fm is None or not fm.strip():
            self.send_json({"errors": [], "warnings": [{"message": "Empty or missing yaml metadata in repo card"}]})
            return
        errors = []
        try:
            data = yaml.safe_load(fm)
        except yaml.YAMLError as e:
            data = None
            errors.append({"message": f"Invalid YAML: {e}"})
        if data is not None and not isinstance(data, dict):
            errors.append({"message": "Metadata must be a YAML mapping"})
        elif isinstance(data, dict):
            def _strs(v):
                return isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))

            for key in ("tags", "base_model", "license", "language", "datasets"):
                if key in data and data[key] is not None and not _strs(data[key]):
                    errors.append({"message": f'"{key}" must be a string or a list of strings'})
            for key in ("library_name", "pipeline_tag", "license_name", "license_link", "base_model_relation"):
                if key in data and data[key] is not None and not isinstance(data[key], str):
                    errors.append({"message": f'"{key}" must be a string'})
            rel = data.get("base_model_relation")
            if rel is not None and rel not in ("adapter", "merge", "quantized", "finetune"):
                errors.append({"message": '"base_model_relation" must be one of adapter, merge, quantized, finetune'})
        if errors:
            raise HubError(400, "Invalid metadata in README.md", extra={"errors": errors, "warnings": []})
        self.send_json({"errors": [], "warnings": []})

    @route("POST", rf"/api/{_T}/{_RID}/preupload/(?P<rev>[^/]+)")
    def preupload(self, t, ns, name, rev):
        body = self.json_body()
        repo = self.hub.get_repo_for(t[:-1], f"{ns}/{name}", self.user, write=True)
        if self.flag("create_pr"):
            raise HubError(400, "Pull requests are not supported by the test hub")
        head = self.hub.resolve_rev(repo, rev)
        tree = repo.git.tree(head)
        out = []
        for f in body.get("files") or []:
            path = _check_path(f.get("path"))
            try:
                sample = base64.b64decode(f.get("sample") or "")
            except Exception:
                raise HubError(400, f"Invalid sample for {path}")
            mode = self.hub.upload_mode(repo, head, path, int(f.get("size") or 0), sample)
            entry = tree.get(path)
            oid = None
            if entry is not None and entry.type == "file":
                oid = entry.lfs_oid if entry.is_lfs else entry.oid
            out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self.send_json({"files": out, "commitOid": head})

    def _sign(self, *parts: str) -> str:
        return hmac.new(self.hub._secret, "\0".join(parts).encode(), hashlib.sha256).hexdigest()[:40]

    @route("POST", r"/(?:(?P<prefix>datasets|spaces)/)?(?P<ns>[^/]+)/(?P<name>[^/]+)\.git/info/lfs/objects/batch")
    def lfs_batch(self, ns, name, prefix=None):
        body = self.json_body()
        repo_type = {"datasets": "dataset", "spaces": "space"}.get(prefix or "", "model")
        if body.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported by the test hub")
        repo = self.hub.get_repo_for(repo_type, f"{ns}/{name}", self.user, write=True)
        objects = []
        base = f"{self.base_url()}/_lfs/{repo_type}/{repo.repo_id}"
        chunk = self.hub.multipart_chunk_size
        for obj in body.get("objects") or []:
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not _SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                objects.append({"oid": str(oid), "size": int(size or 0), "error": {"code": 422, "message": "Invalid object"}})
                continue
            if repo.git.has_lfs(oid, size):
                objects.append({"oid": oid, "size": size})
                continue
            sig = self._sign(repo_type, repo.repo_id, oid, str(size))
            href = f"{base}/{oid}?size={size}&sig={sig}"
            upload: dict = {"href": href, "expires_at": _iso(time.time() + 3600)}
            if chunk and size > chunk:
                nparts = -(-size // chunk)
                header = {"chunk_size": str(chunk)}
                for i in range(1, nparts + 1):
                    psig = self._sign(repo_type, repo.repo_id, oid, str(size), str(i))
                    header[f"{i:05d}"] = f"{base}/{oid}/part/{i}?size={size}&sig={psig}"
                upload["header"] = header
            objects.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": upload,
                        "verify": {"href": f"{self.base_url()}/{URL_PREFIX[repo_type]}{repo.repo_id}.git/info/lfs/objects/verify", "header": {}},
                    },
                }
            )
        self.send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                       headers={"Content-Type": "application/vnd.git-lfs+json"})

    @route("POST", r"/(?:(?P<prefix>datasets|spaces)/)?(?P<ns>[^/]+)/(?P<name>[^/]+)\.git/info/lfs/objects/verify")
    def lfs_verify(self, ns, name, prefix=None):
        body = self.json_body()
        repo_type = {"datasets": "dataset", "spaces": "space"}.get(prefix or "", "model")
        repo = self.hub.get_repo_for(repo_type, f"{ns}/{name}", self.user, write=True)
        oid, size = body.get("oid"), body.get("size")
        if not isinstance(oid, str) or not _SHA256_RE.match(oid) or not repo.git.has_lfs(oid, size):
            raise HubError(404, f"LFS object {oid} not found")
        self.send_json({})

    def _upload_target(self, t: str, ns: str, name: str, oid: str, *sig_extra: str) -> tuple[Repo, int]:
        repo_id = f"{ns}/{name}"
        size_s = self.query.get("size", [""])[-1]
        sig = self.query.get("sig", [""])[-1]
        if not _SHA256_RE.match(oid) or not size_s.isdigit():
            raise HubError(400, "Malformed upload URL")
        if not hmac.compare_digest(sig, self._sign(t, repo_id, oid, size_s, *sig_extra)):
            raise HubError(403, "Invalid or expired upload signature")
        repo = self.hub._repos.get((t, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return repo, int(size_s)

    def _receive_to(self, dest: Path) -> tuple[str, int]:
        h = hashlib.sha256()
        n = 0
        with open(dest, "wb") as f:
            for chunk in self.iter_body():
                h.update(chunk)
                f.write(chunk)
                n += len(chunk)
        return h.hexdigest(), n

    @route("PUT", r"/_lfs/(?P<t>model|dataset|space)/(?P<ns>[^/]+)/(?P<name>[^/]+)/(?P<oid>[0-9a-f]{64})")
    def lfs_put(self, t, ns, name, oid):
        try:
            repo, size = self._upload_target(t, ns, name, oid)
        except HubError:
            self.close_connection = True
            raise
        tmp = repo.git.tmp_dir() / f"put-{uuid.uuid4().hex}"
        try:
            digest, n = self._receive_to(tmp)
            if n != size:
                raise HubError(400, f"Size mismatch: expected {size} bytes, got {n}")
            if digest != oid:
                raise HubError(400, f"sha256 mismatch: expected {oid}, got {digest}")
            repo.git.store_lfs_file(tmp, oid)
        finally:
            tmp.unlink(missing_ok=True)
        self._send(200, b"", headers={"ETag": f'"{oid}"'})

    @route("PUT", r"/_lfs/(?P<t>model|dataset|space)/(?P<ns>[^/]+)/(?P<name>[^/]+)/(?P<oid>[0-9a-f]{64})/part/(?P<part>[0-9]+)")
    def lfs_put_part(self, t, ns, name, oid, part):
        try:
            repo, _size = self._upload_target(t, ns, name, oid, part)
        except HubError:
            self.close_connection = True
            raise
        parts_dir = repo.git.tmp_dir() / f"multipart-{oid}"
        parts_dir.mkdir(parents=True, exist_ok=True)
        tmp = parts_dir / f".{part}-{uuid.uuid4().hex}"
        digest, _n = self._receive_to(tmp)
        os.replace(tmp, parts_dir / f"{int(part):05d}")
        etag = hashlib.md5(bytes.fromhex(digest)).hexdigest()
        (parts_dir / f"{int(part):05d}.etag").write_text(etag)
        self._send(200, b"", headers={"ETag": f'"{etag}"'})

    @route("POST", r"/_lfs/(?P<t>model|dataset|space)/(?P<ns>[^/]+)/(?P<name>[^/]+)/(?P<oid>[0-9a-f]{64})")
    def lfs_complete(self, t, ns, name, oid):
        body = self.json_body()
        repo, size = self._upload_target(t, ns, name, oid)
        parts_dir = repo.git.tmp_dir() / f"multipart-{oid}"
        parts = sorted(body.get("parts") or [], key=lambda p: p.get("partNumber", 0))
        tmp = repo.git.tmp_dir() / f"assemble-{uuid.uuid4().hex}"
        h = hashlib.sha256()
        n = 0
        try:
            with open(tmp, "wb") as out:
                for p in parts:
                    num = int(p.get("partNumber", 0))
                    part_file = parts_dir / f"{num:05d}"
                    etag_file = parts_dir / f"{num:05d}.etag"
                    if not part_file.exists() or etag_file.read_text() != str(p.get("etag", "")).strip('"'):
                        raise HubError(400, f"Missing or mismatched part {num}")
                    with open(part_file, "rb") as f:
                        for chunk in iter(lambda: f.read(1 << 20), b""):
                            h.update(chunk)
                            out.write(chunk)
                            n += len(chunk)
            if n != size or h.hexdigest() != oid:
                raise HubError(400, "Assembled object does not match its oid/size")
            repo.git.store_lfs_file(tmp, oid)
            shutil.rmtree(parts_dir, ignore_errors=True)
        finally:
            tmp.unlink(missing_ok=True)
        self.send_json({})

    @route("POST", rf"/api/{_T}/{_RID}/commit/(?P<rev>[^/]+)")
    def commit(self, t, ns, name, rev):
        body = self.read_body()
        repo = self.hub.get_repo_for(t[:-1], f"{ns}/{name}", self.user, write=True)
        if self.flag("create_pr"):
            raise HubError(400, "Pull requests are not supported by the test hub")
        lines = [ln for ln in body.split(b"\n") if ln.strip()]
        try:
            items = [json.loads(ln) for ln in lines]
        except ValueError:
            raise HubError(400, "Invalid NDJSON body")
        if not items or items[0].get("key") != "header":
            raise HubError(400, "The first line must be the commit header")
        header = items[0].get("value") or {}
        summary = str(header.get("summary") or "").strip()
        if not summary:
            raise HubError(400, "Commit summary is required")
        description = str(header.get("description") or "").strip()
        message = summary + ("\n\n" + description if description else "")
        with repo.git.lock:
            head = self.hub.resolve_rev(repo, rev)
            if not repo.git.is_branch(rev):
                raise HubError(400, f"Can only commit to a branch, not {rev}")
            parent = header.get("parentCommit")
            if parent and parent != head:
                raise HubError(412, f"Parent commit {parent} is not the head of {rev} ({head})")
            sha = self.hub._apply_commit(repo, rev, head, items[1:], message, author=self.user.name)
        self.send_json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self._repo_url(repo)}/commit/{sha}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    # -- downloads ---------------------------------------------------------------------------
    @route("GET", r"/(?:(?P<prefix>datasets|spaces)/)?(?P<ns>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
    def resolve(self, ns, name, rev, path, prefix=None):
        repo_type = {"datasets": "dataset", "spaces": "space"}.get(prefix or "", "model")
        repo = self.hub.get_repo_for(repo_type, f"{ns}/{name}", self.user)
        sha = self.hub.resolve_rev(repo, rev)
        entry = repo.git.tree(sha).get(path)
        if entry is None or entry.type != "file":
            raise HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if entry.is_lfs:
            lfs_file = repo.git.lfs_path(entry.lfs_oid)
            headers.update(
                {"ETag": f'"{entry.lfs_oid}"', "X-Linked-Etag": f'"{entry.lfs_oid}"', "X-Linked-Size": str(entry.size)}
            )
            opener: Callable[[], Any] = lambda: open(lfs_file, "rb")  # noqa: E731
            total = lfs_file.stat().st_size
        else:
            data = repo.git.read_blob(entry.oid)
            headers["ETag"] = f'"{entry.oid}"'
            total = len(data)
            opener = None
        start, end = 0, total - 1
        status = 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng)
            if not m or (not m.group(1) and not m.group(2)):
                raise HubError(416, "Invalid range", headers={"Content-Range": f"bytes */{total}"})
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), total - 1) if m.group(2) else total - 1
            else:  # suffix range: last N bytes
                start = max(0, total - int(m.group(2)))
            if start >= total or start > end:
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{total}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        length = max(0, end - start + 1)
        ctype = "text/plain; charset=utf-8" if path.endswith((".md", ".txt", ".json", ".yaml", ".yml")) else "application/octet-stream"
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD" or length == 0:
            return
        if getattr(self, "_cut", False):  # half the body, then the connection dies
            with (opener() if opener else io.BytesIO(data)) as f:
                f.seek(start)
                self.wfile.write(f.read(max(1, length // 2)))
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if opener is None:
            self.wfile.write(data[start : end + 1])
            return
        with opener() as f:
            f.seek(start)
            remaining = length
            while remaining:
                chunk = f.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)

    # -- collections -------------------------------------------------------------------------
    def _get_collection(self, ns: str, slug: str, write: bool = False) -> Collection:
        full = f"{ns}/{slug}"
        c = self.hub._collections.get(full)
        if c is None or (c.private and not (self.user is not None and self.user.member_of(c.owner))):
            raise HubError(404, f"Collection {full} not found")
        if write:
            user = self.require_user()
            if not user.can_write_ns(c.owner):
                raise HubError(403, f"You don't have the rights to modify collection {full}")
        return c

    @route("POST", r"/api/collections")
    def collection_create(self):
        body = self.json_body()
        user = self.require_user()
        title = body.get("title")
        ns = body.get("namespace") or user.name
        if not isinstance(title, str) or not title.strip():
            raise HubError(400, "A collection needs a title")
        if not user.can_write_ns(ns):
            raise HubError(403, f'You don\'t have the rights to create a collection under the namespace "{ns}"')
        with self.hub._lock:
            for c in self.hub._collections.values():
                if c.owner == ns and c.title == title:
                    raise HubError(409, "A collection with this title already exists", extra={"slug": c.slug})
            self.hub._collection_counter += 1
            n = self.hub._collection_counter
            words = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "collection"
            cid = hashlib.sha1(f"{ns}/{title}/{n}".encode()).hexdigest()[:24]
            slug = f"{ns}/{words}-{cid}"
            position = sum(1 for c in self.hub._collections.values() if c.owner == ns)
            c = Collection(
                slug=slug,
                title=title,
                owner=ns,
                description=body.get("description"),
                private=bool(body.get("private", False)),
                position=position,
                updated=int(time.time()),
            )
            self.hub._collections[slug] = c
        self.send_json(self.hub._collection_json(c))

    @route("GET", r"/api/collections")
    def collection_list(self):
        owner = self.query.get("owner", [None])[-1]
        item = self.query.get("item", [None])[-1]
        out = []
        for c in list(self.hub._collections.values()):
            if c.private and not (self.user is not None and self.user.member_of(c.owner)):
                continue
            if owner and c.owner != owner:
                continue
            if item and not any(f"{i['type']}s/{i['id']}" == item for i in c.items):
                continue
            listed = self.hub._collection_json(c)
            listed.pop("position")  # the Hub's listing has none: huggingface_hub numbers the listed ones itself
            out.append(listed)
        self.send_json(out)

    @route("GET", r"/api/collections/(?P<ns>[^/]+)/(?P<slug>[^/]+)")
    def collection_get(self, ns, slug):
        self.send_json(self.hub._collection_json(self._get_collection(ns, slug)))

    @route("PATCH", r"/api/collections/(?P<ns>[^/]+)/(?P<slug>[^/]+)")
    def collection_update(self, ns, slug):
        body = self.json_body()
        c = self._get_collection(ns, slug, write=True)
        for key in ("title", "description", "private", "position", "theme"):
            if key in body and body[key] is not None:
                setattr(c, key, body[key])
        c.updated = int(time.time())
        self.send_json({"success": True, "data": self.hub._collection_json(c)})

    @route("DELETE", r"/api/collections/(?P<ns>[^/]+)/(?P<slug>[^/]+)")
    def collection_delete(self, ns, slug):
        self._get_collection(ns, slug, write=True)
        with self.hub._lock:
            self.hub._collections.pop(f"{ns}/{slug}", None)
        self.send_json({})

    @route("POST", r"/api/collections/(?P<ns>[^/]+)/(?P<slug>[^/]+)/items?")
    def collection_add_item(self, ns, slug):
        body = self.json_body()
        c = self._get_collection(ns, slug, write=True)
        item = body.get("item") or {}
        itype, iid = item.get("type"), item.get("id")
        if itype not in ("model", "dataset", "space", "paper", "collection") or not isinstance(iid, str):
            raise HubError(400, "Invalid item")
        if itype in REPO_TYPES:
            repo = self.hub._repos.get((itype, iid))
            if repo is None or not self.hub.can_read(repo, self.user):
                raise HubError(404, f"{itype} {iid} not found")
        with self.hub._lock:
            if any(i["type"] == itype and i["id"] == iid for i in c.items):
                raise HubError(409, "Item already in the collection")
            entry: dict = {
                "_id": hashlib.sha1(f"{c.slug}/{itype}/{iid}/{len(c.items)}".encode()).hexdigest()[:24],
                "id": iid,
                "type": itype,
                "position": len(c.items),
                "author": iid.split("/")[0] if "/" in iid else None,
            }
            note = body.get("note")
            if note:
                entry["note"] = {"html": html.escape(note), "text": note}
            if itype == "model":
                repo = self.hub._repos.get((itype, iid))
                if repo is not None:
                    entry["private"] = repo.private
            c.items.append(entry)
            c.updated = int(time.time())
        self.send_json(self.hub._collection_json(c))

    @route("PATCH", r"/api/collections/(?P<ns>[^/]+)/(?P<slug>[^/]+)/items/(?P<item_id>[^/]+)")
    def collection_update_item(self, ns, slug, item_id):
        body = self.json_body()
        c = self._get_collection(ns, slug, write=True)
        for i in c.items:
            if i["_id"] == item_id:
                if body.get("note") is not None:
                    i["note"] = {"html": html.escape(body["note"]), "text": body["note"]}
                if body.get("position") is not None:
                    i["position"] = int(body["position"])
                self.send_json({"success": True})
                return
        raise HubError(404, "Item not found")

    @route("DELETE", r"/api/collections/(?P<ns>[^/]+)/(?P<slug>[^/]+)/items/(?P<item_id>[^/]+)")
    def collection_delete_item(self, ns, slug, item_id):
        c = self._get_collection(ns, slug, write=True)
        with self.hub._lock:
            before = len(c.items)
            c.items = [i for i in c.items if i["_id"] != item_id]
            if len(c.items) == before:
                raise HubError(404, "Item not found")
            for pos, i in enumerate(c.items):
                i["position"] = pos
        self.send_json({})


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - manual use
    import argparse

    p = argparse.ArgumentParser(description="Run the qconvert test Hub on 127.0.0.1.")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--root", default=None, help="storage folder (default: a temporary one, removed on exit)")
    args = p.parse_args(argv)
    import signal

    def _interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    hub = HubServer(root=args.root, port=args.port).start()
    print(f"endpoint: {hub.endpoint}")
    for tok, u in hub.tokens.items():
        print(f"  {u.role:5s} token for {u.name} (orgs: {', '.join(u.orgs) or '-'}): {tok}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
