"""`monitor probe train`: a linear probe and its detector from labeled conversations.

Logistic regression on the mean of the tapped layer's rows over the detector's scope (the
sidecar's `mean` aggregation reproduces it exactly: `monitor.offline.probes`), or on the scope's last
row for a `last` detector (the position where the model decides how to answer); the detector may
aggregate its per-token logits otherwise (`--aggregation`), and every score below is then the one
the sidecar would report with that aggregation. A validation split is
held out first (stratified; records with a `source` keep their whole source on one side, so the
validation figures measure phrasings the probe never saw). The threshold is set at the target FPR on
scores no model saw during its own fit: out-of-fold scores of the training negatives (5 folds, by
source when given) plus the validation negatives scored by the final probe. The probe is written
in the monitor's probe format and a detector YAML that uses it; `monitor calibrate` can then move the
threshold on a larger benign set, and `monitor eval` measures it on a test split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import yaml
from pydantic import ValidationError

from monitor.config.models import Aggregation, DetectorSpec, Mean
from monitor.offline import OfflineError, require
from monitor.offline.evaluate import auroc
from monitor.offline.extract import row_source
from monitor.offline.pack import write_detector
from monitor.offline.probes import (Scope, aggregated_logits, aggregated_scores, calibrate_probe, fit_logistic_probe,
                                    platt_scale, pooled)
from monitor.offline.records import Record, sha256_file, source_groups
from monitor.offline.thresholds import min_samples
from monitor.provenance import TrainingData
from monitor.scoring.space import sigmoid


@dataclass
class Trained:
    probe_dir: Path
    detector_file: Path
    n_train: tuple[int, int]  # positives, negatives
    n_validation: tuple[int, int]
    threshold: float
    metrics: dict


TRAINING_OWNS = ("name", "concept", "inputs", "aggregation", "threshold", "scope", "calibration")


def _operator_fields(path: Path, detector_name: str) -> dict:
    """What an operator set on the detector being retrained (severity, severity_if_answered, mode, action,
    labels...): kept, so retraining a probe never quietly changes how its fires are handled. Training owns
    `TRAINING_OWNS`; `--description` and `--severity`, when given, win over the file's."""
    if not path.is_file():
        return {}
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}  # an unreadable file is replaced, as before; check-config would refuse it anyway
    if not isinstance(doc, dict) or doc.get("name") != detector_name:
        return {}
    return {k: v for k, v in doc.items() if k not in TRAINING_OWNS}


def _detector(path: Path, kept: dict, trained: dict) -> DetectorSpec:
    """The retrained detector: training's fields over the operator's, labels merged; OfflineError naming the
    file when what the operator left there does not read."""
    try:
        return DetectorSpec.model_validate({**kept, **trained,
                                            "labels": {**kept.get("labels", {}), **trained.get("labels", {})}})
    except ValidationError as e:
        err = e.errors()[0]
        raise OfflineError(f"{path}: the existing detector's {'.'.join(map(str, err['loc']))}: {err['msg']} "
                           "(fix or remove the file, then train again)") from None


def _digest(files: list[Path]) -> str:
    """One file's sha256; several files: the sha256 of their digests in order (each is pinned by it)."""
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()


def _split(records: list[Record], y: np.ndarray, validation: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    require("sklearn")
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    k = max(2, round(1 / validation))
    groups = source_groups(records)
    splitter = StratifiedGroupKFold(k, shuffle=True, random_state=seed) if any(r.source for r in records) \
        else StratifiedKFold(k, shuffle=True, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.zeros(len(y)), y, groups))
    if len(set(y[val_idx])) < 2 or len(set(y[train_idx])) < 2:
        raise OfflineError("the validation split lacks a class; add data or change --validation")
    return train_idx, val_idx


