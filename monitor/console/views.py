"""What the incident page shows, computed from a stored incident event: plain words first, numbers after.

Everything here is plain data for the templates (which only lay it out): the headline sentence, the
token strip with each token's shade, the heatmap of every watched input, each detector's trajectory
as SVG coordinates. One colour scale everywhere: one hue, light to dark (readable by colour-blind
readers), the value always in text on hover.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from monitor.config.models import DetectorSpec, FeatureInput, ProbeInput
from monitor.sinks.reply import ReplyOutcome, reply_outcome
from monitor.detectors.runtime import in_scope, token_scores

SEVERITY_WORDS = {"critical": "Critical", "warning": "Warning", "info": "Info"}
_ROLE_MARK = re.compile(r"<\|im_start\|>(\w+)|<\|start_header_id\|>(\w+)<\|end_header_id\|>")
_SPECIAL = re.compile(r"^<\|[a-z_]+\|>$|^</?s>$")
ROLE_WORDS = {"user": "the user's", "system": "the system prompt's", "assistant": "the model's", "tool": "a tool's"}


def shade(x: float) -> str:
    """A colour on the one-hue scale for x in [0, 1] (0: white-ish, 1: dark red)."""
    x = 0.0 if not math.isfinite(x) else min(max(x, 0.0), 1.0)
    return f"hsl(8, {round(30 + 55 * x)}%, {round(97 - 55 * x)}%)"


def ink(x: float) -> str:
    return "#fff" if x > 0.6 else "#1a1a1a"


@dataclass
class Token:
    position: int
    label: str  # the text as shown, or "#position"
    score: float | None  # the primary detector's per-token score (None: outside its scope)
    level: float  # 0..1 on the colour scale
    completion: bool
    evidence: bool
    fired_here: bool
    special: bool
    token_id: int | None
    template: bool = False  # written by the chat template: drawn, kept out of the colour scale

    @property
    def background(self) -> str:
        return shade(self.level) if self.score is not None and not self.template else "transparent"

    @property
    def color(self) -> str:
        return ink(self.level) if self.score is not None and not self.template else "#777"


@dataclass
class Trajectory:
    name: str
    fired: bool
    threshold: float
    width: int
    height: int
    points: str  # SVG polyline points
    threshold_y: float
    fire_x: float | None
    fire_y: float | None
    y_max: float
    first: int
    last: int
    boundary_x: float | None


@dataclass
class HeatRow:
    label: str
    explanation: str | None
    cells: list[tuple[float, float, str]]  # (x, level, title)


@dataclass
class DetectorView:
    name: str
    concept: str
    severity: str
    fired: bool
    alert_id: str | None
    score: float | None
    threshold: float
    fired_at: int | None
    description: str
    space: str  # what the score means, in words
    evidence: list[dict]
    definition: dict
    calibration: dict | None
    tier: str | None = None  # the tier reached: page, record (then `threshold` and `calibration` are the record tier's)


@dataclass
class IncidentView:
    headline: str
    why: str
    primary: DetectorView
    detectors: list[DetectorView]
    tokens: list[Token]
    has_text: bool
    text_hidden: bool
    scale_threshold: float
    legend: list[tuple[str, str]]
    trajectories: list[Trajectory]
    heat: list[HeatRow]
    heat_width: int
    cell: float
    context: dict[int, list[dict]]
    prompt_tokens: int
    words: dict[int, tuple[str, str, str]] = field(default_factory=dict)  # evidence position -> (before, token, after)
    notes: list[str] = field(default_factory=list)
    how_sure: str | None = None
    outcome: ReplyOutcome | None = None
    scale_max: float = 1.0
    hidden_context: int = 0  # context features left out (no readable explanation, or not active)

    @staticmethod
    def input_words(name: str) -> str:
        """A watched input in words when it has no explanation: `pii/score` -> "the pii probe"."""
        head, _, col = name.partition("/")
        return f"SAE {head}, feature {col}" if col.isdigit() else f"the {head} probe"


def input_labels(spec: DetectorSpec, available: list[str]) -> list[str | None]:
    """The trace's name of each input of a detector (`<sae>/<feature>`, `<probe>/<output>`)."""
    out = []
    for i in spec.inputs:
        if isinstance(i, FeatureInput):
            name = f"{i.sae}/{i.feature}"
            out.append(name if name in available else None)
        elif isinstance(i, ProbeInput):
            if i.output:
                name = f"{i.probe}/{i.output}"
                out.append(name if name in available else None)
            else:  # its first output: the first of the probe's columns in the trace
                out.append(next((a for a in available if a.startswith(f"{i.probe}/")), None))
    return out


