"""Score every watched SAE feature and probe of a layer with one matrix multiply.

Each head (a `WatchedEncoder` or a `LinearProbe`) is an affine map of a per-row normalised input:

    pre = s(x) * (x @ W - m(x) * colsum(W)) + (b - b_dec @ W)

with s, m = 1, 0 (no normalisation), sqrt(d)/|x|, 0 (constant_norm_rescale) or 1/(std+eps), mean
(layer_norm). So all heads of one layer share `x @ W_cat`; each then applies its own row scale,
bias and activation to its slice. The fused result is computed in float32 and agrees with each
head's own `encode` to float32 rounding (the order of operations differs: `b_dec` is folded into
the bias); `tests/test_scoring_parity.py` pins the tolerance. TopK heads in exact mode need the
full encoder and are run on their own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import numpy as np
import torch

from monitor.scoring.probe import LinearProbe
from monitor.scoring.watched import ScoringError, WatchedEncoder, _LAYER_NORM_EPS

Head = Union[WatchedEncoder, LinearProbe]


@dataclass(frozen=True)
class _Segment:
    name: str
    kind: str  # relu | jumprelu | gated | proxy | probe
    start: int
    width: int
    normalization: str
    const: torch.Tensor  # [width] (gated: [2*width], gate then magnitude)
    colsum: torch.Tensor | None  # layer_norm only
    threshold: torch.Tensor | None = None
    col_scale: torch.Tensor | None = None


def _affine_of(head: Head) -> tuple[str, str, torch.Tensor, torch.Tensor]:
    """(kind, normalization, W [d, k'], c [k']) for a head, in float32."""
    if isinstance(head, LinearProbe):
        w, b = head.affine()
        return "probe", "none", w.float(), b.float()
    if head.preprocess.hook_z:
        raise ScoringError("hook_z SAEs read attention outputs, not the residual stream; they cannot be fused")
    if head._full_sae is not None:
        raise ScoringError("a TopK SAE in exact mode needs its full encoder and is scored on its own")
    pre = head.preprocess
    if head.architecture == "gated":
        w = torch.cat([head.w_enc, head.w_mag], dim=1).float()
        b = torch.cat([head.b_enc, head.b_mag]).float()
        kind = "gated"
    else:
        w, b = head.w_enc.float(), head.b_enc.float()
        kind = {"standard": "relu", "jumprelu": "jumprelu"}.get(head.architecture, "proxy")
    c = b if pre.b_dec is None else b - pre.b_dec.float() @ w
    return kind, pre.normalization, w, c


class LayerScorer:
    """All heads that read one layer's rows: `score(x)` -> {head name: [n, k] float32}.

    SAE heads give feature activations (as `encode`); probe heads give *logits*. Detectors
    aggregate probe logits over tokens and apply the sigmoid last: a probe trained on mean-pooled
    rows is then exact under `mean` aggregation, and max / EMA / rolling means commute with the
    monotone sigmoid anyway.
    """

    def __init__(self, heads: Mapping[str, Head], device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.separate: dict[str, WatchedEncoder] = {}
        segments: list[_Segment] = []
        blocks: list[torch.Tensor] = []
        start = 0
        d_in: int | None = None
        for name, head in heads.items():
            if isinstance(head, WatchedEncoder) and head._full_sae is not None:
                self.separate[name] = head.to(self.device)
                continue
            if d_in is None:
                d_in = head.d_in
            elif head.d_in != d_in:
                raise ScoringError(f"head {name!r} reads width {head.d_in}, other heads of this layer read {d_in}")
            kind, norm, w, c = _affine_of(head)
            width = w.shape[1] // 2 if kind == "gated" else w.shape[1]
            segments.append(
                _Segment(
                    name=name, kind=kind, start=start, width=width, normalization=norm,
                    const=c.to(self.device),
                    colsum=w.sum(dim=0).to(self.device) if norm == "layer_norm" else None,
                    threshold=None if kind != "jumprelu" else head.threshold.float().to(self.device),
                    col_scale=None if kind != "proxy" or head.col_scale is None else head.col_scale.float().to(self.device),
                )
            )
            blocks.append(w)
            start += w.shape[1]
        self.segments = segments
        self.d_in = d_in
        self.weight = torch.cat(blocks, dim=1).to(self.device) if blocks else None
        self._scratch: list[np.ndarray] = []  # the float32 copy of the rows, reused between calls
        self._matmul = _fastest_cpu_matmul(self.weight) if self.weight is not None and self.device.type == "cpu" \
            else torch.matmul

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.segments] + list(self.separate)

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # From page-locked rows the copy to a GPU runs asynchronously; whoever reads the scores back waits for it.
        x = x.to(self.device, non_blocking=x.is_pinned())
        out: dict[str, torch.Tensor] = {}
        if self.weight is not None:
            xf = _to_float32(x, self._scratch)
            y = self._matmul(xf, self.weight)
            stats: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
            for seg in self.segments:
                cols = y[:, seg.start : seg.start + (2 * seg.width if seg.kind == "gated" else seg.width)]
                if seg.normalization != "none":
                    if seg.normalization not in stats:
                        stats[seg.normalization] = _row_stats(xf, seg.normalization)
                    scale, mean = stats[seg.normalization]
                    if mean is not None:
                        cols = cols - mean * seg.colsum
                    cols = cols * scale
                pre = cols + seg.const
                out[seg.name] = _activate(seg, pre)
        for name, enc in self.separate.items():
            out[name] = enc.encode(x).float()
        return out


def _to_float32(x: torch.Tensor, scratch: list) -> torch.Tensor:
    """bfloat16 -> float32 on the CPU as a 16-bit shift of the bits (exact: a bfloat16 is the top half of a
    float32), in numpy: ~3x quicker than torch's conversion on the AVX2 machine measured (bench/fleet.py).
    Written into `scratch[0]` (grown as needed, reused): valid until the next call."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return x.float()
    bits = x.contiguous().view(torch.int16).numpy().view(np.uint16)
    if not scratch or scratch[0].size < bits.size:
        scratch[:] = [np.empty(max(bits.size, 2 * (scratch[0].size if scratch else 0)), dtype=np.uint32)]
    out = scratch[0][: bits.size].reshape(bits.shape)
    np.left_shift(bits, 16, out=out, dtype=np.uint32)
    return torch.from_numpy(out.view(np.float32))


