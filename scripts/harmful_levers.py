"""Which lever lifts harmful-request recall on requests written by others? Measured side by side.

    python scripts/harmful_levers.py [--out artifacts/demo/probes/harmful_levers.json] [--only TEXT]
    python scripts/harmful_levers.py --concept prompt_injection   # the readers and layers for injection

Every lever is a linear probe on layer 15 (or several layers), thresholded as shipped detectors are: at
1% and at 5% FPR on the calibration set (data/benign/calibration.jsonl, 3,702 chats no probe trains on).
Levers:
- where it reads: the mean over the prompt's tokens aggregated by the max of rolling means over 16
  tokens (shipped until now) against the last prompt token, the assistant header's last token, where
  the model has read the request and decides how to answer (Arditi et al. 2024);
- what it learns from: the template families (data/concepts/harmful_request/train.jsonl) alone, or with
  the categories data (data/harmful_categories.py: ten categories, benign twins, nine registers), or with
  a second round of tasks per category besides (`python data/harmful_categories.py --more`);
- how it is fit: logistic regression (C by family-grouped CV), or the difference of the class means
  (the refusal-direction recipe: no fit at all);
- layers: 15 alone, or 10 + 15 + 20 side by side (offline only here);
- SAE features: the demo SAE's features (artifacts/demo/sae-l15) at the last token, alone or beside the
  residual row (a probe + SAE-feature ensemble: one logistic fit over both). Features active on fewer than
  1% of the training records are left out (a standardised feature seen once would carry a huge weight), and
  activations enter as log1p (their scale spans orders of magnitude).
- the model's own reaction: the mean of its first 8 generated tokens' rows (greedy, as a chat server
  answers), alone or beside the last prompt token; a refusal, or the start of a compliant answer, may
  separate what the prompt alone does not. Costs a verdict 8 tokens later than the prompt's.
`--concept prompt_injection` measures the readers and layers for injection instead (trained on its template
families, judged on its held-out templates, the multi-turn conversations and data/eval/injection-apart.jsonl;
figures in artifacts/demo/probes/prompt_injection_levers.json).
`--only TEXT` runs the levers whose name contains TEXT and updates their entries in `--out`.
Figures per held-out family, none of which any lever trains on: `templates` (the template families held
out whole), `categories` and `categories-more` (tasks held out whole, every register of each), `apart` (data/eval/harmful-apart.jsonl:
80 requests written apart from every training set, in the voice of public benchmarks; used for nothing
but this report). Nothing of the garak or spikee packages is read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monitor.offline.evaluate import auroc  # noqa: E402
from monitor.offline.probes import fit_logistic_probe, scope_rows  # noqa: E402
from monitor.offline.records import read_labeled, source_groups  # noqa: E402
from monitor.offline.rows_transformers import TransformersRows  # noqa: E402
from monitor.offline.thresholds import threshold_at_fpr  # noqa: E402
from monitor.paths import cache_dir  # noqa: E402
from monitor.provenance import TrainingData  # noqa: E402
from monitor.scoring.sae_file import load_sae_folder  # noqa: E402

LAYERS = [10, 15, 20]
D = ROOT / "data"


def rolling_max(logits: np.ndarray, w: int = 16) -> float:
    if len(logits) < w:
        return float(logits.mean())
    c = np.concatenate([[0.0], np.cumsum(logits)])
    return float(((c[w:] - c[:-w]) / w).max())


class SaeColumns:
    """The demo SAE's features at a row, as lever inputs: log1p of the activations of the kept features."""

    def __init__(self, folder: Path) -> None:
        self.sae = load_sae_folder(folder)
        self.keep: torch.Tensor | None = None  # set from the training rows: features active on >= 1% of them

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        acts = torch.log1p(self.sae.encode(rows.float()).clamp_min(0))
        return acts if self.keep is None else acts[:, self.keep]


