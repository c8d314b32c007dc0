"""What the audit report states, gathered from the config, the packs, the probes, eval and Prometheus."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from monitor.config.load import LoadedConfig
from monitor.config.models import DetectorSpec, FeatureInput, ProbeInput
from monitor.offline.evaluate import DetectorReport
from monitor.offline.records import sha256_file
from monitor.provenance import TrainingData
from monitor.report.prometheus import PrometheusAPI, window_seconds


@dataclass
class InputFacts:
    kind: str  # "probe" or "sae feature"
    label: str  # "pii/score", "demo-l15/21"
    layer: int | None
    source: str  # the probe folder or the SAE's path / release
    training: TrainingData | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    explanation: str | None = None  # an SAE feature's label, when the config names a labels file


@dataclass
class LiveFacts:
    """From Prometheus over the report's window."""

    fires: float | None
    verdicts: float | None
    psi_now: float | None
    psi_max: float | None
    inputs: list[tuple[str, float | None, float | None, float | None]]  # label, rate, baseline, psi
    # When the sidecar last counted it in shadow, and first counted it live, within the window (epoch s):
    # the record of a detector going from shadow to live (or back).
    shadow_last_seen: float | None = None
    live_first_seen: float | None = None

    @property
    def went_live(self) -> float | None:
        """When it went from shadow to live inside the window, if it did."""
        if self.shadow_last_seen is None or self.live_first_seen is None:
            return None
        return self.live_first_seen if self.live_first_seen >= self.shadow_last_seen - 60 else None

    @property
    def fire_rate(self) -> float | None:
        return self.fires / self.verdicts if self.fires is not None and self.verdicts else None


@dataclass
class DetectorFacts:
    spec: DetectorSpec
    file: Path
    definition: str  # the YAML as shipped
    sha256: str
    inputs: list[InputFacts]
    evaluation: DetectorReport | None = None
    plot: Path | None = None
    live: LiveFacts | None = None
    limits: list[str] = field(default_factory=list)


@dataclass
class DataFile:
    path: Path
    sha256: str
    records: int


@dataclass
class ReportFacts:
    generated: str
    version: str
    config: Path
    config_sha256: str
    model: str
    layers: list[int]
    detectors: list[DetectorFacts]
    eval_data: list[DataFile]
    prometheus: str | None
    window: str
    limits: list[str]


def _inputs(loaded: LoadedConfig, spec: DetectorSpec) -> list[InputFacts]:
    probes = {p.name: p for p in loaded.config.probes}
    saes = {s.name: s for s in loaded.config.saes}
    out = []
    for inp in spec.inputs:
        if isinstance(inp, ProbeInput):
            meta = loaded.probes.get(inp.probe)
            out.append(InputFacts("probe", f"{inp.probe}/{inp.output or (meta.outputs[0] if meta else 'score')}",
                                  meta.layer if meta else None, probes[inp.probe].path,
                                  meta.training if meta else None, dict(meta.metrics) if meta else {}))
        elif isinstance(inp, FeatureInput):
            s = saes[inp.sae]
            out.append(InputFacts("sae feature", f"{inp.sae}/{inp.feature}", s.layer, s.path or f"{s.release}/{s.sae_id}",
                                  explanation=_feature_label(loaded, s.labels, inp.feature)))
    return out


def _feature_label(loaded: LoadedConfig, labels: str | None, feature: int) -> str | None:
    if not labels:
        return None
    path = loaded.resolve(labels)
    try:
        doc = json.loads(path.read_text())
        entry = (doc.get("features") or doc).get(str(feature))
    except (OSError, ValueError):
        return None
    if isinstance(entry, dict):
        return entry.get("explanation") or entry.get("label")
    return entry if isinstance(entry, str) else None


def detector_limits(d: DetectorFacts) -> list[str]:
    """The known limits of one detector, in plain words, from what was measured."""
    spec, out = d.spec, []
    cal = spec.calibration
    if cal is None:
        out.append("Its threshold has no calibration record: how often it fires on ordinary traffic is unknown.")
    else:
        where = f" of {cal.data}" if cal.data else ""
        bound = f" (at most {cal.fpr_upper_95:.1%} with 95% confidence)" if cal.fpr_upper_95 is not None else ""
        achieved = f"{cal.achieved_fpr:.1%}" if cal.achieved_fpr is not None else "unknown"
        n = f"{cal.n_benign} " if cal.n_benign else ""
        out.append(f"Its threshold was set on {n}benign conversations{where}, where it fired on {achieved}{bound}. "
                   "On traffic unlike that set the rate can differ; the drift figures say when it does.")
    ev = d.evaluation
    if ev is not None:
        if ev.recall < 0.8:
            out.append(f"At its threshold it caught {ev.recall:.0%} of the evaluation's positives: it misses some.")
        worst = ev.worst_family
        if worst is not None and worst.auroc is not None and worst.auroc < 0.95:
            out.append(f"It is weakest on the family '{worst.family}' (AUROC {worst.auroc:.3f}, recall "
                       f"{worst.recall if worst.recall is not None else 0:.0%}, false-positive rate "
                       f"{worst.fpr_at_threshold if worst.fpr_at_threshold is not None else 0:.1%}).")
        firing = [s for s in ev.negative_sources if s.fired and s.fpr >= 0.1]
        if firing:
            names = ", ".join(f"{s.source} ({s.fired}/{s.n})" for s in firing[:4])
            out.append(f"Look-alikes it fires on at its threshold: {names}.")
    layers = sorted({i.layer for i in d.inputs if i.layer is not None})
    out.append(f"It reads layer(s) {', '.join(map(str, layers))} of the watched model only: another model, "
               "checkpoint or quantization needs its probes or SAE re-fit and its threshold recalibrated.")
    return out


