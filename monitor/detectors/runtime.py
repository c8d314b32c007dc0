"""Detectors at run time: compile specs into one scorer, then keep streaming state per request.

Scores of a token, per input, in its head's space (`monitor.scoring.space`): an SAE feature's
activation, or a probe output's logit. A detector whose inputs are all probes reports
`sigmoid(aggregate of logits)` (so its threshold is a probability and a mean-pooled logistic probe
is reproduced exactly); count/fraction aggregations report a count/fraction, and their
`token_threshold` is a probability for probes.

`combine`: any = the highest per-input aggregate, all = the lowest, weighted = aggregate of the
per-token weighted sum. A detector fires at most once per request, when its score first reaches
its threshold; later evidence updates the same alert (same alert id).

Row 0 of every request is skipped: it is the same token at the same position in every chat (an
attention sink with a huge norm) and carries no information; the probes are trained without it.
"""

from __future__ import annotations

import heapq
import math
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch

from monitor.config.load import LoadedConfig
from monitor.config.models import CountAbove, DetectorSpec, FeatureInput, FractionAbove, ProbeInput
from monitor.detectors.aggregate import Aggregator, make_aggregator
from monitor.detectors.updates import DetectorUpdate, TokenEvidence, ranked
from monitor.scoring import BatchedScorer, LinearProbe, WatchedEncoder
from monitor.scoring.context import ContextEncoder
from monitor.scoring.space import HeadInfo, logit, sigmoid

TOP_TOKENS = 5


def sae_head(name: str) -> str:
    return f"sae:{name}"


def probe_head(name: str) -> str:
    return f"probe:{name}"


@dataclass(frozen=True)
class InputRef:
    head: str
    column: int
    weight: float
    is_probe: bool
    label: str  # "demo-l15/1234" or "pii/score"


@dataclass
class CompiledDetector:
    spec: DetectorSpec
    inputs: list[InputRef]

    @property
    def probe_only(self) -> bool:
        return all(i.is_probe for i in self.inputs)

    @property
    def counts(self) -> bool:
        return isinstance(self.spec.aggregation, (CountAbove, FractionAbove))

    def new_state(self) -> "DetectorState":
        transform = logit if self.probe_only and self.spec.combine != "weighted" else None
        n_aggs = 1 if self.spec.combine == "weighted" else len(self.inputs)
        return DetectorState(self, [make_aggregator(self.spec.aggregation, transform) for _ in range(n_aggs)])


