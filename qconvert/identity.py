"""Source identities: what a conversion was made from, as ``qconvert.json`` records it.

One class per kind of source, each answering the same questions, so no caller branches on the
kind:

* :attr:`~SourceIdentity.label`: how messages name it (``tiny-flux``, ``org/name``, a
  folder's or file's name); :attr:`~SourceIdentity.short_name`: the part of it that names
  files and card titles (``name`` of ``org/name``, a file's stem);
* :meth:`~SourceIdentity.to_dict` / :meth:`~SourceIdentity.from_dict`: the manifest's JSON, both ways (the
  same keys as before identities were typed: the bytes of ``qconvert.json`` are unchanged);
* :meth:`~SourceIdentity.public`: what is published (local directories reduced to names);
* :meth:`~SourceIdentity.reproduce_args`: the ``--source``/``--base``/``--revision`` part of
  the card's reproduce command (public: Hub ids and names, never this machine's paths);
* :meth:`~SourceIdentity.resolve_args`: the arguments of :func:`qconvert.sources.resolve_source`
  that resolve the same source again on this machine (``qconvert validate``'s reference;
  :func:`qconvert.sources.resolve_again` calls it);
* facts: :attr:`~SourceIdentity.hub_repo`, :attr:`~SourceIdentity.revision` (the Hub repo and
  commit behind it, if any), :attr:`~SourceIdentity.builtin` (a built-in pipeline's name),
  :attr:`~SourceIdentity.local_path`, :attr:`~SourceIdentity.base` (a single file's base
  pipeline) and :attr:`~SourceIdentity.pipeline` (the pipeline supplying the other components).

This module imports nothing of qconvert's but its errors: the sources build identities, and
the manifest, cards, GGUF metadata, validation and publishing read them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from .errors import InputError, opt

_HUB_CACHE_DIR = re.compile(r"^models--([^/]+?)--([^/]+)$")


def hub_repo_from_path(path: str | Path) -> str | None:
    """``org/name`` for a folder inside a Hub cache (``models--org--name/snapshots/<sha>``)."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        m = _HUB_CACHE_DIR.match(part)
        if m and i + 1 < len(parts) and parts[i + 1] == "snapshots":
            return f"{m.group(1)}/{m.group(2)}"
    return None


def _snapshot_revision(path: str) -> str | None:
    """The commit of a Hub cache snapshot folder (``.../snapshots/<sha>``)."""
    parts = Path(path).parts
    return parts[-1] if len(parts) >= 2 and parts[-2] == "snapshots" else None


@dataclass(frozen=True)
class SourceIdentity:
    """The common questions; the defaults are those of a source that has no such fact."""

    kind: ClassVar[str] = ""

    @property
    def label(self) -> str:
        return "?"

    @property
    def short_name(self) -> str:
        return self.label

    @property
    def hub_repo(self) -> str | None:
        return None

    @property
    def revision(self) -> str | None:
        return None

    @property
    def builtin(self) -> str | None:
        """The name of a built-in pipeline (random-weight demos made by qconvert), else None."""
        return None

    @property
    def local_path(self) -> str | None:
        """The folder or file it was read from on the converting machine, else None."""
        return None

    @property
    def base(self) -> PipelineIdentity | None:
        """The base pipeline of a single transformer file, else None."""
        return None

    @property
    def pipeline(self) -> SourceIdentity:
        """The pipeline folder supplying the components that were not converted."""
        return self.base or self

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value.to_dict() if isinstance(value, SourceIdentity) else value
        return out

    def public(self) -> SourceIdentity:
        return self

    def reproduce_args(self) -> list[str]:
        return []

    @staticmethod
    def from_dict(data: Any) -> SourceIdentity:
        """The identity a manifest records (``to_dict`` of the result gives ``data`` back)."""
        return _from_dict(data)

    def resolve_args(self, transformer: str | None = None) -> dict[str, Any]:
        raise InputError(f"unknown source kind {self.to_dict().get('kind')!r} in the manifest",
                         hint=f"pass {opt('reference')}")  # fmt: skip


@dataclass(frozen=True)
class PipelineIdentity(SourceIdentity):
    """A whole pipeline (built-in, local folder, Hub repo): a source, or a single file's base."""

    @property
    def spec(self) -> str:
        """What a user elsewhere passes as ``--source`` / ``--base`` to get it."""
        return self.label

    def _where(self) -> tuple[str, str | None]:
        """The spec and revision that resolve it on this machine."""
        return self.spec, None

    def reproduce_args(self) -> list[str]:
        return ["--source", self.spec] + (["--revision", self.revision] if self.revision else [])

    def resolve_args(self, transformer: str | None = None) -> dict[str, Any]:
        """``transformer``: a single transformer file to resolve with this pipeline as its base."""
        spec, revision = self._where()
        if transformer:
            return {"spec": transformer, "base": spec, "revision": revision}
        return {"spec": spec, "revision": revision}


@dataclass(frozen=True)
class BuiltinSource(PipelineIdentity):
    kind: ClassVar[str] = "builtin"
    name: str
    builder_version: int | None = None

    @property
    def label(self) -> str:
        return self.name

    @property
    def builtin(self) -> str | None:
        return self.name


