"""Fleet scale: the whole sidecar loop at an 8B model's shape, and its memory with 10,000 requests in flight.

    python bench/fleet.py [--rounds 3] [--device cpu|cuda] [--baseline DIR] [--json OUT] [--skip-memory]

A synthetic producer writes real ring records (d_model 4096, bfloat16, one tapped layer) into a
ring in /dev/shm; the real `Sidecar` reads them on one CPU thread with a 65,536-feature JumpReLU
SAE (64 watched features), three linear probes on the layer and four detectors (max over 32
features, a weighted rolling mean of the other 32, a probe's mean over the prompt, the EMA of two
probes over the generation). Shapes:

- decode: 256 requests x 1 row per slot (every request one token further each slot);
- prefill: 4 new requests x 512 rows per slot, each finished in the next slot.

Each timed cycle fills the ring (not timed), then the sidecar drains it (timed): rows/s is the
loop's capacity, the rate a producer may write at without the ring ever filling. Each run is a
fresh process. Incidents (traces) on and off alternate within each round; medians are reported.
With `--baseline DIR` (a checkout of another commit, e.g. `git worktree add DIR <rev>`), that
commit's sidecar runs the same shapes in the same rounds, so the two compare side by side. Thresholds are out of reach,
so nothing fires: what a fire or an incident costs is in bench/incidents.py.

Also the scoring pass alone (the floor under any loop: a 4096 x 67 float32 product per row).

Memory: a fresh process opens 10,000 requests (64-token prompts, then 16 decode steps each, traces
on, the default 512-row slots) and reports its resident set (VmRSS) and peak (VmHWM), before and
after.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

D, D_SAE, LAYER, WATCHED = 4096, 65536, 20, 64


def build_artifacts(folder: Path) -> None:
    """A random JumpReLU SAE (bf16 on disk: 1 GiB) and three probes of an 8B model's width. Written in
    sae-lens's format without sae-lens: a GPU machine may have none."""
    from monitor.scoring.sae_file import SaeFileConfig, save_sae_folder
    from monitor.scoring.probe import LinearProbe, ProbeMetadata

    torch.manual_seed(0)
    weights = {"W_enc": torch.randn(D, D_SAE, dtype=torch.bfloat16) * D**-0.5,
               "W_dec": torch.randn(D_SAE, D, dtype=torch.bfloat16) * D**-0.5,
               "b_enc": torch.zeros(D_SAE), "b_dec": torch.zeros(D), "threshold": torch.full((D_SAE,), 0.05)}
    save_sae_folder(folder / "sae", SaeFileConfig("jumprelu", D, D_SAE, "bfloat16"), weights)
    del weights
    for name in ("a", "b", "c"):
        meta = ProbeMetadata(name=name, concept=name, model="bench-8b", layer=LAYER, d_in=D)
        LinearProbe(torch.randn(1, D) * D**-0.5, torch.zeros(1), meta).save(folder / f"probe-{name}")
    det = folder / "detectors"
    det.mkdir()
    unreachable = 1e9
    features = list(range(0, D_SAE, D_SAE // WATCHED))[:WATCHED]
    detectors = [
        {"name": "features-any", "inputs": [{"sae": "big", "feature": f} for f in features[:32]],
         "aggregation": {"kind": "max"}},
        {"name": "features-weighted", "inputs": [{"sae": "big", "feature": f, "weight": 0.1} for f in features[32:]],
         "combine": "weighted", "aggregation": {"kind": "rolling_mean_max", "window": 16}},
        {"name": "probe-a-prompt", "inputs": [{"probe": "a"}], "aggregation": {"kind": "mean"}, "scope": "prompt",
         "threshold": 0.999999},
        {"name": "probes-bc-generation", "inputs": [{"probe": "b"}, {"probe": "c"}],
         "aggregation": {"kind": "ema_max", "alpha": 0.3}, "scope": "generation", "threshold": 0.999999},
    ]
    for d in detectors:
        d.setdefault("threshold", unreachable)
        (det / f"{d['name']}.yaml").write_text(yaml.safe_dump({"concept": "bench", **d}))


def write_config(folder: Path, rings: Path, incidents: bool, device: str) -> Path:
    cfg = folder / f"monitor-{incidents}-{device}.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"name": "bench-8b", "num_layers": 32, "d_model": D}, "taps": [{"layer": LAYER}],
        "saes": [{"name": "big", "layer": LAYER, "path": str(folder / "sae")}],
        "probes": [{"name": n, "path": str(folder / f"probe-{n}")} for n in ("a", "b", "c")],
        "detectors": [str(folder / "detectors")], "scoring": {"device": device},
        "transport": {"directory": str(rings), "name": "fleet"}, "incidents": {"enabled": incidents},
        "sinks": {"prometheus": {"enabled": False}}, "deployment": {"name": "bench"}}))
    return cfg


