"""Atomic output folders: build in a temporary sibling, rename when complete.

A killed run leaves only ``.<name>.qconvert-tmp-<pid>`` siblings, never a half-written
``--out``. Stale temporaries (their process is gone) are removed by the next run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import DiskSpaceError, FileSystemError, OutputExists, mapped_os_errors, opt, os_error
from .identity import SourceIdentity

TMP_MARK = ".qconvert-tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(out: Path) -> list[Path]:
    removed = []
    prefix = f".{out.name}{TMP_MARK}"
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        if p.name.startswith(prefix):
            try:
                pid = int(p.name[len(prefix) :].split("-")[0])
            except ValueError:
                continue
            if not _pid_alive(pid) or pid == os.getpid():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


OUT_FIX = f"choose another {opt('out')}"


def check_output(out: Path, *, overwrite: bool) -> None:
    # a stat can fail too: a parent without permission, a name too long for the filesystem
    with mapped_os_errors(f"checking the output folder {out}", fix=OUT_FIX):
        _check_output(out, overwrite=overwrite)


def _check_output(out: Path, *, overwrite: bool) -> None:
    where = _existing_ancestor(out)
    if not where.is_dir():
        raise FileSystemError(f"{where} is a file, so the output folder {out} cannot be made in it", hint=OUT_FIX)
    _check_name_length(out, where)
    if out.exists() and not out.is_dir():
        raise OutputExists(f"output {out} exists and is not a folder", hint=OUT_FIX)
    if out.exists() and not overwrite:
        raise OutputExists(f"output {out} already exists", hint=f"pass {opt('overwrite', True)} or {OUT_FIX}")
    # --overwrite replaces an earlier qconvert output (or an empty folder), never anything else:
    # a mistyped --out must not delete someone's files
    if out.exists() and not (out / "qconvert.json").is_file() and any(out.iterdir()):
        raise OutputExists(
            f"{opt('overwrite', True)} would delete {out}, which is not a qconvert output (no qconvert.json)",
            hint=f"{OUT_FIX}, or remove that folder yourself",
        )


def _existing_ancestor(path: Path) -> Path:
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    return parent


def _check_name_length(out: Path, where: Path) -> None:
    """The output is built in ``.<name>.qconvert-tmp-<pid>-old``: a name the filesystem takes
    can still be too long for that sibling, and the rename would fail only after converting."""
    try:
        limit = os.pathconf(where, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    new_parts = out.absolute().relative_to(where.absolute()).parts[:-1]  # folders still to create
    tmp_name = f".{out.name}{TMP_MARK}{os.getpid()}-old"
    if max(len(n.encode()) for n in (*new_parts, tmp_name)) > limit:
        raise FileSystemError(
            f"a name in the output path {out} is too long: the filesystem allows {limit} bytes per name, "
            f"and the output's temporary sibling adds {len(tmp_name) - len(out.name)} characters to its name",
            hint=f"choose a shorter {opt('out')}",
        )


def check_disk_space(out: Path, needed: int, *, margin: float = 1.1) -> None:
    with mapped_os_errors(f"checking the free space for {out}", fix=OUT_FIX):
        parent = _existing_ancestor(out)
        free = shutil.disk_usage(parent).free
    if needed * margin > free:
        from .plan import human_bytes

        raise DiskSpaceError(
            f"not enough free disk for the output: {human_bytes(needed * margin)} needed, "
            f"{human_bytes(free)} free under {parent}",
            hint=f"free space or {OUT_FIX}",
        )


def _disk_filled(out: Path, needed: int | None) -> DiskSpaceError:
    """The disk filled up while writing: the preflight check passed, but the disk is shared or
    the files took more than their tensor data (headers, filesystem blocks). Name the folder,
    what is free there now and what the output needs."""
    from .plan import human_bytes

    parent = _existing_ancestor(out)
    try:
        free = f"the {human_bytes(shutil.disk_usage(parent).free)} free there"
    except OSError:
        free = "the space free there"
    size = f" (its tensor data alone: {human_bytes(needed)})" if needed else ""
    return DiskSpaceError(
        f"the disk under {parent} filled up while writing {out}: the output needs more than {free}{size}; "
        "nothing was left behind",
        hint=f"free space or {OUT_FIX}",
    )


def _make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, outermost first."""
    created = []
    p = folder
    while not p.exists():
        created.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return created[::-1]


