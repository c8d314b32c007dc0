"""Which SAE features mean X: every feature of an SAE ranked by how well it separates example
conversations that are X from ones that are not, read the way the sidecar will read them.

A feature's score for a conversation is its maximum over the tokens in scope (never row 0, as the
detectors see them), through the scorer's own `WatchedEncoder`, so a feature ranked here scores the
same under a detector. Per feature: the AUROC of those maxima (positives against negatives), how often
it is active at all on each side, and the strongest tokens in context from the positives. Explanations
come from the SAE's label file (`saes[].labels`) or from Neuronpedia's explanation export; a text
query ranks features by their explanation instead. `write_pack` turns chosen features into detector
drafts in `mode: shadow`, with a provisional threshold from the negatives: never paging until someone
has watched them on real traffic and calibrated them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from monitor.config.models import DetectorSpec
from monitor.offline import OfflineError
from monitor.offline.evaluate import auroc
from monitor.offline.probes import Scope, token_slice
from monitor.offline.rows import ConversationRows
from monitor.offline.thresholds import threshold_at_fpr

MIN_EXAMPLES = 5  # below this per side an AUROC says nothing; the error says how many are needed


@dataclass(frozen=True)
class FeatureHit:
    feature: int
    auroc: float
    pos_active: float  # share of positive conversations where the feature is active at all
    neg_active: float
    pos_median: float  # median of the per-conversation maxima
    neg_max: float
    explanation: str | None
    contexts: tuple[str, ...] = ()  # strongest tokens among the positives, in context: "…words [token] words…"
    query_match: float = 0.0  # share of the query's words in the explanation


@dataclass
class SearchResult:
    sae: str
    layer: int
    scope: Scope
    n_pos: int
    n_neg: int
    hits: list[FeatureHit]  # by AUROC, best first
    matched: list[FeatureHit] = field(default_factory=list)  # by the query, then AUROC
    pos_max: np.ndarray | None = None  # [n_pos, d_sae]: for plots and pack thresholds
    neg_max: np.ndarray | None = None


def read_explanations(path: Path) -> dict[int, str]:
    """Feature index -> explanation, from the SAE's own label file (`{"features": {"21": {"explanation":
    ...}}}`, what `saes[].labels` names) or Neuronpedia's explanation export (a JSON array, or JSON lines,
    of objects with `index` and `description`)."""
    path = Path(path)
    if not path.is_file():
        raise OfflineError(f"--explanations {path}: no such file")
    text = path.read_text()
    try:
        docs = [json.loads(text)]
    except json.JSONDecodeError:
        try:
            docs = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise OfflineError(f"{path}: neither JSON nor JSON lines ({e.msg} at line {e.lineno})") from None
    if len(docs) == 1 and isinstance(docs[0], dict) and isinstance(docs[0].get("features"), dict):
        out = {}
        for k, v in docs[0]["features"].items():
            if isinstance(v, dict) and isinstance(v.get("explanation"), str) and str(k).isdigit():
                out[int(k)] = v["explanation"]
        return out
    items = docs[0] if len(docs) == 1 and isinstance(docs[0], list) else docs
    out = {}
    for n, item in enumerate(items, start=1):
        if not (isinstance(item, dict) and "index" in item and isinstance(item.get("description"), str)
                and str(item["index"]).isdigit()):
            raise OfflineError(f"{path}: entry {n} is not a Neuronpedia explanation (an object with `index` and "
                               "`description`), nor is the file a label file ({\"features\": {\"<index>\": "
                               "{\"explanation\": ...}}})")
        out.setdefault(int(item["index"]), item["description"])  # Neuronpedia may list several: the first
    return out


def conversation_maxima(encoder, convs: list[ConversationRows], layer: int, scope: Scope,
                        chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """([n, d_sae] each feature's max over the conversation's scope, [n, d_sae] the token index of it)."""
    maxima, where = [], []
    with torch.no_grad():
        for c in convs:
            sl = token_slice(c, scope)
            rows = c.rows[layer][sl]
            if rows.shape[0] == 0:  # nothing in scope (a generation scope on a prompt): never active
                maxima.append(np.zeros(len(encoder.features), np.float32))
                where.append(np.full(len(encoder.features), -1))
                continue
            acts = torch.cat([encoder.encode(rows[i:i + chunk]).float() for i in range(0, rows.shape[0], chunk)])
            v, j = acts.max(0)
            maxima.append(v.numpy())
            where.append(j.numpy() + (sl.start or 0))
    return np.stack(maxima), np.stack(where)


def column_aurocs(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Every column's AUROC at once (Mann-Whitney, ties counted half): equal to `evaluate.auroc` per column."""
    from scipy.stats import rankdata

    ranks = rankdata(np.vstack([pos, neg]), axis=0)
    n_pos, n_neg = len(pos), len(neg)
    return (ranks[:n_pos].sum(0) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _query_words(query: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", query.lower()) if len(w) >= 3]


def _context(tokens: list[str], j: int, span: int = 6) -> str:
    before = "".join(tokens[max(0, j - span):j])
    after = "".join(tokens[j + 1:j + 1 + span])
    return " ".join(f"{before}[{tokens[j]}]{after}".split())


def search(encoder, sae_name: str, layer: int, pos: list[ConversationRows], neg: list[ConversationRows],
           scope: Scope = "prompt", explanations: dict[int, str] | None = None, query: str | None = None,
           top: int = 20, decode=None) -> SearchResult:
    """`encoder`: a WatchedEncoder over every feature of the SAE (column i is feature i)."""
    for side, convs in (("positive", pos), ("negative", neg)):
        if len(convs) < MIN_EXAMPLES:
            raise OfflineError(f"{len(convs)} {side} conversation(s): a feature's separation needs at least "
                               f"{MIN_EXAMPLES} on each side (a few dozen to trust the ranking)")
    explanations = explanations or {}
    pos_max, pos_at = conversation_maxima(encoder, pos, layer, scope)
    neg_max, _ = conversation_maxima(encoder, neg, layer, scope)
    scores = column_aurocs(pos_max, neg_max)
    words = _query_words(query) if query else []
    if query is not None and not words:
        raise OfflineError(f"--query {query!r} has no word of three letters or more to look for")

    def hit(f: int, with_contexts: bool) -> FeatureHit:
        contexts: tuple[str, ...] = ()
        if with_contexts and decode is not None:
            best = np.argsort(-pos_max[:, f])[:3]
            contexts = tuple(_context(decode(pos[i].token_ids), int(pos_at[i, f])) for i in best if pos_max[i, f] > 0)
        expl = explanations.get(f)
        match = (sum(w in expl.lower() for w in words) / len(words)) if (words and expl) else 0.0
        return FeatureHit(f, float(scores[f]), float((pos_max[:, f] > 0).mean()), float((neg_max[:, f] > 0).mean()),
                          float(np.median(pos_max[:, f])), float(neg_max[:, f].max()), expl, contexts, match)

    order = np.argsort(-scores, kind="stable")[:top]
    hits = [hit(int(f), True) for f in order]
    matched = []
    if words:
        candidates = [f for f, e in explanations.items() if 0 <= f < scores.shape[0]
                      and any(w in e.lower() for w in words)]
        matched = sorted((hit(f, True) for f in candidates), key=lambda h: (-h.query_match, -h.auroc))[:top]
    return SearchResult(sae_name, layer, scope, len(pos), len(neg), hits, matched, pos_max, neg_max)


def warnings_for(result: SearchResult) -> list[str]:
    """Warnings a person should read before trusting the ranking."""
    notes = []
    if min(result.n_pos, result.n_neg) < 30:
        notes.append(f"only {min(result.n_pos, result.n_neg)} conversations on one side: the ranking is noisy "
                     "(a few hundred per side are better)")
    if result.hits and result.hits[0].auroc < 0.7:
        notes.append(f"the best feature separates the sets poorly (AUROC {result.hits[0].auroc:.2f}): the SAE may have "
                     "no feature for this; train a probe instead (monitor probe train)")
    return notes


def write_pack(result: SearchResult, features: list[int], folder: Path, concept: str, severity: str = "info",
               provisional_fpr: float = 0.01) -> list[Path]:
    """One detector draft per feature, `mode: shadow`, thresholded provisionally at `provisional_fpr` of the
    negative examples (recorded in its description; no calibration provenance: it is not calibrated)."""
    if result.neg_max is None:
        raise OfflineError("no scores to write a pack from")
    by_feature = {h.feature: h for h in [*result.hits, *result.matched]}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for f in features:
        if not 0 <= f < result.neg_max.shape[1]:
            raise OfflineError(f"feature {f} is not in {result.sae} (it has {result.neg_max.shape[1]} features)")
        h = by_feature.get(f)
        thr, _ = threshold_at_fpr(result.neg_max[:, f], provisional_fpr)
        thr = max(thr, 1e-6)  # a feature never active on the negatives still needs to be active to fire
        a = h.auroc if h else float(column_aurocs(result.pos_max[:, [f]], result.neg_max[:, [f]])[0])
        expl = (h.explanation if h else None) or "no explanation"
        name = f"{concept.replace('_', '-')}-{result.sae}-f{f}"
        spec = DetectorSpec.model_validate({
            "name": name, "concept": concept, "mode": "shadow", "severity": severity,
            "description": (f"Draft by monitor features search: feature {f} of {result.sae} ({expl}); AUROC {a:.3f} on "
                            f"{result.n_pos} positive / {result.n_neg} negative examples. Threshold provisional: "
                            f"{provisional_fpr:.0%} of the negative examples reach it. Watch it in shadow, then "
                            "calibrate on your traffic before it goes live."),
            "inputs": [{"sae": result.sae, "feature": f}], "aggregation": {"kind": "max"},
            "threshold": float(thr), "scope": result.scope, "labels": {"source": "features_search"}})
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True, exclude_defaults=False),
                                       sort_keys=False))
        written.append(path)
    return written


def plot(result: SearchResult, path: Path, n: int = 6) -> Path:
    """The separation of the top features: per feature, the conversations' maxima, positives against negatives."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hits = result.hits[:n]
    cols = min(3, len(hits)) or 1
    rows_n = (len(hits) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax, h in zip(axes.flat, hits):
        p, q = result.pos_max[:, h.feature], result.neg_max[:, h.feature]
        hi = float(max(p.max(), q.max(), 1e-6))
        bins = np.linspace(0, hi, 30)
        # Each set as shares of itself: a few hundred positives stay visible beside thousands of negatives.
        ax.hist(q, bins=bins, weights=np.full(len(q), 1 / len(q)), alpha=0.6, label=f"negative ({len(q)})", color="#4575b4")
        ax.hist(p, bins=bins, weights=np.full(len(p), 1 / len(p)), alpha=0.6, label=f"positive ({len(p)})", color="#d73027")
        title = f"feature {h.feature}: AUROC {h.auroc:.3f}"
        if h.explanation:
            title += "\n" + (h.explanation[:48] + ("…" if len(h.explanation) > 48 else ""))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("max activation over the conversation", fontsize=8)
        ax.set_ylabel("share of the set", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(hits):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{result.sae} (layer {result.layer}, scope {result.scope}): the features that best separate the sets",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(result: SearchResult, hits: list[FeatureHit] | None = None) -> str:
    hits = result.hits if hits is None else hits
    lines = [f"{'feature':>8} {'AUROC':>6} {'active+':>8} {'active-':>8} {'median+':>8} {'max-':>8}  explanation / strongest tokens"]
    for h in hits:
        lines.append(f"{h.feature:>8} {h.auroc:>6.3f} {h.pos_active:>8.0%} {h.neg_active:>8.0%} {h.pos_median:>8.3g} "
                     f"{h.neg_max:>8.3g}  {h.explanation or '(no explanation)'}")
        for c in h.contexts[:2]:
            lines.append(f"{'':>44}  {c[:100]}")
    return "\n".join(lines)


def summary(result: SearchResult) -> dict:
    def one(h: FeatureHit) -> dict:
        return {"feature": h.feature, "auroc": round(h.auroc, 4), "active_positive": round(h.pos_active, 4),
                "active_negative": round(h.neg_active, 4), "median_positive": round(h.pos_median, 4),
                "max_negative": round(h.neg_max, 4), "explanation": h.explanation, "contexts": list(h.contexts),
                **({"query_match": round(h.query_match, 3)} if result.matched else {})}

    return {"sae": result.sae, "layer": result.layer, "scope": result.scope, "positives": result.n_pos,
            "negatives": result.n_neg, "top": [one(h) for h in result.hits], "matched": [one(h) for h in result.matched]}


def search_sae(loaded, sae_name: str, positive: Path, negative: Path, model_dir: Path, backend: str = "transformers",
               scope: Scope = "prompt", explanations: Path | None = None, query: str | None = None,
               top: int = 20) -> SearchResult:
    """The search over the SAE `sae_name` of a loaded config, on two JSON-lines files of conversations."""
    from monitor.scoring.sae_file import load_sae as load_sae_files
    from monitor.offline.extract import row_source
    from monitor.offline.records import read_labeled
    from monitor.scoring import WatchedEncoder

    saes = {s.name: s for s in loaded.config.saes}
    if sae_name not in saes:
        raise OfflineError(f"--sae {sae_name!r} is not an SAE of {loaded.path} (its SAEs: "
                           f"{', '.join(sorted(saes)) or 'none'}); add it under `saes:` first")
    s = saes[sae_name]
    pos = read_labeled(positive, require_labels=False)
    neg = read_labeled(negative, require_labels=False)
    for side, recs in (("positive", pos), ("negative", neg)):
        if len(recs) < MIN_EXAMPLES:
            raise OfflineError(f"{positive if side == 'positive' else negative}: {len(recs)} {side} conversation(s); "
                               f"at least {MIN_EXAMPLES} are needed on each side (a few dozen to trust the ranking)")
    if explanations is not None:
        expl = read_explanations(explanations)
    elif s.labels:
        expl = read_explanations(loaded.resolve(s.labels))
    else:
        expl = {}
    sae = load_sae_files(loaded.resolve(s.path)) if s.path else load_sae_files(release=s.release, sae_id=s.sae_id)
    encoder = WatchedEncoder.from_sae(sae, list(range(sae.cfg.d_sae)), mode=s.mode)
    source = row_source(model_dir, [s.layer], backend)
    pos_rows = source.many([r.messages for r in pos], progress="positive examples")
    neg_rows = source.many([r.messages for r in neg], progress="negative examples")
    tokenizer = getattr(source, "tokenizer", None)
    decode = (lambda ids: [tokenizer.decode([i]) for i in ids]) if tokenizer is not None else None
    return search(encoder, sae_name, s.layer, pos_rows, neg_rows, scope, expl, query, top, decode)