class Replies:
    """The first tokens a greedy chat server would answer with, and their rows at one layer, per conversation;
    cached on disk by the prompt's token ids (generation is the slow part)."""

    def __init__(self, rows: TransformersRows, layer: int = 15, new_tokens: int = 9, batch: int = 16) -> None:
        self.rows, self.layer, self.new_tokens, self.batch = rows, layer, new_tokens, batch
        self.path = cache_dir() / "activations" / f"replies-l{layer}-n{new_tokens}.pt"
        self.cache: dict[str, dict] = torch.load(self.path) if self.path.is_file() else {}

    @staticmethod
    def key(conv) -> str:
        return hashlib.sha256(json.dumps(conv.token_ids[: conv.n_prompt]).encode()).hexdigest()

    def of(self, conv) -> torch.Tensor:
        """The reply's rows ([k, d]; k = 0 for an empty reply); `generate` must have seen the conversation."""
        return self.cache[self.key(conv)]["rows"]

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]]) -> list[dict]:
        tok, model = self.rows.tokenizer, self.rows.model
        width = max(map(len, prompts))
        pad = tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding: all end together
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.new_tokens, do_sample=False,
                             pad_token_id=pad, output_hidden_states=True, return_dict_in_generate=True)
        # hidden_states[step][layer + 1]: the block's output for the token fed at that step; step s >= 1
        # feeds generated token s - 1, so n new tokens give n - 1 reply rows (the last is never fed).
        fed = torch.cat([h[self.layer + 1][:, -1:] for h in out.hidden_states[1:]], dim=1).float()
        gen = out.sequences[:, width:]
        res = []
        for i in range(len(prompts)):
            g = gen[i].tolist()
            n = g.index(tok.eos_token_id) if tok.eos_token_id in g else len(g)  # rows up to the reply's end
            res.append({"tokens": g[:n], "rows": fed[i, : min(n, fed.shape[1])].clone()})
        return res

    def generate(self, convs, name: str) -> None:
        """Replies for the conversations not in the cache yet, shortest prompts first (little padding)."""
        todo = {}
        for c in convs:
            k = self.key(c)
            if k not in self.cache:
                todo[k] = c.token_ids[: c.n_prompt]
        todo = sorted(todo.items(), key=lambda kv: len(kv[1]))
        for i in range(0, len(todo), self.batch):
            part = todo[i : i + self.batch]
            for (k, _), r in zip(part, self._generate([ids for _, ids in part])):
                self.cache[k] = r
            if (i // self.batch) % 20 == 0 or i + self.batch >= len(todo):
                print(f"{name}: replies {min(i + self.batch, len(todo))}/{len(todo)}", flush=True)
        if todo:
            torch.save(self.cache, self.path)


def features(convs, layers: list[int], where: str, sae: SaeColumns | None = None,
             replies: Replies | None = None) -> torch.Tensor:
    """[conversations, width]: per layer, the prompt's mean row (positions >= 1) or its last row; with `where`
    `sae` the SAE's features of the last row instead, with `last+sae` both side by side; with `reply` the
    mean of the reply's rows instead, with `last+reply` both."""
    out = []
    for c in convs:
        parts = []
        for layer in layers:
            rows = scope_rows(c, layer, "prompt").float()
            if where in ("last", "last+sae", "last+reply"):
                parts.append(rows[-1])
            elif where == "mean":
                parts.append(rows.mean(0))
        if where in ("reply", "last+reply"):  # an empty reply: the decision point's row stands for it
            reply = replies.of(c)
            parts.append(reply.mean(0) if len(reply) else scope_rows(c, replies.layer, "prompt").float()[-1])
        out.append(torch.cat(parts) if parts else torch.empty(0))
    x = torch.stack(out)
    if where in ("sae", "last+sae"):
        last = torch.stack([scope_rows(c, 15, "prompt").float()[-1] for c in convs])
        x = torch.cat([x, sae(last)], dim=1)
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concept", choices=["harmful_request", "prompt_injection"], default="harmful_request")
    ap.add_argument("--out", type=Path, help="default: artifacts/demo/probes/harmful_levers.json "
                                             "(prompt_injection_levers.json for injection)")
    ap.add_argument("--only", default="", help="run only the levers whose name contains this; update their entries")
    args = ap.parse_args()
    concept = args.concept
    harmful = concept == "harmful_request"
    args.out = args.out or ROOT / "artifacts/demo/probes" / ("harmful_levers.json" if harmful else f"{concept}_levers.json")
    sae = SaeColumns(ROOT / "artifacts/demo/sae-l15")
    rows = TransformersRows(cache_dir() / "models" / "SmolLM2-135M-Instruct", LAYERS)

    def load(paths, name, labelled_only=False):
        recs = [r for p in paths for r in read_labeled(p, require_labels=False)
                if not labelled_only or concept in r.labels]  # judged on the records that label the concept
        return recs, rows.many([r.messages for r in recs], progress=name)

    calib, calib_c = load([D / "benign/calibration.jsonl"], "calibration")
    templates, templates_c = load([D / f"concepts/{concept}/train.jsonl", D / "benign/train.jsonl"], "train templates")
    cats, cats_c = load([D / f"concepts/{concept}/categories-train.jsonl"], "train categories") if harmful else ([], [])
    more, more_c = load([D / f"concepts/{concept}/categories-more-train.jsonl"], "train categories-more") \
        if harmful else ([], [])
    tests = ((("templates", D / f"concepts/{concept}/test.jsonl"), ("categories", D / f"concepts/{concept}/categories-test.jsonl"),
              ("categories-more", D / f"concepts/{concept}/categories-more-test.jsonl"), ("apart", D / "eval/harmful-apart.jsonl"))
             if harmful else (("templates", D / f"concepts/{concept}/test.jsonl"), ("multi-turn", D / "eval/multi-turn.jsonl"),
                              ("apart", D / "eval/injection-apart.jsonl")))
    families = {name: load([p], f"test {name}", labelled_only=True) for name, p in tests}

    replies = Replies(rows) if "reply" in args.only else None
    if replies is not None:
        for (_, convs), name in (((calib, calib_c), "calibration"), ((templates, templates_c), "train templates"),
                                 ((cats, cats_c), "train categories"), *((families[f], f"test {f}") for f in families)):
            replies.generate(convs, name)

    def labels(recs):
        return np.array([r.labels.get(concept, 0) for r in recs])

    results = json.loads(args.out.read_text()) if args.only and args.out.exists() else {}

    def lever(key, train_recs, train_c, layers, where, fit):
        if args.only not in key:
            return
        y = labels(train_recs)
        if "sae" in where:
            sae.keep = None
            active = (sae(torch.stack([scope_rows(c, 15, "prompt").float()[-1] for c in train_c])) > 0).float().mean(0)
            sae.keep = torch.nonzero(active >= 0.01).squeeze(1)
            print(f"{key}: {len(sae.keep)} of {len(active)} SAE features active on >= 1% of training records", flush=True)
        x = features(train_c, layers, where, sae, replies)
        if fit == "logistic":
            probe = fit_logistic_probe(x, y, name=key, concept=concept, model="SmolLM2-135M-Instruct",
                                       layer=(layers or [15])[0],
                                       training=TrainingData(path="-", n_pos=int(y.sum()), n_neg=int((1 - y).sum())),
                                       groups=source_groups(train_recs)).probe
            w, b, mu, sd = probe.weight[0].double(), float(probe.bias[0]), probe.mean.double(), probe.std.double()
        else:  # difference of means, on standardised rows: the direction alone, no fit
            xd = x.double()
            mu, sd = xd.mean(0), xd.std(0) + 1e-6
            z = (xd - mu) / sd
            w, b = z[y == 1].mean(0) - z[y == 0].mean(0), 0.0

        def score(convs):
            if where != "mean":
                return (((features(convs, layers, where, sae, replies).double() - mu) / sd) @ w + b).numpy()
            out = []
            for c in convs:  # per-token logits of the mean-fit probe, max of rolling means (the shipped detector)
                r = torch.cat([scope_rows(c, la, "prompt").float() for la in layers], dim=1).double()
                out.append(rolling_max((((r - mu) / sd) @ w + b).numpy()))
            return np.array(out)

        sc = score(calib_c)
        thr = {f: threshold_at_fpr(sc, f)[0] for f in (0.01, 0.05)}
        res = {}
        for fam, (recs, convs) in families.items():
            s, yt = score(convs), labels(recs)
            pos, neg = s[yt == 1], s[yt == 0]
            res[fam] = {"auroc": round(auroc(pos, neg), 3),
                        **{f"recall@{int(f * 100)}%": round(float((pos >= t).mean()), 3) for f, t in thr.items()},
                        **{f"fpr@{int(f * 100)}%": round(float((neg >= t).mean()), 3) for f, t in thr.items()},
                        "n": [int(len(pos)), int(len(neg))]}
        results[key] = res
        print(key, json.dumps(res), flush=True)

    if not harmful:
        lever("rolling16-mean-fit/templates (shipped)", templates, templates_c, [15], "mean", "logistic")
        lever("rolling16-mean-fit/layers10+15+20/templates", templates, templates_c, LAYERS, "mean", "logistic")
        lever("last-token/templates", templates, templates_c, [15], "last", "logistic")
        lever("last-token/layers10+15+20/templates", templates, templates_c, LAYERS, "last", "logistic")
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        return
    both, both_c = templates + cats, templates_c + cats_c
    lever("rolling16-mean-fit/templates (shipped)", templates, templates_c, [15], "mean", "logistic")
    lever("rolling16-mean-fit/templates+categories", both, both_c, [15], "mean", "logistic")
    lever("last-token/templates", templates, templates_c, [15], "last", "logistic")
    lever("last-token/templates+categories", both, both_c, [15], "last", "logistic")
    lever("last-token/templates+categories+more", both + more, both_c + more_c, [15], "last", "logistic")
    lever("last-token-diff-of-means/templates+categories", both, both_c, [15], "last", "diffmeans")
    lever("last-token/layers10+15+20/templates+categories", both, both_c, LAYERS, "last", "logistic")
    lever("last-token-sae-features/templates+categories", both, both_c, [], "sae", "logistic")
    lever("last-token+sae-features/templates+categories", both, both_c, [15], "last+sae", "logistic")
    if "reply" in args.only:  # generation is slow (minutes): only when asked for
        lever("reply-first-8-tokens/templates+categories", both, both_c, [15], "reply", "logistic")
        lever("last-token+reply-first-8-tokens/templates+categories", both, both_c, [15], "last+reply", "logistic")
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
