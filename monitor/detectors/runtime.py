"""Detectors at run time: compile specs into one scorer, then keep streaming state for every request.

Each detector's per-request state lives in a `DetectorBank`: arrays indexed by a request slot,
updated for all requests of a poll in a few array operations (`monitor.detectors.aggregate`).

Scores of a token, per input, in its head's space (`monitor.scoring.space`): an SAE feature's
activation, or a probe output's logit. A detector whose inputs are all probes reports
`sigmoid(aggregate of logits)` (so its threshold is a probability and a mean-pooled logistic probe
is reproduced exactly); count/fraction aggregations report a count/fraction, and their
`token_threshold` is a probability for probes.

`combine`: any = the highest per-input aggregate, all = the lowest, weighted = aggregate of the
per-token weighted sum. A detector fires at most once per request, when its score first reaches
its lowest threshold; later evidence updates the same alert (same alert id). A detector with a
`record_threshold` has two tiers: it fires at `record` there, and the same alert escalates to
`page` (once) when the score reaches `threshold`.

Row 0 of every request is skipped: it is the same token at the same position in every chat (an
attention sink with a huge norm) and carries no information; the probes are trained without it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np
import torch

from monitor.config.load import LoadedConfig
from monitor.config.models import CountAbove, DetectorSpec, FeatureInput, FractionAbove, ProbeInput
from monitor.detectors.aggregate import Ragged, grown, make_aggregator
from monitor.detectors.updates import DetectorUpdate
from monitor.scoring import BatchedScorer, LinearProbe, WatchedEncoder
from monitor.scoring.context import ContextEncoder
from monitor.scoring.sae_file import load_sae as load_sae_files
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

    @property
    def sigmoid_last(self) -> bool:
        """Its score is the sigmoid of aggregated logits (probe-only, not counting, not weighted)."""
        return self.probe_only and not self.counts and self.spec.combine != "weighted"


@dataclass
class BankStep:
    """What one update did: the batch rows whose request the detector fired on, and running scores."""

    fired: np.ndarray  # [F] indices into the batch's requests
    escalated: np.ndarray  # [E] indices into the batch's requests whose alert rose from `record` to `page` now
    running: np.ndarray | None  # [S, L] the detector's score after each token (with `running`)
    changed: np.ndarray  # [C] indices into the batch's requests whose top tokens changed


class DetectorBank:
    """One detector's state for every request in flight, in arrays indexed by request slot.

    Semantics per request are those of a streaming detector: each update feeds the request's new
    in-scope tokens, and the detector fires (once) when its score after the update reaches the
    threshold; `fired_at` is then the last position of that update. The top `TOP_TOKENS` tokens by
    token score are kept as evidence, with every input's value there.
    """

    def __init__(self, detector: CompiledDetector, capacity: int = 64) -> None:
        self.detector = detector
        spec = detector.spec
        # Probe inputs are logits: a count's token threshold (a probability) is compared as one.
        transform = logit if detector.probe_only and spec.combine != "weighted" else None
        # One aggregator over all inputs side by side (weighted: over their per-token sum).
        width = 1 if spec.combine == "weighted" else len(detector.inputs)
        self.agg = make_aggregator(spec.aggregation, capacity, transform, width)
        k, n_in = TOP_TOKENS, len(detector.inputs)
        self.active = np.zeros(capacity, dtype=bool)  # has seen an in-scope token
        self.fired = np.zeros(capacity, dtype=bool)
        self.paged = np.zeros(capacity, dtype=bool)  # reached the page tier (`threshold`)
        self.fired_at = np.full(capacity, -1, dtype=np.int64)
        self.score = np.full(capacity, np.nan)
        self.top_score = np.full((capacity, k), -np.inf)
        self.top_pos = np.full((capacity, k), -1, dtype=np.int64)
        self.top_inputs = np.zeros((capacity, k, n_in))
        self.alert_ids: dict[int, str] = {}

    @property
    def spec(self) -> DetectorSpec:
        return self.detector.spec

    @property
    def capacity(self) -> int:
        return len(self.active)

    def grow(self, capacity: int) -> None:
        self.agg.grow(capacity)
        self.active = grown(self.active, capacity, False)
        self.fired = grown(self.fired, capacity, False)
        self.paged = grown(self.paged, capacity, False)
        self.fired_at = grown(self.fired_at, capacity, -1)
        self.score = grown(self.score, capacity, np.nan)
        self.top_score = grown(self.top_score, capacity, -np.inf)
        self.top_pos = grown(self.top_pos, capacity, -1)
        self.top_inputs = grown(self.top_inputs, capacity, 0.0)

    def reset(self, slots: np.ndarray) -> None:
        """Forget these slots' requests (finished, expired): the slots are then free for new ones."""
        self.agg.reset(slots)
        self.active[slots] = False
        self.fired[slots] = False
        self.paged[slots] = False
        self.fired_at[slots] = -1
        self.score[slots] = np.nan
        self.top_score[slots] = -np.inf
        self.top_pos[slots] = -1
        self.top_inputs[slots] = 0.0
        for s in np.asarray(slots).tolist():
            self.alert_ids.pop(s, None)

    def update(self, batch: Ragged, positions: np.ndarray, scores: dict[str, np.ndarray],
               running: bool = False) -> BankStep:
        """Feed each request of `batch` its in-scope tokens: `positions` and `scores` (head -> [rows, k])
        are flat per-token arrays that `batch` indexes."""
        det, spec, s = self.detector, self.detector.spec, batch.slots
        refs = det.inputs
        if len({ref.head for ref in refs}) == 1:  # the usual case: one column pick from one head's scores
            flat = scores[refs[0].head][:, [ref.column for ref in refs]].astype(np.float64)
        else:
            flat = np.stack([scores[ref.head][:, ref.column] for ref in refs], axis=1).astype(np.float64)
        inputs = batch.gather(flat)  # [S, L, inputs]
        if spec.combine == "weighted":
            weights = np.array([ref.weight for ref in refs])
            run = self.agg.update(batch, (inputs @ weights)[:, :, None])[:, :, 0]
            raw = self.agg.value(s)[:, 0]
        else:
            run = self.agg.update(batch, inputs)
            values = self.agg.value(s)
            if values.shape[1] == 1:
                raw, run = values[:, 0], run[:, :, 0]
            else:
                raw = np.min(values, 1) if spec.combine == "all" else np.max(values, 1)
                run = np.min(run, 2) if spec.combine == "all" else np.max(run, 2)
        score = sigmoid(raw) if det.sigmoid_last else raw
        self.score[s] = score
        self.active[s] = True
        changed = self._merge_top(batch, batch.gather(positions, -1).astype(np.int64), inputs)
        was_fired = self.fired[s]
        fired = np.flatnonzero(~was_fired & (score >= spec.lowest_threshold))
        if len(fired):
            slots = s[fired]
            self.fired[slots] = True
            rows = batch.index[fired, batch.last[fired]]
            self.fired_at[slots] = positions[rows]
            for slot in slots.tolist():
                self.alert_ids[slot] = str(uuid.uuid4())
        paged_now = ~self.paged[s] & (score >= spec.threshold)
        self.paged[s[paged_now]] = True
        escalated = np.flatnonzero(paged_now & was_fired)  # fired at `record` before, `page` now
        run = (sigmoid(run) if det.sigmoid_last else run) if running else None
        return BankStep(fired, escalated, run, np.flatnonzero(changed))

    def _merge_top(self, batch: Ragged, positions: np.ndarray, inputs: np.ndarray) -> np.ndarray:
        """Merge each request's new tokens (`inputs`: [S, L, inputs]) into its top tokens; returns which
        requests' top changed."""
        columns = [inputs[:, :, j] for j in range(inputs.shape[2])]
        token = np.where(batch.mask, token_scores(self.spec, columns, self.detector.probe_only), -np.inf)
        # Past the first few tokens most steps bring nothing that beats a request's weakest top token:
        # only the requests with a contender are merged.
        beats = token.max(axis=1) > self.top_score[batch.slots].min(axis=1)
        rows = np.flatnonzero(beats)
        if not len(rows):
            return beats
        s = batch.slots[rows]
        cand_score = np.concatenate([self.top_score[s], token[rows]], axis=1)
        # Kept tokens come first, so a new token must beat them (not tie) to displace one.
        order = np.argsort(-cand_score, axis=1, kind="stable")[:, :TOP_TOKENS]
        new_score = np.take_along_axis(cand_score, order, axis=1)
        new_pos = np.take_along_axis(np.concatenate([self.top_pos[s], positions[rows]], axis=1), order, axis=1)
        new_pos[np.isneginf(new_score)] = -1
        cand_inputs = np.concatenate([self.top_inputs[s], inputs[rows]], axis=1)
        self.top_score[s] = new_score
        self.top_pos[s] = new_pos
        self.top_inputs[s] = np.take_along_axis(cand_inputs, order[:, :, None], axis=1)
        return beats

    def top(self, slot: int) -> tuple[tuple[float, int, dict[str, float]], ...]:
        """The evidence of one request: (score, position, {input label: value}), unsorted."""
        labels = [ref.label for ref in self.detector.inputs]
        return tuple((float(sc), int(p), dict(zip(labels, vals.tolist())))
                     for sc, p, vals in zip(self.top_score[slot], self.top_pos[slot], self.top_inputs[slot]) if p >= 0)

    def top_positions(self, slot: int) -> set[int]:
        return {int(p) for p in self.top_pos[slot] if p >= 0}

    def tier(self, slot: int) -> str | None:
        """The highest tier this request's alert reached: `page`, `record`, or None (not fired)."""
        return "page" if self.paged[slot] else "record" if self.fired[slot] else None

    def snapshot(self, slot: int, req: str, request_id: str, external_id: str, sample: int, *, fired_now: bool,
                 final: bool, step_time: float | None = None, escalated_now: bool = False) -> DetectorUpdate:
        """One request's state as it is now, frozen: what sinks receive."""
        fired = bool(self.fired[slot])
        return DetectorUpdate(req, request_id, external_id, sample, self.spec, float(self.score[slot]), fired,
                              self.alert_ids.get(slot), int(self.fired_at[slot]) if fired else None, self.top(slot),
                              fired_now, final, step_time, self.tier(slot), escalated_now)

    def adopt(self, detector: CompiledDetector) -> None:
        """A reload kept what this detector measures: judge by the new definition from now on."""
        self.detector = detector


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
        # sae-lens's folder format read directly; sae-lens itself only for a release or a folder only it reads.
        return load_sae_files(loaded.resolve(s.path)) if s.path else load_sae_files(release=s.release, sae_id=s.sae_id)

    for name, feats in watched.items():
        s = sae_cfg[name]
        sae = load_sae(s)
        cols = sorted(feats)
        feature_columns[name] = cols
        heads.setdefault(s.layer, {})[sae_head(name)] = WatchedEncoder.from_sae(sae, cols, mode=s.mode)
        del sae  # only the watched columns are kept
    probe_outputs: dict[str, list[str]] = {}
    sums: dict[str, list[str]] = {}
    for name in sorted(used_probes):
        probe = LinearProbe.load(loaded.resolve(probe_cfg[name].path))
        probe_outputs[name] = probe.meta.outputs
        parts = probe.per_layer()
        if len(parts) == 1:
            heads.setdefault(probe.meta.layer, {})[probe_head(name)] = probe
            continue
        sums[probe_head(name)] = [f"{probe_head(name)}@{layer}" for layer in parts]
        for layer, part in parts.items():
            heads.setdefault(layer, {})[f"{probe_head(name)}@{layer}"] = part
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
    return DetectorSet(BatchedScorer(heads, dev, cfg.scoring.max_batch_rows, sums), compiled, sorted(heads), infos, context)


