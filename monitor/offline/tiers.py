"""The record tier beside a page threshold: set from the same scores at a higher rate, kept, or refused.

`monitor calibrate` sets `threshold` (the page tier) at `--target-fpr`. A detector may also record at a
lower tier (`record_threshold`, say at 5% where it pages at 1%): `--record-fpr RATE` sets it from the
same benign scores (or the same traffic), with its own provenance. Without the flag a tier that was
calibrated before is recalibrated at its own rate, so the two tiers always come from one set; a
record threshold set by hand is kept while it stays below the new page threshold, and refused (before
any file is written) when it would not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from monitor.config.models import DetectorSpec
from monitor.offline import OfflineError
from monitor.offline.thresholds import fpr_upper_bound, min_samples, threshold_at_fpr
from monitor.provenance import Calibration


def check_record_rate(record_rate: float | None, target: float) -> None:
    if record_rate is not None and not target < record_rate < 1:
        raise OfflineError(f"--record-fpr {record_rate:g} must lie between --target-fpr {target:g} and 1: the record "
                           "tier is the lower threshold, so more normal conversations reach it")


def record_tier(spec: DetectorSpec, path: Path, threshold: float, scores: np.ndarray, record_rate: float | None,
                calibration: Callable[..., Calibration]) -> dict:
    """The record tier's fields to write with a new page `threshold` ({} for a one-tier detector).
    `scores`: the scores `threshold` was set on (NaN-free; -inf for no score); `calibration(threshold=,
    target_fpr=, achieved_fpr=, fpr_upper_95=)` builds the provenance the caller writes."""
    rate = record_rate
    if rate is None and spec.record_calibration is not None:
        rate = spec.record_calibration.target_fpr
    if rate is None:
        if spec.record_threshold is not None and not spec.record_threshold < threshold:
            raise OfflineError(f"{path}: record_threshold {spec.record_threshold:.4g} (set by hand) would not be below "
                               f"the new threshold {threshold:.4g}; give --record-fpr RATE to set it from the same "
                               "data, or remove it")
        return {}
    if len(scores) < min_samples(rate):
        raise OfflineError(f"{path}: {len(scores)} conversations cannot show a record rate of {rate:g}")
    thr, achieved = threshold_at_fpr(scores, rate)
    if not thr < threshold:
        raise OfflineError(f"{path}: the record tier at {rate:g} lands at {thr:.4g}, not below the page threshold "
                           f"{threshold:.4g} (the scores tie there); choose a record rate further above the target")
    fp = int((scores >= thr).sum())
    return {"record_threshold": thr, "record_calibration": calibration(
        threshold=thr, target_fpr=rate, achieved_fpr=achieved, fpr_upper_95=fpr_upper_bound(fp, len(scores)))}
