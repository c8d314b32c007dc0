"""Compute only the watched features of a sparse autoencoder.

A monitor watches a handful of features of an SAE that may be 1M wide. For ReLU ("standard"),
JumpReLU and gated SAEs a feature's activation depends only on its own encoder column, so slicing
those columns gives exactly `sae.encode(x)[:, features]` at a fraction of the cost. For TopK SAEs a
feature's activation depends on every other feature (it must rank among the top k), so exact
scoring needs the full encoder; the pre-activation of the watched columns is offered as a proxy,
named as such, which needs its own calibrated threshold.

The input preprocessing mirrors sae-lens's `SAE.process_sae_in` (dtype cast, hook_z reshape,
run-time normalisation, `b_dec` subtraction). We reimplement it rather than call it so the scorer
holds only the watched columns (a 65k x 4096 SAE is 2 GB; its 64 watched columns are 1 MB) and
keeps no per-call state on a shared module. The parity tests pin it to sae-lens's behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

Mode = Literal["exact", "preact_proxy"]
Normalization = Literal["none", "constant_norm_rescale", "layer_norm"]

# Architectures whose watched features can be computed from their own columns alone.
COLUMNWISE = ("standard", "jumprelu", "gated")
TOPK = ("topk",)
# sae-lens applies these only when weights are loaded (folded into W_enc / b_dec), so at encode
# time they are the identity. Anything else would change encode() in a way we do not mirror.
_FOLDED_AT_LOAD = ("none", "expected_average_only_in", "covariance_whitening")
_LAYER_NORM_EPS = 1e-5


class ScoringError(ValueError):
    """An SAE or feature list the scorer cannot serve; the message says why."""


def sae_architecture(sae) -> str:
    return sae.cfg.architecture()


@dataclass(frozen=True)
class Preprocess:
    """What happens to a residual row before it meets the encoder columns (see sae-lens)."""

    dtype: torch.dtype
    normalization: Normalization
    b_dec: torch.Tensor | None  # None when apply_b_dec_to_input is off
    hook_z: bool
    d_in: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.hook_z:
            x = x.flatten(-2)
        if self.normalization == "constant_norm_rescale":
            x = x * ((self.d_in**0.5) / x.norm(dim=-1, keepdim=True))
        elif self.normalization == "layer_norm":
            x = x - x.mean(dim=-1, keepdim=True)
            x = x / (x.std(dim=-1, keepdim=True) + _LAYER_NORM_EPS)
        if self.b_dec is not None:
            x = x - self.b_dec
        return x

    def to(self, device: torch.device | str) -> "Preprocess":
        b = None if self.b_dec is None else self.b_dec.to(device)
        return Preprocess(self.dtype, self.normalization, b, self.hook_z, self.d_in)


def preprocess_of(sae) -> Preprocess:
    cfg = sae.cfg
    norm = cfg.normalize_activations
    if norm in _FOLDED_AT_LOAD:
        norm = "none"
    elif norm not in ("constant_norm_rescale", "layer_norm"):
        raise ScoringError(f"normalize_activations={norm!r} is not supported by the watched-feature scorer")
    b_dec = sae.b_dec.detach().clone() if cfg.apply_b_dec_to_input else None
    return Preprocess(
        dtype=sae.dtype,
        normalization=norm,  # type: ignore[arg-type]
        b_dec=b_dec,
        hook_z=getattr(cfg, "reshape_activations", "none") == "hook_z",
        d_in=cfg.d_in,
    )


def _check_features(features: Sequence[int], d_sae: int) -> torch.Tensor:
    if len(features) == 0:
        raise ScoringError("no watched features given")
    idx = torch.as_tensor(list(features), dtype=torch.long)
    bad = [int(i) for i in idx if i < 0 or i >= d_sae]
    if bad:
        raise ScoringError(f"feature indices {bad} are outside the SAE (d_sae={d_sae})")
    return idx


class WatchedEncoder:
    """`encode(x)` equals `sae.encode(x)[..., features]` for the watched features only.

    Build it with `WatchedEncoder.from_sae(sae, features, mode="exact")`.
    """

    def __init__(
        self,
        *,
        architecture: str,
        features: tuple[int, ...],
        mode: Mode,
        preprocess: Preprocess,
        w_enc: torch.Tensor,
        b_enc: torch.Tensor,
        threshold: torch.Tensor | None = None,
        w_mag: torch.Tensor | None = None,
        b_mag: torch.Tensor | None = None,
        col_scale: torch.Tensor | None = None,
        full_sae=None,
    ) -> None:
        self.architecture = architecture
        self.features = features
        self.mode = mode
        self.preprocess = preprocess
        self.w_enc = w_enc  # [d_in, k] (gated: the gate path)
        self.b_enc = b_enc  # [k] (gated: b_gate)
        self.threshold = threshold  # jumprelu
        self.w_mag = w_mag  # gated magnitude path
        self.b_mag = b_mag
        self.col_scale = col_scale  # topk proxy with rescale_acts_by_decoder_norm
        self._full_sae = full_sae  # topk exact: the whole encoder is needed

    @property
    def d_in(self) -> int:
        return self.preprocess.d_in

    @property
    def device(self) -> torch.device:
        return self.w_enc.device if self._full_sae is None else self._full_sae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.preprocess.dtype

    @classmethod
    def from_sae(cls, sae, features: Sequence[int], mode: Mode = "exact") -> "WatchedEncoder":
        arch = sae_architecture(sae)
        idx = _check_features(features, sae.cfg.d_sae)
        bad = [int(f) for f, ok in zip(idx, torch.isfinite(sae.W_enc.detach()[:, idx]).all(dim=0)) if not ok]
        if bad:  # every score of that feature would be NaN: refused here, not discovered as a silent detector
            raise ScoringError(f"the encoder columns of watched features {bad} hold NaN or infinite values")
        feats = tuple(int(i) for i in idx)
        pre = preprocess_of(sae)
        with torch.no_grad():
            if arch in COLUMNWISE:
                if mode != "exact":
                    raise ScoringError(
                        f"mode={mode!r} is only for TopK SAEs; a {arch} SAE is scored exactly from its columns"
                    )
                w = sae.W_enc.detach()[:, idx].contiguous()
                if arch == "gated":
                    w_mag = (sae.W_enc.detach()[:, idx] * sae.r_mag.detach()[idx].exp()).contiguous()
                    return cls(
                        architecture=arch, features=feats, mode=mode, preprocess=pre,
                        w_enc=w, b_enc=sae.b_gate.detach()[idx].clone(),
                        w_mag=w_mag, b_mag=sae.b_mag.detach()[idx].clone(),
                    )
                threshold = sae.threshold.detach()[idx].clone() if arch == "jumprelu" else None
                return cls(
                    architecture=arch, features=feats, mode=mode, preprocess=pre,
                    w_enc=w, b_enc=sae.b_enc.detach()[idx].clone(), threshold=threshold,
                )
            if arch in TOPK:
                col_scale = None
                if sae.cfg.rescale_acts_by_decoder_norm:
                    col_scale = sae.W_dec.detach()[idx].norm(dim=-1)
                common = dict(
                    architecture=arch, features=feats, mode=mode, preprocess=pre,
                    w_enc=sae.W_enc.detach()[:, idx].contiguous(), b_enc=sae.b_enc.detach()[idx].clone(),
                    col_scale=col_scale,
                )
                if mode == "exact":
                    return cls(**common, full_sae=sae)
                if mode == "preact_proxy":
                    return cls(**common)
                raise ScoringError(f"unknown mode {mode!r}; use 'exact' or 'preact_proxy'")
        raise ScoringError(
            f"SAE architecture {arch!r} is not supported; supported: {', '.join(COLUMNWISE + TOPK)} "
            "(BatchTopK SAEs load as jumprelu)"
        )

    def to(self, device: torch.device | str) -> "WatchedEncoder":
        def mv(t):
            return None if t is None else t.to(device)

        full = None if self._full_sae is None else self._full_sae.to(device)
        return WatchedEncoder(
            architecture=self.architecture, features=self.features, mode=self.mode,
            preprocess=self.preprocess.to(device), w_enc=mv(self.w_enc), b_enc=mv(self.b_enc),
            threshold=mv(self.threshold), w_mag=mv(self.w_mag), b_mag=mv(self.b_mag),
            col_scale=mv(self.col_scale), full_sae=full,
        )

    def hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations of the watched columns (for gated SAEs: the magnitude path)."""
        sae_in = self.preprocess(x)
        if self.architecture == "gated":
            return sae_in @ self.w_mag + self.b_mag
        pre = sae_in @ self.w_enc + self.b_enc
        if self.col_scale is not None:
            pre = pre * self.col_scale
        return pre

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] residual rows -> [..., len(features)] activations, in the SAE's dtype."""
        if x.shape[-1] != self.d_in and not self.preprocess.hook_z:
            raise ScoringError(f"input rows have width {x.shape[-1]}, the SAE expects d_in={self.d_in}")
        if self._full_sae is not None:
            return self._full_sae.encode(x)[..., list(self.features)]
        if self.architecture == "gated":
            sae_in = self.preprocess(x)
            active = ((sae_in @ self.w_enc + self.b_enc) > 0).to(sae_in.dtype)
            return active * torch.relu(sae_in @ self.w_mag + self.b_mag)
        pre = self.hidden_pre(x)
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
        if self.mode == "preact_proxy":
            return pre
        return torch.relu(pre)

    __call__ = encode
