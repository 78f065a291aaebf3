"""The report and the Hub: reading a collection's variants, publishing a release's report.

Reading (``qconvert report NAMESPACE/COLLECTION``): the collection is found by its slug (as in
its URL) or by ``namespace/Title``; each model in it that holds a ``qconvert.json`` and a
``validation.json`` is a variant (its samples are downloaded to a temporary folder); others
are left out with a note.

Publishing (``qconvert release --push``, after the variants were pushed):

* the report folder goes to a static Space ``<namespace>/<source>-report`` (its page is the
  report) in one commit, none when the Space already holds the same files;
* each variant pushed from the workdir (and in the report) gets an "Other variants of this model" section in its
  card (the Markdown table with links, its own row marked): the section is kept in the
  output folder (``.qconvert-variants.md``, never uploaded) so that later ``qconvert card``
  and ``qconvert push`` runs keep it, and the variant is pushed again, which commits the
  changed README.md alone, or nothing when it did not change;
* the collection's description links the Space (only when it changes; a description someone
  wrote is kept, the link appended when it fits the Hub's 150 characters).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import InputError, redact, register_secret
from .collect import MANIFEST, VALIDATION, Collected, read_folder

SECTION_FILE = ".qconvert-variants.md"
DESCRIPTION_MAX = 150
DESCRIPTION_PREFIX = "Compare the variants:"


def _api(token: str | None, endpoint: str | None) -> Any:
    from huggingface_hub import HfApi

    register_secret(token)
    return HfApi(endpoint=endpoint, token=token)


def find_collection(api: Any, spec: str, *, endpoint: str | None) -> Any:
    """The collection ``spec`` names (slug or ``namespace/Title``), or a one-line error."""
    from huggingface_hub.errors import HfHubHTTPError

    from ..publish import hub_error

    from huggingface_hub.errors import OfflineModeIsEnabled

    ns, rest = spec.split("/", 1)
    try:
        return api.get_collection(spec)
    except OfflineModeIsEnabled:
        raise InputError(f"{spec} is not a local folder, and HF_HUB_OFFLINE is set: reading a collection needs the Hub",
                         hint="unset HF_HUB_OFFLINE, or pass a local folder") from None
    except HfHubHTTPError as e:
        if getattr(e.response, "status_code", None) not in (400, 404):
            raise hub_error(e, f"reading the collection {spec}", repo_id=spec, endpoint=endpoint) from None
    except Exception as e:  # noqa: BLE001 - transport: one line
        raise hub_error(e, f"reading the collection {spec}", repo_id=spec, endpoint=endpoint) from None
    try:
        for c in api.list_collections(owner=ns, limit=100):
            if c.title == rest:
                return api.get_collection(c.slug)
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, f"listing the collections of {ns}", repo_id=spec, endpoint=endpoint) from None
    raise InputError(f"there is no collection {spec} on the Hub (nor a local folder {spec})",
                     hint="pass a folder, or a collection's slug (namespace/title-slug-id, as in its URL) or namespace/Title")  # fmt: skip


def _download_variant(api: Any, repo_id: str, folder: Path) -> bool:
    """The repo's manifest, validation and samples into ``folder``; False when it has none."""
    import json

    from huggingface_hub.errors import EntryNotFoundError

    try:
        for name in (MANIFEST, VALIDATION):
            api.hf_hub_download(repo_id, name, local_dir=folder)
    except EntryNotFoundError:
        return False
    samples = json.loads((folder / VALIDATION).read_text(encoding="utf-8")).get("samples") or []
    for s in samples:
        if re.fullmatch(r"samples/(quantized|reference)-\d+\.png", str(s)):
            api.hf_hub_download(repo_id, str(s), local_dir=folder)
    return True


def collect_collection(spec: str, *, token: str | None, endpoint: str | None, scratch: Path) -> Collected:
    from ..publish import hub_error

    api = _api(token, endpoint)
    coll = find_collection(api, spec, endpoint=endpoint)
    variants, notes = [], []
    for item in coll.items or []:
        if item.item_type != "model":
            continue
        folder = scratch / item.item_id.replace("/", "--")
        try:
            found = _download_variant(api, item.item_id, folder)
        except Exception as e:  # noqa: BLE001
            raise hub_error(e, f"downloading the results of {item.item_id}", repo_id=item.item_id,
                            endpoint=endpoint) from None  # fmt: skip
        if not found:
            notes.append(f"{item.item_id} has no qconvert validation results: left out")
            continue
        variants.append(read_folder(folder, repo_id=item.item_id, name=item.item_id.split("/")[-1]))
    if not variants:
        raise InputError(f"the collection {coll.slug} holds no repo with qconvert validation results",
                         hint="push validated outputs to it (qconvert push OUT --collection TITLE)")  # fmt: skip
    info = {"slug": coll.slug, "title": coll.title}
    return Collected(variants, f"the collection {coll.title}", Path(f"report-{coll.slug.split('/')[-1]}"), info, notes)


