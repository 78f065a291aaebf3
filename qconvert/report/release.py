"""The report at the end of ``qconvert release``: ``<workdir>/report``, and with ``--push`` its
Space, the cards' cross-links and the collection's link (:mod:`qconvert.report.hub`).

A report that cannot be made (no variant has validation results yet) or published is a line
in the log, not a failure of the release: the variants themselves are done and recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import QConvertError

REPORT_DIR = "report"


def after_release(plan: Any, workdir: Path, *, push: bool, token: str | None, endpoint: str | None,
                  log: Any) -> Any:
    """Write (and with ``push`` publish) the release's report; returns the ReportResult or None."""
    from . import build_report

    try:
        report = build_report([workdir], workdir / REPORT_DIR)
    except QConvertError as e:
        log(f"report: not written: {e.one_line()}")
        return None
    log(f"report: {report.html}")
    for note in report.notes:
        log(f"report: note: {note}")
    if push and any(v.repo_id for v in report.variants):
        try:
            publish(report, plan, token=token, endpoint=endpoint, log=log)
        except QConvertError as e:
            log(f"report: publishing FAILED: {e.one_line()}")
    return report


def publish(report: Any, plan: Any, *, token: str | None, endpoint: str | None, log: Any) -> None:
    from .hub import cross_link, link_collection, push_space, space_id, space_url

    space = space_id(plan.namespace, report.source)
    url = space_url(space, endpoint)
    push_space(report, space, token=token, endpoint=endpoint, log=log)
    cross_link(report, url, token=token, endpoint=endpoint, log=log)
    if plan.collection:
        link_collection(plan.collection, plan.namespace, url, token=token, endpoint=endpoint, log=log)
