#!/usr/bin/env python3
"""Helm post-renderer for vllm-project/production-stack: add the misalignment-monitor sidecar.

    helm install vllm vllm/vllm-stack -f your-values.yaml \\
        --post-renderer helm/integrations/production-stack/inject-monitor.py

production-stack has no hook for extra containers, so this rewrites its rendered manifests: every
Deployment with a container named `vllm` gets the monitor as a native sidecar, the shared /dev/shm
and the monitor config (volumes), and the vLLM container gets the config's path, the mounts and the
request-id middleware. The pieces come from monitor-sidecar.yaml, cut from the misalignment-monitor
chart's own rendering (helm/integrations/generate.py). Reads all manifests on stdin, writes them to
stdout, changes nothing else. Needs Python 3 and PyYAML.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

PARTS = Path(__file__).resolve().parent / "monitor-sidecar.yaml"


def inject(doc: dict, parts: dict) -> dict:
    if not isinstance(doc, dict) or doc.get("kind") != "Deployment":
        return doc
    spec = doc["spec"]["template"]["spec"]
    vllm = next((c for c in spec.get("containers", []) if c.get("name") == "vllm"), None)
    if vllm is None:
        return doc
    names = {v["name"] for v in parts["volumes"]}
    # production-stack may mount its own /dev/shm: ours (shared with the sidecar) replaces it.
    shm = {m["name"] for m in vllm.get("volumeMounts", []) if m.get("mountPath") == "/dev/shm"}
    spec["volumes"] = [v for v in spec.get("volumes", []) if v["name"] not in names | shm] + parts["volumes"]
    spec["initContainers"] = [c for c in spec.get("initContainers", []) if c["name"] != "monitor"] + parts["initContainers"]
    mounts = [m for m in vllm.get("volumeMounts", []) if m["name"] not in names | shm]
    vllm["volumeMounts"] = mounts + parts["vllmVolumeMounts"]
    env_names = {e["name"] for e in parts["vllmEnv"]}
    vllm["env"] = [e for e in vllm.get("env", []) if e["name"] not in env_names] + parts["vllmEnv"]
    key = "args" if "args" in vllm or "command" not in vllm else None
    if key and "--middleware" not in vllm.get("args", []):
        vllm["args"] = list(vllm.get("args", [])) + parts["vllmArgs"]
    return doc


def main() -> int:
    parts = yaml.safe_load(PARTS.read_text())
    docs = [inject(d, parts) for d in yaml.safe_load_all(sys.stdin.read())]
    sys.stdout.write(yaml.safe_dump_all([d for d in docs if d is not None], sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