def segments_decode(step: int, n_req: int = 256, n_prompt: int = 64):
    from monitor.transport.meta import Segment

    # Ids as vLLM's OpenAI server makes them: the response id and the caller's id follow from the worker's.
    return tuple(Segment(f"chatcmpl-d{i}-0000abcd", f"chatcmpl-d{i}", f"d{i}", 0, n_prompt + step, 1, n_prompt, i)
                 for i in range(n_req))


def use_checkout(root: str | None) -> None:
    """Import `monitor` from another checkout (the editable install's finder would win over sys.path)."""
    if root:
        sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")
                            and "__editable__" not in type(f).__module__]
        sys.path.insert(0, root)


def one_thread() -> None:
    try:
        from monitor.sidecar.service import one_scoring_thread
    except ImportError:  # an older checkout: torch's threads only
        torch.set_num_threads(1)
    else:
        one_scoring_thread()


def run_in_child(root: str | None, *args) -> float:
    cmd = [sys.executable, __file__, "--child", *(str(a) for a in args)] + (["--root", root] if root else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"bench child failed:\n{proc.stderr[-3000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT:"))
    return float(line[len("RESULT:"):])


def loop_rate(folder: Path, shape: str, incidents: bool, device: str, cycles: int, slots_per_cycle: int) -> float:
    """Rows/s of the sidecar draining `cycles` fills of the ring (the first fill is a warm-up, not timed)."""
    from monitor.config import load_config
    from monitor.sidecar.loop import Sidecar
    from monitor.transport.meta import Segment, SlotMeta
    from monitor.transport.ring import RingSpec, RingWriter

    with tempfile.TemporaryDirectory(dir="/dev/shm") as rings:
        side = Sidecar(load_config(write_config(folder, Path(rings), incidents, device)))
        rows_per_slot = 256 if shape == "decode" else 4 * 512
        ring = RingWriter(Path(rings) / "fleet-bench.ring", RingSpec(
            slots=slots_per_cycle + 1, slot_rows=rows_per_slot, d_model=D, layers=(LAYER,), dtype=torch.bfloat16))
        side.discover()
        import monitor.sidecar.loop as loop

        if "gc" in vars(loop):  # as `Sidecar.run` does (a baseline from before it did runs as it did)
            gc.freeze()
        x = torch.randn(rows_per_slot, D, dtype=torch.bfloat16) * 3
        ids = np.arange(rows_per_slot, dtype=np.int32)
        step, elapsed, rows = 0, 0.0, 0
        previous: list[str] = []
        for cycle in range(cycles + 1):
            for _ in range(slots_per_cycle):
                if shape == "decode":
                    meta = SlotMeta(segments_decode(step), (), time.time())
                else:
                    segs = tuple(Segment(f"chatcmpl-p{step}-{i}-0000abcd", f"chatcmpl-p{step}-{i}", f"p{step}-{i}", 0, 0, 512,
                                         512, 512 * i) for i in range(4))
                    meta = SlotMeta(segs, tuple(previous), time.time())
                    previous = [s.req for s in segs]
                ring.publish(step, meta, [x], ids)
                step += 1
            t = time.perf_counter()
            while side.poll_once():
                pass
            if cycle:
                elapsed += time.perf_counter() - t
                rows += slots_per_cycle * rows_per_slot
        lost = sum(r.counters()["lost_slots"] for r in side.readers.values())
        ring.close()
        side.close()
    assert not lost, "the ring lapped the reader: fill less per cycle"
    return rows / elapsed


MEMORY = r"""
import gc, json, sys, tempfile, time
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, sys.argv[2])
from fleet import D, LAYER, write_config, segments_decode
from monitor.config import load_config
from monitor.sidecar.loop import Sidecar
from monitor.transport.meta import Segment, SlotMeta
from monitor.transport.ring import RingSpec, RingWriter

def status():
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}

from fleet import one_thread
one_thread()
folder, n_req = Path(sys.argv[1]), int(sys.argv[3])
out = {"start": status()}
with tempfile.TemporaryDirectory(dir="/dev/shm") as rings:
    side = Sidecar(load_config(write_config(folder, Path(rings), True, "cpu")))
    side.discover()
    gc.freeze()
    out["loaded"] = status()
    per_slot = 8  # the default slot: 512 rows
    ring = RingWriter(Path(rings) / "fleet-mem.ring", RingSpec(slots=64, slot_rows=512, d_model=D,
                                                               layers=(LAYER,), dtype=torch.bfloat16))
    side.discover()
    x = torch.randn(512, D, dtype=torch.bfloat16) * 3
    step = 0
    for first in range(0, n_req, per_slot):  # prefill: 64-token prompts
        segs = tuple(Segment(f"m{i}-0000abcd", f"chatcmpl-m{i}", f"m{i}", 0, 0, 64, 64, 64 * (i - first))
                     for i in range(first, min(n_req, first + per_slot)))
        ring.publish(step, SlotMeta(segs, (), time.time()), [x[: 64 * len(segs)]])
        step += 1
        side.poll_once()
    for k in range(16):  # decode: every request one token further, 512 per slot
        for first in range(0, n_req, 512):
            segs = tuple(Segment(f"m{i}-0000abcd", f"chatcmpl-m{i}", f"m{i}", 0, 64 + k, 1, 64, i - first)
                         for i in range(first, min(n_req, first + 512)))
            ring.publish(step, SlotMeta(segs, (), time.time()), [x[: len(segs)]])
            step += 1
            side.poll_once()
    snap = side.snapshot()
    out["tracked"] = status()
    out["requests_in_flight"] = snap.requests_in_flight
    out["trace_tokens"] = snap.trace.used
    out["context_rows"] = snap.trace.context_rows
    out["tokens_scored"] = snap.stats.tokens_scored
    out["over_limit"] = snap.stats.requests_over_limit
    ring.close()
print("RESULT:" + json.dumps(out))
"""


