"""Sources: where the Flux weights come from, behind one interface.

Four kinds, all resolved to a :class:`Source` whose components hold *lazy* tensors:

* a built-in pipeline (``tiny-flux``, ``slim-flux``), built locally on first use;
* a local diffusers pipeline folder (``model_index.json`` with ``FluxPipeline``);
* a Hub repo id (``org/name`` + ``--revision``), downloaded with ``snapshot_download``
  (only the files a pipeline folder needs; the single-file BFL checkpoint that FLUX.1-dev
  also ships is skipped);
* a single Black Forest Labs transformer ``.safetensors`` file plus ``--base``, the pipeline
  that supplies every other component and the transformer config.

Tensors are read with safetensors ``safe_open`` (mmap): nothing is loaded until a converter
asks for one tensor, and only the rows a recipe needs are read (``get_slice``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from .families import Family, all_families, flux, for_pipeline_class, for_single_file
from .output import sha256_of
from .errors import (
    CorruptCheckpoint,
    GatedRepo,
    InputError,
    NotAFluxModel,
    SourceNotFound,
    UsageError,
    mapped_os_errors,
    opt,
    os_error,
    transport_errors,
)
from .identity import BuiltinSource, HubSource, LocalSource, PipelineIdentity, SingleFileSource, SourceIdentity

# safetensors dtype name -> bytes per element
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
FLOAT_DTYPES = {"F32", "F16", "BF16"}
_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
_MAX_HEADER = 100 * 1024 * 1024


# --- safetensors headers -------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderEntry:
    dtype: str
    shape: tuple[int, ...]


SOURCE_FIX = f"make the source readable, or pass another {opt('source')}"


def read_safetensors_header(path: Path) -> tuple[dict[str, HeaderEntry], dict[str, str]]:
    """Parse and check a safetensors header without reading tensor data.

    Raises :class:`CorruptCheckpoint` for a file that is truncated, not safetensors, or
    whose offsets do not match its dtypes and shapes.
    """
    if not isinstance(path, Path) and hasattr(path, "commit"):  # a RemoteFile: range requests
        return _read_remote_header(path)
    path = Path(path)
    # a source the user cannot read (permissions, a dying disk) is theirs to fix, not a bug
    with mapped_os_errors(f"reading the source file {path}", fix=SOURCE_FIX):
        return _read_safetensors_header(path)


def _read_safetensors_header(path: Path) -> tuple[dict[str, HeaderEntry], dict[str, str]]:
    size = path.stat().st_size
    # component files read as "transformer/diffusion_pytorch_model.safetensors"; a file given
    # on its own as the path the user typed
    label = f"{path.parent.name}/{path.name}" if path.parent.name in flux.PIPELINE_COMPONENTS else str(path)
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CorruptCheckpoint(f"{label} is not a safetensors file (too short)", hint="re-download or re-export it")
        (n,) = struct.unpack("<Q", raw)
        if n <= 1 or n > _MAX_HEADER:
            raise CorruptCheckpoint(
                f"{label} is not a valid safetensors file (bad header length)",
                hint="re-download or re-export it",
            )
        if 8 + n > size:
            raise CorruptCheckpoint(f"{label} is truncated (its header is incomplete)", hint="re-download or re-export it")
        raw_header = fh.read(n)
    return _check_header(label, raw_header, size - 8 - n)


def _read_remote_header(rf: Any) -> tuple[dict[str, HeaderEntry], dict[str, str]]:
    from .remote import header_bytes

    with _hub_errors(rf.repo_id, rf.commit):
        raw, base = header_bytes(rf)
    return _check_header(str(rf), raw, rf.size - base)


def _check_header(label: str, raw_header: bytes, data_len: int) -> tuple[dict[str, HeaderEntry], dict[str, str]]:
    """The parsed header of a file with ``data_len`` bytes after it, checked against them."""
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptCheckpoint(f"{label} has a corrupt safetensors header", hint="re-download or re-export it") from None
    if not isinstance(header, dict):
        raise CorruptCheckpoint(f"{label} has a corrupt safetensors header", hint="re-download or re-export it")
    metadata = header.pop("__metadata__", None) or {}
    entries: dict[str, HeaderEntry] = {}
    end_max = 0
    for key, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpoint(f"{label}: malformed header entry for {key}", hint="re-download or re-export it") from None
        ints = (start, end, *shape)
        if not all(type(v) is int and v >= 0 for v in ints) or end < start:
            raise CorruptCheckpoint(f"{label}: malformed offsets or shape for {key}", hint="re-download or re-export it")
        if dtype not in DTYPE_SIZES:
            raise CorruptCheckpoint(f"{label}: tensor {key} has unsupported dtype {dtype}", hint="convert from a float (BF16/F16/F32) checkpoint")
        numel = 1
        for d in shape:
            numel *= d
        if end - start != numel * DTYPE_SIZES[dtype]:
            raise CorruptCheckpoint(f"{label}: tensor {key} size does not match its shape", hint="re-download or re-export it")
        end_max = max(end_max, end)
        entries[key] = HeaderEntry(dtype, shape)
    if end_max > data_len:
        raise CorruptCheckpoint(
            f"{label} is truncated ({data_len} of {end_max} data bytes present)",
            hint="re-download or re-export it",
        )
    return entries, metadata


# --- lazy tensors ------------------------------------------------------------------------


@dataclass(frozen=True)
class FileSegment:
    """Rows ``start:stop`` of tensor ``key`` in safetensors file ``path`` (local, or a
    :class:`~qconvert.remote.RemoteFile` read with range requests)."""

    path: Any
    key: str
    start: int | None = None
    stop: int | None = None


@dataclass(frozen=True)
class SourceTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    segments: tuple[FileSegment, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


class TensorReader:
    """Keeps one ``safe_open`` handle per file and assembles tensors from segments."""

    def __init__(self) -> None:
        import threading

        self._handles: dict[Any, Any] = {}
        self._scale_keys: dict[Path, dict[str, str]] = {}
        self._lock = threading.Lock()  # one remote handle (one sha256 in progress) per file

    def _handle(self, path: Any) -> Any:
        h = self._handles.get(path)
        if h is None:
            with self._lock:
                h = self._handles.get(path)
                if h is None:
                    h = self._handles[path] = _open(path)
        return h

    def verify(self) -> None:
        """Check every streamed file read so far against the Hub's sha256 (at the end of a
        conversion: bytes never read in order are fetched once here)."""
        for path, h in list(self._handles.items()):
            if hasattr(h, "finish"):
                with _hub_errors(path.repo_id, path.commit):
                    h.finish()

    def _scales(self, path: Path) -> dict[str, str]:
        """weight key -> its ComfyUI ``scale_weight`` key, for a scaled-fp8 file (else {})."""
        found = self._scale_keys.get(path)
        if found is None:
            keys = list(self._handle(path).keys())
            marked = any(k.endswith("scaled_fp8") for k in keys)
            found = {k[: -len(".scale_weight")] + ".weight": k for k in keys if marked and k.endswith(".scale_weight")}
            self._scale_keys[path] = found
        return found

    def _decode(self, seg: FileSegment, t: Any, dtype: str) -> Any:
        """A stored float8 (or ComfyUI-scaled) tensor upcast to the dtype it is presented as
        (see :func:`qconvert.singlefile.upcast`); anything else as it is stored."""
        import torch

        from .singlefile import upcast

        scale_key = self._scales(seg.path).get(seg.key)
        if scale_key is None and t.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            return t
        scale = self._handle(seg.path).get_tensor(scale_key) if scale_key else None
        return upcast(t, scale, getattr(torch, _TORCH_DTYPES[dtype]))

    def load(self, tensor: SourceTensor, rows: tuple[int, int] | None = None) -> Any:
        """Read a tensor, or only its rows ``rows[0]:rows[1]`` (dim 0), from the mmapped files
        (float8 weights upcast: the backends never see float8)."""
        import torch

        want_lo, want_hi = rows if rows is not None else (0, tensor.shape[0] if tensor.shape else 0)
        parts = []
        offset = 0  # first row of the current segment within the output tensor
        for seg in tensor.segments:
            h = self._handle(seg.path)
            sl = h.get_slice(seg.key)
            full_rows = sl.get_shape()[0] if sl.get_shape() else 0
            lo = seg.start or 0
            hi = full_rows if seg.stop is None else seg.stop
            n = hi - lo
            a, b = max(want_lo, offset), min(want_hi, offset + n)
            if rows is None and len(tensor.segments) == 1 and seg.start is None and seg.stop is None:
                parts.append(self._decode(seg, h.get_tensor(seg.key), tensor.dtype))
            elif a < b:
                parts.append(self._decode(seg, sl[lo + a - offset : lo + b - offset], tensor.dtype))
            offset += n
        if not tensor.shape:  # 0-d tensor
            seg = tensor.segments[0]
            return self._decode(seg, self._handle(seg.path).get_tensor(seg.key), tensor.dtype)
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        expect = tensor.shape if rows is None else (want_hi - want_lo, *tensor.shape[1:])
        if tuple(t.shape) != tuple(expect):
            raise CorruptCheckpoint(f"tensor {tensor.name} has shape {tuple(t.shape)}, expected {expect}", hint="re-download or re-export the source")
        return t

    def close(self) -> None:
        self._handles.clear()
        self._scale_keys.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                self.verify()
        finally:
            self.close()


def _open(path: Any) -> Any:
    if isinstance(path, Path):
        from safetensors import safe_open

        return safe_open(str(path), framework="pt")
    from .remote import RemoteHandle

    with _hub_errors(path.repo_id, path.commit):
        return RemoteHandle(path)


# --- components and sources ----------------------------------------------------------------


@dataclass
class Component:
    """One pipeline component (a sub-folder of the pipeline)."""

    name: str
    folder: Path | None
    library: str
    class_name: str
    config: dict[str, Any] = field(default_factory=dict)
    # Lazily-described weights; empty for components without weights (scheduler, tokenizers).
    tensors: dict[str, SourceTensor] = field(default_factory=dict)
    weight_files: list[Any] = field(default_factory=list)  # Paths, or RemoteFiles of a streamed repo

    @property
    def remote_files(self) -> list[Any]:
        """The weight files read from the Hub (not in ``folder``): copied by streaming."""
        return [f for f in self.weight_files if not isinstance(f, Path)]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


@dataclass
class Source:
    spec: str
    root: Path  # the pipeline folder supplying non-quantized components
    identity: SourceIdentity  # what it is, as the manifest records it (``qconvert.identity``)
    model_index: dict[str, Any]
    components: dict[str, Component]
    family: type[Family] = flux.Flux  # what it is: components, key maps, how it runs

    @property
    def kind(self) -> str:
        """``builtin``, ``local``, ``hub`` or ``bfl`` (for messages and tests: ask the identity)."""
        return self.identity.kind


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a JSON object", hint="re-download the source")
    return data


def _component_weight_files(folder: Path, remote: dict[str, Any] | None = None) -> list[Any]:
    """safetensors files of a diffusers/transformers component folder (index-aware); of a
    streamed Hub repo, those not in ``folder`` are ``remote``'s (repo path -> RemoteFile)."""
    remote = remote or {}
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    indexes = [p for p in indexes if not _is_variant(p.name)]
    if indexes:
        weight_map = _load_json(indexes[0]).get("weight_map", {})
        files = [folder / f if (folder / f).is_file() else remote.get(f"{folder.name}/{f}", folder / f)
                 for f in sorted(set(weight_map.values()))]  # fmt: skip
        missing = [f.name for f in files if isinstance(f, Path) and not f.is_file()]
        if missing:
            raise SourceNotFound(
                f"{folder.name}/{missing[0]} is listed in {indexes[0].name} but missing",
                hint="re-download the source",
            )
        return files
    local = {p.name: p for p in folder.glob("*.safetensors") if not _is_variant(p.name)}
    streamed = {f.name: f for rel, f in remote.items() if f.parent.as_posix() == folder.name and not _is_variant(f.name)}
    files = [local.get(name) or streamed[name] for name in sorted(local.keys() | streamed.keys())]
    if not files and any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()):
        raise InputError(
            f"{folder.name}/ holds only pickle weights (.bin/.pt), which qconvert does not load",
            hint="convert them to safetensors first",
        )
    return files