def _space(spec: DetectorSpec) -> str:
    kind = spec.aggregation.kind
    if kind == "count_above":
        return "how many words scored above the token threshold"
    if kind == "fraction_above":
        return "the share of words that scored above the token threshold"
    if all(isinstance(i, ProbeInput) for i in spec.inputs) and spec.combine != "weighted":
        return "a probability (0 to 1) that the concept is present"
    return "the strength of the watched features (activation units)"


def _roles(texts: list[str]) -> list[str | None]:
    """Which chat role each token belongs to, from the template's markers (None: unknown)."""
    roles: list[str | None] = []
    current = None
    pending = ""
    for t in texts:
        pending = (pending + t)[-80:]
        m = None
        for m in _ROLE_MARK.finditer(pending):
            pass
        if m is not None:
            current = m.group(1) or m.group(2)
            pending = pending[m.end():]
        roles.append(current)
    return roles


def template_mask(texts: list[str] | None, positions: list[int]) -> list[bool]:
    """Tokens the chat template wrote, not a person: special tokens, the role header after each (up to
    its line break), the system prompt, and position 0 (where every model stores outsized
    activations). They are drawn but kept out of the colour scales: otherwise `<|im_start|>` or the
    default system prompt is the darkest cell of every incident and the words that matter wash out.
    Without text only position 0 is known."""
    if texts is None:
        return [p == 0 for p in positions]
    roles = _roles(texts)
    out, header = [], False
    for j, t in enumerate(texts):
        special = bool(_SPECIAL.match(t.strip()))
        if special:
            header = True
            out.append(True)
            continue
        out.append(header or roles[j] == "system" or positions[j] == 0)
        if header and "\n" in t:
            header = False
    return out


def usable_explanation(text: str | None) -> bool:
    """An explanation a newcomer can read: not "never active", and a mechanical "peaks on:" label only
    when it names a word (a feature that peaks on digits or punctuation says nothing here)."""
    if not text or text.startswith("never active"):
        return False
    if text.startswith("peaks on:"):
        return bool(re.search(r"[A-Za-z]{3,}", text[len("peaks on:"):]))
    return True


_ROLES = {"system", "user", "assistant", "tool"}


def _words(texts: list[str], j: int, span: int = 6, before_only: bool = False, start: int = 0) -> str:
    """The words around token j (or the ones leading up to it, from `start` on), without the chat
    template's markers."""
    lo, hi = (max(start, j - 3 * span), j + 1) if before_only else (max(0, j - span), min(len(texts), j + span + 1))
    # Inside a long redacted span (a card number is ~19 tokens) every token is empty but the first, which
    # holds the replacement: reach back to it so the words read "[CREDIT_CARD]", not nothing.
    while lo > start and not "".join(texts[lo:hi]).strip():
        lo -= 1
    # The template's markers, and the role name that follows one ("<|im_start|>user"), are not words anyone wrote.
    kept = [t for k, t in enumerate(texts[lo:hi], start=lo) if not _SPECIAL.match(t.strip())
            and not (k > 0 and _SPECIAL.match(texts[k - 1].strip()) and t.strip() in _ROLES)]
    text = " ".join("".join(kept).split())
    if before_only:
        return ("…" if lo > start or len(text) > 120 else "") + text[-120:]
    return text[:120]


def detector_view(d: dict) -> DetectorView:
    spec = DetectorSpec.model_validate(d["definition"])
    record = d.get("tier") == "record"  # judged against the tier it reached: its threshold, its calibration
    return DetectorView(
        name=d["name"], concept=d["concept"], severity=d["severity"], fired=d["fired"], alert_id=d["alert_id"],
        score=d["score"], threshold=spec.record_threshold if record else d["threshold"], fired_at=d["fired_at_position"],
        description=spec.description, space=_space(spec), evidence=d["evidence"], definition=d["definition"],
        calibration=d["definition"].get("record_calibration" if record else "calibration"), tier=d.get("tier"))


