"""`monitor calibrate`: set each detector's threshold at a target false-positive rate on benign data.

The threshold is the lowest one at which at most `floor(target x n)` benign conversations fire
(`score >= threshold`), scored exactly as the sidecar would (`monitor.offline.judge`). It is written
back into the detector's YAML with its provenance: the data file and its sha256, the sample count,
the target, the FPR achieved on the set and a one-sided 95% upper bound on the true FPR
(Clopper-Pearson), the date, and a baseline for the sidecar's drift figures: the benign scores'
distribution in bins and each input's firing rate per prompt token (`monitor.detectors.drift`).

A benign set too small for the target to mean anything is refused: with n samples and no false
positive the 95% upper bound is about 3/n, so below n = ceil(3 / target) even a perfect result
cannot show the target is met.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np

from monitor.config.load import parse_detector
from monitor.detectors.drift import make_baseline
from monitor.detectors.runtime import build_detector_set
from monitor.offline import OfflineError
from monitor.offline.extract import row_source
from monitor.offline.judge import head_scores, judge, prompt_firing
from monitor.offline.pack import write_detector
from monitor.offline.records import Record, sha256_file
from monitor.offline.thresholds import fpr_upper_bound, min_samples, threshold_at_fpr
from monitor.offline.tiers import check_record_rate, record_tier
from monitor.provenance import Baseline, Calibration


@dataclass
class Calibrated:
    detector: str
    file: Path
    old_threshold: float
    threshold: float
    achieved_fpr: float
    fpr_upper_95: float
    n_benign: int
    skipped_positive: int  # records labelled positive for the detector's concept: not benign for it
    baseline: Baseline  # the benign set's score distribution and input firing rates, for drift
    record: dict  # the record tier's fields (`monitor.offline.tiers`), {} for one tier


def calibrate(loaded, records: list[Record], benign_file: Path, target_fpr: float, model_dir: Path,
              write: bool = True, backend: str = "transformers", record_fpr: float | None = None) -> list[Calibrated]:
    if not 0 < target_fpr < 1:
        raise OfflineError(f"--target-fpr must be between 0 and 1, got {target_fpr}")
    check_record_rate(record_fpr, target_fpr)
    need = min_samples(target_fpr)
    # Refuse before the (slow) activations, and before any file is touched.
    for det in loaded.detectors:
        n = sum(1 for r in records if r.labels.get(det.spec.concept, 0) == 0)
        if n < need:
            raise OfflineError(f"detector {det.spec.name}: {n} benign conversations cannot show an FPR of "
                               f"{target_fpr:g} (with none firing, the 95% upper bound would still be about "
                               f"{3 / max(n, 1):.3g}); use at least {need}")
    detset = build_detector_set(loaded, "cpu")
    convs = row_source(model_dir, detset.layers, backend).many([r.messages for r in records], progress="calibrate")
    scored = [head_scores(detset, c) for c in convs]
    verdicts = [judge(detset, c, s) for c, s in zip(convs, scored)]
    compiled = {d.spec.name: d for d in detset.detectors}
    digest = sha256_file(benign_file)
    today = date.today().isoformat()
    out = []
    for det in loaded.detectors:
        spec = det.spec
        benign = [v[spec.name].score for r, v in zip(records, verdicts) if r.labels.get(spec.concept, 0) == 0]
        scores = np.array([-np.inf if np.isnan(s) else s for s in benign])
        thr, achieved = threshold_at_fpr(scores, target_fpr)
        fp = int((scores >= thr).sum())
        benign_idx = [i for i, r in enumerate(records) if r.labels.get(spec.concept, 0) == 0]
        labels = [i.label for i in compiled[spec.name].inputs]
        fired = {label: 0 for label in labels}
        n_tokens = 0
        for i in benign_idx:
            n_tokens += max(convs[i].n_prompt - 1, 0)
            counts = prompt_firing(detset, scored[i], convs[i].n_prompt)
            for label in labels:
                fired[label] += counts[label]
        baseline = make_baseline(np.array(benign, np.float64),
                                 {k: v / n_tokens if n_tokens else 0.0 for k, v in fired.items()}, n_tokens)
        record = record_tier(spec, det.file, thr, scores, record_fpr, lambda **kw: Calibration(
            **kw, n_benign=len(scores), data=str(benign_file), data_sha256=digest, date=today))
        out.append(Calibrated(spec.name, det.file, spec.threshold, thr, achieved, fpr_upper_bound(fp, len(scores)),
                              len(scores), len(records) - len(benign), baseline, record))
    if write:  # only once every detector's tiers were found: a refused one leaves every file as it was
        for c in out:
            _write_back(c.file, c, target_fpr, benign_file, digest)
    return out


def _write_back(path: Path, c: Calibrated, target_fpr: float, data: Path, digest: str) -> None:
    """Replace `threshold` and `calibration` (and the record tier's) in the detector file; its leading comment
    lines are kept."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:].strip())
    calibration = Calibration(
        threshold=c.threshold, target_fpr=target_fpr, achieved_fpr=c.achieved_fpr, fpr_upper_95=c.fpr_upper_95,
        n_benign=c.n_benign, data=str(data), data_sha256=digest, date=date.today().isoformat(), baseline=c.baseline)
    spec = parse_detector(path).model_copy(update={"threshold": c.threshold, "calibration": calibration, **c.record})
    write_detector(spec, path, header)
