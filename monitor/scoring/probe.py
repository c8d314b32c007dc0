"""Linear probes: logistic regression on a tapped layer's residual rows.

On disk a probe is a folder (see docs/probe-format.md):

    probe.safetensors   weight [k, d_in] float32, bias [k], optional mean [d_in] and std [d_in]
    probe.json          ProbeMetadata: what the probe reads, what it was trained on, its threshold

A probe's output space is the logit `((x - mean) / std) @ weight.T + bias`, one column per output
(`logits`); `encode` gives the probability `sigmoid(logit)`. The sidecar scores logits and applies
the sigmoid after aggregating over tokens (`monitor.scoring.space`).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file

from monitor.provenance import Calibration, TrainingData

WEIGHTS_FILE = "probe.safetensors"
META_FILE = "probe.json"
FORMAT_VERSION = 1


class ProbeError(ValueError):
    """A probe folder that cannot be read or used; the message names the file and the problem."""


class ProbeMetadata(BaseModel):
    """Everything a reader needs to trust a probe: what it reads, how it was made, where it fires."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    name: str
    concept: str
    model: str = Field(description="model the activations came from")
    layer: int = Field(ge=0, description="residual stream after this decoder block (HF hidden_states[layer+1]); "
                       "for a probe over several layers, the first of `layers`")
    layers: list[int] | None = Field(None, description="A probe over several tapped layers reads their rows of "
                                     "the same token side by side, in this order (`d_in` = d_model x layers). "
                                     "Absent: `layer` alone.")
    hook: str = "resid_post"
    d_in: int = Field(gt=0)
    outputs: list[str] = Field(default_factory=lambda: ["score"], min_length=1)
    probe_type: str = "logistic_regression"
    aggregation: str = Field(default="mean", description="the token aggregation the probe was trained for")
    standardize: bool = False
    training: TrainingData | None = None
    calibration: Calibration | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @model_validator(mode="after")
    def _layers_agree(self) -> "ProbeMetadata":
        if self.layers is None:
            return self
        if len(self.layers) < 2 or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
            raise ValueError(f"layers {self.layers}: give two or more distinct layers (one layer: `layer` alone)")
        if self.layer != self.layers[0]:
            raise ValueError(f"layer {self.layer} must be the first of layers {self.layers}")
        if self.d_in % len(self.layers):
            raise ValueError(f"d_in {self.d_in} is not a multiple of the {len(self.layers)} layers it reads")
        return self

    @property
    def read_layers(self) -> list[int]:
        """The layers whose rows the probe reads, side by side, in order."""
        return list(self.layers) if self.layers else [self.layer]


class LinearProbe:
    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        meta: ProbeMetadata,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
    ) -> None:
        weight = weight.reshape(-1, weight.shape[-1]) if weight.ndim == 1 else weight
        if weight.shape[1] != meta.d_in:
            raise ProbeError(f"probe {meta.name!r}: weight width {weight.shape[1]} != d_in {meta.d_in}")
        if bias.numel() != weight.shape[0] or len(meta.outputs) != weight.shape[0]:
            raise ProbeError(
                f"probe {meta.name!r}: {weight.shape[0]} weight rows, {bias.numel()} biases, "
                f"{len(meta.outputs)} named outputs; these must agree"
            )
        if (mean is None) != (std is None) or (mean is not None) != meta.standardize:
            raise ProbeError(f"probe {meta.name!r}: standardize={meta.standardize} needs both mean and std, or neither")
        for name, t in (("weight", weight), ("bias", bias), ("mean", mean), ("std", std)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ProbeError(f"probe {meta.name!r}: {name} holds NaN or infinite values (a broken training run?)")
        if std is not None and bool((std <= 0).any()):
            raise ProbeError(f"probe {meta.name!r}: std must be positive")
        if mean is not None and (mean.numel() != meta.d_in or std.numel() != meta.d_in):
            raise ProbeError(f"probe {meta.name!r}: mean and std need d_in={meta.d_in} values, have {mean.numel()} "
                             f"and {std.numel()}")
        self.weight = weight.float()
        self.bias = bias.reshape(-1).float()
        self.mean = None if mean is None else mean.float()
        self.std = None if std is None else std.float()
        self.meta = meta

    @property
    def d_in(self) -> int:
        return self.meta.d_in

    @property
    def threshold(self) -> float | None:
        return None if self.meta.calibration is None else self.meta.calibration.threshold

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [d_in, k], b [k]) with standardisation folded in, so logits = x @ W + b."""
        if self.mean is None:
            return self.weight.T.contiguous(), self.bias.clone()
        w = (self.weight / self.std).T.contiguous()
        return w, self.bias - (self.mean / self.std) @ self.weight.T

    def per_layer(self) -> dict[int, "LinearProbe"]:
        """A probe over several layers as one partial probe per layer, whose logits sum to this probe's:
        `x @ W + b` splits by the blocks of `x` (standardisation folded in, the bias on the first layer).
        The sidecar scores each part with the heads of its own layer and adds them up."""
        layers = self.meta.read_layers
        if len(layers) == 1:
            return {layers[0]: self}
        w, b = self.affine()
        d = self.d_in // len(layers)
        parts = {}
        for i, layer in enumerate(layers):
            meta = self.meta.model_copy(update={"layer": layer, "layers": None, "d_in": d, "standardize": False,
                                                "name": f"{self.meta.name}@{layer}"})
            parts[layer] = LinearProbe(w[i * d:(i + 1) * d].T, b if i == 0 else torch.zeros_like(b), meta)
        return parts

    def to(self, device: torch.device | str) -> "LinearProbe":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LinearProbe(self.weight.to(device), self.bias.to(device), self.meta, mv(self.mean), mv(self.std))

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_in:
            raise ProbeError(f"probe {self.meta.name!r} expects rows of width {self.d_in}, got {x.shape[-1]}")
        x = x.float()
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x @ self.weight.T + self.bias

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> [..., k] probabilities."""
        return torch.sigmoid(self.logits(x))

    __call__ = encode

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.contiguous().cpu(), "bias": self.bias.contiguous().cpu()}
        if self.mean is not None:
            tensors["mean"] = self.mean.contiguous().cpu()
            tensors["std"] = self.std.contiguous().cpu()
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "misalignment-monitor-probe"})
        (folder / META_FILE).write_text(self.meta.model_dump_json(indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "LinearProbe":
        meta = read_probe_metadata(folder)
        folder = Path(folder)
        try:
            t = load_file(str(folder / WEIGHTS_FILE))
        except FileNotFoundError as e:
            raise ProbeError(f"{folder / WEIGHTS_FILE}: file not found") from e
        except Exception as e:  # safetensors raises its own types for corrupt files
            raise ProbeError(f"{folder / WEIGHTS_FILE}: not a readable safetensors file ({e})") from e
        if "weight" not in t or "bias" not in t:
            raise ProbeError(f"{folder / WEIGHTS_FILE}: needs tensors 'weight' and 'bias', has {sorted(t)}")
        try:
            return cls(t["weight"], t["bias"], meta, t.get("mean"), t.get("std"))
        except ProbeError as e:
            raise ProbeError(f"{folder / WEIGHTS_FILE}: {e}") from e


def read_probe_metadata(folder: str | Path) -> ProbeMetadata:
    """The metadata alone (no tensors): enough to validate a config against."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise ProbeError(f"{path}: file not found (a probe is a folder with {META_FILE} and {WEIGHTS_FILE})")
    try:
        return ProbeMetadata.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ProbeError(f"{path}: not valid JSON ({e})") from e
    except ValueError as e:
        raise ProbeError(f"{path}: {e}") from e
