"""Atomic output folders: build in a temporary sibling, rename when complete.

A killed run leaves only ``.<name>.qconvert-tmp-<pid>`` siblings, never a half-written
``--out``. Stale temporaries (their process is gone) are removed by the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import DiskSpaceError, InputError, OutputExists

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


def check_output(out: Path, *, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExists(f"output {out} exists and is not a folder", hint="choose another --out")
    if out.exists() and not overwrite:
        raise OutputExists(f"output {out} already exists", hint="pass --overwrite or choose another --out")
    # --overwrite replaces an earlier qconvert output (or an empty folder), never anything else:
    # a mistyped --out must not delete someone's files
    if out.exists() and not (out / "qconvert.json").is_file() and any(out.iterdir()):
        raise OutputExists(
            f"--overwrite would delete {out}, which is not a qconvert output (no qconvert.json)",
            hint="choose another --out, or remove that folder yourself",
        )


def check_disk_space(out: Path, needed: int, *, margin: float = 1.1) -> None:
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if needed * margin > free:
        from .plan import human_bytes

        raise DiskSpaceError(
            f"not enough free disk for the output: {human_bytes(needed * margin)} needed, "
            f"{human_bytes(free)} free under {parent}",
            hint="free space or choose another --out",
        )


@contextmanager
def atomic_folder(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success it replaces ``out`` atomically."""
    out = Path(out).absolute()
    check_output(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out)
    tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def json_bytes(data: Any) -> bytes:
    """The one JSON layout of qconvert's files (sorted keys: deterministic; strict: no NaN)."""
    return (json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def write_json(path: Path, data: Any) -> None:
    path.write_bytes(json_bytes(data))


def public_identity(identity: Any) -> Any:
    """A source identity without local directories: a ``path`` keeps only its last part.

    The local ``qconvert.json`` records where a local source lives (``qconvert validate`` finds
    it again); what is published (GGUF metadata, the files pushed to the Hub) must not reveal
    the user's directory layout.
    """
    if not isinstance(identity, dict):
        return identity
    return {
        k: public_identity(v) if isinstance(v, dict) else Path(str(v)).name if k == "path" else v
        for k, v in identity.items()
    }


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
        doc["source"] = public_identity(doc["source"])
    elif name == "validation.json" and isinstance((doc.get("settings") or {}).get("reference"), dict):
        doc["settings"]["reference"] = public_identity(doc["settings"]["reference"])
    return json_bytes(doc)


def read_manifest(out: Path) -> dict[str, Any]:
    from .convert import MANIFEST_NAME

    out = Path(out)
    if not out.is_dir():
        raise InputError(f"{out} is not a folder", hint="pass the --out folder of a qconvert conversion")
    path = out / MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"{out} has no {MANIFEST_NAME}: not a qconvert output", hint="convert with `qconvert flux` first")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise InputError(f"{path} is not readable JSON", hint="convert again") from None
    if not isinstance(data, dict) or not {"backend", "scheme", "source", "components"} <= set(data):
        raise InputError(f"{path} is not a qconvert manifest", hint="convert again")
    return data