def _remove_if_empty(folders: list[Path]) -> None:
    """Undo :func:`_make_parents` on failure: a failed or interrupted command leaves no empty
    ``out/`` behind. Only folders it created, innermost first, and only while they are empty
    (another run may have put its output there meanwhile)."""
    for p in reversed(folders):
        try:
            p.rmdir()
        except OSError:
            return


def _is_output_error(e: OSError, tmp: Path) -> bool:
    """Whether an OSError raised while building the output came from writing it (not from
    reading the source). A bare write() names no file; a copy names both ends."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    names = [n for n in (e.filename, e.filename2) if n is not None]
    return not names or any(str(n).startswith(str(tmp)) for n in names)


@contextmanager
def atomic_folder(out: Path, *, overwrite: bool, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success it replaces ``out`` atomically.

    On any failure (an error, Ctrl-C) the temporary and the parent folders this call created
    are removed; an OSError the user can fix (a full disk, permissions, a read-only mount)
    becomes a one-line error naming ``out``. ``needed``: the planned size, for that message.
    """
    out = Path(out).absolute()
    check_output(out, overwrite=overwrite)
    created: list[Path] = []
    tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}"
    failure: OSError | None = None
    try:
        with mapped_os_errors(f"creating the output folder {out}", fix=OUT_FIX):
            created = _make_parents(out.parent)
            clean_stale_temporaries(out)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        try:
            yield tmp
            replace_folder(out, tmp)
        except OSError as e:
            if not _is_output_error(e, tmp):
                raise
            failure = e  # reported after the clean-up: its message says what is free then
    except BaseException:
        _clean_up(tmp, created)
        raise
    if failure is not None:
        _clean_up(tmp, created)
        raise _write_error(failure, out, needed) from None


def _clean_up(tmp: Path, created: list[Path]) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    _remove_if_empty(created)


def _write_error(e: OSError, out: Path, needed: int | None) -> Exception:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return _disk_filled(out, needed)
    return os_error(e, f"writing the output {out}", fix=OUT_FIX) or e


def replace_folder(out: Path, tmp: Path) -> None:
    """Put the finished folder ``tmp`` in place of ``out`` (the old one moved aside, then removed)."""
    if out.exists():
        old = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-old"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while data := fh.read(chunk):
            h.update(data)
    return h.hexdigest()


