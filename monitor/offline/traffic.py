"""`monitor calibrate --from-decisions`: thresholds set on the deployment's own traffic.

A threshold calibrated on an offline benign set holds on that set's distribution; on another it gives
away recall or floods. Here the scores are the ones the sidecar recorded for real requests (its decision
log, `monitor sidecar --decisions FILE`: every detector's final score on every request, shadow
detectors included), over a window. The threshold is the lowest at which at most `floor(target x n)`
of those requests fire. Verdicts from the incident store are used as labels where a person gave one:
a request confirmed as a true positive is not normal traffic and is left out; a false positive stays
in (it is exactly what the threshold must rise above). Unjudged requests count as normal traffic, so
a window with an attack in it sets a higher threshold: judge the incidents first.

Provenance goes beside the threshold, as the offline calibration writes it, with `source: traffic`,
the window and the label counts; the drift baseline is remade from the same scores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

import numpy as np

from monitor.config.load import parse_detector
from monitor.detectors.drift import make_baseline
from monitor.offline import OfflineError
from monitor.offline.pack import write_detector
from monitor.offline.records import sha256_file
from monitor.offline.tiers import check_record_rate, record_tier
from monitor.offline.thresholds import fpr_upper_bound, min_samples, threshold_at_fpr
from monitor.provenance import Calibration
from monitor.sinks.jsonl import whole_lines


@dataclass
class TrafficCalibrated:
    detector: str
    file: Path
    old_threshold: float
    threshold: float
    fire_rate: float  # on the window's traffic, at the new threshold
    fire_rate_upper_95: float
    n_requests: int  # requests counted as normal traffic
    labels: dict[str, int] = field(default_factory=dict)  # verdict -> requests (true positives were left out)
    record: dict = field(default_factory=dict)  # the record tier's fields (`monitor.offline.tiers`), {} for one tier
    scores: np.ndarray | None = None  # the counted requests' scores (NaN: no score)


def read_decisions(files: list[Path], since: datetime | None) -> dict[str, list[dict]]:
    """Detector -> its final verdicts (one per request) in the window, from decision logs."""
    out: dict[str, list[dict]] = {}
    t0 = since.timestamp() if since else None
    for path in files:
        if not Path(path).is_file():
            raise OfflineError(f"--from-decisions {path}: no such file")
        for n, line in enumerate(whole_lines(path), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise OfflineError(f"{path}:{n}: not a decision record ({e.msg}); decision logs are written by "
                                   "`monitor sidecar --decisions FILE`") from None
            if not isinstance(rec, dict) or rec.get("event") not in ("fired", "escalated", "final") \
                    or "detector" not in rec:
                raise OfflineError(f"{path}:{n}: not a decision record (needs `event`: fired|escalated|final and "
                                   "`detector`)")
            if rec["event"] != "final" or (t0 is not None and rec.get("time", 0) < t0):
                continue
            out.setdefault(rec["detector"], []).append(rec)
    return out


def calibrate_on_traffic(loaded, files: list[Path], target_rate: float, since: datetime | None,
                         verdicts: dict[str, str] | None = None, write: bool = True,
                         window: str | None = None, record_rate: float | None = None) -> list[TrafficCalibrated]:
    """`verdicts`: alert id -> a person's verdict (true_positive, false_positive, unsure), from the store.
    `record_rate`: also set the record tier at this fire rate (`monitor.offline.tiers`)."""
    if not 0 < target_rate < 1:
        raise OfflineError(f"--target-fpr must be between 0 and 1, got {target_rate}")
    check_record_rate(record_rate, target_rate)
    verdicts = verdicts or {}
    decisions = read_decisions(files, since)
    need = min_samples(target_rate)
    plans = []
    for det in loaded.detectors:  # every detector checked before any file is written
        recs = decisions.get(det.spec.name, [])
        labels: dict[str, int] = {}
        kept = []
        for r in recs:
            v = verdicts.get(r.get("alert_id") or "", "none")
            labels[v] = labels.get(v, 0) + 1
            if v != "true_positive":
                kept.append(r)
        if len(kept) < need:
            since_text = f" since {since:%Y-%m-%d %H:%M} UTC" if since else ""
            raise OfflineError(
                f"detector {det.spec.name}: {len(kept)} request(s) in the decision log{since_text} cannot show a fire "
                f"rate of {target_rate:g} (with none firing, the 95% upper bound would still be about "
                f"{3 / max(len(kept), 1):.3g}); at least {need} are needed: watch it longer, or widen --since")
        plans.append((det, kept, labels))
    shared = dict(source="traffic", window=window, data=", ".join(str(f) for f in files),
                  data_sha256=sha256_file(files[0]) if len(files) == 1 else None, date=date.today().isoformat())
    out = []
    for det, kept, labels in plans:
        scores = np.array([np.nan if r.get("score") is None else float(r["score"]) for r in kept], np.float64)
        ranked = np.where(np.isnan(scores), -np.inf, scores)
        thr, achieved = threshold_at_fpr(ranked, target_rate)
        fires = int((ranked >= thr).sum())
        out.append(TrafficCalibrated(det.spec.name, det.file, det.spec.threshold, thr, achieved,
                                     fpr_upper_bound(fires, len(ranked)), len(ranked), labels, scores=scores))
        out[-1].record = record_tier(det.spec, det.file, thr, ranked, record_rate,
                                     lambda **kw: Calibration(**kw, n_benign=len(ranked), labels=labels, **shared))
    for c in out if write else ():  # only once every detector's tiers were found: a refusal writes nothing
        calibration = Calibration(
            threshold=c.threshold, target_fpr=target_rate, achieved_fpr=c.fire_rate, fpr_upper_95=c.fire_rate_upper_95,
            n_benign=c.n_requests, labels=c.labels, **shared,
            # The decision log has each request's score, not its tokens: no per-input rates to keep.
            baseline=make_baseline(c.scores, {}, 0))
        spec = parse_detector(c.file).model_copy(update={"threshold": c.threshold, "calibration": calibration,
                                                         **c.record})
        write_detector(spec, c.file, _header(c.file))
    return out


def _header(path: Path) -> list[str]:
    header = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:].strip())
    return header