# --- publishing ------------------------------------------------------------------------------


def space_id(namespace: str, source: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", source).strip("-.")[:80] or "variants"
    return f"{namespace}/{name}-report"


def space_url(repo_id: str, endpoint: str | None) -> str:
    from huggingface_hub import constants

    return f"{(endpoint or constants.ENDPOINT).rstrip('/')}/spaces/{repo_id}"


def section(table: Any, repo_id: str, report_url: str | None) -> str:
    """The card section of ``repo_id``: every variant's row, its own marked."""
    from .render import markdown_table, settings_note

    link = f" The full comparison, with images and plots: [report]({report_url})." if report_url else ""
    return (f"## Other variants of this model\n\nThe same source, quantized other ways ({settings_note(table)}){link}\n\n"
            + markdown_table(table, current=repo_id))  # fmt: skip


def _space_files(report: Any) -> dict[str, Any]:
    """What the Space holds: the report folder, and a README.md that makes it a static Space."""
    from ..publish import LocalFile, local_files

    out = Path(report.out)
    files = {p: LocalFile((out / p).stat().st_size, None, path=out / p) for p in local_files(out)}
    readme = ("---\ntitle: " + report.source[:60].replace(":", " ") + " variants\nsdk: static\napp_file: index.html\n"
              "pinned: false\n---\n\n" + report.markdown.read_text(encoding="utf-8")).encode("utf-8")  # fmt: skip
    files["README.md"] = LocalFile(len(readme), None, data=readme)
    return files


def push_space(report: Any, repo_id: str, *, token: str | None, endpoint: str | None, log: Any) -> bool:
    """Upload the report to its Space in one commit; False when nothing changed."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    from ..publish import _same, hub_error

    api = _api(token, endpoint)
    try:
        api.create_repo(repo_id, repo_type="space", space_sdk="static", exist_ok=True)
        info = api.space_info(repo_id, files_metadata=True)
        remote = {s.rfilename: s for s in info.siblings or []}
        files = _space_files(report)
        ops: list[Any] = [CommitOperationAdd(p, str(f.path) if f.path is not None else f.data)
                          for p, f in files.items() if not _same(f, remote.get(p))]  # fmt: skip
        ops += [CommitOperationDelete(p) for p in sorted(remote) if p not in files and p != ".gitattributes"]
        if not ops:
            return False
        log(f"report: pushing {len(ops)} file(s) to the Space {repo_id} in one commit")
        api.create_commit(repo_id, ops, repo_type="space", commit_message=f"qconvert report of {report.source}",
                          parent_commit=info.sha)  # fmt: skip
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, f"publishing the report to {repo_id}", repo_id=repo_id, endpoint=endpoint) from None
    return True


def cross_link(report: Any, folders: dict[str, Path], url: str | None, *, token: str | None, endpoint: str | None,
               log: Any) -> dict[str, bool]:
    """The card of each variant in ``folders`` (repo id -> its output folder) gets the section and
    is pushed again; returns repo id -> whether that made a commit."""
    from ..publish import push

    done = {}
    for repo_id, folder in sorted(folders.items()):
        if not any(v.repo_id == repo_id for v in report.variants):
            continue  # not in the report (not in the collection): nothing to link it with
        (folder / SECTION_FILE).write_text(section(report.table, repo_id, url), encoding="utf-8")
        result = push(folder, repo_id, token=token, endpoint=endpoint, info=log)
        done[repo_id] = result.committed
        log(f"{repo_id}: card cross-links {'pushed' if result.committed else 'unchanged'}")
    return done


def link_collection(title: str, namespace: str, url: str, *, token: str | None, endpoint: str | None, log: Any) -> bool:
    """The collection's description links the report; True when it was changed."""
    from ..publish import hub_error

    api = _api(token, endpoint)
    ours = f"{DESCRIPTION_PREFIX} {url}"
    try:
        coll = api.create_collection(title, namespace=namespace, exists_ok=True)
        now = coll.description or ""
        if url in now:
            return False
        wanted = ours if not now or now.startswith(DESCRIPTION_PREFIX) else f"{now} · {ours}"
        if len(wanted) > DESCRIPTION_MAX:
            log(redact(f"report: the description of {coll.slug} was left as it is (no room for the report link {url})"))
            return False
        api.update_collection_metadata(coll.slug, description=wanted)
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, f"linking the report from the collection {title!r}", repo_id=f"{namespace}/x",
                        endpoint=endpoint) from None  # fmt: skip
    log(f"report: linked from the description of the collection {coll.slug}")
    return True
