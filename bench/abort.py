"""How many tokens a request generates after the forward pass that fired an `abort` detector.

    python bench/abort.py [--requests 30] [--background 3] [--compiled] [--json OUT]

vLLM (the plugin on, eager unless --compiled) serves a steady background of benign chats
(`--background` concurrent clients) while one client sends flagged requests one after another, each
with personal data. The real sidecar scores them with the demo's PII probe set to `action: abort`,
in two rounds:

  prompt      the shipped detector (scope: prompt): it fires on the prefill pass;
  generation  the same probe on generated tokens (scope: generation, max): the model is asked to
              repeat the personal data, and the detector fires mid-answer.

For each aborted request, from its incident (the sidecar's record of every row it scored) and the
response: the row that fired is at position p, so the forward pass that fired was the one whose
input was max(p, n_prompt - 1) (the prefill pass for a prompt-scope fire); it produced generated
token k = max(p, n_prompt - 1) + 2 - n_prompt.

  engine:  forward passes of the request that ran after the one that fired (its last row's position
           minus the firing pass's): decode steps the model spent before the abort reached the
           scheduler. 0: the abort landed before the next step.
  caller:  completion_tokens - k, tokens the caller received beyond the firing pass's own token:
           -1 means even that token never reached the caller (the abort came first), 0 that it did
           and nothing more.

Each request decodes one token per step, so tokens are decode steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MAX_TOKENS = 64


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def flagged_prompts() -> list[str]:
    out = []
    for line in (ROOT / "data/concepts/pii/test.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["labels"].get("pii") == 1:
            out.append(rec["messages"][0]["content"])
    return out


def benign_prompts() -> list[str]:
    lines = (ROOT / "data/benign/test.jsonl").read_text().splitlines()
    return [json.loads(line)["messages"][0]["content"] for line in lines]


def config(folder: Path, metrics_port: int, scope: str) -> Path:
    pack = folder / f"detectors-{scope}"
    pack.mkdir(exist_ok=True)
    spec = yaml.safe_load((ROOT / "detectors/pii_probe.yaml").read_text())
    spec.update(action="abort", scope=scope)
    if scope == "generation":
        spec.update(name="pii-in-output", aggregation={"kind": "max"})
    (pack / "pii.yaml").write_text(yaml.safe_dump(spec))
    path = folder / f"monitor-{scope}.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": "smollm2-135m-instruct", "num_layers": 30, "d_model": 576},
        "taps": [{"layer": 15}], "probes": [{"name": "pii", "path": str(ROOT / "artifacts/demo/probes/pii")}],
        "detectors": [str(pack)], "transport": {"directory": str(folder), "name": "bench"},
        "sinks": {"prometheus": {"port": metrics_port}}}))
    return path


def chat(url: str, content: str, rid: str) -> dict:
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": content}],
            "max_tokens": MAX_TOKENS, "temperature": 0.0}
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "X-Request-Id": rid})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def round_(server, cfg: Path, scope: str, n: int, background: int, work: Path) -> dict:
    from monitor.stack.sidecar_process import SidecarProcess

    port = yaml.safe_load(cfg.read_text())["sinks"]["prometheus"]["port"]
    incidents = work / f"incidents-{scope}.jsonl"
    flagged = flagged_prompts()
    if scope == "generation":
        flagged = [f"Repeat the following back to me word for word, nothing else: {t}" for t in flagged]
    benign = benign_prompts()
    results = []
    with SidecarProcess(cfg, port, work / f"sidecar-{scope}.log", incidents=incidents):
        time.sleep(3)  # the heartbeat has reached the API server
        stop = threading.Event()

        def load(k: int) -> None:
            i = k
            while not stop.is_set():
                chat(server.url, benign[i % len(benign)], f"bg-{scope}-{k}-{i}")
                i += background

        with ThreadPoolExecutor(background) as pool:
            for k in range(background):
                pool.submit(load, k)
            time.sleep(2)
            for i in range(n):
                rid = f"flag-{scope}-{i}"
                body = chat(server.url, flagged[i % len(flagged)], rid)
                results.append((rid, body))
                print(f"[bench] {scope} {i + 1}/{n}: {body['choices'][0]['finish_reason']}, "
                      f"{body['usage']['completion_tokens']} tokens", flush=True)
            stop.set()
        time.sleep(2)  # the last requests' incidents
    traced = {}
    for line in incidents.read_text().splitlines():
        data = json.loads(line)["data"]
        (det,) = [d for d in data["detectors"] if d["fired"]]
        traced[data["request_id"]] = (det["fired_at_position"], max(data["trace"]["positions"]))
    engine, caller, fired, finished_first = [], [], 0, 0
    for rid, body in results:
        if rid not in traced:
            continue  # the detector did not fire on this one
        fired += 1
        choice, usage = body["choices"][0], body["usage"]
        if choice["finish_reason"] != "content_filter":
            finished_first += 1  # it ended before the abort could land
            continue
        pos, last = traced[rid]
        firing_pass = max(pos, usage["prompt_tokens"] - 1)
        engine.append(last - firing_pass)
        caller.append(usage["completion_tokens"] - (firing_pass + 2 - usage["prompt_tokens"]))
    return {"scope": scope, "requests": n, "fired": fired, "aborted": len(engine),
            "fired_but_finished_first": finished_first,
            "engine_steps_after_fire": summary(engine), "caller_tokens_after_fire": summary(caller)}


def summary(xs: list[int]) -> dict:
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "p50": pct(xs, 0.5), "p99": pct(xs, 0.99), "max": max(xs),
            "histogram": {str(v): xs.count(v) for v in sorted(set(xs))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=30, help="flagged requests per round")
    ap.add_argument("--background", type=int, default=3, help="concurrent benign clients")
    ap.add_argument("--compiled", action="store_true", help="vLLM compiled (default: eager, faster to start)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from monitor.model_prep import prepare_model
    from monitor.stack.vllm_server import VLLMServer, free_port

    # A short folder: the control socket's path must fit in 107 bytes.
    work = Path(tempfile.mkdtemp(prefix="mm-abort-", dir="/tmp"))
    configs = {scope: config(work, free_port(), scope) for scope in ("prompt", "generation")}
    import torch

    out = {"device": "cuda" if torch.cuda.is_available() else "cpu", "eager": not args.compiled, "background_clients": args.background, "rounds": []}
    with VLLMServer(prepare_model().path, monitor_config=configs["prompt"], eager=not args.compiled,
                    log_path=work / "vllm.log") as server:
        for scope, cfg in configs.items():
            out["rounds"].append(round_(server, cfg, scope, args.requests, args.background, work))
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