@dataclass(frozen=True)
class LocalSource(PipelineIdentity):
    """A pipeline folder; inside a Hub cache (``models--org--name/snapshots/<sha>``) it names
    that repo and commit."""

    kind: ClassVar[str] = "local"
    path: str
    fingerprint: str | None = None

    @property
    def label(self) -> str:
        return Path(self.path).name

    @property
    def hub_repo(self) -> str | None:
        return hub_repo_from_path(self.path)

    @property
    def revision(self) -> str | None:
        return _snapshot_revision(self.path)

    @property
    def local_path(self) -> str | None:
        return self.path

    @property
    def spec(self) -> str:
        return self.hub_repo or "./" + self.label

    def _where(self) -> tuple[str, str | None]:
        return self.path, None

    def public(self) -> SourceIdentity:
        return replace(self, path=Path(self.path).name)


@dataclass(frozen=True)
class HubSource(PipelineIdentity):
    kind: ClassVar[str] = "hub"
    repo_id: str
    revision: str | None = None  # type: ignore[assignment]  # the resolved commit
    requested_revision: str | None = None  # what was asked for, when not that commit

    @property
    def label(self) -> str:
        return self.repo_id

    @property
    def short_name(self) -> str:
        return self.repo_id.split("/")[-1]

    @property
    def hub_repo(self) -> str | None:
        return self.repo_id

    def _where(self) -> tuple[str, str | None]:
        return self.repo_id, self.revision


@dataclass(frozen=True)
class SingleFileSource(SourceIdentity):
    """A single-file checkpoint (a BFL or ComfyUI transformer, or an all-in-one file),
    converted with ``base`` supplying the rest; a local file, or ``file`` of Hub repo ``repo_id``
    at ``commit``. ``embedded``: the components taken from the file besides the transformer;
    ``float8``/``scaled``: its weights were stored in float8 (with ComfyUI's per-tensor scales)."""

    kind: ClassVar[str] = "bfl"
    file: str
    path: str | None = None
    sha256: str | None = None
    base: PipelineIdentity | None = None  # type: ignore[assignment]
    repo_id: str | None = None
    commit: str | None = None
    requested_revision: str | None = None  # what was asked for, when not that commit
    embedded: tuple[str, ...] | None = None
    float8: str | None = None
    scaled: bool | None = None

    @property
    def label(self) -> str:
        return f"{self.repo_id}/{self.file}" if self.repo_id else self.file

    @property
    def short_name(self) -> str:
        return Path(self.file).stem

    @property
    def hub_repo(self) -> str | None:
        """The repo the file came from (a finetune's own), else its base's."""
        if self.repo_id:
            return self.repo_id
        return self.base.hub_repo if self.base else None

    @property
    def revision(self) -> str | None:
        if self.repo_id:
            return self.commit
        return self.base.revision if self.base else None

    @property
    def local_path(self) -> str | None:
        return self.path

    def public(self) -> SourceIdentity:
        path = Path(self.path).name if self.path is not None else None
        return replace(self, path=path, base=self.base.public() if self.base else None)

    def reproduce_args(self) -> list[str]:
        if self.repo_id:
            args = ["--source", self.repo_id, "--file", self.file] + (["--revision", self.commit] if self.commit else [])
            return args + (["--base", self.base.spec] if self.base else [])
        args = ["--source", self.file]
        if self.base:
            args += ["--base", self.base.spec] + (["--revision", self.base.revision] if self.base.revision else [])
        return args

    def resolve_args(self, transformer: str | None = None) -> dict[str, Any]:
        if self.base is None:
            return super().resolve_args(transformer)
        if self.repo_id and transformer is None:
            spec, revision = self.base._where()
            return {"spec": self.repo_id, "source_file": self.file, "revision": self.commit, "base": spec, "base_revision": revision}
        return self.base.resolve_args(transformer=transformer or self.path or self.file)


@dataclass(frozen=True)
class UnknownSource(SourceIdentity):
    """A manifest's source this version does not know (kept as it is, published path-free)."""

    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.data)

    def public(self) -> SourceIdentity:
        return UnknownSource(_paths_to_names(self.data))


def _paths_to_names(data: dict[str, Any]) -> dict[str, Any]:
    return {
        k: _paths_to_names(v) if isinstance(v, dict) else Path(str(v)).name if k == "path" else v
        for k, v in data.items()
    }


KINDS: dict[str, type[SourceIdentity]] = {
    cls.kind: cls for cls in (BuiltinSource, LocalSource, HubSource, SingleFileSource)
}


def _from_dict(data: Any) -> SourceIdentity:
    cls = KINDS.get(data.get("kind")) if isinstance(data, dict) else None
    names = {f.name for f in fields(cls)} if cls else set()
    if cls is None or not set(data) - {"kind"} <= names:
        return UnknownSource(dict(data) if isinstance(data, dict) else {})
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k != "kind"}
    if "base" in kwargs:
        kwargs["base"] = _from_dict(kwargs["base"])
        if not isinstance(kwargs["base"], PipelineIdentity):
            return UnknownSource(dict(data))
    try:
        return cls(**kwargs)
    except TypeError:  # a required field is missing
        return UnknownSource(dict(data))
