"""Residual rows for conversations through vLLM offline: the production tap itself, no server.

Where vLLM is installed this gives exactly the rows the sidecar sees (same kernels, same dtype),
rather than transformers' float32 reproduction of them (`rows_transformers`, cosine >= 0.999 to
these; `tests/test_capture_offline.py`). vLLM runs `LLM.generate` in a child process with the
plugin tapping into a private ring (prefix caching off, so every position is computed; one token
generated); this process reads the ring as the sidecar would.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Iterable, Sequence

import torch
import yaml

from monitor.offline.rows import ConversationRows, Messages, tokenize_conversation
from monitor.plugin import CONFIG_ENV, DISABLE_ENV
from monitor.transport.ring import RingReader

log = logging.getLogger("monitor.offline")

SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    if __name__ == "__main__":
        model, max_len, eager = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
        prompts = json.loads(sys.stdin.read())
        llm = LLM(model=model, dtype="bfloat16", max_model_len=max_len, enforce_eager=eager,
                  enable_prefix_caching=False, seed=0)
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts],
                            SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        print("RESULT:" + json.dumps([o.request_id for o in outs]), flush=True)
""")


class VLLMRows:
    def __init__(self, model_dir: str | Path, layers: Sequence[int], max_tokens: int = 1024, eager: bool = True) -> None:
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        self.layers = sorted(set(layers))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.max_tokens = max_tokens
        self.eager = eager
        cfg = json.loads((self.model_dir / "config.json").read_text())
        self.num_layers, self.d_model = cfg["num_hidden_layers"], cfg["hidden_size"]

    def many(self, conversations: Iterable[Messages], progress: str | None = None) -> list[ConversationRows]:
        tokenized = [tokenize_conversation(self.tokenizer, m, max_tokens=self.max_tokens) for m in conversations]
        with tempfile.TemporaryDirectory(prefix="monitor-vllm-rows-") as tmp:
            config = Path(tmp) / "monitor.yaml"
            config.write_text(yaml.safe_dump({
                "model": {"name": "offline", "num_layers": self.num_layers, "d_model": self.d_model},
                "taps": [{"layer": layer} for layer in self.layers],
                "transport": {"directory": tmp, "name": "rows", "slots": 4096, "slot_rows": 512}}))
            rows: dict[str, dict[int, list[torch.Tensor]]] = {}
            readers: dict[str, RingReader] = {}
            stop = threading.Event()

            def drain() -> None:
                for path in glob.glob(f"{tmp}/rows-*.ring"):
                    if path not in readers:
                        readers[path] = RingReader(path)
                for reader in readers.values():
                    for slot in reader.poll(4096):
                        for seg in slot.meta.segments:
                            got = rows.setdefault(seg.req, {})
                            for k in range(seg.n):
                                got[seg.start + k] = [r[seg.row + k].clone() for r in slot.rows]

            def loop() -> None:
                while not stop.wait(0.05):
                    drain()

            reader = threading.Thread(target=loop, name="vllm-rows-reader", daemon=True)
            reader.start()
            env = {k: v for k, v in os.environ.items() if k != DISABLE_ENV} | {CONFIG_ENV: str(config)}
            if progress:
                log.info("%s: rows of %d conversations through vLLM offline", progress, len(tokenized),
                         extra={"task": progress, "total": len(tokenized)})
            proc = subprocess.run([sys.executable, "-c", SCRIPT, str(self.model_dir), str(self.max_tokens + 8),
                                   "1" if self.eager else "0"], input=json.dumps([ids for ids, _ in tokenized]),
                                  capture_output=True, text=True, env=env)
            stop.set()
            reader.join()
            drain()
            dropped = sum(r.counters()["dropped_slots"] for r in readers.values())
            for r in readers.values():
                r.close()
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT:")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"vLLM offline failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        if dropped:
            raise RuntimeError(f"{dropped} ring slots were dropped while reading rows; retry with fewer conversations")
        out = []
        for (ids, n_prompt), request_id in zip(tokenized, json.loads(line[len("RESULT:"):])):
            # The engine's internal id is the output's id, or that id plus a random "-suffix".
            (got,) = [v for req, v in rows.items() if req == request_id or req.startswith(request_id + "-")] or [{}]
            if sorted(got) != list(range(len(ids))):
                raise RuntimeError(f"request {request_id}: rows for {len(got)} of {len(ids)} positions arrived")
            stacked = {layer: torch.stack([got[p][i] for p in range(len(ids))]).float() for i, layer in enumerate(self.layers)}
            out.append(ConversationRows(ids, n_prompt, stacked))
        return out