@dataclass
class DetectorState:
    detector: CompiledDetector
    aggs: list[Aggregator]
    fired: bool = False
    alert_id: str | None = None
    fired_at: int | None = None  # position of the token that pushed it over
    top: list[tuple[float, int, dict]] = field(default_factory=list)  # min-heap of (score, position, inputs)
    running: np.ndarray | None = None  # with update(..., running=True): the score after each token of that call
    running_positions: np.ndarray | None = None  # their positions (set by `feed`)
    top_version: int = 0  # counts changes to `top`: a trace rebuilds its evidence windows only then
    _score: float = float("nan")  # as of the last update (a reload keeps what a detector measures, so it holds)

    def _combine_aggs(self) -> float:
        vals = [a.value for a in self.aggs]
        if any(math.isnan(v) for v in vals):
            vals = [v for v in vals if not math.isnan(v)]
            if not vals:
                return float("nan")
        spec = self.detector.spec
        raw = min(vals) if spec.combine == "all" else max(vals)
        if self.detector.probe_only and not self.detector.counts and spec.combine != "weighted":
            return sigmoid(raw)
        return raw

    @property
    def score(self) -> float:
        return self._score

    def _combine_running(self, runs: list[np.ndarray]) -> np.ndarray:
        """`_combine_aggs`, token by token: per aggregator [tokens] -> [tokens]."""
        spec = self.detector.spec
        if len(runs) == 1:
            raw = runs[0]
        else:
            raw = np.min(runs, axis=0) if spec.combine == "all" else np.max(runs, axis=0)
        if self.detector.probe_only and not self.detector.counts and spec.combine != "weighted":
            return sigmoid(raw)
        return raw

    def update(self, positions: np.ndarray, columns: list[np.ndarray], running: bool = False) -> bool:
        """Feed in-scope tokens (`columns[i]` = input i's scores). Returns True when this call fired.

        With `running`, `self.running` is then the detector's score after each of these tokens."""
        if len(positions) == 0:
            return False
        det = self.detector
        many = running and len(positions) > 1  # one token's running score is just the score after it
        if det.spec.combine == "weighted":
            runs = [self.aggs[0].update(sum(ref.weight * col for ref, col in zip(det.inputs, columns)), many)]
        else:
            runs = [agg.update(col, many) for agg, col in zip(self.aggs, columns)]
        if many:
            self.running = self._combine_running(runs)
        scores = token_scores(det.spec, columns, det.probe_only)
        for j in np.argsort(scores)[-TOP_TOKENS:]:
            score = float(scores[j])
            if len(self.top) == TOP_TOKENS and score <= self.top[0][0]:
                continue
            item = (score, int(positions[j]), {ref.label: float(col[j]) for ref, col in zip(det.inputs, columns)})
            if len(self.top) < TOP_TOKENS:
                heapq.heappush(self.top, item)
            else:
                heapq.heapreplace(self.top, item)
            self.top_version += 1
        score = self._score = self._combine_aggs()
        if running and not many:
            self.running = np.array([score])
        if not self.fired and score >= det.spec.threshold:
            self.fired = True
            self.alert_id = str(uuid.uuid4())
            self.fired_at = int(positions[-1])
            return True
        return False

    def evidence(self) -> list[TokenEvidence]:
        return list(ranked(self.top))

    def snapshot(self, req: str, request_id: str, external_id: str, sample: int, *, fired_now: bool, final: bool,
                 step_time: float | None = None) -> DetectorUpdate:
        """The state as it is now, frozen: what sinks receive."""
        # The heap's items are made once and never changed, so the snapshot may share them.
        return DetectorUpdate(req, request_id, external_id, sample, self.detector.spec, self.score, self.fired,
                              self.alert_id, self.fired_at, tuple(self.top), fired_now, final, step_time)


@dataclass
class DetectorSet:
    """The scorer for every configured SAE/probe input, and the detectors that read it."""

    scorer: BatchedScorer
    detectors: list[CompiledDetector]
    layers: list[int]
    heads: dict[str, HeadInfo]  # every scored head: its kind, output space and column labels
    context: dict[str, ContextEncoder] = field(default_factory=dict)  # every configured SAE, full, loaded on demand

    @property
    def context_layers(self) -> set[int]:
        return {c.layer for c in self.context.values()}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("scoring.device is cuda but no CUDA device is available")
    return torch.device(name)


