"""The tap through offline `LLM.generate` in eager mode (the server tests cover compiled mode)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from capture_helpers import LAYER, Collector, capture_config, cosines
from monitor.offline.rows_transformers import TransformersRows
from monitor.plugin import CONFIG_ENV

pytestmark = pytest.mark.vllm

PROMPTS = [
    [{"role": "user", "content": "What is the capital of Italy?"}],
    [{"role": "user", "content": "Describe a rainy afternoon in a small town, in three sentences."}],
    [{"role": "user", "content": "My email is jane.doe@example.org, please remember it."}],
]


def test_offline_eager_rows_equal_transformers(model_dir, tmp_path):
    rings = tmp_path / "rings"
    cfg = capture_config(rings)
    ref = TransformersRows(model_dir, [LAYER], dtype=torch.float32, cache=False)
    prompt_ids = [ref.tokenize(m, add_generation_prompt=True)[0] for m in PROMPTS]
    script = textwrap.dedent(f"""
        import json, os
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        if __name__ == "__main__":
            llm = LLM(model={str(model_dir)!r}, dtype="bfloat16", max_model_len=1024, enforce_eager=True, seed=0)
            outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in {prompt_ids!r}],
                                SamplingParams(temperature=0, max_tokens=8))
            print("RESULT:" + json.dumps([{{"id": o.request_id, "out": list(o.outputs[0].token_ids)}} for o in outs]))
    """)
    collector = Collector(rings)
    stop = threading.Event()

    def read():
        while not stop.is_set():
            collector.poll()
            time.sleep(0.05)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    env = {**__import__("os").environ, CONFIG_ENV: str(cfg)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    stop.set()
    reader.join()
    collector.poll()
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT:")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    results = json.loads(line[len("RESULT:"):])
    assert len(collector.reqs) == len(PROMPTS)
    for ids, res in zip(prompt_ids, results):
        (rec,) = [r for req, r in collector.reqs.items() if req.startswith(res["id"])]
        full = ids + res["out"]
        want = ref.rows_for_ids(full)[LAYER]
        assert sorted(rec.rows) == list(range(len(full) - 1))
        assert rec.segments[0]["n_prompt"] == len(ids)
        cos = cosines(rec.rows, want)
        assert min(cos.values()) > 0.999, min(cos.items(), key=lambda kv: kv[1])


def test_vllm_offline_extractor_matches_transformers(model_dir):
    """`monitor eval --backend vllm`'s rows: the tap through vLLM offline, equal to the transformers path."""
    from monitor.offline.rows_vllm import VLLMRows

    convs = PROMPTS[:2] + [[{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}]]
    got = VLLMRows(model_dir, [LAYER]).many(convs)
    ref = TransformersRows(model_dir, [LAYER], dtype=torch.float32, cache=False)
    for conv, rows in zip(convs, got):
        ids, n_prompt = ref.tokenize(conv)
        assert rows.token_ids == ids and rows.n_prompt == n_prompt
        want = ref.rows_for_ids(ids)[LAYER]
        assert rows.rows[LAYER].shape == want.shape
        cos = torch.nn.functional.cosine_similarity(rows.rows[LAYER], want, dim=1)
        assert float(cos.min()) > 0.999, cos
    assert got[2].n_prompt < len(got[2].token_ids)  # the assistant turn is the response part