def _numpy_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(x.numpy() @ w.numpy())


def _fastest_cpu_matmul(w: torch.Tensor, rows: int = 256, rounds: int = 7):
    """torch's BLAS or numpy's for `x @ w` on this CPU, whichever is quicker, timed once at start. They
    differ by vendor: numpy's OpenBLAS ran this product 1.3x quicker than torch's MKL on the AMD EPYC the
    benchmarks ran on; MKL is usually the quicker on Intel. Both compute the same float32 product."""
    x = torch.randn(rows, w.shape[0])
    candidates = (torch.matmul, _numpy_matmul)
    best = {fn: float("inf") for fn in candidates}
    for _ in range(rounds):  # alternating, the quickest of several: a noisy machine hits both alike
        for fn in candidates:
            t = time.perf_counter()
            fn(x, w)
            best[fn] = min(best[fn], time.perf_counter() - t)
    return min(candidates, key=best.get)


def _row_stats(x: torch.Tensor, normalization: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if normalization == "constant_norm_rescale":
        return (x.shape[-1] ** 0.5) / x.norm(dim=-1, keepdim=True), None
    mean = x.mean(dim=-1, keepdim=True)
    return 1.0 / ((x - mean).std(dim=-1, keepdim=True) + _LAYER_NORM_EPS), mean


def _activate(seg: _Segment, pre: torch.Tensor) -> torch.Tensor:
    if seg.kind == "relu":
        return torch.relu(pre)
    if seg.kind == "jumprelu":
        return torch.relu(pre) * (pre > seg.threshold)
    if seg.kind == "gated":
        gate, mag = pre[:, : seg.width], pre[:, seg.width :]
        return (gate > 0) * torch.relu(mag)
    if seg.kind == "proxy":
        return pre if seg.col_scale is None else pre * seg.col_scale
    return pre  # probes: logits (see LayerScorer)


class BatchedScorer:
    """Heads grouped by layer: `score({layer: rows})` -> {head name: [n, k]}.

    At most `max_rows` rows go through one pass: the float32 copy of the rows and the fused
    pre-activations are the scorer's working memory, so this bounds it whatever a slot holds.
    """

    def __init__(self, heads_by_layer: Mapping[int, Mapping[str, Head]], device: torch.device | str = "cpu",
                 max_rows: int = 4096, sums: Mapping[str, Sequence[str]] | None = None) -> None:
        names = [n for heads in heads_by_layer.values() for n in heads]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ScoringError(f"head names must be unique across layers: {dupes}")
        # A probe over several layers: its parts (one per layer, named in `sums`) are scored with their layers'
        # heads in the same matrix multiply, and their logits added up (the rows of every layer of a slot are
        # the same tokens in the same order).
        self.sums = {name: list(parts) for name, parts in (sums or {}).items()}
        unknown = sorted({p for parts in self.sums.values() for p in parts} - set(names))
        if unknown:
            raise ScoringError(f"summed heads {unknown} are not heads of any layer")
        if max_rows < 1:
            raise ScoringError(f"max_rows must be at least 1, got {max_rows}")
        self.max_rows = max_rows
        self.device = torch.device(device)
        self.layers = {layer: LayerScorer(heads, device) for layer, heads in heads_by_layer.items()}

    def score(self, rows_by_layer: Mapping[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for layer, scorer in self.layers.items():
            if layer not in rows_by_layer:
                continue
            rows = rows_by_layer[layer]
            if rows.shape[0] <= self.max_rows:
                out.update(scorer.score(rows))
                continue
            parts = [scorer.score(chunk) for chunk in rows.split(self.max_rows)]
            out.update({name: torch.cat([p[name] for p in parts]) for name in parts[0]})
        for name, parts in self.sums.items():
            if all(p in out for p in parts):
                out[name] = sum(out.pop(p) for p in parts)
            else:  # a layer it reads is missing from these rows: no score, rather than part of one
                for p in parts:
                    out.pop(p, None)
        return out
