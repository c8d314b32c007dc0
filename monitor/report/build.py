"""Write the audit report folder: index.html (self-contained), the plots beside it, report.pdf if it can."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from monitor.config.load import LoadedConfig
from monitor.offline.evaluate import DetectorReport, plots
from monitor.report import ReportError
from monitor.report.facts import gather
from monitor.report.prometheus import PrometheusAPI, check_window
from monitor.report.render import render_html, write_pdf

log = logging.getLogger("monitor.report")


@dataclass
class Written:
    html: Path
    pdf: Path | None
    pdf_error: str | None  # why there is no PDF, when one was wanted


def write_report(loaded: LoadedConfig, out: Path, version: str, evaluation: list[DetectorReport],
                 eval_files: list[Path], prometheus: str | None, window: str, pdf: bool = True) -> Written:
    window = check_window(window)
    api = PrometheusAPI(prometheus) if prometheus else None
    facts = gather(loaded, version, evaluation, eval_files, api, window)
    out.mkdir(parents=True, exist_ok=True)
    if evaluation:
        written = {p.stem: p for p in plots(evaluation, out / "plots")}
        for d in facts.detectors:
            d.plot = written.get(d.spec.name)
    html = out / "index.html"
    html.write_text(render_html(facts), encoding="utf-8")
    log.info("report written", extra={"path": str(html)})
    if not pdf:
        return Written(html, None, None)
    target = out / "report.pdf"
    try:
        write_pdf(html, target)
    except ReportError as e:
        return Written(html, None, str(e))
    return Written(html, target, None)