def scope_batch(spec: DetectorSpec, slots: np.ndarray, first_row: np.ndarray, start: np.ndarray,
                counts: np.ndarray, n_prompt: np.ndarray) -> tuple[Ragged, np.ndarray] | None:
    """The in-scope tokens of each request: request i has rows first_row[i] ... with positions start[i] ...
    (`counts[i]` of them, consecutive). Returns the batch and which requests are in it, or None."""
    lo = np.maximum(start, 1)  # row 0 (the attention sink) never counts
    hi = start + counts
    if spec.scope == "prompt":
        hi = np.minimum(hi, n_prompt)
    elif spec.scope == "generation":
        lo = np.maximum(lo, n_prompt)
    n = hi - lo
    if spec.scope == "prompt" and spec.aggregation.kind == "last":
        # The prompt's last token is where the model has read the request and decides how to answer: a long
        # prompt prefilled in chunks is judged when its end arrives, never at the end of an earlier chunk (a
        # position its probe was never trained on, which could fire).
        n = np.where(start + counts >= n_prompt, n, 0)
    which = np.flatnonzero(n > 0)
    if not len(which):
        return None
    return Ragged.of(slots[which], (first_row + lo - start)[which], n[which]), which


def feed_one(bank: DetectorBank, positions: np.ndarray, n_prompt: int, scores: dict[str, np.ndarray],
             slot: int = 0, running: bool = False) -> BankStep | None:
    """Give one request's consecutive tokens (`positions`, with `scores` per row) to a detector's bank:
    how offline evaluation meets a detector, through the sidecar's own code. None when none is in scope."""
    if not len(positions):
        return None
    one = np.array([slot])
    found = scope_batch(bank.spec, one, np.array([0]), positions[:1], np.array([len(positions)]), np.array([n_prompt]))
    if found is None:
        return None
    return bank.update(found[0], positions, scores, running)


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
