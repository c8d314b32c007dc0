"""The few Prometheus queries the audit report makes, through its HTTP API (instant queries)."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from monitor.report import ReportError

WINDOW_RE = re.compile(r"^[1-9][0-9]*[smhdw]$")


@dataclass(frozen=True)
class Sample:
    labels: dict[str, str]
    value: float


class PrometheusAPI:
    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        if not re.match(r"^https?://[^\s/]+", url):
            raise ReportError(f"--prometheus {url!r} is not an http(s) URL")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def query(self, expr: str) -> list[Sample]:
        target = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            with urllib.request.urlopen(target, timeout=self.timeout_s) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            raise ReportError(f"Prometheus at {self.url} refused the query {expr!r}: HTTP {e.code} {detail}") from e
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise ReportError(f"cannot reach Prometheus at {self.url}: {e}") from e
        if body.get("status") != "success":
            raise ReportError(f"Prometheus at {self.url} answered {body.get('error', body)} to {expr!r}")
        return [Sample(r["metric"], float(r["value"][1])) for r in body["data"]["result"]]


def window_seconds(window: str) -> int:
    return int(window[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[window[-1]]


def check_window(window: str) -> str:
    if not WINDOW_RE.match(window):
        raise ReportError(f"--window {window!r} is not a Prometheus duration such as 24h or 7d")
    return window
