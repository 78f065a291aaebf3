"""The facts a model card is made of, gathered from an output folder and its source.

Everything here is deterministic: the same output folder (``qconvert.json``,
``validation.json``, files) gives the same facts, so the rendered card is byte-identical.

* Base model: ``--base-model``, else the ``base_model`` of an earlier qconvert card in the
  folder, else the Hub repo the output was converted from (a Hub source, the repo of a
  single file downloaded from one -- a finetune's own --, the ``--base`` of a local single file, or a local folder inside a Hub cache
  ``models--org--name/snapshots/<sha>``). Built-in demo pipelines have none.
* License: ``--license`` (with ``--license-name``/``--license-link``), else an earlier
  qconvert card in the folder (so ``qconvert push`` re-renders with what ``qconvert card``
  was told), else the base model's own card (``README.md`` front matter of the source
  folder, or of the Hub repo through the local cache). A single file from a Hub repo (a
  finetune) takes its own repo's card first, with the ``--base``'s ``license_name``/``link``
  where it says the same license without them, and the ``--base``'s when it declares none. The built-in demos are random
  weights made by qconvert and are Apache-2.0. Nothing found: :class:`InputError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, UsageError, opt
from ..identity import SourceIdentity

CARD_MARKER = "<!-- qconvert:card -->"
USAGE_MARKER = "<!-- qconvert:usage -->"
CARD_NAME = "README.md"
BUILTIN_LICENSE = "apache-2.0"
HUB_URL = "https://huggingface.co"
DEFAULT_PROMPT = "a photo of a cat sitting on a red car"

# Pipeline order for the tables: what was quantized first.
_ORDER = ("transformer", "text_encoder_2", "text_encoder", "vae", "tokenizer", "tokenizer_2", "scheduler")
_DEFAULT_COMPONENTS = ["transformer", "text_encoder_2"]


@dataclass
class LicenseInfo:
    license: str
    name: str | None = None
    link: str | None = None
    origin: str | None = None  # the Hub repo whose card declared it (a relative link points there)


@dataclass
class CardFacts:
    out: Path
    manifest: dict[str, Any]
    validation: dict[str, Any] | None
    base_model: str | None
    license: LicenseInfo
    repo_id: str | None
    command: str

    @property
    def backend(self) -> str:
        return str(self.manifest["backend"])

    @property
    def scheme(self) -> str:
        return str(self.manifest["scheme"])

    @property
    def backend_class(self) -> Any:
        """The backend's class: its declarations and card hooks (``qconvert.convert.base``)."""
        from ..convert import backend_class

        return backend_class(self.backend)

    @property
    def family(self) -> Any:
        """The output's model family (``qconvert.families``): pipeline class, card wording."""
        from ..manifest import manifest_family

        return manifest_family(self.manifest)

    @property
    def source(self) -> SourceIdentity:
        """What the output was converted from (``qconvert.identity``)."""
        return SourceIdentity.from_dict(self.manifest.get("source") or {})

    @property
    def files_only(self) -> bool:
        """The output holds only the converted models' files; the rest comes from the base."""
        from ..convert import container_of
        from ..convert.base import PIPELINE_FOLDER

        return container_of(self.manifest) != PIPELINE_FOLDER

    @property
    def repo(self) -> str:
        """What the usage snippet loads: the repo id, else this folder."""
        return self.repo_id or self.out.resolve().as_posix()

    @property
    def dtype(self) -> str:
        return card_dtype(self.manifest, self.validation)

    def files(self, component: str) -> list[str]:
        return component_files(self.manifest, component)

    def base_pipeline(self) -> tuple[list[str], str]:
        """Import lines and the Python expression of the base pipeline (for file-only outputs)."""
        base = self.source.pipeline
        if base.builtin and not (self.base_model and self.base_model != base.hub_repo):
            return ["from qconvert.tiny import builtin_path"], f"str(builtin_path({json.dumps(base.builtin)}))"
        if self.base_model:
            return [], json.dumps(self.base_model)
        path = Path(base.local_path or ".")
        # a card for a Hub repo never names the converter's own directories: the base folder's name
        return [], json.dumps("./" + path.name if self.repo_id else path.as_posix())


# --- reading -------------------------------------------------------------------------------