def build_detector_set(loaded: LoadedConfig, device: str | torch.device | None = None) -> DetectorSet:
    from sae_lens import SAE

    cfg = loaded.config
    dev = resolve_device(cfg.scoring.device) if device is None else torch.device(device)
    sae_cfg = {s.name: s for s in cfg.saes}
    probe_cfg = {p.name: p for p in cfg.probes}
    watched: dict[str, set[int]] = {}
    used_probes: set[str] = set()
    for det in loaded.detectors:
        for inp in det.spec.inputs:
            if isinstance(inp, FeatureInput):
                watched.setdefault(inp.sae, set()).add(inp.feature)
            else:
                used_probes.add(inp.probe)
    heads: dict[int, dict[str, object]] = {}
    feature_columns: dict[str, list[int]] = {}
    def load_sae(s):
        return SAE.load_from_disk(loaded.resolve(s.path)) if s.path else SAE.from_pretrained(s.release, s.sae_id)

    for name, feats in watched.items():
        s = sae_cfg[name]
        sae = load_sae(s)
        cols = sorted(feats)
        feature_columns[name] = cols
        heads.setdefault(s.layer, {})[sae_head(name)] = WatchedEncoder.from_sae(sae, cols, mode=s.mode)
        del sae  # only the watched columns are kept
    probe_outputs: dict[str, list[str]] = {}
    for name in sorted(used_probes):
        probe = LinearProbe.load(loaded.resolve(probe_cfg[name].path))
        probe_outputs[name] = probe.meta.outputs
        heads.setdefault(probe.meta.layer, {})[probe_head(name)] = probe
    infos = {sae_head(n): HeadInfo(sae_head(n), "sae", tuple(f"{n}/{c}" for c in cols))
             for n, cols in feature_columns.items()}
    infos |= {probe_head(n): HeadInfo(probe_head(n), "probe", tuple(f"{n}/{o}" for o in outs))
              for n, outs in probe_outputs.items()}
    compiled = []
    for det in loaded.detectors:
        refs = []
        for inp in det.spec.inputs:
            if isinstance(inp, FeatureInput):
                col = feature_columns[inp.sae].index(inp.feature)
                refs.append(InputRef(sae_head(inp.sae), col, inp.weight, False, f"{inp.sae}/{inp.feature}"))
            elif isinstance(inp, ProbeInput):
                outputs = probe_outputs[inp.probe]
                col = 0 if inp.output is None else outputs.index(inp.output)
                refs.append(InputRef(probe_head(inp.probe), col, inp.weight, True, f"{inp.probe}/{outputs[col]}"))
        compiled.append(CompiledDetector(det.spec, refs))
    context = {s.name: ContextEncoder(s.name, s.layer, lambda s=s: load_sae(s), dev) for s in cfg.saes}
    return DetectorSet(BatchedScorer(heads, dev, cfg.scoring.max_batch_rows), compiled, sorted(heads), infos, context)


def feed(det: CompiledDetector, state: "DetectorState | None", positions: np.ndarray, n_prompt: int,
         scores: dict[str, np.ndarray], running: bool = False) -> tuple["DetectorState | None", bool]:
    """Give a detector one batch of a request's tokens (`scores`: head -> [n, k] for `positions`).

    The one place where a detector meets token scores: the sidecar and offline evaluation both call
    it, so a detector is judged offline exactly as it is in production. Returns the state (created
    on the first in-scope token), or None when no token of this batch is in scope, and whether this
    batch fired it. With `running`, `state.running` holds the score after each in-scope token and
    `state.running_positions` their positions.
    """
    mask = in_scope(det.spec, positions, n_prompt)
    if not mask.any():
        return None, False
    if state is None:
        state = det.new_state()
    cols = [scores[ref.head][mask, ref.column].astype(np.float64) for ref in det.inputs]
    fired = state.update(positions[mask], cols, running)
    if running:
        state.running_positions = positions[mask]
    return state, fired


def token_scores(spec: DetectorSpec, columns: list[np.ndarray], probe_only: bool | None = None) -> np.ndarray:
    """Each token's score for a detector, before aggregation (what ranks its evidence, and what the console
    colours): the weighted sum under `weighted`, else the highest (any) or lowest (all) input, as a
    probability when every input is a probe. `columns[i]`: input i's scores, in the order of `spec.inputs`."""
    if probe_only is None:
        probe_only = all(isinstance(i, ProbeInput) for i in spec.inputs)
    if spec.combine == "weighted":
        return sum(i.weight * col for i, col in zip(spec.inputs, columns))
    if len(columns) == 1:  # most detectors: nothing to combine
        out = columns[0]
    else:
        stack = np.stack(columns)
        out = stack.min(0) if spec.combine == "all" else stack.max(0)
    return sigmoid(out) if probe_only else out


def in_scope(spec: DetectorSpec, positions: np.ndarray, n_prompt: int) -> np.ndarray:
    mask = positions >= 1
    if spec.scope == "prompt":
        mask &= positions < n_prompt
    elif spec.scope == "generation":
        mask &= positions >= n_prompt
    return mask