def copy_file(src: Path, dst: Path) -> None:
    """Copy content only (follows Hub-cache symlinks; no metadata, for determinism)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def copy_tree(src: Path, dst: Path) -> list[Path]:
    files = []
    for p in sorted(src.rglob("*")):
        if ".cache" in p.relative_to(src).parts or not p.is_file():
            continue
        target = dst / p.relative_to(src)
        copy_file(p, target)
        files.append(target)
    return files


# Shards uploaded as they were finished (a staging push) are not in the folder: their sha256
# and size, by file name, in this hidden file of their component folder (read by the manifest
# and by push, which commits them without uploading them again).
UPLOADED_NAME = ".qconvert-uploaded.json"


def record_uploaded(folder: Path, uploaded: dict[str, tuple[str, int]]) -> None:
    if uploaded:
        data = {name: {"sha256": sha, "size": size} for name, (sha, size) in sorted(uploaded.items())}
        write_json(folder / UPLOADED_NAME, data)


def uploaded_entry(path: Path) -> dict[str, Any] | None:
    """``{"sha256", "size"}`` of a file uploaded instead of kept, None for any other file."""
    record = path.parent / UPLOADED_NAME
    if path.exists() or not record.is_file():
        return None
    entry = json.loads(record.read_text()).get(path.name)
    return dict(entry) if isinstance(entry, dict) else None


# sha256 of files hashed as they were written (GGUF: every byte goes through the writer in file
# order), so the manifest need not read them back: at full size the page cache no longer holds
# the output once the source has streamed through it, and reading it back was a second read
# from disk (17.8 GB for Q8_0). path -> (size, mtime_ns, sha256); used once, and only while the
# file's size and mtime are those it had when it was closed.
_HASHED: dict[Path, tuple[int, int, str]] = {}


def note_hashed(path: Path, sha256: str) -> None:
    """Record the sha256 of a file just written and closed (see :func:`file_entry`)."""
    st = path.stat()
    _HASHED[path.absolute()] = (st.st_size, st.st_mtime_ns, sha256)


def _hashed(path: Path, st: os.stat_result) -> str | None:
    record = _HASHED.pop(path.absolute(), None)
    return record[2] if record is not None and record[:2] == (st.st_size, st.st_mtime_ns) else None


def file_entry(path: Path) -> dict[str, Any]:
    """A file's ``{"size", "sha256"}`` as the manifest lists it (an uploaded shard's as recorded,
    a file hashed while it was written as :func:`note_hashed` recorded it)."""
    uploaded = uploaded_entry(path)
    if uploaded:
        return uploaded
    st = path.stat()
    return {"size": st.st_size, "sha256": _hashed(path, st) or sha256_of(path)}


def file_entries(paths: list[Path]) -> dict[Path, dict[str, Any]]:
    """:func:`file_entry` of each path, the files hashed side by side (hashlib releases the GIL:
    a 12B model's 11-18 GB of output hashes in half the time on two cores)."""
    from concurrent.futures import ThreadPoolExecutor

    unique = sorted(set(paths))
    if len(unique) < 2:
        return {p: file_entry(p) for p in unique}
    with ThreadPoolExecutor(max_workers=min(len(unique), os.cpu_count() or 1)) as pool:
        return dict(zip(unique, pool.map(file_entry, unique)))


def json_bytes(data: Any) -> bytes:
    """The one JSON layout of qconvert's files (sorted keys: deterministic; strict: no NaN)."""
    return (json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def write_json(path: Path, data: Any) -> None:
    path.write_bytes(json_bytes(data))


def _public_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """A recorded source identity as published: without local directories (a path keeps only
    its last part, :meth:`qconvert.identity.SourceIdentity.public`).

    The local ``qconvert.json`` records where a local source lives (``qconvert validate`` finds
    it again); what is published (GGUF metadata, the files pushed to the Hub) must not reveal
    the user's directory layout.
    """
    return SourceIdentity.from_dict(identity).public().to_dict()


PUBLIC_FILES = ("qconvert.json", "validation.json")  # published with local paths reduced to names


def public_file(name: str, data: bytes) -> bytes:
    """``qconvert.json`` / ``validation.json`` as published: source paths reduced to names."""
    if name not in PUBLIC_FILES:
        return data
    try:
        doc = json.loads(data)
    except ValueError:
        return data
    if name == "qconvert.json" and isinstance(doc.get("source"), dict):
        doc["source"] = _public_identity(doc["source"])
    elif name == "validation.json" and isinstance((doc.get("settings") or {}).get("reference"), dict):
        doc["settings"]["reference"] = _public_identity(doc["settings"]["reference"])
    return json_bytes(doc)


def copy_license_files(src_root: Path, dst: Path) -> list[Path]:
    """Copy the source's LICENSE* files (the card links them)."""
    out = []
    for p in sorted(src_root.glob("LICENSE*")):
        if p.is_file():
            copy_file(p, dst / p.name)
            out.append(dst / p.name)
    return out