def _trajectory(d: DetectorView, running: dict | None, first: int, last: int, boundary: int,
                width: int = 720, height: int = 120) -> Trajectory:
    pos = (running or {}).get("positions", [])
    vals = (running or {}).get("scores", [])
    finite = [v for v in vals if v is not None and math.isfinite(v)]
    y_max = max([d.threshold * 1.25, *finite, 1e-9]) if finite else max(d.threshold * 1.25, 1e-9)
    span = max(last - first, 1)

    def x(p: float) -> float:
        return round(8 + (p - first) / span * (width - 16), 1)

    def y(v: float) -> float:
        return round(height - 8 - min(max(v, 0.0), y_max) / y_max * (height - 16), 1)

    points = " ".join(f"{x(p)},{y(v)}" for p, v in zip(pos, vals) if v is not None and math.isfinite(v))
    fire_x = fire_y = None
    if d.fired_at is not None and d.fired_at in pos:
        fire_x, fire_y = x(d.fired_at), y(vals[pos.index(d.fired_at)])
    return Trajectory(name=d.name, fired=d.fired, threshold=d.threshold, width=width, height=height, points=points,
                      threshold_y=y(d.threshold), fire_x=fire_x, fire_y=fire_y, y_max=y_max, first=first, last=last,
                      boundary_x=x(boundary - 0.5) if first < boundary <= last else None)


def _primary(detectors: list[DetectorView]) -> DetectorView:
    fired = [d for d in detectors if d.fired]
    return max(fired or detectors, key=lambda d: ({"critical": 2, "warning": 1, "info": 0}[d.severity],
                                                  (d.score or 0) / (d.threshold or 1)))


def how_sure(d: DetectorView) -> str | None:
    """How unusual this score is for normal traffic, in plain words, from the threshold's calibration."""
    cal = d.calibration or {}
    fpr = cal.get("achieved_fpr")
    if fpr is None:
        fpr = cal.get("target_fpr")
    if fpr is None:
        return None
    n = cal.get("n_benign")
    on = f" (measured on {n:,} normal conversations" if n else " (the calibration's target"
    upper = cal.get("fpr_upper_95")
    bound = f"; at most about 1 in {max(1, round(1 / upper)):,} with 95% confidence)" if upper else ")"
    rate = "none" if fpr <= 0 else f"about 1 in {max(1, round(1 / fpr)):,}"
    times = ""
    if d.score is not None and d.threshold and d.threshold > 0 and d.score > d.threshold:
        times = f" This one scored {d.score / d.threshold:.1f} times the threshold."
    which = "record tier's threshold" if d.tier == "record" else "threshold"
    return f"{rate.capitalize()} normal conversations reach this detector's {which}{on}{bound}.{times}"


def _headline(primary: DetectorView, kind: str, trace: dict, texts: list[str] | None, n_prompt: int) -> tuple[str, str, str | None]:
    """(headline, why, the firing words) in plain words; numbers follow in `why`."""
    positions = trace["positions"]
    # A `last` detector decides on the one token it fired at (with `scope: prompt`, the end of the prompt,
    # in the chat template's header for the reply): the headline names the words that led up to it, not
    # the token of strongest score, which did not decide.
    decided_by_one = kind == "last" and primary.fired_at is not None
    top = primary.fired_at if decided_by_one else (
        primary.evidence[0]["position"] if primary.evidence else primary.fired_at)
    where, words = ("the model's reply" if top is not None and top >= n_prompt else "the prompt"), None
    if top is not None and top in positions and texts is not None:
        j = positions.index(top)
        roles = _roles(texts)
        if decided_by_one and top == n_prompt - 1:  # step back out of the reply's header to the message before
            opened = roles[j]
            while j > 0 and opened is not None and roles[j] == opened:
                j -= 1
        role = roles[j]
        if role:
            where = f"{ROLE_WORDS.get(role, 'the ' + role)} message"
        start = 0
        if decided_by_one and role is not None:  # this message's words only, after its role's name
            start = j
            while start > 0 and roles[start - 1] == role:
                start -= 1
            start += 1
        words = _words(texts, j, before_only=decided_by_one, start=start)
    what = f"“{primary.concept}”"
    if not primary.fired:
        headline = f"No detector fired on this conversation ({primary.name} was closest)."
    elif decided_by_one:
        moment = "at the end of the prompt, just before the answer" if top == n_prompt - 1 else f"at token {top}"
        headline = (f"{primary.name} flagged this conversation for {what}: it read the model's state {moment}"
                    + (f", after {where} “{words}”." if words else "."))
    else:
        headline = f"{primary.name} flagged this conversation for {what}" + (
            f": the strongest signal was on the words “{words}” in {where}." if words else
            f": the strongest signal was at token {top} of {len(positions)}, in {where}.")
    score = "—" if primary.score is None else f"{primary.score:.3g}"
    why = (f"Its score reached {score} against a threshold of {primary.threshold:.3g} ({primary.space})"
           + (f", crossing it at token {primary.fired_at}." if primary.fired_at is not None else "."))
    return headline, why, words