def _is_variant(filename: str) -> bool:
    # diffusion_pytorch_model.fp16.safetensors etc.
    parts = filename.split(".")
    return len(parts) > 2 and parts[-2] in {"fp16", "bf16", "fp32"}


def describe_files(files: list[Any]) -> dict[str, SourceTensor]:
    tensors: dict[str, SourceTensor] = {}
    for f in files:
        entries, _ = read_safetensors_header(f)
        for key, e in entries.items():
            tensors[key] = SourceTensor(key, e.shape, e.dtype, (FileSegment(f, key),))
    return tensors


def load_pipeline_folder(root: Path, *, spec: str, identity: SourceIdentity, remote: dict[str, Any] | None = None) -> Source:
    root = Path(root)
    index_path = root / "model_index.json"
    if not index_path.is_file():
        if (root / "config.json").is_file() or (root / "unet").is_dir():
            raise NotAFluxModel(
                f"{spec} is a single model folder, not a pipeline",
                hint="pass the pipeline folder that holds model_index.json",
            )
        raise NotAFluxModel(
            f"{spec} has no model_index.json: not a diffusers pipeline folder",
            hint=f"pass a FluxPipeline folder, a Hub repo id or a BFL .safetensors file with {opt('base')}",
        )
    model_index = _load_json(index_path)
    fam = for_pipeline_class(model_index.get("_class_name"), spec)
    components: dict[str, Component] = {}
    for name in fam.components:
        entry = model_index.get(name)
        if not entry or entry[0] is None:
            raise NotAFluxModel(f"{spec}: model_index.json has no {name} component", hint="pass a complete FluxPipeline folder")
        folder = root / name
        if not folder.is_dir():
            raise SourceNotFound(f"{spec}: component folder {name}/ is missing", hint="re-download the source")
        library, class_name = entry[0], entry[1]
        comp = Component(name, folder, library, class_name)
        if name in fam.weight_components:
            comp.config = _load_json(folder / "config.json") if (folder / "config.json").is_file() else {}
            if not comp.config:
                raise SourceNotFound(f"{spec}: {name}/config.json is missing", hint="re-download the source")
            comp.weight_files = _component_weight_files(folder, remote)
            if not comp.weight_files:
                raise SourceNotFound(f"{spec}: {name}/ has no .safetensors weights", hint="re-download the source (qconvert reads only .safetensors)")
            comp.tensors = describe_files(comp.weight_files)
            if "quantization_config" in comp.config:
                raise InputError(
                    f"{spec}: {name} is already quantized "
                    f"({comp.config['quantization_config'].get('quant_method', '?')})",
                    hint="convert from the original bf16 checkpoint",
                )
        components[name] = comp
    return Source(spec, root, identity, model_index, components, fam)