def train_probe(records: list[Record], data_file: Path | list[Path], concept: str, model_dir: Path, *, name: str,
                detector_name: str, layer: int | list[int], scope: Scope, target_fpr: float, validation: float,
                severity: str | None, out_probe: Path, out_detector: Path, model_name: str, description: str | None = None,
                seed: int = 0, backend: str = "transformers", aggregation: Aggregation | None = None) -> Trained:
    aggregation = aggregation or Mean(kind="mean")
    # What the operator set on an existing detector must still read, checked before minutes of work.
    kept = _operator_fields(out_detector, detector_name)
    kept |= {k: v for k, v in (("description", description), ("severity", severity)) if v is not None}
    kept.setdefault("description", f"Linear probe {name} for {concept}.")
    kept.setdefault("severity", "warning")
    _detector(out_detector, kept,
              {"name": detector_name, "concept": concept, "inputs": [{"probe": name}], "threshold": 0.5,
               "aggregation": aggregation.model_dump(), "scope": scope})
    files = [Path(f) for f in data_file] if isinstance(data_file, list) else [Path(data_file)]
    data_file = files[0] if len(files) == 1 else Path(" + ".join(str(f) for f in files))  # how messages name it
    missing = [r.line for r in records if concept not in r.labels]
    if missing:
        raise OfflineError(f"{data_file}: line(s) {missing[:5]}{'...' if len(missing) > 5 else ''} carry no label "
                           f"for {concept!r}")
    y = np.array([r.labels[concept] for r in records])
    if y.sum() < 10 or (1 - y).sum() < 10:
        raise OfflineError(f"{data_file}: {int(y.sum())} positive and {int((1 - y).sum())} negative records for "
                           f"{concept!r}; a probe needs at least 10 of each")
    need = min_samples(target_fpr)
    if (1 - y).sum() < need:
        raise OfflineError(f"{int((1 - y).sum())} negatives cannot calibrate a threshold at FPR {target_fpr:g}; "
                           f"use at least {need} (or a larger --target-fpr)")
    train_idx, val_idx = _split(records, y, validation, seed)
    layers = [layer] if isinstance(layer, int) else list(layer)
    convs = row_source(model_dir, layers, backend).many([r.messages for r in records], progress="probe train")
    last = aggregation.kind == "last"
    x = pooled(convs, layers, scope, last=last)
    groups = source_groups(records)
    fit = fit_logistic_probe(
        x[train_idx], y[train_idx], name=name, concept=concept, model=model_name, layer=layers,
        training=TrainingData(path=str(data_file), sha256=_digest(files), n_pos=int(y[train_idx].sum()),
                              n_neg=int((1 - y[train_idx]).sum()),
                              notes=f"fit on {'the last' if last else 'the mean over'} {scope} "
                                    f"token{'' if last else 's'} (positions >= 1); {len(val_idx)} records held out; "
                                    f"detector aggregation {aggregation.kind}"),
        groups=groups[train_idx])
    probe = fit.probe
    probe.meta.aggregation = aggregation.kind
    val_convs = [convs[i] for i in val_idx]
    y_tr, y_val = y[train_idx], y[val_idx]
    oof = np.empty(len(train_idx))
    for held, fold_probe in fit.folds:  # each training record scored by a probe that never saw its family
        oof[held] = aggregated_logits(fold_probe, [convs[train_idx[i]] for i in held], scope, aggregation)
    a, c = platt_scale(probe, oof, y_tr)
    oof = sigmoid(a * oof + c)
    s_val = aggregated_scores(probe, val_convs, scope, aggregation)
    unseen_neg = np.concatenate([oof[y_tr == 0], s_val[y_val == 0]])
    calibrate_probe(probe, unseen_neg, target_fpr, date=date.today().isoformat(),
                    data=f"out-of-fold training negatives + validation negatives of {data_file}")
    thr = probe.threshold
    metrics = {"platt_scale": round(a, 6), "platt_offset": round(c, 6),
               "train_oof_auroc": round(auroc(oof[y_tr == 1], oof[y_tr == 0]), 4),
               "validation_auroc": round(auroc(s_val[y_val == 1], s_val[y_val == 0]), 4),
               "validation_tpr_at_threshold": round(float((s_val[y_val == 1] >= thr).mean()), 4),
               "validation_fpr_at_threshold": round(float((s_val[y_val == 0] >= thr).mean()), 4)}
    probe.meta.metrics.update(metrics)
    trained = {
        "name": detector_name, "concept": concept, "inputs": [{"probe": name}], "aggregation": aggregation.model_dump(),
        "threshold": thr, "scope": scope, "labels": {"source": "linear_probe"},
        "calibration": probe.meta.calibration.model_dump(exclude_none=True),
    }
    detector = _detector(out_detector, kept, trained)
    probe.save(out_probe)
    write_detector(detector, out_detector, ([description] if description else [])
                   + [f"Trained by `monitor probe train` from {data_file}; probe at {out_probe}."])
    return Trained(out_probe, out_detector, (int(y[train_idx].sum()), int((1 - y[train_idx]).sum())),
                   (int(y_val.sum()), int((1 - y_val).sum())), thr, metrics)
