"""Generated tokens/s of vLLM (default compiled mode) with the plugin off, idle, and tapping 1 or 3 layers.

    python bench/capture.py --model DIR [--rounds 3] [--prompts 32] [--max-tokens 64] [--json OUT]

Configurations alternate within each round (this machine is noisy); each run is a fresh vLLM
process timed around `generate` only (load and compile excluded). When tapping, the real sidecar
runs with the demo detectors, pinned to its own core, as in production on a 2-core box. Reports
medians and the ratio to "off". Also the sidecar's rate in rows/s on one thread: the scoring
matmul alone, and the whole loop on decode-shaped and prefill-shaped slots.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

GEN = textwrap.dedent("""
    import json, os, sys, time
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    if __name__ == "__main__":
        model, n, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        llm = LLM(model=model, dtype="bfloat16", max_model_len=1024, seed=0)
        topics = ["the ocean", "a city at night", "machine learning", "the history of tea", "mountains",
                  "a robot learning to paint", "coffee", "the moon landing"]
        prompts = [[{"role": "user", "content": f"Write a short paragraph about {topics[i % len(topics)]} ({i})."}]
                   for i in range(n)]
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        llm.chat(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
        t = time.perf_counter()
        outs = llm.chat(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t
        toks = sum(len(o.outputs[0].token_ids) for o in outs)
        print("RESULT:" + json.dumps({"tokens": toks, "seconds": dt}))
""")

CONFIGS = {
    "off": {"disable": True, "layers": [15], "sidecar": False},
    "idle": {"disable": False, "layers": [], "sidecar": False},
    "tap-1-layer": {"disable": False, "layers": [15], "sidecar": True},
    "tap-3-layers": {"disable": False, "layers": [8, 15, 22], "sidecar": True},
}


def write_config(folder: Path, layers: list[int]) -> Path:
    from capture_helpers import capture_config

    path = capture_config(folder, detectors=bool(layers))
    if layers and layers != [15]:
        text = path.read_text().replace("taps: [{layer: 15}]", "taps: [" + ", ".join(f"{{layer: {x}}}" for x in layers) + "]")
        path.write_text(text)
    if not layers:
        path.write_text(path.read_text().replace("taps: [{layer: 15}]", "taps: []"))
    return path


def run_once(model: str, name: str, spec: dict, args, tmp: Path) -> float:
    folder = tmp / f"{name}-{time.time_ns()}"
    cfg = write_config(folder, spec["layers"])
    env = {**os.environ, "MISALIGNMENT_MONITOR_CONFIG": str(cfg), "VLLM_CPU_OMP_THREADS_BIND": "0"}
    if spec["disable"]:
        env["MISALIGNMENT_MONITOR_DISABLE"] = "1"
    side = None
    if spec["sidecar"]:
        side = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-m", "monitor.cli", "sidecar", "--config", str(cfg)],
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                stderr=(folder / "sidecar.log").open("wb"))
    try:
        p = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", GEN, model, str(args.prompts), str(args.max_tokens)],
                           env=env, capture_output=True, text=True, timeout=900)
    finally:
        if side is not None:
            side.terminate()
            side.wait(timeout=30)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT:")), None)
    if line is None:
        raise RuntimeError(f"{name} failed:\n{p.stderr[-3000:]}")
    r = json.loads(line[7:])
    return r["tokens"] / r["seconds"]


def scoring_rate(rows: int = 4096) -> float:
    import torch

    from capture_helpers import capture_config
    from monitor.config import load_config
    from monitor.detectors.runtime import build_detector_set

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        ds = build_detector_set(load_config(capture_config(Path(d), detectors=True)), "cpu")
    x = torch.randn(rows, 576, dtype=torch.bfloat16) * 3
    ds.scorer.score({15: x})
    times = []
    for _ in range(10):
        t = time.perf_counter()
        ds.scorer.score({15: x})
        times.append(time.perf_counter() - t)
    return rows / statistics.median(times)


def sidecar_rate(slots: int = 400) -> dict[str, float]:
    """The whole sidecar loop (ring read, scoring, per-request split, demo detectors) on one thread.

    Two shapes: decode steps (32 requests x 1 row per slot) and prefill chunks (1 request x 128 rows).
    """
    import torch

    from capture_helpers import capture_config
    from monitor.config import load_config
    from monitor.sidecar.loop import Sidecar
    from monitor.transport.meta import Segment, SlotMeta
    from monitor.transport.ring import RingSpec, RingWriter

    torch.set_num_threads(1)
    out = {}
    for shape, (n_req, rows_per) in {"decode": (32, 1), "prefill": (1, 128)}.items():
        with tempfile.TemporaryDirectory() as d:
            cfg = capture_config(Path(d), detectors=True)
            side = Sidecar(load_config(cfg), device="cpu")
            ring = RingWriter(Path(d) / "test-bench.ring", RingSpec(slots=slots + 1, slot_rows=128, d_model=576,
                                                                     layers=(15,), dtype=torch.bfloat16))
            side.discover()
            x = torch.randn(n_req * rows_per, 576, dtype=torch.bfloat16) * 3
            for step in range(slots):
                segs = tuple(Segment(f"r{i}", f"chatcmpl-r{i}", f"r{i}", 0, 1 + step * rows_per, rows_per, 10**6,
                                     i * rows_per) for i in range(n_req))
                ring.publish(step, SlotMeta(segs), [x])
            t = time.perf_counter()
            while side.poll_once():
                pass
            dt = time.perf_counter() - t
            out[shape] = slots * n_req * rows_per / dt
            ring.close()
            side.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    names = list(CONFIGS)
    results: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]  # rotate to spread drift
            for name in order:
                tps = run_once(args.model, name, CONFIGS[name], args, Path(tmp))
                results[name].append(tps)
                print(f"[bench] round {r + 1}/{args.rounds} {name:>13}: {tps:7.1f} generated tokens/s", flush=True)
    med = {n: statistics.median(v) for n, v in results.items()}
    rate = scoring_rate()
    loop = sidecar_rate()
    print("\nconfiguration   median tok/s   vs off")
    for n in names:
        print(f"{n:>13}   {med[n]:12.1f}   {med[n] / med['off']:6.3f}")
    print(f"\nsidecar scoring (demo detectors, 1 thread): {rate:,.0f} rows/s = "
          f"{rate / med['tap-1-layer']:.0f}x vLLM's token rate with one tapped layer")
    for shape, r in loop.items():
        print(f"whole sidecar loop, {shape} slots: {r:,.0f} rows/s = {r / med['tap-1-layer']:.0f}x vLLM's token rate")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "median": med, "scoring_rows_per_s": rate,
                                               "sidecar_loop_rows_per_s": loop}, indent=2))


if __name__ == "__main__":
    main()