def read_validation(out: Path) -> dict[str, Any] | None:
    from ..validate import VALIDATION_NAME

    path = Path(out) / VALIDATION_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise InputError(f"{path} is not readable JSON", hint=f"run `qconvert validate {out}` again") from None
    return data if isinstance(data, dict) else None


def front_matter(path: Path) -> dict[str, Any] | None:
    """YAML metadata of a card file, or None (no file, no block, unparsable)."""
    from huggingface_hub.repocard import metadata_load

    try:
        data = metadata_load(path)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    except Exception:  # noqa: BLE001 - yaml errors: a broken base card is "no card"
        return None
    return data if isinstance(data, dict) else None


def existing_card_metadata(out: Path) -> dict[str, Any]:
    """Metadata of a card qconvert wrote earlier into ``out`` ({} for none or a hand-written one)."""
    path = Path(out) / CARD_NAME
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if CARD_MARKER not in text:
        return {}
    return front_matter(path) or {}


def is_generated_card(path: Path) -> bool:
    try:
        return CARD_MARKER in Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def _base_card(identity: SourceIdentity, *, token: str | None, endpoint: str | None) -> dict[str, Any] | None:
    """Front matter of the source pipeline's own README.md: in its folder, else on the Hub."""
    base = identity.pipeline
    if base.local_path:
        return front_matter(Path(base.local_path) / CARD_NAME)
    if base.hub_repo:
        path = _hub_readme(base.hub_repo, base.revision, token=token, endpoint=endpoint)
        return front_matter(path) if path else None
    return None


def _own_card(identity: SourceIdentity, *, token: str | None, endpoint: str | None) -> dict[str, Any] | None:
    """Front matter of the card of the Hub repo a single file came from (a finetune's own repo),
    when that is not its base pipeline's; else None."""
    repo = identity.hub_repo
    if not repo or repo == identity.pipeline.hub_repo:
        return None
    path = _hub_readme(repo, identity.revision, token=token, endpoint=endpoint)
    return front_matter(path) if path else None


def _finetune_license(identity: SourceIdentity, *, token: str | None, endpoint: str | None) -> LicenseInfo | None:
    """A finetune's license: its own repo's card, with the base's name and link where it says
    ``other`` and leaves them out (a finetune of a gated base stays under the base's license);
    none declared there: the base's."""
    own = _license_from(_own_card(identity, token=token, endpoint=endpoint), origin=identity.hub_repo)
    base = _license_from(_base_card(identity, token=token, endpoint=endpoint), origin=identity.pipeline.hub_repo)
    if own is None or base is None:
        return own or base
    if own.license == base.license and not own.name and not own.link:
        return base
    return own


