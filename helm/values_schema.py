"""Generate helm/misalignment-monitor/values.schema.json from values.yaml, or check it is in sync.

    python helm/values_schema.py           # write the schema
    python helm/values_schema.py --check   # exit 1 if values.schema.json differs from what values.yaml gives

Types come from the defaults in values.yaml; our own objects reject unknown keys (a typo in a values
file fails `helm install` instead of being ignored); Kubernetes pass-through objects (resources,
probes, securityContext, labels, volumes) and the monitor config (validated by the monitor itself,
`monitor check-config`) accept anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parent / "misalignment-monitor"
FREE_FORM = {
    "vllm.resources", "vllm.startupProbe", "vllm.readinessProbe", "vllm.livenessProbe", "vllm.podAnnotations",
    "vllm.podLabels", "vllm.nodeSelector", "vllm.affinity", "monitor.config", "monitor.detectors",
    "monitor.artifactsVolume", "monitor.resources", "monitor.securityContext", "monitor.livenessProbe",
    "monitor.readinessProbe", "serviceMonitor.additionalLabels", "podMonitor.additionalLabels",
    "prometheusRule.additionalLabels", "prometheusRule.rules", "grafanaDashboards.labels",
    "grafanaDashboards.annotations", "monitoringSelector", "ingester.resources", "console.resources",
    "console.proxy.roles", "console.ingress.annotations",
}
ENUMS = {
    "kafka.securityProtocol": ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"],
    "kafka.sasl.mechanism": ["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"],
    "vllm.service.type": ["ClusterIP", "NodePort", "LoadBalancer"],
    "vllm.image.pullPolicy": ["Always", "IfNotPresent", "Never"],
    "monitor.image.pullPolicy": ["Always", "IfNotPresent", "Never"],
    "console.service.type": ["ClusterIP", "NodePort", "LoadBalancer"],
    "console.proxy.defaultRole": ["none", "viewer"],
}
INT_OR_STRING = {"shm.sizeLimit", "kafka.spool.sizeLimit"}  # Kubernetes quantities


def schema_of(value, path: str) -> dict:
    if path in ENUMS:
        return {"type": "string", "enum": ENUMS[path]}
    if path in INT_OR_STRING:
        return {"type": ["string", "integer"]}
    if path in FREE_FORM:
        return {"type": "object"}
    if isinstance(value, dict):
        return {"type": "object", "additionalProperties": False,
                "properties": {k: schema_of(v, f"{path}.{k}" if path else k) for k, v in value.items()}}
    if isinstance(value, list):
        return {"type": "array"}
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "integer"}
    if isinstance(value, float):
        return {"type": "number"}
    return {"type": "string"}


def generate() -> str:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = {"$schema": "https://json-schema.org/draft-07/schema#", "title": "misalignment-monitor chart values",
              **schema_of(values, "")}
    return json.dumps(schema, indent=2) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    path = CHART / "values.schema.json"
    text = generate()
    if args.check:
        if not path.exists() or path.read_text() != text:
            print(f"error: {path} is out of sync with values.yaml: run python helm/values_schema.py", file=sys.stderr)
            return 1
        print(f"{path.name}: in sync with values.yaml")
        return 0
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
