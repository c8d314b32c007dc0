"""Generate the model's own answers to a varied prompt list with vLLM (offline), for the SAE corpus.

    python scripts/generate_corpus.py --model DIR [--out data/sae_corpus/generations.jsonl]

The prompts are the benign chat prompts and the concept train splits' user turns (never the test
splits). Seeded at the engine level (vLLM on CPU rejects per-request seeds), so the corpus can be rebuilt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "data"))


def prompts() -> list[list[dict]]:
    from build_datasets import BENIGN

    convs = [[{"role": "user", "content": p}] for p in BENIGN]
    for concept in ("pii", "prompt_injection", "harmful_request"):
        for line in (ROOT / "data/concepts" / concept / "train.jsonl").read_text().splitlines():
            convs.append(json.loads(line)["messages"])
    return convs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default=str(ROOT / "data/sae_corpus/generations.jsonl"))
    ap.add_argument("--max-tokens", type=int, default=160)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    convs = prompts()
    print(f"[corpus] generating answers to {len(convs)} prompts with vLLM ...", flush=True)
    llm = LLM(model=args.model, dtype="bfloat16", max_model_len=2048, seed=0)
    params = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=args.max_tokens)
    t = time.time()
    outs = llm.chat(convs, params, use_tqdm=True)
    n_tok = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"[corpus] {n_tok} tokens in {time.time() - t:.0f}s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for conv, o in zip(convs, outs):
            f.write(json.dumps({"messages": conv + [{"role": "assistant", "content": o.outputs[0].text}]}) + "\n")
    print(f"[corpus] wrote {out}", flush=True)


if __name__ == "__main__":
    main()
