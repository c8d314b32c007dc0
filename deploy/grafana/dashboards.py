"""Generate the Grafana dashboards (plain Python, no dashboard library), or check them.

    python deploy/grafana/dashboards.py           # write deploy/grafana/*.json and the chart's copies
    python deploy/grafana/dashboards.py --check   # fail if a file is stale, a query does not parse
                                                  # (promtool), or a query names a metric that neither
                                                  # the monitor (docs/metrics.md) nor vLLM exports

Grafana >= 10.4 JSON (schemaVersion 39), a `datasource` variable (no hard-coded uid), `model_name`
and `detector` variables. vLLM's metric names are pinned to vLLM 0.32/0.33 (`VLLM_METRICS`).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "deploy/grafana"
CHART_COPY = ROOT / "helm/misalignment-monitor/files/dashboards"

# vLLM 0.32/0.33 metrics the dashboards read (renamed ones, e.g. gpu_cache_usage_perc, are not used).
VLLM_METRICS = {
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
    "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
}

DS = {"type": "prometheus", "uid": "${datasource}"}
M = 'model_name=~"$model_name"'


def monitor_metrics() -> set[str]:
    """Every series name the monitor exports, from docs/metrics.md (histograms with their suffixes)."""
    out = set()
    for line in (ROOT / "docs/metrics.md").read_text().splitlines():
        m = re.match(r"^\| `(misalignment_monitor_\w+)` \| (\w+) \|", line)
        if m:
            name, kind = m.groups()
            out |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    return out


def vllm_series() -> set[str]:
    out = set()
    for name in VLLM_METRICS:
        out |= {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"} if name.endswith("_seconds") else {name}
    return out


class Layout:
    """Places panels left to right on a 24-column grid."""

    def __init__(self) -> None:
        self.x = self.y = 0
        self.row_h = 0
        self.next_id = 1

    def place(self, w: int, h: int) -> dict:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def row(self, title: str) -> dict:
        self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel = {"type": "row", "title": title, "id": self._id(), "collapsed": False,
                 "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1}, "panels": []}
        self.y += 1
        return panel

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def panel(self, title: str, targets: list[tuple[str, str]], *, kind: str = "timeseries", unit: str = "short",
              w: int = 8, h: int = 8, description: str = "", **extra) -> dict:
        return {
            "type": kind, "title": title, "id": self._id(), "datasource": DS, "description": description,
            "gridPos": self.place(w, h),
            "targets": [{"refId": chr(65 + i), "datasource": DS, "expr": expr, "legendFormat": legend,
                         **({"format": "heatmap"} if kind == "heatmap" else {})}
                        for i, (expr, legend) in enumerate(targets)],
            "fieldConfig": {"defaults": {"unit": unit, **extra.pop("defaults", {})}, "overrides": []},
            "options": extra.pop("options", {}),
            **extra,
        }


def variables(detector: bool) -> dict:
    out = [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "current": {}},
        {"name": "model_name", "label": "Model", "type": "query", "datasource": DS, "refresh": 2, "includeAll": True,
         "multi": True, "query": {"query": "label_values(misalignment_monitor_build_info, model_name)", "refId": "v"},
         "definition": "label_values(misalignment_monitor_build_info, model_name)"},
    ]
    if detector:
        # Every detector in force has its evaluations series from the start (thresholds may not be exported).
        q = f"label_values(misalignment_monitor_detector_evaluations_total{{{M}}}, detector)"
        out.append({"name": "detector", "label": "Detector", "type": "query", "datasource": DS, "refresh": 2,
                    "includeAll": False, "multi": False, "query": {"query": q, "refId": "d"}, "definition": q})
        # Where the incident console lives (console.base_url): the dashboard links to its incidents.
        out.append({"name": "console_url", "label": "Console URL", "type": "textbox", "query": CONSOLE_URL,
                    "current": {"text": CONSOLE_URL, "value": CONSOLE_URL}, "hide": 2})
    return {"list": out}


CONSOLE_URL = "http://127.0.0.1:8470"


def dashboard(uid: str, title: str, panels: list[dict], detector_var: bool) -> dict:
    links = [{"title": "Runbooks", "type": "link", "url": "https://github.com/misalignment-monitor/misalignment-monitor/tree/main/runbooks"}]
    if detector_var:
        # keepTime appends from/to (the dashboard's range, e.g. now-6h): the console reads Grafana's time syntax.
        links.append({"title": "Incidents of $detector in the console", "type": "link", "keepTime": True,
                      "targetBlank": True, "url": "${console_url}/incidents?detector=${detector}"})
    return {
        "uid": uid, "title": title, "tags": ["misalignment-monitor", "vllm"], "schemaVersion": 39,
        "editable": True, "graphTooltip": 1, "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
        "templating": variables(detector_var), "annotations": {"list": []}, "panels": panels,
        "description": "misalignment-monitor (generated by deploy/grafana/dashboards.py; edit that, not this file)",
        "links": links,
    }


# Fires at a detector's page tier (what pages): a two-tier detector also counts its record tier.
PAGE = M + ', tier="page"'


def rate(metric: str, sel: str = M, by: str = "", window: str = "$__rate_interval") -> str:
    agg = f"sum by ({by}) " if by else "sum "
    return f"{agg}(rate({metric}{{{sel}}}[{window}]))"


def quantile(q: float, metric: str, sel: str = M, by: str = "") -> str:
    return f"histogram_quantile({q}, sum by (le{', ' + by if by else ''}) (rate({metric}_bucket{{{sel}}}[$__rate_interval])))"


def overview() -> dict:
    L = Layout()
    p = [L.row("Detectors")]
    p.append(L.panel("Detector fires by severity", [
        (f"sum by (severity) (increase(misalignment_monitor_detector_fires_total{{{PAGE}}}[$__rate_interval]))", "{{severity}}")],
        kind="timeseries", w=8, options={"legend": {"displayMode": "list", "placement": "bottom"}},
        defaults={"custom": {"drawStyle": "bars", "stacking": {"mode": "normal"}}},
        description="Requests on which a detector fired at its page tier, per interval, by the detector's severity."))
    p.append(L.panel("Top detectors (fires in range)", [
        (f"topk(10, sum by (detector) (increase(misalignment_monitor_detector_fires_total{{{PAGE}}}[$__range])))", "{{detector}}")],
        kind="bargauge", w=8, options={"orientation": "horizontal", "reduceOptions": {"calcs": ["lastNotNull"]}}))
    p.append(L.panel("Fire rate per 1k requests", [
        (f"1000 * {rate('misalignment_monitor_detector_fires_total', PAGE, by='detector')} / ignoring(detector) group_left "
         f"{rate('misalignment_monitor_requests_scored_total')}", "{{detector}}")], w=8,
        description="Fires per thousand requests the monitor judged, by detector."))
    p.append(L.panel("Actions taken (abort, annotate)", [
        (f"sum by (detector, action) (increase(misalignment_monitor_actions_total{{{M}}}[$__rate_interval]))",
         "{{action}} {{detector}}")], w=12, defaults={"custom": {"drawStyle": "bars", "stacking": {"mode": "normal"}}},
        description="Requests that detectors with an action aborted or annotated (docs/enforcement.md); "
                    "MisalignmentRequestsAborted."))
    p.append(L.panel("Control channel to vLLM's API servers", [
        (f"sum(misalignment_monitor_control_receivers{{{M}}})", "API servers connected"),
        (rate("misalignment_monitor_control_messages_dropped_total"), "messages dropped/s")], w=12,
        description="0 API servers while detectors act: MisalignmentMonitorEnforcementDown. Dropped messages are "
                    "actions not taken (an API server's buffer was full, or it went away)."))
    p.append(L.row("Coverage: is the monitor seeing everything vLLM serves?"))
    p.append(L.panel("Tokens scored vs tokens vLLM processed", [
        (rate("misalignment_monitor_tokens_scored_total"), "scored by the monitor"),
        (f"{rate('vllm:prompt_tokens_total')} + {rate('vllm:generation_tokens_total')}", "vLLM prompt + generated"),
        (rate("misalignment_monitor_positions_not_covered_total"), "not computed (prefix cache)")],
        unit="short", w=12, description="The two lines should track each other; a gap is MisalignmentMonitorBlind."))
    p.append(L.panel("Ring drops", [
        (rate("misalignment_monitor_ring_slots_dropped_total", by="reason"), "{{reason}}"),
        (rate("misalignment_monitor_ring_rows_dropped_total"), "rows dropped"),
        (rate("misalignment_monitor_ring_producer_errors_total"), "tap errors"),
        (rate("misalignment_monitor_slots_skipped_total", by="reason"), "skipped {{reason}}"),
        (f"sum(misalignment_monitor_taps_disabled{{{M}}})", "workers with the tap off")], w=12,
        description="Dropped: never scored (ring full, overwritten, corrupt). Skipped: read, not scored "
                    "(MisalignmentMonitorSlotsSkipped). Tap off: /dev/shm too small (MisalignmentMonitorTapDisabled)."))
    p.append(L.row("Sidecar"))
    p.append(L.panel("Latency (p99)", [
        (quantile(0.99, "misalignment_monitor_scoring_lag_seconds"), "forward pass → scored"),
        (quantile(0.99, "misalignment_monitor_detection_latency_seconds"), "forward pass → fire"),
        (quantile(0.99, "misalignment_monitor_scoring_duration_seconds"), "scoring one slot"),
        (quantile(0.99, "misalignment_monitor_kafka_delivery_latency_seconds"), "event → Kafka ack")], unit="s", w=8))
    p.append(L.panel("Ring fill", [
        (f"sum(misalignment_monitor_ring_lag_slots{{{M}}}) / sum(misalignment_monitor_ring_capacity_slots{{{M}}})", "lag / capacity"),
        (f"max(misalignment_monitor_loop_heartbeat_age_seconds{{{M}}})", "loop heartbeat age (s)")], unit="percentunit", w=8))
    p.append(L.panel("Kafka delivery", [
        (rate("misalignment_monitor_kafka_events_sent_total"), "sent"),
        (rate("misalignment_monitor_kafka_events_spooled_total"), "spooled"),
        (rate("misalignment_monitor_kafka_events_dropped_total", by="reason"), "dropped {{reason}}"),
        (rate("misalignment_monitor_kafka_send_errors_total"), "send errors"),
        (f"sum(misalignment_monitor_kafka_spool_events{{{M}}})", "in spool"),
        (f"sum(misalignment_monitor_kafka_queue_events{{{M}}})", "in memory (lost on a kill)"),
        (f"min(misalignment_monitor_kafka_sender_up{{{M}}})", "sender up")], w=8))
    p.append(L.panel("Config reloads", [
        (f"sum by (outcome) (increase(misalignment_monitor_config_reloads_total{{{M}}}[$__rate_interval]))", "{{outcome}}"),
        (f"min(misalignment_monitor_config_last_reload_successful{{{M}}})", "last reload ok")], w=8,
        defaults={"custom": {"drawStyle": "bars"}}))
    p.append(L.panel("Requests in flight in the sidecar", [
        (f"sum(misalignment_monitor_requests_in_flight{{{M}}})", "in flight"),
        (rate("misalignment_monitor_requests_completed_total", by="reason"), "completed/s {{reason}}"),
        (rate("misalignment_monitor_requests_not_scored_total", by="reason"), "not scored/s {{reason}}")], w=8,
        description="Not scored: sampled_out is `sampling.fraction` at work; over_limit means more requests than "
                    "`sampling.max_requests` (MisalignmentMonitorRequestsNotScored)."))
    p.append(L.panel("Build", [
        (f"count by (version, model_name, scoring_device) (misalignment_monitor_build_info{{{M}}})",
         "{{version}} {{model_name}} {{scoring_device}}")],
        kind="table", w=8, options={"showHeader": True}))
    p.append(L.row("vLLM (beside the monitor)"))
    p.append(L.panel("Requests running / waiting", [
        (f"sum(vllm:num_requests_running{{{M}}})", "running"), (f"sum(vllm:num_requests_waiting{{{M}}})", "waiting")], w=6))
    p.append(L.panel("Time to first token (p50, p99)", [
        (quantile(0.5, "vllm:time_to_first_token_seconds"), "p50"), (quantile(0.99, "vllm:time_to_first_token_seconds"), "p99")],
        unit="s", w=6))
    p.append(L.panel("Inter-token latency (p50, p99)", [
        (quantile(0.5, "vllm:inter_token_latency_seconds"), "p50"), (quantile(0.99, "vllm:inter_token_latency_seconds"), "p99")],
        unit="s", w=6))
    p.append(L.panel("Generated tokens/s and KV cache", [
        (rate("vllm:generation_tokens_total"), "generated tokens/s"),
        (f"max(vllm:kv_cache_usage_perc{{{M}}})", "KV cache usage")], w=6))
    return dashboard("misalignment-monitor-overview", "misalignment-monitor / Overview", p, detector_var=False)


def detector() -> dict:
    L = Layout()
    D = f'{M}, detector="$detector"'
    p = [L.row("$detector")]
    p.append(L.panel("Final score / threshold (heatmap; 1 = the firing line)", [
        (f"sum by (le) (increase(misalignment_monitor_detector_score_ratio_bucket{{{D}}}[$__rate_interval]))", "{{le}}")],
        kind="heatmap", w=12, h=9, options={"calculate": False, "yAxis": {"unit": "short"}, "color": {"scheme": "Oranges"}},
        description="Each request's final detector score divided by its threshold."))
    p.append(L.panel("Score / threshold quantiles", [
        (quantile(0.5, "misalignment_monitor_detector_score_ratio", D), "p50"),
        (quantile(0.9, "misalignment_monitor_detector_score_ratio", D), "p90"),
        (quantile(0.99, "misalignment_monitor_detector_score_ratio", D), "p99"),
        ("vector(1)", "threshold")],
        w=12, h=9))
    p.append(L.panel("Fires and verdicts", [
        (f"sum by (tier) (increase(misalignment_monitor_detector_fires_total{{{D}}}[$__rate_interval]))",
         "fires ({{tier}} tier)"),
        (f"sum by (outcome) (increase(misalignment_monitor_detector_evaluations_total{{{D}}}[$__rate_interval]))", "verdict {{outcome}}"),
        (f"sum by (action) (increase(misalignment_monitor_actions_total{{{D}}}[$__rate_interval]))", "{{action}}")],
        w=12, defaults={"custom": {"drawStyle": "bars"}}))
    p.append(L.panel("Threshold", [(f"max by (severity) (misalignment_monitor_detector_threshold{{{D}}})", "{{severity}}")],
                     kind="stat", w=12, description="Empty unless the sidecar exports thresholds "
                     "(sinks.prometheus.expose_thresholds)."))
    p.append(L.row("Drift against the calibration set"))
    p.append(L.panel("Drift (population-stability index; > 0.25: a shift)", [
        (f"max(misalignment_monitor_detector_score_psi{{{D}}})", "scores of $detector"),
        (f"max by (feature) (misalignment_monitor_feature_firing_psi{{{M}}})", "firing of {{feature}}"),
        ("vector(0.25)", "shift line")],
        w=12, description="The detector's final scores over its window, and each watched input's share of firing prompt "
        "tokens, compared with the baseline `monitor calibrate` stored (docs/drift.md). Empty until the window holds "
        "drift.min_requests requests, or when the detector was calibrated without a baseline."))
    p.append(L.panel("Input firing rate: window vs calibration", [
        (f"max by (feature) (misalignment_monitor_feature_firing_rate{{{M}}})", "now {{feature}}"),
        (f"max by (feature) (misalignment_monitor_feature_firing_rate_baseline{{{M}}})", "calibration {{feature}}")],
        unit="percentunit", w=12))
    p.append(L.row("Watched features"))
    p.append(L.panel("SAE feature activation quantiles (p50, p99)", [
        (quantile(0.5, "misalignment_monitor_feature_activation", by="feature"), "p50 {{feature}}"),
        (quantile(0.99, "misalignment_monitor_feature_activation", by="feature"), "p99 {{feature}}")], w=12))
    p.append(L.panel("Probe probability quantiles (p50, p99)", [
        (quantile(0.5, "misalignment_monitor_probe_probability", by="feature"), "p50 {{feature}}"),
        (quantile(0.99, "misalignment_monitor_probe_probability", by="feature"), "p99 {{feature}}")], w=12))
    p.append(L.panel("Share of tokens with the feature active", [
        (f"1 - sum by (feature) (rate(misalignment_monitor_feature_activation_bucket{{{M}, le=\"0.0\"}}[$__rate_interval])) "
         f"/ sum by (feature) (rate(misalignment_monitor_feature_activation_count{{{M}}}[$__rate_interval]))", "{{feature}}")],
        unit="percentunit", w=24))
    return dashboard("misalignment-monitor-detector", "misalignment-monitor / Detector", p, detector_var=True)


DASHBOARDS = {"overview.json": overview, "detector.json": detector}


def render() -> dict[str, str]:
    return {name: json.dumps(fn(), indent=2) + "\n" for name, fn in DASHBOARDS.items()}


def queries(doc: dict) -> list[tuple[str, str]]:
    out = [(p["title"], t["expr"]) for p in doc["panels"] for t in p.get("targets", [])]
    out += [(f"variable {v['name']}", v["definition"]) for v in doc["templating"]["list"] if "definition" in v]
    return out


def check(files: dict[str, str]) -> list[str]:
    problems = []
    for name, text in files.items():
        for folder in (OUT, CHART_COPY):
            path = folder / name
            if not path.exists() or path.read_text() != text:
                problems.append(f"{path.relative_to(ROOT)} is stale: run python deploy/grafana/dashboards.py")
    known = monitor_metrics() | vllm_series()
    rules = []
    for name, text in files.items():
        for title, expr in queries(json.loads(text)):
            for metric in re.findall(r"\b(misalignment_monitor_\w+|vllm:[\w:]+)", expr):
                if metric not in known:
                    problems.append(f"{name}: {title!r} queries {metric}, which neither the monitor nor vLLM exports")
            if expr.startswith("label_values("):
                m = re.match(r"label_values\((.+), \w+\)$", expr)
                expr = m.group(1) if m else expr
            concrete = (expr.replace("$__rate_interval", "5m").replace("$__range", "1h")
                        .replace("$model_name", "m").replace("$detector", "d"))
            rules.append({"record": f"dashboard:check:{len(rules)}", "expr": concrete, "labels": {"panel": f"{name}: {title}"}})
    promtool = shutil.which("promtool")
    if promtool is None:
        problems.append("promtool not found (apt-get install prometheus): cannot check that queries parse")
    else:
        with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
            yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}, f)
        res = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True)
        Path(f.name).unlink()
        if res.returncode != 0:
            problems.append("a panel query does not parse:\n" + res.stdout + res.stderr)
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    files = render()
    if args.check:
        problems = check(files)
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        print(f"{len(files)} dashboards, {sum(len(queries(json.loads(t))) for t in files.values())} queries: "
              + ("ok" if not problems else f"{len(problems)} problem(s)"))
        return 1 if problems else 0
    CHART_COPY.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text)
        (CHART_COPY / name).write_text(text)
        print(f"wrote deploy/grafana/{name} and its copy in the chart")
    return 0


if __name__ == "__main__":
    sys.exit(main())