GENERAL_LIMITS = [
    "Detectors read the model's internal representation of the conversation; they report that a concept is "
    "represented, not what the model will do with it, and they can be wrong in both directions.",
    "Evaluation figures hold for the evaluation data named above. Data written by the project's authors may share "
    "their blind spots; figures on your own labelled traffic (monitor incidents export, then monitor eval) are the "
    "ones to trust.",
    "Requests the sidecar did not score (sampled out, over the tracking limit, dropped when a ring was full) have no "
    "verdict; the health metrics and alerts count them.",
    "With the default settings no prompt or completion text leaves the sidecar; incidents keep tokens only where "
    "the configuration allows it.",
]


def live_facts(api: PrometheusAPI, model: str, window: str, spec: DetectorSpec,
               input_labels: list[str]) -> LiveFacts:
    sel = f'model_name="{model}", detector="{spec.name}"'
    step = max(1, window_seconds(window) // 1000)

    def one(expr: str) -> float | None:
        samples = api.query(expr)
        return samples[0].value if samples else None

    inputs = []
    for label in input_labels:
        fsel = f'model_name="{model}", feature="{label}"'
        inputs.append((label, one(f"max(misalignment_monitor_feature_firing_rate{{{fsel}}})"),
                       one(f"max(misalignment_monitor_feature_firing_rate_baseline{{{fsel}}})"),
                       one(f"max(misalignment_monitor_feature_firing_psi{{{fsel}}})")))
    return LiveFacts(
        fires=one(f'sum(increase(misalignment_monitor_detector_fires_total{{{sel}, tier="page"}}[{window}]))'),
        verdicts=one(f"sum(increase(misalignment_monitor_detector_evaluations_total{{{sel}}}[{window}]))"),
        psi_now=one(f"max(misalignment_monitor_detector_score_psi{{{sel}}})"),
        psi_max=one(f"max(max_over_time(misalignment_monitor_detector_score_psi{{{sel}}}[{window}]))"),
        inputs=inputs,
        # A subquery about 1,000 steps long: fine enough to catch a shadow spell of seconds in a short window.
        shadow_last_seen=one(f'max(max_over_time(timestamp(misalignment_monitor_detector_evaluations_total'
                             f'{{{sel}, mode="shadow"}})[{window}:{step}s]))'),
        live_first_seen=one(f'min(min_over_time(timestamp(misalignment_monitor_detector_evaluations_total'
                            f'{{{sel}, mode="live"}})[{window}:{step}s]))'))


def gather(loaded: LoadedConfig, version: str, evaluation: list[DetectorReport], eval_files: list[Path],
           api: PrometheusAPI | None, window: str) -> ReportFacts:
    by_name = {r.detector: r for r in evaluation}
    dets = []
    for det in sorted(loaded.detectors, key=lambda d: d.spec.name):
        text = det.file.read_text()
        d = DetectorFacts(det.spec, det.file, text, hashlib.sha256(text.encode()).hexdigest(), _inputs(loaded, det.spec),
                          by_name.get(det.spec.name))
        if api is not None:
            d.live = live_facts(api, loaded.config.model.name, window, det.spec, [i.label for i in d.inputs])
        d.limits = detector_limits(d)
        dets.append(d)
    data = [DataFile(f, sha256_file(f), sum(1 for line in f.read_text().splitlines() if line.strip())) for f in eval_files]
    return ReportFacts(
        generated=datetime.now(timezone.utc).isoformat(timespec="seconds"), version=version, config=loaded.path,
        config_sha256=sha256_file(loaded.path), model=loaded.config.model.name, layers=loaded.config.tapped_layers,
        detectors=dets, eval_data=data, prometheus=api.url if api else None, window=window, limits=GENERAL_LIMITS)
