"""The audit report as one HTML file (plots inlined), and a PDF of it when Chromium is installed."""

from __future__ import annotations

import base64
import shutil
import subprocess
import tempfile
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from monitor.report import ReportError
from monitor.report.facts import ReportFacts

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
# Chromium's own background connections fail on a closed network and slow every start (see console tests).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-pdf-header-footer"]


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x * 100:.{digits}f}%"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def _timestamp(epoch: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _aggregation(agg) -> str:
    params = {k: v for k, v in agg.model_dump().items() if k != "kind"}
    return agg.kind + (f" ({', '.join(f'{k} {v}' for k, v in params.items())})" if params else "")


def _inline_png(path: Path | None) -> str | None:
    return None if path is None else "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def render_html(facts: ReportFacts) -> str:
    env = Environment(loader=PackageLoader("monitor.report", "templates"), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pct=_pct, num=_num, png=_inline_png, aggregation=_aggregation, timestamp=_timestamp)
    return env.get_template("report.html").render(r=facts)


def chromium() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM) if p), None)


def write_pdf(html: Path, pdf: Path, timeout_s: float = 120.0) -> None:
    browser = chromium()
    if browser is None:
        raise ReportError("no Chromium on PATH (Debian: apt-get install chromium); the HTML report is complete "
                          "without the PDF")
    with tempfile.TemporaryDirectory(prefix="monitor-report-") as profile:
        cmd = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--print-to-pdf={pdf}", html.resolve().as_uri()]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            raise ReportError(f"Chromium did not print {html} within {timeout_s:.0f} s") from e
    if res.returncode != 0 or not pdf.is_file() or pdf.stat().st_size == 0:
        raise ReportError(f"Chromium could not print {html} to PDF (exit {res.returncode}): {res.stderr.strip()[-500:]}")
