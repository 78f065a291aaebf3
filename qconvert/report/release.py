"""The report at the end of ``qconvert release``: ``<workdir>/report``, and with ``--push`` its
Space, the cards' cross-links and the collection's link (:mod:`qconvert.report.hub`).

Without ``--push`` the report is of the workdir's validated outputs. With ``--push`` and a
collection it is of the collection, read back from the Hub after the pushes: every published
variant (those of earlier runs and other workdirs too, a CI matrix job's siblings), with the
numbers their cards show. The variants pushed from this workdir then get the cross-links.

A report that cannot be made (no variant has validation results yet) or published is a line
in the log, not a failure of the release: the variants themselves are done and recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import QConvertError

REPORT_DIR = "report"


def _try(build: Any, log: Any) -> Any:
    try:
        return build()
    except QConvertError as e:
        log(f"report: not written: {e.one_line()}")
        return None


def after_release(plan: Any, workdir: Path, *, push: bool, token: str | None, endpoint: str | None,
                  log: Any) -> Any:
    """Write (and with ``push`` publish) the release's report; returns the ReportResult or None."""
    from . import build_report

    out = workdir / REPORT_DIR
    local = _try(lambda: build_report([workdir], out), log)
    report = local
    if push and plan.collection:
        spec = f"{plan.namespace}/{plan.collection}"
        report = _try(lambda: build_report([spec], out, token=token, endpoint=endpoint), log)
    if report is None:
        return None
    log(f"report: {report.html}")
    for note in report.notes:
        log(f"report: note: {note}")
    if not push:
        return report
    if len(report.variants) < 2:
        log("report: not published (one variant: nothing to compare)")
        return report
    folders = {v.repo_id: v.folder for v in (local.variants if local is not None else []) if v.repo_id}
    try:
        publish(report, plan, folders, token=token, endpoint=endpoint, log=log)
    except QConvertError as e:
        log(f"report: publishing FAILED: {e.one_line()}")
    return report


def publish(report: Any, plan: Any, folders: dict[str, Path], *, token: str | None, endpoint: str | None,
            log: Any) -> None:
    """The Space, the cross-links of the variants in ``folders`` (repo id -> output), the collection."""
    from .hub import cross_link, link_collection, push_space, space_id, space_url

    space = space_id(plan.namespace, report.source)
    url = space_url(space, endpoint)
    push_space(report, space, token=token, endpoint=endpoint, log=log)
    cross_link(report, folders, url, token=token, endpoint=endpoint, log=log)
    if plan.collection:
        link_collection(plan.collection, plan.namespace, url, token=token, endpoint=endpoint, log=log)
