"""Where a probe or a threshold came from: the records that travel with them (probe.json, detector YAML).

A leaf module: the config schema, scoring and the offline tools all read and write these.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainingData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="data file the probe was fit on, relative to the repo or absolute")
    sha256: str | None = None
    n_pos: int = Field(ge=0)
    n_neg: int = Field(ge=0)
    notes: str = ""


class Baseline(BaseModel):
    """What the calibration set looked like, for drift: the detector's score distribution in bins, and each
    input's firing rate per prompt token (a probe fires at logit > 0, an SAE feature when active)."""

    model_config = ConfigDict(extra="forbid")

    score_edges: list[float] = Field(description="Bin edges, ascending: bin i holds scores x with "
                                     "edges[i-1] <= x < edges[i] (the first and last bins are open).")
    score_fractions: list[float] = Field(description="Share of the calibration requests in each bin (len(edges) + 1).")
    input_rates: dict[str, float] = Field(default_factory=dict, description="Input label (`probe/output`, "
                                          "`sae/feature`) -> share of prompt tokens on which it fired.")
    n_requests: int = Field(ge=1)
    n_tokens: int = Field(ge=0)

    @model_validator(mode="after")
    def _shape(self) -> "Baseline":
        if len(self.score_fractions) != len(self.score_edges) + 1:
            raise ValueError(f"score_fractions needs {len(self.score_edges) + 1} entries (one per bin), "
                             f"got {len(self.score_fractions)}")
        if any(b <= a for a, b in zip(self.score_edges, self.score_edges[1:])):
            raise ValueError("score_edges must be strictly ascending")
        return self


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
    baseline: Baseline | None = Field(default=None, description="The calibration set's score distribution and "
                                      "input firing rates, for the sidecar's drift figures.")
    source: Literal["offline", "traffic"] = Field(
        "offline", description="`offline`: a benign set of conversations (`target_fpr` is a false-positive rate); "
        "`traffic`: the deployment's own requests from the sidecar's decision log (`target_fpr` is a fire rate, "
        "`n_benign` the requests counted).")
    window: str | None = Field(None, description="For `traffic`: the requests' time window.")
    labels: dict[str, int] | None = Field(None, description="For `traffic`: requests by a person's verdict "
                                          "(`none`: not judged); true positives were left out of the count.")