def scoring_only(folder: Path, rows: int, device: str = "cpu", repeats: int = 20) -> float:
    """Rows/s of the scoring pass alone (bfloat16 rows in from host memory, every watched feature and
    probe out, back on the host)."""
    from monitor.config import load_config
    from monitor.detectors.runtime import build_detector_set

    with tempfile.TemporaryDirectory(dir="/dev/shm") as rings:
        ds = build_detector_set(load_config(write_config(folder, Path(rings), False, device)))
    x = torch.randn(rows, D, dtype=torch.bfloat16) * 3
    ds.scorer.score({LAYER: x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        [s.cpu() for s in ds.scorer.score({LAYER: x}).values()]
        times.append(time.perf_counter() - t)
    return rows / statistics.median(times)


def write_profile(folder: Path, device: str, out: Path) -> None:
    import cProfile
    import io
    import pstats

    text = io.StringIO()
    for shape, slots in (("decode", 48), ("prefill", 6)):
        prof = cProfile.Profile()
        prof.enable()
        rate = loop_rate(folder, shape, True, device, 4, slots)
        prof.disable()
        text.write(f"== {shape}, traces on, {device}: {rate:,.0f} rows/s under the profiler ==\n")
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    out.write_text(text.getvalue())
    print(f"[bench] profile written to {out}", flush=True)


def memory(folder: Path, n_req: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", MEMORY, str(folder), str(Path(__file__).parent), str(n_req)],
                          capture_output=True, text=True, check=True)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT:"))
    return json.loads(line[len("RESULT:"):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cycles", type=int, default=4)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--baseline", default=None, help="a checkout of another commit to run side by side")
    ap.add_argument("--profile", default=None, help="also write a cProfile of one decode and one prefill run, "
                                                      "traces on, to this file (where the loop's time goes)")
    ap.add_argument("--child", nargs=6, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # one measured run, in its own process
        use_checkout(args.root)
        one_thread()
        folder, shape, mode, device, cycles, slots = args.child
        rate = loop_rate(Path(folder), shape, mode == "on", device, int(cycles), int(slots))
        print(f"RESULT:{rate}")
        return
    one_thread()  # as the sidecar does
    out: dict = {"device": args.device, "rows_per_s": {}, "rounds": {}}
    versions = {"": None} | ({"baseline ": args.baseline} if args.baseline else {})
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        t = time.perf_counter()
        print(f"[bench] writing a {D} x {D_SAE} SAE, three probes and four detectors ...", flush=True)
        build_artifacts(folder)
        print(f"[bench]   done in {time.perf_counter() - t:.0f} s", flush=True)
        out["scoring_only_rows_per_s"] = {f"{n} rows": scoring_only(folder, n, args.device) for n in (256, 2048)}
        print(f"[bench] scoring pass alone: {out['scoring_only_rows_per_s']['256 rows']:,.0f} rows/s (256 rows), "
              f"{out['scoring_only_rows_per_s']['2048 rows']:,.0f} rows/s (2048 rows)", flush=True)
        for shape, slots in (("decode", 48), ("prefill", 6)):
            runs: dict[str, list[float]] = {f"{v}{m}": [] for v in versions for m in ("off", "on")}
            for r in range(args.rounds):
                order = list(runs) if r % 2 == 0 else list(reversed(runs))
                for key in order:
                    version, mode = key.rsplit(" ", 1) if " " in key else ("", key)
                    root = versions[f"{version} " if version else ""]
                    runs[key].append(run_in_child(root, folder, shape, mode, args.device, args.cycles, slots))
                print(f"[bench] {shape} round {r + 1}/{args.rounds}: " + ", ".join(
                    f"{k} {v[-1]:,.0f}" for k, v in runs.items()) + " rows/s", flush=True)
            out["rounds"][shape] = runs
            out["rows_per_s"][shape] = {k: statistics.median(v) for k, v in runs.items()}
        if args.profile:
            write_profile(folder, args.device, Path(args.profile))
        if not args.skip_memory:
            print(f"[bench] memory with {args.requests:,} requests in flight ...", flush=True)
            out["memory"] = memory(folder, args.requests)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