@dataclass
class Gist:
    """One incident in a line or two: what an alert's landing page lists."""

    primary: DetectorView
    headline: str
    words: str | None
    outcome: ReplyOutcome
    how_sure: str | None


def outcome_of(data: dict, texts: list[str] | None) -> ReplyOutcome:
    """Read from the reply's text where this reader may see it (with its first words); else what the sidecar
    read (`outcome`), so a reader without the text permission still learns whether the model went along."""
    read = reply_outcome(texts, data["trace"]["positions"], data["prompt_tokens"])
    stored = data.get("outcome", "unknown")
    if read.outcome == "unknown" and stored != "unknown":
        return ReplyOutcome(stored, "", None)
    return read


def gist(event: dict, show_text: bool) -> Gist:
    data = event["data"]
    trace = data["trace"]
    texts = trace.get("text") if show_text else None
    primary = _primary([detector_view(d) for d in data["detectors"]])
    kind = primary.definition.get("aggregation", {}).get("kind", "max")
    headline, _, words = _headline(primary, kind, trace, texts, data["prompt_tokens"])
    return Gist(primary=primary, headline=headline, words=words, how_sure=how_sure(primary),
                outcome=outcome_of(data, texts))


def incident_view(event: dict, show_text: bool) -> IncidentView:
    data = event["data"]
    trace = data["trace"]
    positions = np.asarray(trace["positions"], dtype=np.int64)
    n_prompt = data["prompt_tokens"]
    texts = trace.get("text") if show_text else None
    detectors = [detector_view(d) for d in data["detectors"]]
    fired = [d for d in detectors if d.fired]
    primary = _primary(detectors)
    spec = DetectorSpec.model_validate(primary.definition)
    inputs = trace["inputs"]
    labels = input_labels(spec, list(inputs))
    per_token = np.full(len(positions), np.nan)
    if positions.size and all(labels):
        cols = [np.asarray(inputs[lab], dtype=np.float64) for lab in labels]
        per_token = np.asarray(token_scores(spec, cols), dtype=np.float64)
        per_token[~in_scope(spec, positions, n_prompt)] = np.nan
    template = np.asarray(template_mask(texts, trace["positions"]), dtype=bool)
    kind = spec.aggregation.kind
    scale_threshold = spec.aggregation.token_threshold if kind in ("count_above", "fraction_above") else primary.threshold
    probability = all(isinstance(i, ProbeInput) for i in spec.inputs) and spec.combine != "weighted"
    # The scale is the threshold's: it sits at the middle, twice the threshold is the darkest shade, so a
    # word's shade says how far past the line it is, the same on every incident of this detector.
    if scale_threshold > 0:
        scale_max = min(2 * scale_threshold, 1.0) if probability else 2 * scale_threshold
    else:
        signal = per_token[np.isfinite(per_token) & ~template]
        scale_max = 1.0 if probability else float(max(signal.max() if signal.size else 0, 1e-9))
    evidence_pos = {e["position"] for e in primary.evidence}
    tokens = []
    for j, p in enumerate(positions.tolist()):
        s = per_token[j]
        raw = texts[j] if texts is not None else None
        label = raw if raw is not None else f"#{p}"
        tokens.append(Token(
            position=p, label=label, score=None if not np.isfinite(s) else float(s),
            level=0.0 if not np.isfinite(s) else min(float(s) / scale_max, 1.0), completion=p >= n_prompt,
            evidence=p in evidence_pos, fired_here=p == primary.fired_at,
            special=raw is not None and bool(_SPECIAL.match(raw.strip())), template=bool(template[j]),
            token_id=(trace.get("token_ids") or [None] * len(positions))[j] if show_text else None))
    legend = [(f"{v:.2g}", shade(v / scale_max)) for v in np.linspace(0, scale_max, 5)]

    headline, why, _ = _headline(primary, kind, trace, texts, n_prompt)
    others = [d.name for d in fired if d is not primary]
    if others:
        why += f" Also fired: {', '.join(others)}."

    first = int(positions.min()) if positions.size else 0
    last = int(positions.max()) if positions.size else 0
    trajectories = [_trajectory(d, trace["running"].get(d.name), first, last, n_prompt) for d in detectors]

    # Heatmap: every watched input on the layer, one row each, each on its own scale: its largest value
    # on the words people wrote (template tokens are drawn grey, kept out of the scale).
    explanations: dict[str, str] = {}
    for d in detectors:
        for e in d.evidence:
            for i in e["inputs"]:
                if i.get("explanation"):
                    explanations[i["input"]] = i["explanation"]
    heat_width = 720
    cell = heat_width / max(len(positions), 1)
    heat = []
    for name, vals in inputs.items():
        arr = np.asarray(vals, dtype=np.float64)
        signal = arr[~template] if arr.size == template.size else arr
        signal = signal[np.isfinite(signal)]
        top_v = float(np.max(signal)) if signal.size else 0.0  # darkest at its highest; negatives stay white
        cells = []
        for j, (p, v) in enumerate(zip(positions.tolist(), arr.tolist())):
            word = f" {texts[j]!r}" if texts is not None else ""
            if template[j]:
                cells.append((round(j * cell, 2), -1.0, f"{name} at token {p}{word}: {v:.3g} (chat template: not in the scale)"))
                continue
            lvl = 0.0 if top_v <= 0 or not math.isfinite(v) else max(v, 0.0) / top_v
            cells.append((round(j * cell, 2), lvl, f"{name} at token {p}{word}: {v:.3g}"))
        heat.append(HeatRow(label=name, explanation=explanations.get(name), cells=cells))

    words = {}
    if texts is not None:
        index = {p: j for j, p in enumerate(trace["positions"])}
        for d in detectors:
            for e in d.evidence:
                j = index.get(e["position"])
                if j is not None:
                    lo = max(0, j - 4)
                    while lo > 0 and not "".join(texts[lo:j + 1]).strip():  # inside a redacted span: its replacement
                        lo -= 1
                    before = "".join(texts[lo:j])
                    after = "".join(texts[j + 1:j + 5])
                    words[e["position"]] = (" ".join(before.split())[-40:] + (" " if before[-1:].isspace() else ""),
                                            texts[j], (" " if after[:1].isspace() else "") + " ".join(after.split())[:40])
    # Evidence worth a row: a score above zero, on a token that is not the template's.
    index = {p: j for j, p in enumerate(trace["positions"])}
    for d in detectors:
        d.evidence = [e for e in d.evidence if e["score"] > 0 and math.isfinite(e["score"]) and not (
            e["position"] in index and template[index[e["position"]]])]

    # What else the model represented there: features with a readable explanation and a real activation.
    context: dict[int, list[dict]] = {}
    hidden_context = 0
    for c in data["context"]:
        for f in c["features"]:
            if f["activation"] > 0 and usable_explanation(f.get("explanation")):
                context.setdefault(c["position"], []).append({"sae": c["sae"], **f})
            else:
                hidden_context += 1
    for fs in context.values():
        fs.sort(key=lambda f: -f["activation"])
    notes = []
    if data["coverage"]["uncovered_positions"]:
        notes.append(f"{data['coverage']['uncovered_positions']} token(s) came from vLLM's prefix cache and were "
                     "never computed, so never scored.")
    if data["coverage"]["untraced_tokens"]:
        notes.append(f"{data['coverage']['untraced_tokens']} token(s) were scored but beyond the trace cap: not shown.")
    if trace.get("trimmed"):
        t = trace["trimmed"]
        notes.append(f"The trace was trimmed to fit the event size: {t['kept_tokens']} tokens kept near the "
                     f"evidence, {t['dropped_tokens']} dropped.")
    return IncidentView(
        headline=headline, why=why, primary=primary, detectors=detectors, tokens=tokens,
        has_text=trace.get("text") is not None, text_hidden=trace.get("text") is not None and not show_text,
        scale_threshold=scale_threshold, legend=legend, trajectories=trajectories, heat=heat,
        heat_width=heat_width, cell=cell, context=context, prompt_tokens=n_prompt, words=words,
        notes=notes, how_sure=how_sure(primary), outcome=outcome_of(data, texts),
        scale_max=scale_max, hidden_context=hidden_context)


def without_text(event: dict) -> dict:
    """The event as someone without the text permission may see it: no token text, no token ids."""
    trace = dict(event["data"]["trace"])
    if trace.get("text") is not None:
        trace["text"] = None
    if trace.get("token_ids") is not None:
        trace["token_ids"] = None
    return {**event, "data": {**event["data"], "trace": trace}}
