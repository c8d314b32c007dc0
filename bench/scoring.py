"""Watched-feature scoring vs sae-lens's full encode + column selection, side by side.

    python bench/scoring.py [--device cpu|cuda] [--rows 4096] [--json OUT]

Same inputs, same process, same device; the two methods alternate within each repeat so machine
noise hits both alike, and the ratio of medians is what we report (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from sae_lens import SAE, JumpReLUSAEConfig

from monitor.scoring import LayerScorer, WatchedEncoder


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def bench_case(d_in: int, d_sae: int, n_features: int, rows: int, device: str, repeats: int) -> dict:
    torch.manual_seed(0)
    sae = SAE.from_dict(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, device=device).to_dict())
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 1 / d_in**0.5)
    features = torch.randperm(d_sae)[:n_features].tolist()
    x = torch.randn(rows, d_in, device=device) * 3
    enc = WatchedEncoder.from_sae(sae, features).to(device)
    fused = LayerScorer({"sae": enc}, device)

    def full():
        with torch.no_grad():
            return sae.encode(x)[:, features]

    def watched():
        return enc.encode(x)

    def fused_pass():
        return fused.score(x)["sae"]

    assert torch.allclose(full(), watched(), atol=1e-4, rtol=1e-4), "methods disagree; the benchmark would be moot"
    for fn in (full, watched, fused_pass):  # warm up allocators and kernels
        timed(fn, device)
    times: dict[str, list[float]] = {"full": [], "watched": [], "fused": []}
    for _ in range(repeats):
        times["full"].append(timed(full, device))
        for _ in range(5):  # the fast paths are short: several samples per repeat
            times["watched"].append(timed(watched, device))
            times["fused"].append(timed(fused_pass, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "d_in": d_in, "d_sae": d_sae, "features": n_features, "rows": rows, "device": device,
        "full_rows_per_s": rows / med["full"], "watched_rows_per_s": rows / med["watched"],
        "fused_rows_per_s": rows / med["fused"],
        "speedup_watched": med["full"] / med["watched"], "speedup_fused": med["full"] / med["fused"],
        "median_s": med,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}", flush=True)
    results = []
    for d_in, d_sae in ((576, 16384), (4096, 65536)):
        print(f"[bench] {args.features} of {d_sae} features, d_in={d_in}, {args.rows} rows ...", flush=True)
        r = bench_case(d_in, d_sae, args.features, args.rows, args.device, args.repeats)
        results.append(r)
        print(
            f"  full encode + select: {r['full_rows_per_s']:>12,.0f} rows/s\n"
            f"  watched columns:      {r['watched_rows_per_s']:>12,.0f} rows/s  ({r['speedup_watched']:.0f}x)\n"
            f"  fused layer scorer:   {r['fused_rows_per_s']:>12,.0f} rows/s  ({r['speedup_fused']:.0f}x)",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
