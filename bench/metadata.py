"""Slot metadata on vLLM's inference thread: bytes and time per decode step at 512 requests.

    python bench/metadata.py [--requests 512] [--steps 2000]

Each step is a decode step of N requests (one row each, ids as vLLM's OpenAI server makes them:
`chatcmpl-<36-char X-Request-Id>-<8 hex>`). Timed side by side in one process: the first format
(JSON, every segment's three ids spelled out, `v1`, restated here as it was) and the current one
(binary columns, each id once: `SlotMeta`), encoding alone, decoding into the reader's columns, and
the whole publish of a step (segments split into slots, metadata encoded, the slot written) into a
ring in /dev/shm.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import torch

from monitor.plugin.capture import _Publisher
from monitor.transport.meta import Segment, SlotMeta, parse_request_id, wire_id
from monitor.transport.ring import RingSpec, RingWriter


def step(n: int) -> list[Segment]:
    out = []
    for i in range(n):
        req = wire_id(f"chatcmpl-{i:036d}-{i:08x}")
        external, request_id, sample = parse_request_id(req)
        out.append(Segment(req, external, request_id, sample, 100 + i, 1, 50, i))
    return out


def v1_bytes(segs: list[Segment], t: float) -> bytes:
    rows = [[s.req, s.external_id, s.request_id, s.sample, s.start, s.n, s.n_prompt, s.row] for s in segs]
    return json.dumps({"v": 1, "segments": rows, "finished": [], "t": t}, separators=(",", ":")).encode()


def timed(fn, steps: int) -> float:
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(steps // 5):
            fn()
        samples.append((time.perf_counter() - t0) / (steps // 5))
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args()
    segs, t = step(args.requests), time.time()
    meta = SlotMeta(segs, (), t)
    old = timed(lambda: v1_bytes(segs, t), args.steps)
    new = timed(lambda: SlotMeta(segs, (), t).to_bytes(), args.steps)
    raw = meta.to_bytes()
    decode = timed(lambda: SlotMeta.from_bytes(raw).table(), args.steps)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        ring = RingWriter(f"{d}/bench.ring", RingSpec(slots=4, slot_rows=512, d_model=64, layers=(0,),
                                                      dtype=torch.bfloat16, overwrite=True))
        pub = _Publisher(ring)
        rows = [torch.zeros(args.requests, 64, dtype=torch.bfloat16)]
        ids = np.zeros(args.requests, dtype=np.int32)
        whole = timed(lambda: pub.publish(1, segs, [], rows, t, ids), args.steps)
        ring.close()
    print(json.dumps({"requests": args.requests, "v1_bytes": len(v1_bytes(segs, t)), "current_bytes": len(raw),
                      "v1_encode_ms": round(old * 1e3, 3), "current_encode_ms": round(new * 1e3, 3),
                      "encode_speedup": round(old / new, 2), "current_decode_ms": round(decode * 1e3, 3),
                      "current_publish_step_ms": round(whole * 1e3, 3)}))


if __name__ == "__main__":
    main()
