"""Git storage for the test Hub: one bare git repository per Hub repo, LFS objects beside it.

Every Hub commit is exactly one git commit on the branch it targets. Regular files are git
blobs; LFS files are committed as standard git-lfs pointer files (``version
https://git-lfs.github.com/spec/v1`` / ``oid sha256:...`` / ``size N``) whose content lives in
``<repo>.git/lfs/objects/<oid[0:2]>/<oid[2:4]>/<oid>`` (the layout git-lfs itself uses), so a
repository can be inspected, cloned or served by any git tool.

Blobs are written as loose objects from Python (no subprocess per file); trees, commits and
refs go through the ``git`` CLI with a scrubbed environment (no system/global config), a
throw-away index file, ``-c user.name=hub -c user.email=hub@localhost`` and deterministic
dates (2024-01-01T00:00:00Z plus one second per commit already in the repo), so the same
sequence of operations always yields the same commit ids.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
import threading
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

EPOCH = 1704067200  # 2024-01-01T00:00:00Z: commit N of a repo is dated EPOCH + N seconds
ZERO_OID = "0" * 40
LFS_POINTER_RE = re.compile(
    rb"^version https://git-lfs\.github\.com/spec/v1\noid sha256:([0-9a-f]{64})\nsize ([0-9]+)\n$"
)
_SAFE_REV_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._/-]*$")
_HEX40_RE = re.compile(r"^[0-9a-f]{40}$")

_GIT_ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "LC_ALL": "C",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_TERMINAL_PROMPT": "0",
    "HOME": tempfile.gettempdir(),
}
_GIT_IDENTITY = ["-c", "user.name=hub", "-c", "user.email=hub@localhost"]


class GitError(RuntimeError):
    pass


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob holding ``data`` (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class TreeEntry:
    """One path of a commit: a file (``type == "file"``) or a folder (``"directory"``)."""

    path: str
    type: str
    oid: str  # git blob id (for LFS files: the id of the pointer blob) or git tree id
    size: int  # file size (for LFS files: the size of the real content); 0 for folders
    lfs_oid: str | None = None  # sha256 of the content for LFS files
    pointer_size: int | None = None

    @property
    def is_lfs(self) -> bool:
        return self.lfs_oid is not None

    def api_json(self) -> dict:
        """The entry as ``/tree`` and ``/paths-info`` return it."""
        out: dict = {"type": self.type, "oid": self.oid, "size": self.size, "path": self.path}
        if self.is_lfs:
            out["lfs"] = {"oid": self.lfs_oid, "size": self.size, "pointerSize": self.pointer_size}
        return out


class GitRepo:
    """A bare git repository plus its LFS object store."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lfs_dir = self.path / "lfs" / "objects"
        self.lock = threading.RLock()  # serialises commits and ref updates
        self._trees: dict[str, dict[str, TreeEntry]] = {}  # commit id -> tree (immutable)

    # -- setup -----------------------------------------------------------------------
    @classmethod
    def init(cls, path: str | os.PathLike) -> "GitRepo":
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _run(["git", "init", "-q", "--bare", "-b", "main", str(path)])
        repo = cls(path)
        repo.lfs_dir.mkdir(parents=True, exist_ok=True)
        return repo

    def git(self, *args: str, input: bytes | None = None, env: dict | None = None) -> bytes:
        return _run(["git", *_GIT_IDENTITY, "--git-dir", str(self.path), *args], input=input, env=env)

    # -- refs ------------------------------------------------------------------------
    def resolve(self, rev: str) -> str | None:
        """Commit id for a branch, tag or full commit id; None if unknown."""
        if not rev or not _SAFE_REV_RE.match(rev) or ".." in rev:
            return None
        candidates = [rev] if _HEX40_RE.match(rev) else []
        if rev.startswith("refs/"):
            candidates.append(rev)
        else:
            candidates += [f"refs/heads/{rev}", f"refs/tags/{rev}"]
        for cand in candidates:
            try:
                out = self.git("rev-parse", "--verify", "--quiet", f"{cand}^{{commit}}")
            except GitError:
                continue
            sha = out.decode().strip()
            if _HEX40_RE.match(sha):
                return sha
        return None

    def is_branch(self, name: str) -> bool:
        return self.resolve(f"refs/heads/{name}") is not None

    def refs(self) -> dict[str, list[dict]]:
        out = self.git("for-each-ref", "--format=%(refname)%00%(objectname)").decode()
        result: dict[str, list[dict]] = {"branches": [], "converts": [], "tags": []}
        for line in out.splitlines():
            ref, sha = line.split("\0")
            for prefix, group in (("refs/heads/", "branches"), ("refs/tags/", "tags"), ("refs/convert/", "converts")):
                if ref.startswith(prefix):
                    result[group].append({"name": ref[len(prefix):], "ref": ref, "targetCommit": sha})
        return result

    def commit_count(self, rev: str = "main") -> int:
        sha = self.resolve(rev)
        if sha is None:
            return 0
        return int(self.git("rev-list", "--count", sha).decode().strip())

    def log(self, rev: str = "main", limit: int | None = None) -> list[dict]:
        sha = self.resolve(rev)
        if sha is None:
            return []
        args = ["log", "--format=%H%x00%an%x00%ct%x00%B%x1e"]
        if limit:
            args.append(f"-{int(limit)}")
        out = self.git(*args, sha).decode()
        commits = []
        for rec in out.split("\x1e"):
            rec = rec.strip("\n")
            if not rec:
                continue
            sha_, author, ts, body = rec.split("\0", 3)
            title, _, message = body.strip("\n").partition("\n")
            commits.append(
                {"id": sha_, "author": author, "timestamp": int(ts), "title": title, "message": message.strip("\n")}
            )
        return commits

    def commit_timestamp(self, sha: str) -> int:
        return int(self.git("show", "-s", "--format=%ct", sha).decode().strip())

    def root_timestamp(self) -> int | None:
        try:
            out = self.git("rev-list", "--max-parents=0", "--format=%ct", "--all").decode().split()
        except GitError:
            return None
        stamps = [int(x) for x in out if x.isdigit()]
        return min(stamps) if stamps else None

    # -- objects ---------------------------------------------------------------------
    def write_blob(self, data: bytes) -> str:
        """Store ``data`` as a loose git blob (like ``git hash-object -w``) and return its id."""
        header = b"blob %d\0" % len(data)
        oid = hashlib.sha1(header + data).hexdigest()
        target = self.path / "objects" / oid[:2] / oid[2:]
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".tmp-{uuid.uuid4().hex}"
            tmp.write_bytes(zlib.compress(header + data, 1))
            os.replace(tmp, target)
        return oid

    def read_blob(self, oid: str) -> bytes:
        return self.git("cat-file", "blob", oid)

    def lfs_path(self, oid: str) -> Path:
        return self.lfs_dir / oid[:2] / oid[2:4] / oid

    def has_lfs(self, oid: str, size: int | None = None) -> bool:
        p = self.lfs_path(oid)
        try:
            st = p.stat()
        except (FileNotFoundError, ValueError):
            return False
        return size is None or st.st_size == size

    def lfs_oids(self) -> set[str]:
        if not self.lfs_dir.exists():
            return set()
        return {p.name for p in self.lfs_dir.glob("*/*/*") if len(p.name) == 64}

    def store_lfs_file(self, src: Path, oid: str) -> None:
        """Move a verified upload into the LFS store (atomic; keeps an existing copy)."""
        dest = self.lfs_path(oid)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            src.unlink(missing_ok=True)
            return
        os.replace(src, dest)

    def tmp_dir(self) -> Path:
        d = self.path / "lfs" / "incomplete"
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- trees -----------------------------------------------------------------------
    def tree(self, commit: str) -> dict[str, TreeEntry]:
        """All files and folders of a commit, keyed by path (cached: commits are immutable)."""
        cached = self._trees.get(commit)
        if cached is not None:
            return cached
        raw = self.git("ls-tree", "-r", "-t", "-l", "-z", commit)
        items: list[tuple[str, str, str, str]] = []
        small_blobs: list[str] = []
        for rec in raw.split(b"\0"):
            if not rec:
                continue
            meta, _, path = rec.partition(b"\t")
            _mode, otype, oid, size = meta.decode().split()
            items.append((path.decode(), otype, oid, size))
            if otype == "blob" and int(size) < 200:
                small_blobs.append(oid)
        pointers = self._read_pointers(small_blobs)
        entries: dict[str, TreeEntry] = {}
        for path, otype, oid, size in items:
            if otype == "tree":
                entries[path] = TreeEntry(path=path, type="directory", oid=oid, size=0)
            elif otype == "blob":
                ptr = pointers.get(oid)
                if ptr is not None:
                    entries[path] = TreeEntry(
                        path=path, type="file", oid=oid, size=ptr[1], lfs_oid=ptr[0], pointer_size=int(size)
                    )
                else:
                    entries[path] = TreeEntry(path=path, type="file", oid=oid, size=int(size))
        self._trees[commit] = entries
        return entries

    def _read_pointers(self, oids: list[str]) -> dict[str, tuple[str, int]]:
        if not oids:
            return {}
        out = self.git("cat-file", "--batch", input=("\n".join(oids) + "\n").encode())
        result: dict[str, tuple[str, int]] = {}
        pos = 0
        while pos < len(out):
            nl = out.index(b"\n", pos)
            header = out[pos:nl].decode().split()
            pos = nl + 1
            if len(header) < 3 or header[1] == "missing":
                continue
            size = int(header[2])
            content = out[pos : pos + size]
            pos += size + 1
            m = LFS_POINTER_RE.match(content)
            if m:
                result[header[0]] = (m.group(1).decode(), int(m.group(2)))
        return result

    # -- commits ---------------------------------------------------------------------
    def commit(
        self,
        branch: str,
        files: dict[str, str],
        message: str,
        parent: str | None,
        author: str = "hub",
    ) -> str:
        """Write ``files`` ({path: blob id}, the complete new tree) as one commit on ``branch``.

        ``parent`` must be the branch's current head (None for the first commit); the ref is
        updated with compare-and-swap so a concurrent writer cannot be silently overwritten.
        """
        with self.lock:
            n = self.commit_count(parent) if parent else 0
            index = self.path / f"index-{uuid.uuid4().hex}"
            env = {"GIT_INDEX_FILE": str(index)}
            try:
                self.git("read-tree", "--empty", env=env)
                if files:
                    lines = b"".join(
                        f"100644 {oid}\t{path}".encode() + b"\0" for path, oid in sorted(files.items())
                    )
                    self.git("update-index", "-z", "--index-info", input=lines, env=env)
                tree = self.git("write-tree", env=env).decode().strip()
            finally:
                index.unlink(missing_ok=True)
            date = f"{EPOCH + n} +0000"
            cenv = {
                "GIT_AUTHOR_NAME": author,
                "GIT_AUTHOR_EMAIL": f"{author}@users.localhost",
                "GIT_AUTHOR_DATE": date,
                "GIT_COMMITTER_DATE": date,
            }
            args = ["commit-tree", tree]
            if parent:
                args += ["-p", parent]
            sha = self.git(*args, input=message.encode(), env=cenv).decode().strip()
            self.git("update-ref", f"refs/heads/{branch}", sha, parent or ZERO_OID)
            return sha


def _run(cmd: list[str], input: bytes | None = None, env: dict | None = None) -> bytes:
    full_env = dict(_GIT_ENV)
    if env:
        full_env.update(env)
    proc = subprocess.run(cmd, input=input, capture_output=True, env=full_env)
    if proc.returncode != 0:
        raise GitError(f"{' '.join(cmd[:6])}...: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout
