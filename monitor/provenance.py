"""Where a probe or a threshold came from: the records that travel with them (probe.json, detector YAML).

A leaf module: the config schema, scoring and the offline tools all read and write these.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrainingData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="data file the probe was fit on, relative to the repo or absolute")
    sha256: str | None = None
    n_pos: int = Field(ge=0)
    n_neg: int = Field(ge=0)
    notes: str = ""


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float
    target_fpr: float = Field(gt=0, lt=1)
    achieved_fpr: float | None = Field(default=None, ge=0, le=1)
    n_benign: int | None = Field(default=None, ge=0)
    fpr_upper_95: float | None = Field(default=None, ge=0, le=1, description="One-sided 95% upper bound on the FPR (Clopper-Pearson).")
    data: str | None = None
    data_sha256: str | None = None
    date: str | None = None