def _folder_fingerprint(root: Path) -> str:
    """A cheap identity for a local folder: names, sizes and safetensors headers."""
    with mapped_os_errors(f"reading the source folder {root}", fix=SOURCE_FIX):
        return _fingerprint(root)


def _fingerprint(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        # skip huggingface_hub's download cache *inside* the folder, not a folder that itself
        # lives under ~/.cache (a Hub snapshot, qconvert's built-ins): test the relative path
        if not p.is_file() or ".cache" in p.relative_to(root).parts:
            continue
        rel = p.relative_to(root).as_posix()
        h.update(f"{rel}\0{p.stat().st_size}\0".encode())
        if p.suffix == ".safetensors":
            with open(p, "rb") as fh:
                raw = fh.read(8)
                n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
                h.update(fh.read(min(n, _MAX_HEADER)))
        elif p.stat().st_size < 1 << 20:
            h.update(p.read_bytes())
    return h.hexdigest()


# Files a pipeline folder needs from a Hub repo (FLUX.1-dev also ships a 23.8 GB
# single-file checkpoint and ae.safetensors at the top level: never download those).
HUB_ALLOW_PATTERNS = [
    "model_index.json",
    "LICENSE*",
    "README.md",
    "scheduler/*",
    "tokenizer/*",
    "tokenizer_2/*",
    "*/config.json",
    "*/*.safetensors.index.json",
    "*/*.safetensors",
]
HUB_IGNORE_PATTERNS = ["*.bin", "*.pt", "*.ckpt", "*/*.fp16.safetensors", "*.onnx*"]


def looks_like_repo_id(spec: str) -> bool:
    """``namespace/name`` as the Hub accepts it (huggingface_hub's own rules: no "--" or "..")."""
    parts = spec.split("/")
    if not (
        len(parts) == 2
        and all(parts)
        and not spec.startswith((".", "/", "~"))
        and all(c.isalnum() or c in "-_." for c in spec.replace("/", ""))
    ):
        return False
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:  # the release workflow's plan job installs qconvert alone (--no-deps)
        return True
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def _cached_hub_source(repo_id: str, revision: str | None) -> tuple[Path, str]:
    """(snapshot folder, commit) of a repo in the local Hub cache.

    qconvert downloads a commit by its hash, which records no branch ref: for a branch or tag
    (default "main") the snapshot with that ref is used if known, else the only one cached.
    """
    from huggingface_hub import constants, scan_cache_dir

    missing = InputError(
        f"{repo_id}{f'@{revision}' if revision else ''} is not in the local Hub cache and HF_HUB_OFFLINE is set",
        hint="unset HF_HUB_OFFLINE to download it once, or pass a local pipeline folder",
    )
    try:
        repos = [r for r in scan_cache_dir(constants.HF_HUB_CACHE).repos if r.repo_id == repo_id and r.repo_type == "model"]
    except Exception:  # noqa: BLE001 - no cache folder at all (CacheNotFound) or an unreadable one
        raise missing from None
    revisions = [rev for r in repos for rev in r.revisions if (rev.snapshot_path / "model_index.json").is_file()]
    wanted = revision or "main"
    chosen = [rev for rev in revisions if rev.commit_hash == wanted or wanted in rev.refs]
    is_commit = bool(re.fullmatch(r"[0-9a-f]{40}", wanted))
    if not chosen and not is_commit and len(revisions) == 1:  # a branch or tag: no ref recorded
        chosen = revisions
    if not chosen:
        if not is_commit and len(revisions) > 1:
            raise InputError(f"{repo_id} has {len(revisions)} cached revisions and HF_HUB_OFFLINE is set",
                             hint=f"pass {opt('revision', metavar='<commit>')}")  # fmt: skip
        raise missing
    return Path(chosen[0].snapshot_path), chosen[0].commit_hash


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """The Hub's failures as one-line errors that say what to do."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError:
        raise GatedRepo(
            f"{repo_id} is gated",
            hint=f"accept its license on the Hub page of {repo_id}, then set HF_TOKEN or run `hf auth login`",
        ) from None
    except RevisionNotFoundError:
        raise SourceNotFound(f"revision {revision!r} not found in {repo_id}") from None
    except RepositoryNotFoundError:
        raise SourceNotFound(
            f"Hub repo {repo_id} not found (or private)",
            hint="check the id; for a private repo set HF_TOKEN",
        ) from None
    except LocalEntryNotFoundError:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise InputError(f"{repo_id} is not in the local Hub cache and HF_HUB_OFFLINE is set",
                             hint="unset HF_HUB_OFFLINE to download it once") from None  # fmt: skip
        raise InputError(
            f"cannot download {repo_id}: the Hub is not reachable", hint="check the network or HF_ENDPOINT"
        ) from None
    except EntryNotFoundError:
        raise SourceNotFound(f"{repo_id} has no such file", hint=f"check {opt('source_file')}") from None
    except HfHubHTTPError as e:
        raise _download_http_error(repo_id, e) from None
    except OSError as e:
        # the download writes into the Hub cache: a full disk or an unwritable cache is the
        # user's to fix there, not a network problem
        mapped = os_error(e, f"downloading {repo_id} into the Hub cache", fix=CACHE_FIX)
        if mapped is not None:
            raise mapped from None
        raise _unreachable(repo_id, e) from None
    except transport_errors() as e:
        raise _unreachable(repo_id, e) from None


def download_hub_source(
    repo_id: str, revision: str | None, *, token: str | None = None, endpoint: str | None = None
) -> tuple[Path, str]:
    """Download the pipeline files of a Hub repo; return (folder, resolved commit sha)."""
    from huggingface_hub import HfApi, constants, snapshot_download

    if constants.HF_HUB_OFFLINE:  # HF_HUB_OFFLINE=1: the local Hub cache only, no request at all
        return _cached_hub_source(repo_id, revision)

    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(repo_id, revision):
        info = api.model_info(repo_id, revision=revision)
        sha = info.sha or revision or "main"
        folder = snapshot_download(
            repo_id,
            revision=sha,
            allow_patterns=HUB_ALLOW_PATTERNS,
            ignore_patterns=HUB_IGNORE_PATTERNS,
            token=token,
            endpoint=endpoint,
        )
    return Path(folder), sha


def stream_hub_source(
    repo_id: str, revision: str | None, *, token: str | None = None, endpoint: str | None = None
) -> tuple[Path, str, dict[str, Any]]:
    """(folder of the small files, commit, repo path -> RemoteFile of each weight file not in
    the local Hub cache): what converting a Hub pipeline without copying it needs."""
    from huggingface_hub import HfApi, constants, snapshot_download, try_to_load_from_cache

    from .remote import RemoteFile

    if constants.HF_HUB_OFFLINE:
        return (*_cached_hub_source(repo_id, revision), {})
    with _hub_errors(repo_id, revision):
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision, files_metadata=True)
        sha = info.sha or revision or "main"
        folder = Path(snapshot_download(repo_id, revision=sha, allow_patterns=HUB_ALLOW_PATTERNS, token=token,
                                        ignore_patterns=[*HUB_IGNORE_PATTERNS, "*.safetensors"], endpoint=endpoint))  # fmt: skip
    remote: dict[str, Any] = {}
    for sib in info.siblings or []:
        rel = sib.rfilename
        if rel.count("/") != 1 or not rel.endswith(".safetensors") or _is_variant(rel):
            continue
        cached = try_to_load_from_cache(repo_id, rel, revision=sha)
        if isinstance(cached, str):  # in the local Hub cache already (the snapshot folder): read it there
            continue
        lfs_sha = sib.lfs.sha256 if sib.lfs is not None else None
        remote[rel] = RemoteFile(repo_id, rel, sha, int(sib.size or 0), lfs_sha, endpoint, token)
    return folder, sha, remote


# --- single files in Hub repos ---------------------------------------------------------------


def hub_repo_files(repo_id: str, revision: str | None, *, token: str | None, endpoint: str | None) -> tuple[str, list[str]]:
    """(commit, the repo's file paths) at ``revision``; offline, those of the cached snapshot."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        try:  # a cached pipeline snapshot, as download_hub_source would take it
            folder, sha = _cached_hub_source(repo_id, revision)
        except InputError:
            folder, sha = _cached_snapshot(repo_id, revision)
        return sha, sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    with _hub_errors(repo_id, revision):
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision)
    return info.sha or revision or "main", sorted(s.rfilename for s in info.siblings or [])


def _cached_snapshot(repo_id: str, revision: str | None) -> tuple[Path, str]:
    """The cached snapshot of a repo that holds no pipeline (a single file's), by the same rules."""
    from huggingface_hub import constants, scan_cache_dir

    try:
        repos = [r for r in scan_cache_dir(constants.HF_HUB_CACHE).repos if r.repo_id == repo_id and r.repo_type == "model"]
    except Exception:  # noqa: BLE001 - no cache folder at all (CacheNotFound) or an unreadable one
        repos = []
    wanted = revision or "main"
    revisions = [rev for r in repos for rev in r.revisions]
    chosen = [rev for rev in revisions if rev.commit_hash == wanted or wanted in rev.refs] or (
        revisions if len(revisions) == 1 and not re.fullmatch(r"[0-9a-f]{40}", wanted) else [])  # fmt: skip
    if not chosen:
        raise InputError(f"{repo_id}{f'@{revision}' if revision else ''} is not in the local Hub cache and HF_HUB_OFFLINE is set",
                         hint="unset HF_HUB_OFFLINE to download it once, or pass a local file")  # fmt: skip
    return Path(chosen[0].snapshot_path), chosen[0].commit_hash


def choose_hub_file(repo_id: str, sha: str, files: list[str], file: str | None, *, token: str | None,
                    endpoint: str | None) -> str:  # fmt: skip
    """The single file to convert: ``file``, the repo's only ``.safetensors``, or the only one
    of several whose header keys are a transformer qconvert knows; else a one-line error."""
    candidates = [f for f in files if f.endswith(".safetensors")]
    listed = ", ".join(candidates[:6]) + (", ..." if len(candidates) > 6 else "")
    pick = f"pick one with {opt('source_file', metavar='<name>')} (or {opt('source')} {repo_id}/<name>)"
    if file is not None:
        if file not in files:
            raise SourceNotFound(f"{repo_id} has no file {file}",
                                 hint=f"its .safetensors files: {listed}" if candidates else "check the repo's files")  # fmt: skip
        _check_single_file_name(Path(file), f"{repo_id}/{file}", allow=True)
        return file
    if not candidates:
        pickles = [f for f in files if Path(f).suffix in PICKLE_SUFFIXES]
        raise NotAFluxModel(f"{repo_id} holds no model_index.json and no .safetensors file"
                            + (f" (only pickle weights: {pickles[0]})" if pickles else ""),
                            hint="pass a diffusers pipeline repo, or a repo with a Flux .safetensors file")  # fmt: skip
    if len(candidates) == 1:
        return candidates[0]
    transformers = [f for f in candidates if for_single_file(_hub_header_keys(repo_id, f, sha, token=token, endpoint=endpoint))]
    if len(transformers) == 1:
        return transformers[0]
    raise UsageError(f"{repo_id} holds {len(candidates)} .safetensors files ({listed})"
                     + (f", {len(transformers)} of them Flux transformers" if transformers else ""), hint=pick)  # fmt: skip


def _hub_header_keys(repo_id: str, file: str, sha: str, *, token: str | None, endpoint: str | None) -> list[str]:
    """A Hub file's tensor names, from its safetensors header alone (HTTP range requests;
    offline, the cached file's header)."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        cached = try_to_load_from_cache(repo_id, file, revision=sha)
        return list(read_safetensors_header(Path(cached))[0]) if isinstance(cached, str) else []
    with _hub_errors(repo_id, sha):
        meta = HfApi(endpoint=endpoint, token=token).parse_safetensors_file_metadata(repo_id, file, revision=sha)
    return list(meta.tensors)


def download_hub_file(repo_id: str, file: str, sha: str, *, token: str | None, endpoint: str | None) -> Path:
    """Download one file of a Hub repo at commit ``sha`` (the cached copy when there is one)."""
    from huggingface_hub import constants, hf_hub_download

    with _hub_errors(repo_id, sha):
        return Path(hf_hub_download(repo_id, file, revision=sha, token=token, endpoint=endpoint,
                                    local_files_only=constants.HF_HUB_OFFLINE))  # fmt: skip


CACHE_FIX = "point HF_HOME (or HF_HUB_CACHE) at a disk with room that you can write to"
TOKEN_FIX = ("set HF_TOKEN to a valid token (https://huggingface.co/settings/tokens) or run `hf auth login`; "
             "a public repo needs none: unset HF_TOKEN")


def _download_http_error(repo_id: str, e: Exception) -> InputError:
    """What an HTTP status means for a download, and what the user can do about it."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status == 401:
        return InputError(f"the Hub rejected the token while downloading {repo_id} (HTTP 401)", hint=TOKEN_FIX)
    if status == 403:
        return InputError(
            f"the token may not read {repo_id} (HTTP 403)",
            hint="use a token with read access to it (a fine-grained token needs the repo or its org), or accept its terms on its Hub page",
        )
    if status == 429:
        return InputError(f"the Hub is rate-limiting downloads of {repo_id} (HTTP 429)", hint="wait a few minutes, or set HF_TOKEN (logged-in limits are higher)")
    return InputError(f"downloading {repo_id} failed (HTTP {status or '?'})", hint="retry later")


def _unreachable(repo_id: str, e: BaseException) -> InputError:
    return InputError(
        f"cannot reach the Hub to download {repo_id} ({type(e).__name__})",
        hint="check the network or HF_ENDPOINT; with HF_HUB_OFFLINE=1 a repo in the local cache is used",
    )


def resolve_source(
    spec: str,
    *,
    revision: str | None = None,
    base: str | None = None,
    source_file: str | None = None,
    base_revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    stream: bool = False,
    _allow_bfl: bool = True,
) -> Source:
    """Turn ``--source`` (and ``--base``/``--revision``/``--file``: ``source_file``) into a :class:`Source` (see
    :func:`resolve_again` for a recorded identity).

    ``revision`` is the Hub revision of ``spec`` -- of ``base`` for a local single file, whose
    own has none; ``base_revision`` that of ``base`` for a single file in a Hub repo. ``stream``:
    a Hub pipeline's weights are read with range requests (not downloaded), what converting
    needs; validation, which loads the source, downloads it."""
    from . import tiny

    path = Path(spec).expanduser()
    hub = None if path.exists() else hub_file_spec(spec, source_file)
    if source_file and hub is None:
        raise UsageError(f"{opt('source_file')} picks a file in a Hub repo; {spec} is not a Hub repo id", hint=f"drop {opt('source_file')}")
    if hub is None and not path.exists() and path.suffix.lower() == ".safetensors":
        raise SourceNotFound(f"{spec} not found", hint="check the path of the .safetensors file")
    is_single_file = path.is_file()
    if base and not is_single_file and hub is None:
        raise UsageError(f"{opt('base')} is for a single-file {opt('source')}; {spec} is a whole pipeline", hint=f"drop {opt('base')}")
    if revision and hub is None and not (is_single_file and base):
        raise UsageError(f"{opt('revision')} applies to a Hub repo id; {spec} is not one", hint=f"drop {opt('revision')}")
    if spec in tiny.BUILTIN_SOURCES:
        root = tiny.builtin_path(spec)
        return load_pipeline_folder(root, spec=spec, identity=BuiltinSource(spec, tiny.BUILDER_VERSION))
    hub_args = {"token": token, "endpoint": endpoint}
    if path.exists():
        if path.is_dir():
            identity = LocalSource(str(path.resolve()), _folder_fingerprint(path))
            return load_pipeline_folder(path, spec=spec, identity=identity)
        _check_single_file_name(path, spec, allow=_allow_bfl)
        return _bfl_source(path, spec=spec, base=base, revision=revision, **hub_args)
    if hub is not None:
        return _hub_source(spec, *hub, revision=revision, base=base, base_revision=base_revision, allow_file=_allow_bfl,
                           stream=stream, **hub_args)  # fmt: skip
    raise SourceNotFound(
        f"source {spec!r} not found",
        hint="pass tiny-flux, a pipeline folder, a Hub repo id (org/name) or a BFL .safetensors file",
    )


def _check_single_file_name(path: Path, spec: str, *, allow: bool) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InputError(
            f"{spec} is a pickle checkpoint, which qconvert refuses to load (it can run code)",
            hint="use the .safetensors release of the model",
        )
    if path.suffix.lower() != ".safetensors":
        raise InputError(f"{spec} is not a .safetensors file or a pipeline folder", hint="pass a FluxPipeline folder, a Hub repo id or a BFL .safetensors file")
    if not allow:
        raise UsageError(f"{opt('base')} {spec} must be a pipeline, not a single file",
                         hint=f"pass a FluxPipeline folder or Hub repo id as {opt('base')}")  # fmt: skip


def hub_file_spec(spec: str, file: str | None = None) -> tuple[str, str | None] | None:
    """(repo id, file or None) of ``org/name`` or ``org/name/<path>.safetensors``; None for anything else."""
    parts = spec.split("/")
    if len(parts) > 2 and spec.lower().endswith(".safetensors") and looks_like_repo_id("/".join(parts[:2])):
        if file:
            raise UsageError(f"{spec} names its file already", hint=f"drop {opt('source_file')}, or pass the repo id alone")
        return "/".join(parts[:2]), "/".join(parts[2:])
    return (spec, file) if looks_like_repo_id(spec) else None


def _hub_source(spec: str, repo_id: str, file: str | None, *, revision: str | None, base: str | None,
                base_revision: str | None, allow_file: bool, token: str | None, endpoint: str | None,
                stream: bool = False) -> Source:  # fmt: skip
    """A Hub repo: a pipeline (``model_index.json``, no ``--file``), else one of its single files."""
    sha, files = hub_repo_files(repo_id, revision, token=token, endpoint=endpoint)
    if file is None and "model_index.json" in files:
        if base:
            raise UsageError(f"{opt('base')} is for a single-file {opt('source')}; {repo_id} is a whole pipeline", hint=f"drop {opt('base')}")
        remote: dict[str, Any] = {}
        if stream:
            folder, sha, remote = stream_hub_source(repo_id, revision, token=token, endpoint=endpoint)
        else:
            folder, sha = download_hub_source(repo_id, revision, token=token, endpoint=endpoint)
        identity = HubSource(repo_id, sha, revision if revision and revision != sha else None)
        return load_pipeline_folder(folder, spec=spec, identity=identity, remote=remote)
    if not allow_file:
        raise UsageError(f"{opt('base')} {repo_id} holds no model_index.json: it must be a pipeline",
                         hint=f"pass a diffusers pipeline folder or Hub repo as {opt('base')}")  # fmt: skip
    name = choose_hub_file(repo_id, sha, files, file, token=token, endpoint=endpoint)
    if not base:
        raise UsageError(f"{repo_id}/{name} is a single-file checkpoint",
                         hint=f"add {opt('base', metavar='<pipeline folder or Hub id>')} to supply the config files, tokenizers and whatever else the file lacks")  # fmt: skip
    local = download_hub_file(repo_id, name, sha, token=token, endpoint=endpoint)
    where = HubFile(repo_id, name, sha, revision if revision and revision != sha else None)
    return _bfl_source(local, spec=spec, base=base, revision=base_revision, token=token, endpoint=endpoint, hub=where)


@dataclass(frozen=True)
class HubFile:
    """Where a single file came from on the Hub."""

    repo_id: str
    file: str
    commit: str
    requested_revision: str | None = None


def _bfl_source(
    path: Path, *, spec: str, base: str | None, revision: str | None, token: str | None, endpoint: str | None,
    hub: HubFile | None = None,
) -> Source:
    from . import singlefile

    name = hub.file if hub else path.name
    entries, _ = read_safetensors_header(path)
    layout = singlefile.split_checkpoint({k: (e.dtype, e.shape) for k, e in entries.items()}, name)
    keys = list(layout.transformer)
    if for_single_file(keys) is None:
        raise NotAFluxModel(
            f"{name} is {flux.guess_architecture(keys or list(entries))}, not a Black Forest Labs Flux transformer",
            hint=f"pass a Flux transformer .safetensors (e.g. flux1-dev.safetensors) with {opt('base')}, or a Flux pipeline",
        )
    if not base:
        raise UsageError(
            f"{name} holds only the transformer" if not layout.embedded else f"{name} is a single-file checkpoint",
            hint=f"add {opt('base', metavar='<pipeline folder or Hub id>')} to supply the text encoders, VAE and config"
            if not layout.embedded else f"add {opt('base', metavar='<pipeline folder or Hub id>')} to supply the config files and tokenizers",
        )
    base_src = resolve_source(base, revision=revision, token=token, endpoint=endpoint, _allow_bfl=False)
    check_single_file_family(name, keys, base_src.family)
    sha = sha256_of(path)
    components, root, embedded = base_src.components, base_src.root, ()
    if layout.embedded:  # all-in-one: the file's own encoders and VAE, the base for the rest
        from .tiny import cache_root

        plans = singlefile.plan_parts(layout, base_src.family, base_src.components, name)
        key = singlefile.json_key(sha, base_src.identity.to_dict(), [p.component for p in plans])
        root = singlefile.derived_pipeline(path, key, base_src.root, plans, cache_root(), layout.scales)
        components = load_pipeline_folder(root, spec=spec, identity=base_src.identity).components
        embedded = tuple(p.component for p in plans)
    comp = base_src.components["transformer"]
    tensors = _single_file_tensors(path, name, layout, entries, comp, base_src.family)
    new_comp = Component("transformer", None, comp.library, comp.class_name, dict(comp.config), tensors, [path])
    components = {**components, "transformer": new_comp}
    assert isinstance(base_src.identity, PipelineIdentity)  # resolved with _allow_bfl=False
    facts = {"embedded": embedded or None, "float8": layout.float8, "scaled": bool(layout.scales) or None}
    if hub:
        identity = SingleFileSource(hub.file, str(path.absolute()), sha, base_src.identity, hub.repo_id, hub.commit,
                                    hub.requested_revision, **facts)  # fmt: skip
    else:
        identity = SingleFileSource(path.name, str(path.resolve()), sha, base_src.identity, **facts)
    return Source(spec, root, identity, base_src.model_index, components, base_src.family)


def _single_file_tensors(path: Path, name: str, layout: Any, entries: dict[str, HeaderEntry], comp: Component,
                         family: type[Family]) -> dict[str, SourceTensor]:  # fmt: skip
    """The transformer part of a single file as lazy diffusers-named tensors (float8: presented
    upcast), checked against the base's transformer config."""
    from .singlefile import presented_dtype

    cfg = comp.config
    inner = int(cfg.get("num_attention_heads", 24)) * int(cfg.get("attention_head_dim", 128))
    bfl_keys = layout.transformer  # BFL name -> key in the file
    bfl_shapes = {k: entries[key].shape for k, key in bfl_keys.items()}
    try:
        recipes = flux.bfl_to_diffusers(bfl_shapes, inner_dim=inner)
    except (KeyError, ValueError) as e:
        raise NotAFluxModel(f"{name}: {e}") from None
    tensors: dict[str, SourceTensor] = {}
    for out_name, recipe in recipes.items():
        segs = tuple(FileSegment(path, bfl_keys[s.key], s.start, s.stop) for s in recipe)
        first = entries[bfl_keys[recipe[0].key]]
        rows = 0
        for s in recipe:
            full = bfl_shapes[s.key][0]
            rows += (full if s.stop is None else s.stop) - (s.start or 0)
        tensors[out_name] = SourceTensor(out_name, (rows, *first.shape[1:]), presented_dtype(first.dtype), segs)
    expected = set(comp.tensors)
    if expected and set(tensors) != expected:
        missing = sorted(expected - set(tensors))
        extra = sorted(set(tensors) - expected)
        raise NotAFluxModel(
            f"{name} does not match the base transformer config "
            f"(missing {missing[:2]}, unexpected {extra[:2]})",
            hint=f"pick a {opt('base')} with the same Flux variant (dev/schnell)",
        )
    for out_name, t in tensors.items():
        want = comp.tensors[out_name].shape
        if t.shape != want:
            raise NotAFluxModel(f"{name}: {out_name} has shape {t.shape}, base config expects {want}",
                                hint=_variant_hint(tensors, family))  # fmt: skip
    return tensors


def _variant_hint(tensors: dict[str, SourceTensor], base_family: type[Family]) -> str:
    """Name the family a FLUX.1 file's input channels say it is (Fill: 384, Depth/Canny: 128)."""
    x, out = tensors.get("x_embedder.weight"), tensors.get("proj_out.weight")
    if x is not None and out is not None:
        config = {"in_channels": x.shape[1], "out_channels": out.shape[0]}
        for fam in all_families():
            if fam is not base_family and fam.kind == base_family.kind and fam.matches_config(config):
                return f"it is a {fam.label} transformer: pass a {fam.pipeline_class} folder or Hub repo as {opt('base')}"
    return f"pick a {opt('base')} of the same {base_family.label} variant and size"


def check_single_file_family(name: str, keys: list[str], base_family: type[Family]) -> None:
    """A single file whose kind of keys (FLUX.1 or Chroma) is not its base's: one line naming
    the base to pass. Files of one kind (dev, Kontext, Fill, Depth/Canny) take the base's family;
    their shapes are checked against the base's config after."""
    wanted = for_single_file(keys)
    if wanted is not None and wanted.kind != base_family.kind:
        raise NotAFluxModel(
            f"{name} is a {wanted.label} transformer, but {opt('base')} is a {base_family.label} pipeline",
            hint=f"pass a {wanted.pipeline_class} folder or Hub repo as {opt('base')}",
        )


def resolve_again(identity: SourceIdentity, *, transformer: str | None = None, token: str | None = None,
                  endpoint: str | None = None) -> Source:  # fmt: skip
    """The source a manifest recorded, resolved again on this machine (``transformer``: a single
    transformer file to resolve with the recorded pipeline as its base)."""
    return resolve_source(**identity.resolve_args(transformer), token=token, endpoint=endpoint)

