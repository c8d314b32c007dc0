"""Train the demo SAE on SmolLM2-135M-Instruct's residual stream after block 15, offline.

    python scripts/train_demo_sae.py --model DIR [--out artifacts/demo/sae-l15]

Corpus (all of it exists offline, nothing is downloaded):
  1. text already on the machine: package descriptions (*.dist-info/METADATA) in this environment
     and Debian's license texts, chunked and shown to the model as user messages;
  2. the model's own answers to a varied prompt list (data/sae_corpus/generations.jsonl, made by
     scripts/generate_corpus.py with vLLM);
  3. the concept data sets' train splits (never the test splits).

Training uses sae-lens's own trainer (BatchTopK, saved for inference as a JumpReLU SAE, so watched
features are scored exactly from their columns). The script records the corpus, token count, L0,
fraction of variance explained and dead features in training.json next to the SAE, and writes
feature_labels.json: each feature's top activating contexts.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from monitor.offline.records import read_labeled  # noqa: E402
from monitor.offline.rows_transformers import TransformersRows  # noqa: E402


def messages_and_labels(path):
    return [(r.messages, r.labels) for r in read_labeled(path, require_labels=False)]


LAYER = 15


def local_text_chunks(max_chunks: int, words: int = 160) -> tuple[list[str], list[str]]:
    """Prose that ships with the machine: package READMEs and license texts."""
    sources: list[Path] = []
    site = Path(torch.__file__).resolve().parent.parent
    sources += sorted(site.glob("*.dist-info/METADATA"))
    sources += sorted(Path("/usr/share/common-licenses").glob("*"))
    chunks: list[str] = []
    used: list[str] = []
    for path in sources:
        try:
            text = path.read_text(errors="ignore")
        except (OSError, IsADirectoryError):
            continue
        if path.name == "METADATA":  # keep the description, skip the header fields
            text = text.split("\n\n", 1)[-1]
        tokens = text.split()
        if len(tokens) < 40:
            continue
        used.append(str(path))
        for i in range(0, min(len(tokens), words * 6), words):
            piece = " ".join(tokens[i : i + words])
            if len(piece.split()) >= 40:
                chunks.append(piece)
    random.Random(0).shuffle(chunks)
    return chunks[:max_chunks], used


def corpus(max_local: int) -> tuple[list[list[dict]], dict]:
    local, used = local_text_chunks(max_local)
    intros = ["Summarize this:", "What is this text about?", "Explain the following in simple terms:", "Read this:"]
    convs = [[{"role": "user", "content": f"{intros[i % len(intros)]}\n\n{c}"}] for i, c in enumerate(local)]
    gen_file = ROOT / "data/sae_corpus/generations.jsonl"
    gens = [m for m, _ in messages_and_labels(gen_file)] if gen_file.is_file() else []
    convs += gens
    train_splits = sorted((ROOT / "data/concepts").glob("*/train.jsonl"))
    n_concept = 0
    for f in train_splits:
        recs = messages_and_labels(f)
        convs += [m for m, _ in recs]
        n_concept += len(recs)
    info = {
        "local_text_chunks": len(local),
        "local_text_files": len(used),
        "local_text_examples": used[:5],
        "generations": len(gens),
        "generations_file": str(gen_file.relative_to(ROOT)),
        "concept_train_records": n_concept,
        "concept_train_files": [str(f.relative_to(ROOT)) for f in train_splits],
    }
    return convs, info


def explain(contexts: list[dict]) -> str:
    """A short, mechanical explanation: the tokens the feature peaks on (no auto-interp model here)."""
    peaks = []
    for c in contexts:
        tok = c["text"].split("[", 1)[-1].rsplit("]", 1)[0].strip()
        if tok and tok not in peaks:
            peaks.append(tok)
    return ("peaks on: " + ", ".join(repr(t) for t in peaks[:5])) if peaks else "never active on the corpus"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default=str(ROOT / "artifacts/demo/sae-l15"))
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--max-local", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2048)
    args = ap.parse_args()
    torch.manual_seed(0)

    from sae_lens import BatchTopKTrainingSAEConfig, SAE
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE
    from sae_lens.training.sae_trainer import SAETrainer

    convs, info = corpus(args.max_local)
    print(f"[sae] corpus: {len(convs)} conversations ({info['local_text_chunks']} local text chunks, "
          f"{info['generations']} generations, {info['concept_train_records']} concept train records)", flush=True)
    # The committed artifacts were made from bf16 activations (2.6x faster to extract than float32,
    # which reproduces vLLM's rows more closely; see TransformersRows).
    ex = TransformersRows(args.model, [LAYER], dtype=torch.bfloat16, max_tokens=384)
    rows, contexts = [], []  # contexts: (conversation index, token index) per row, for labels
    t0 = time.time()
    for i, m in enumerate(convs):
        r = ex.rows(m)
        # The first row (BOS) has a norm ~50x the rest and carries no content: SAEs skip it.
        x = r.rows[LAYER][1:]
        rows.append(x.to(torch.bfloat16))
        contexts += [(i, j + 1) for j in range(x.shape[0])]
        if (i + 1) % 200 == 0 or i + 1 == len(convs):
            n = sum(t.shape[0] for t in rows)
            print(f"[sae] activations {i + 1}/{len(convs)} conversations, {n} tokens, {time.time() - t0:.0f}s", flush=True)
    acts = torch.cat(rows)
    n_tokens = acts.shape[0]
    perm = torch.randperm(n_tokens)
    n_eval = max(2048, n_tokens // 50)
    eval_idx, train_idx = perm[:n_eval], perm[n_eval:]

    total = len(train_idx) * args.epochs
    cfg = BatchTopKTrainingSAEConfig(
        d_in=acts.shape[1], d_sae=args.d_sae, k=args.k, dtype="float32", device="cpu",
        normalize_activations="expected_average_only_in", apply_b_dec_to_input=True,
    )
    sae = BatchTopKTrainingSAE(cfg)
    # Start the decoder bias at the data's mean, in the units the SAE sees: the trainer rescales
    # inputs by sqrt(d_in) / mean norm (expected_average_only_in). A b_dec in raw units leaves
    # one constant direction in x - b_dec, the same latents win top-k on every token and the
    # rest die (a first run here: 99% dead features).
    with torch.no_grad():
        sample = acts[train_idx[:50000]].float()
        factor = acts.shape[1] ** 0.5 / sample.norm(dim=-1).mean()
        sae.b_dec.copy_(sample.mean(0) * factor)

    def provider():
        while True:
            p = train_idx[torch.randperm(len(train_idx))]
            for s in range(0, len(p) - args.batch + 1, args.batch):
                yield acts[p[s : s + args.batch]].float()

    trainer_cfg = SAETrainerConfig(
        total_training_samples=total, train_batch_size_samples=args.batch, lr=4e-4, lr_warm_up_steps=50,
        lr_decay_steps=max(1, total // args.batch // 5), lr_end=4e-5, device="cpu",
        dead_feature_window=500, feature_sampling_window=1000, n_batches_for_norm_estimate=50,
    )
    print(f"[sae] training BatchTopK d_sae={args.d_sae} k={args.k} on {len(train_idx)} tokens x {args.epochs} epochs "
          f"({total // args.batch} steps)", flush=True)
    t1 = time.time()
    trained = SAETrainer(trainer_cfg, sae, provider()).fit()
    train_s = time.time() - t1
    out = Path(args.out)
    trained.save_inference_model(out)
    inf = SAE.load_from_disk(out)
    print(f"[sae] saved {out} ({inf.cfg.architecture()}), {train_s:.0f}s", flush=True)

    # Held-out quality and feature statistics with the saved (inference) SAE.
    with torch.no_grad():
        xe = acts[eval_idx].float()
        fe = inf.encode(xe)
        recon = inf.decode(fe)
        fve = 1 - ((xe - recon) ** 2).sum() / ((xe - xe.mean(0)) ** 2).sum()
        l0 = (fe > 0).float().sum(-1).mean()
        fires = torch.zeros(args.d_sae)
        top_val = torch.full((args.d_sae, 5), -1.0)
        top_row = torch.zeros((args.d_sae, 5), dtype=torch.long)
        for s in range(0, n_tokens, 8192):
            f = inf.encode(acts[s : s + 8192].float())
            fires += (f > 0).sum(0)
            cat_v = torch.cat([top_val, f.T], dim=1)
            cat_i = torch.cat([top_row, torch.arange(s, s + f.shape[0]).expand(args.d_sae, -1)], dim=1)
            v, j = cat_v.topk(5, dim=1)
            top_val, top_row = v, torch.gather(cat_i, 1, j)
    dead = int((fires == 0).sum())
    stats = {
        "model": "SmolLM2-135M-Instruct (dequantized Q4_1, bf16)",
        "layer": LAYER,
        "hook": "resid_post (HF hidden_states[16], vLLM hidden+residual of block 15)",
        "architecture_trained": "batchtopk (saved as jumprelu)",
        "d_in": acts.shape[1], "d_sae": args.d_sae, "k": args.k,
        "corpus": info,
        "tokens": n_tokens, "train_tokens": len(train_idx), "eval_tokens": n_eval, "epochs": args.epochs,
        "eval_l0": round(float(l0), 2),
        "eval_fraction_variance_explained": round(float(fve), 4),
        "dead_features": dead, "dead_fraction": round(dead / args.d_sae, 4),
        "train_seconds": round(train_s),
    }
    (out / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2), flush=True)

    # Feature labels: top activating contexts (±8 tokens, the max token in [brackets]).
    tok = ex.tokenizer
    labels = {}
    for f in range(args.d_sae):
        ctxs = []
        for v, row in zip(top_val[f].tolist(), top_row[f].tolist()):
            if v <= 0:
                continue
            ci, ti = contexts[row]
            ids, _ = ex.tokenize(convs[ci])
            left = tok.decode(ids[max(0, ti - 8) : ti])
            mid = tok.decode(ids[ti : ti + 1])
            right = tok.decode(ids[ti + 1 : ti + 5])
            ctxs.append({"activation": round(v, 3), "text": f"{left}[{mid}]{right}"})
        labels[str(f)] = {"frequency": round(float(fires[f]) / n_tokens, 6), "explanation": explain(ctxs),
                          "top_contexts": ctxs}
    (out / "feature_labels.json").write_text(json.dumps({"sae": "demo-l15", "features": labels}, ensure_ascii=False) + "\n")
    print(f"[sae] wrote {out / 'feature_labels.json'}", flush=True)


if __name__ == "__main__":
    main()