def _hub_readme(repo_id: str, revision: str | None, *, token: str | None, endpoint: str | None) -> Path | None:
    """The base repo's README.md: from the local cache (snapshot_download put it there), else the Hub."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, CARD_NAME, revision=revision)
    except Exception:  # noqa: BLE001 - a malformed revision: just go to the Hub
        cached = None
    if isinstance(cached, str):
        return Path(cached)
    try:
        return Path(hf_hub_download(repo_id, CARD_NAME, revision=revision, token=token, endpoint=endpoint))
    except Exception:  # noqa: BLE001 - offline, gated, no README: "no license found"
        return None


def _license_from(meta: dict[str, Any] | None, origin: str | None = None) -> LicenseInfo | None:
    if not meta:
        return None
    lic = meta.get("license")
    if isinstance(lic, list):
        lic = lic[0] if lic else None
    if not isinstance(lic, str) or not lic.strip():
        return None
    name = meta.get("license_name")
    link = meta.get("license_link")
    return LicenseInfo(
        lic.strip(),
        name if isinstance(name, str) and name else None,
        link if isinstance(link, str) and link else None,
        origin,
    )


def resolve_license(
    out: Path,
    manifest: dict[str, Any],
    base_model: str | None,
    *,
    license: str | None,
    license_name: str | None,
    license_link: str | None,
    token: str | None,
    endpoint: str | None,
) -> LicenseInfo:
    if license:
        if license == "other" and not license_name:
            raise UsageError(
                "--license other needs --license-name (and usually --license-link)",
                hint="e.g. --license other --license-name flux-1-dev-non-commercial-license --license-link LICENSE.md",
            )
        info = LicenseInfo(license, license_name, license_link)
    else:
        if license_name or license_link:
            raise UsageError("--license-name/--license-link need --license")
        identity = SourceIdentity.from_dict(manifest.get("source") or {})
        # an earlier qconvert card keeps what was chosen then (e.g. `qconvert card --license`)
        info = _license_from(existing_card_metadata(out))
        if info is None and identity.builtin:
            info = LicenseInfo(BUILTIN_LICENSE, None, None)
        if info is None:
            info = _finetune_license(identity, token=token, endpoint=endpoint)
        if info is None and base_model and base_model != identity.hub_repo:
            path = _hub_readme(base_model, None, token=token, endpoint=endpoint)
            info = _license_from(front_matter(path) if path else None)
        if info is None:
            what = base_model or identity.label
            raise InputError(
                f"no license found for the base model {what} (its card declares none)",
                hint=f"pass {opt('license')} (e.g. {opt('license', 'apache-2.0')}, or {opt('license', 'other')} "
                f"{opt('license_name', metavar='NAME')} {opt('license_link', metavar='URL')})",
            )
    # A relative license_link points into the base repo; keep it only if the file came along.
    if info.link and "://" not in info.link and not (Path(out) / info.link).is_file():
        repo = info.origin or base_model
        info.link = f"{HUB_URL}/{repo}/blob/main/{info.link}" if repo else None
    return info


def reproduce_command(manifest: dict[str, Any], out_name: str) -> str:
    """The ``qconvert flux`` command that makes this output again (no local absolute paths)."""
    source = SourceIdentity.from_dict(manifest.get("source") or {})
    args = ["qconvert", "flux", *source.reproduce_args()]
    args += ["--backend", str(manifest["backend"]), "--scheme", str(manifest["scheme"])]
    opts = manifest.get("options") or {}
    comps = opts.get("components")
    if comps and list(comps) != _DEFAULT_COMPONENTS:
        args += ["--components", ",".join(comps)]
    from ..convert import backend_class

    for key in backend_class(str(manifest["backend"])).cli_flags:  # the rest are not flags
        if opts.get(key) is not None:
            args += ["--" + key.replace("_", "-"), str(opts[key])]
    args += ["--out", out_name]
    import shlex

    return " ".join(shlex.quote(a) for a in args)


def install_line(manifest: dict[str, Any], *, builtin_base: bool) -> str:
    versions = manifest.get("versions") or {}
    pkgs = []
    for pkg in ("diffusers", "transformers"):
        v = versions.get(pkg)
        pkgs.append(f'"{pkg}>={v}"' if v else pkg)
    pkgs.append("accelerate")
    from ..convert import backend_class

    backend = backend_class(str(manifest.get("backend")))
    if backend.pip_package and backend.pip_package not in ("diffusers", "transformers"):  # listed already
        v = versions.get(backend.pip_package)
        op = "==" if backend.pin_version else ">="
        pkgs.append(f'"{backend.pip_package}{op}{v}"' if v else backend.pip_package)
    if builtin_base:
        pkgs.append(f'"qconvert=={versions.get("qconvert", "")}"' if versions.get("qconvert") else "qconvert")
    return "pip install " + " ".join(pkgs)


def card_dtype(manifest: dict[str, Any], validation: dict[str, Any] | None) -> str:
    if validation and isinstance(validation.get("settings"), dict) and validation["settings"].get("dtype"):
        return str(validation["settings"]["dtype"])
    if SourceIdentity.from_dict(manifest.get("source") or {}).builtin:
        return "float32"
    return "bfloat16"


def _transformer_config(out: Path) -> dict[str, Any]:
    path = Path(out) / "transformer" / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def generation_args(facts: CardFacts) -> dict[str, Any]:
    """Steps/size/guidance/T5 tokens for the usage snippet: the family's (schnell's from its config)."""
    return facts.family.generation_settings(_transformer_config(facts.out), builtin=bool(facts.source.builtin))


def component_files(manifest: dict[str, Any], name: str) -> list[str]:
    comp = (manifest.get("components") or {}).get(name) or {}
    return sorted((comp.get("files") or {}).keys())


def ordered_components(manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    comps = manifest.get("components") or {}
    names = sorted(comps, key=lambda n: (comps[n].get("action") != "quantize", _ORDER.index(n) if n in _ORDER else 99, n))
    return [(n, comps[n]) for n in names]
