"""What a sidecar container must carry, and how long the sidecar takes to be ready.

    python bench/sidecar_start.py [--rounds 5] [--baseline DIR] [--json OUT]

- Closure: the distributions `pip install misalignment-monitor` (no extras) pulls in, walked from the
  installed metadata (requirements with their environment markers, no extras), with their size on disk.
- Start: a fresh process imports the sidecar and builds the demo config's detectors (its SAE read,
  its probes, the fused scorer) and loads the SAE for incident context: what happens before the
  sidecar reads its first slot. Also which of the known heavy packages got imported.

With `--baseline DIR` (a checkout of another commit, `git worktree add DIR <rev>`), that commit's
sidecar starts in the same rounds, alternating, and its closure is walked from its pyproject.toml.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("sae_lens", "transformer_lens", "datasets", "pandas", "pyarrow", "wandb", "transformers", "vllm")


def _name(n: str) -> str:
    return re.sub(r"[-_.]+", "-", n).lower()


def closure(requirements: list[str]) -> dict[str, int]:
    """{distribution: bytes on disk} for these requirements and everything they need (installed metadata)."""
    seen: dict[str, int] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = _name(req.name)
        if name in seen:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            seen[name] = 0
            continue
        seen[name] = sum((f.size or 0) for f in dist.files or ())
        todo.extend(Requirement(r) for r in dist.requires or ())
    return seen


def core_requirements(root: Path) -> list[str]:
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]


def child(root: str | None) -> None:
    t0 = time.perf_counter()  # before fleet's imports (torch among them) too, so both variants pay for them
    if root:
        sys.path.insert(0, str(Path(__file__).parent))
        from fleet import use_checkout

        use_checkout(root)
    from monitor.config.load import load_config
    from monitor.detectors.runtime import build_detector_set
    import monitor.sidecar.service  # noqa: F401 - what `monitor sidecar` imports

    t_import = time.perf_counter() - t0
    ds = build_detector_set(load_config(ROOT / "deploy/local/monitor.yaml"), "cpu")
    for c in ds.context.values():
        c._encoder()
    total = time.perf_counter() - t0
    heavy = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
    print(json.dumps({"import_s": t_import, "ready_s": total, "heavy": heavy, "modules": len(sys.modules)}))


def run_child(root: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child"] + (["--root", root] if root else [])
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline", help="a checkout of another commit to compare with")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.root)
        return
    variants = {"now": None} | ({"baseline": args.baseline} if args.baseline else {})
    results: dict[str, dict] = {}
    for name, root in variants.items():
        dists = closure(core_requirements(Path(root) if root else ROOT))
        results[name] = {"distributions": len(dists), "closure_mib": sum(dists.values()) / 2**20,
                         "dists": sorted(dists), "runs": []}
    for r in range(args.rounds):
        for name, root in variants.items():
            run = run_child(root)
            results[name]["runs"].append(run)
            print(f"round {r + 1} {name}: import {run['import_s']:.2f} s, ready {run['ready_s']:.2f} s, "
                  f"heavy imports {run['heavy']}", flush=True)
    print(f"{'':10} {'dists':>6} {'MiB':>8} {'import s':>9} {'ready s':>8}")
    for name, res in results.items():
        res["import_s"] = statistics.median(x["import_s"] for x in res["runs"])
        res["ready_s"] = statistics.median(x["ready_s"] for x in res["runs"])
        print(f"{name:10} {res['distributions']:>6} {res['closure_mib']:>8.0f} {res['import_s']:>9.2f} "
              f"{res['ready_s']:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
