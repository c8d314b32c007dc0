"""The Helm chart, offline: lint, render, validate, golden files, and the properties operators rely on.

Rendering uses helm-python-sdk (Helm 4's SDK, no helm binary). Core kinds are validated with
kubernetes-validate --strict, the Prometheus Operator's kinds with cloudcoil's models, the rendered
PrometheusRule with promtool. `UPDATE_GOLDEN=1 pytest tests/test_helm_chart.py` rewrites the goldens.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from binaries import binary

helm = pytest.importorskip("helm_python", reason="pip install helm-python-sdk (in the dev extra)")

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm/misalignment-monitor"
CI_VALUES = sorted((ROOT / "helm/ci").glob("*-values.yaml"))
GOLDEN = ROOT / "tests/golden/helm"
K8S_VERSION = "1.30.0"


def render(values: dict | None = None, name: str = "mm", namespace: str = "ml") -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        return chart.render(values or {}, name=name, namespace=namespace)


def objects(values: dict | None = None) -> list[dict]:
    out = []
    for path, text in sorted(render(values).items()):
        if path.endswith(".txt"):
            continue
        out += [d for d in yaml.safe_load_all(text) if d]
    return out


def kind(objs: list[dict], k: str, name_suffix: str = "") -> dict:
    hits = [o for o in objs if o["kind"] == k and o["metadata"]["name"].endswith(name_suffix)]
    assert len(hits) == 1, f"{k}*{name_suffix}: {len(hits)}"
    return hits[0]


def pod(objs: list[dict]) -> dict:
    return kind(objs, "Deployment")["spec"]["template"]["spec"]


def sidecar(objs: list[dict]) -> dict:
    spec = pod(objs)
    return next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "monitor")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


@pytest.fixture(scope="module", params=[None] + CI_VALUES, ids=["default"] + [p.stem for p in CI_VALUES])
def case(request) -> tuple[str, dict]:
    return ("default", {}) if request.param is None else (request.param.stem, load(request.param))


def test_ci_values_files_exist():
    assert {p.stem for p in CI_VALUES} >= {"minimal-values", "production-values", "legacy-values"}


def test_lint(case):
    _, values = case
    report = helm.lint(CHART, values, strict=True, kube_version="v" + K8S_VERSION)
    errors = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not errors, errors


def test_core_objects_validate_strictly(case):
    import kubernetes_validate

    _, values = case
    for obj in objects(values):
        if obj["apiVersion"].startswith("monitoring.coreos.com"):
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_operator_objects_parse_with_the_operator_models(case):
    from cloudcoil.models.prometheus_operator.v1 import PodMonitor, PrometheusRule, ServiceMonitor

    models = {"ServiceMonitor": ServiceMonitor, "PodMonitor": PodMonitor, "PrometheusRule": PrometheusRule}
    _, values = case
    for obj in objects(values):
        if obj["kind"] in models:
            parsed = models[obj["kind"]].model_validate(obj)
            assert parsed.metadata.name == obj["metadata"]["name"]


def test_golden_files(case):
    name, values = case
    text = "".join(f"# Source: {path}\n{body.strip()}\n---\n" for path, body in sorted(render(values).items())
                   if body.strip())
    golden = GOLDEN / f"{name}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"no golden file: UPDATE_GOLDEN=1 pytest {__file__}"
    assert text == golden.read_text(), f"{golden.name} changed: review, then UPDATE_GOLDEN=1 to accept"


# ---- properties --------------------------------------------------------------------------------

def test_native_sidecar_and_legacy_mode():
    native = pod(objects())
    assert native["initContainers"][0]["name"] == "monitor" and native["initContainers"][0]["restartPolicy"] == "Always"
    assert [c["name"] for c in native["containers"]] == ["vllm"]
    legacy = pod(objects(load(ROOT / "helm/ci/legacy-values.yaml")))
    assert "initContainers" not in legacy
    assert [c["name"] for c in legacy["containers"]] == ["vllm", "monitor"]
    assert "restartPolicy" not in legacy["containers"][1]


def test_shared_memory_is_a_memory_emptydir_in_both_containers():
    spec = pod(objects({"shm": {"sizeLimit": "3Gi"}}))
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "3Gi"}
    for c in spec["initContainers"] + spec["containers"]:
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"], c["name"]


def test_plugin_enabled_in_vllm_with_the_request_id_middleware():
    spec = pod(objects())
    vllm = spec["containers"][0]
    assert {"name": "MISALIGNMENT_MONITOR_CONFIG", "value": "/etc/misalignment-monitor/config/monitor.yaml"} in vllm["env"]
    assert "monitor.plugin.middleware.MonitorMiddleware" in vllm["args"]
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "nvidia.com/gpu" in vllm["resources"]["limits"]


def test_sidecar_is_hardened_and_requests_no_gpu():
    c = sidecar(objects())
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert not any("gpu" in k for part in c["resources"].values() for k in part)


def test_probes_never_depend_on_kafka():
    """A Kafka outage must not take vLLM out of its Service: the sidecar's readiness counts for the pod."""
    c = sidecar(objects(load(ROOT / "helm/ci/production-values.yaml")))
    for probe in ("readinessProbe", "livenessProbe"):
        p = c[probe]
        assert set(p) >= {"httpGet"} and p["httpGet"]["path"] in ("/readyz", "/healthz"), p
        assert "kafka" not in yaml.safe_dump(p).lower()


def test_config_checksum_rolls_the_pods_on_a_detector_change():
    def checksum(values):
        return kind(objects(values), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/monitor-config"]

    base = load(ROOT / "helm/ci/minimal-values.yaml")
    changed = yaml.safe_load(yaml.safe_dump(base))
    changed["monitor"]["detectors"]["pii_sae_feature.yaml"]["threshold"] = 9.0
    assert checksum(base) != checksum(changed) and checksum(base) == checksum(base)


def test_monitor_config_is_valid_and_secrets_come_from_secrets(tmp_path):
    """The rendered monitor config passes the monitor's own validation; no password appears anywhere."""
    from monitor.config.models import MonitorConfig

    values = load(ROOT / "helm/ci/production-values.yaml")
    objs = objects(values)
    cfg = yaml.safe_load(kind(objs, "ConfigMap", "-monitor")["data"]["monitor.yaml"])
    parsed = MonitorConfig.model_validate(cfg)
    assert parsed.model.name == "llama-3.1-8b-instruct"  # = vLLM's --served-model-name: PromQL joins on it
    k = parsed.sinks.kafka
    assert k.enabled and k.security_protocol == "SASL_SSL" and k.sasl_mechanism == "SCRAM-SHA-512"
    assert k.sasl_password_file == "/etc/misalignment-monitor/kafka-sasl/password"
    assert k.ssl_cafile == "/etc/misalignment-monitor/kafka-tls/ca.crt"
    assert parsed.sinks.prometheus.host == "$POD_IP" and "privacy" not in cfg
    spec = pod(objs)
    sasl = next(v for v in spec["volumes"] if v["name"] == "kafka-sasl")
    assert sasl["secret"]["secretName"] == "misalignment-monitor-kafka"
    assert not any(o["kind"] == "Secret" for o in objs)
    detectors = kind(objs, "ConfigMap", "-detectors")["data"]
    assert "prompt_injection_probe.yaml" in detectors


def test_vllm_and_the_sidecar_share_the_ring_through_a_group():
    """vLLM (root, as its image runs) makes the ring 0660 in an fsGroup-owned /dev/shm; the sidecar (uid 65532)
    is in that group: tests/chaos/test_ring_faults.py opens such a file from another uid in the group."""
    objs = objects()
    spec = pod(objs)
    cfg = yaml.safe_load(kind(objs, "ConfigMap", "-monitor")["data"]["monitor.yaml"])
    assert cfg["transport"]["file_mode"] == "0660"
    assert spec["securityContext"]["fsGroup"] == 65532
    assert sidecar(objs)["securityContext"]["runAsGroup"] == 65532
    vllm = spec["containers"][0]["securityContext"]
    assert vllm["allowPrivilegeEscalation"] is False and vllm["capabilities"]["drop"] == ["ALL"]
    assert vllm["seccompProfile"]["type"] == "RuntimeDefault"


def test_metrics_bind_the_pod_ip_behind_a_network_policy():
    objs = objects()
    env = {e["name"]: e for e in sidecar(objs)["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    policy = kind(objs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == pod_labels(objs)
    api, metrics = policy["spec"]["ingress"]
    assert api["ports"] == [{"port": "http", "protocol": "TCP"}] and "from" not in api  # the API as before
    assert metrics["ports"] == [{"port": "monitor-metrics", "protocol": "TCP"}]
    assert metrics["from"][0] == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    test_pod = next(o for o in objs if o["kind"] == "Pod")
    assert all(test_pod["metadata"]["labels"][k] == v for k, v in metrics["from"][1]["podSelector"]["matchLabels"].items())
    assert not any(o["kind"] == "NetworkPolicy" for o in objects({"networkPolicy": {"enabled": False}}))


def pod_labels(objs: list[dict]) -> dict:
    labels = kind(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    return {k: v for k, v in labels.items() if k in ("app.kubernetes.io/name", "app.kubernetes.io/instance")}


def test_a_ring_that_does_not_fit_in_shm_fails_the_render():
    """The issue's case: an 8B model (d_model 4096) with the default 1024 x 512 ring is ~4.3 GB: 2Gi is refused."""
    big = {"monitor": {"config": {"model": {"num_layers": 32, "d_model": 4096}, "taps": [{"layer": 16}]}}}
    with pytest.raises(helm.HelmError, match=r"one ring \(1024 slots x 512 rows x 1 tapped layer\(s\) at d_model 4096\) "
                                             r"takes 4164 MiB, more than three quarters of shm.sizeLimit 2Gi"):
        render(big)
    render({**big, "shm": {"sizeLimit": "6Gi"}})
    render({"monitor": {**big["monitor"], "config": {**big["monitor"]["config"], "transport": {"slots": 256}}}})
    with pytest.raises(helm.HelmError, match="use a plain quantity"):
        render({"shm": {"sizeLimit": "2 gigs"}})


def test_sasl_without_a_secret_is_refused():
    values = {"kafka": {"enabled": True, "bootstrapServers": ["k:9093"], "securityProtocol": "SASL_SSL",
                        "sasl": {"mechanism": "PLAIN", "username": "u"}}}
    with pytest.raises(helm.HelmError, match="kafka.sasl.existingSecret is required"):
        render(values)


def test_prometheus_rule_is_the_rules_file_with_overrides(tmp_path):
    values = load(ROOT / "helm/ci/production-values.yaml")
    objs = objects(values)
    rule = kind(objs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    groups = rule["spec"]["groups"]
    rules = {r["alert"]: r for g in groups for r in g["rules"]}
    shipped = {r["alert"] for g in load(ROOT / "deploy/prometheus/rules.yml")["groups"] for r in g["rules"]}
    assert set(rules) == shipped - {"MisalignmentMonitorWatchdog"}
    assert rules["MisalignmentMonitorBlind"]["for"] == "10m"
    assert rules["MisalignmentDetectorBurst"]["labels"]["severity"] == "warning"
    assert rules["MisalignmentMonitorBlind"]["annotations"]["runbook_url"] == \
        "https://runbooks.example.com/misalignment-monitor/misalignmentmonitorblind.md"
    # .Files.Get, not tpl: the alert templates reach Prometheus unrendered.
    assert "{{ $labels.detector }}" in rules["MisalignmentDetectorFired"]["annotations"]["summary"]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    res = subprocess.run([binary("promtool"), "check", "rules", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_monitors_set_the_job_names_the_rules_expect():
    objs = objects(load(ROOT / "helm/ci/production-values.yaml"))
    for k, key in (("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")):
        mon = kind(objs, k)
        assert mon["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        eps = {e["port"]: e for e in mon["spec"][key]}
        assert eps["monitor-metrics"]["relabelings"][0] == {"targetLabel": "job", "replacement": "misalignment-monitor"}
        assert eps["http"]["path"] == "/metrics"  # vLLM's own metrics, beside ours
        assert eps["monitor-metrics"]["interval"] == "15s"
    sm = kind(objs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["metricRelabelings"][0]["action"] == "drop"


def test_dashboards_ship_as_labelled_configmaps():
    objs = objects(load(ROOT / "helm/ci/production-values.yaml"))
    boards = [o for o in objs if o["kind"] == "ConfigMap" and "-dashboard-" in o["metadata"]["name"]]
    assert {o["metadata"]["name"].rsplit("-", 1)[1] for o in boards} == {"overview", "detector"}
    for o in boards:
        assert o["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert o["metadata"]["annotations"]["grafana_folder"] == "LLM safety"
        (body,) = o["data"].values()
        assert yaml.safe_load(body)["schemaVersion"] >= 39
    assert not [o for o in objects() if "-dashboard-" in o["metadata"]["name"]]  # off by default


def test_helm_test_hook_checks_the_sidecar_metrics():
    hook = next(o for o in objects() if o["metadata"].get("annotations", {}).get("helm.sh/hook") == "test")
    cmd = " ".join(hook["spec"]["containers"][0]["args"])
    assert ":9464/metrics" in cmd and "misalignment_monitor_build_info" in cmd


def test_notes_say_what_was_installed():
    notes = render(load(ROOT / "helm/ci/production-values.yaml"))["misalignment-monitor/templates/NOTES.txt"]
    assert "native sidecar" in notes and "Kafka topic misalignment-monitor.alerts" in notes and "helm test" in notes


def test_values_schema_in_sync_and_rejects_typos():
    res = subprocess.run([sys.executable, str(ROOT / "helm/values_schema.py"), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    with helm.Chart.load(CHART) as chart:
        for path in CI_VALUES:
            chart.validate_schema(load(path))
        with pytest.raises(helm.HelmError, match="kafak|additional"):
            chart.validate_schema({"kafak": {"enabled": True}})


def test_chart_rules_file_is_the_repo_rules_file():
    assert (CHART / "files/rules.yml").read_text() == (ROOT / "deploy/prometheus/rules.yml").read_text(), \
        "cp deploy/prometheus/rules.yml helm/misalignment-monitor/files/rules.yml"


# ---- other vLLM charts --------------------------------------------------------------------------

def test_integration_files_are_cut_from_this_chart():
    res = subprocess.run([sys.executable, str(ROOT / "helm/integrations/generate.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    snippet = load(ROOT / "helm/integrations/llm-d-modelservice/values-snippet.yaml")
    ours = pod(objects({"fullnameOverride": "misalignment-monitor"}))
    assert snippet["decode"]["initContainers"] == ours["initContainers"]
    assert snippet["decode"]["volumes"] == ours["volumes"]


def test_production_stack_post_renderer_adds_the_sidecar():
    """A Deployment shaped like production-stack's serving engine, through the post-renderer."""
    import kubernetes_validate

    engine = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "vllm-llama3-deployment-vllm", "labels": {"model": "llama3", "helm-release-name": "vllm"}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"model": "llama3"}},
                 "template": {"metadata": {"labels": {"model": "llama3"}}, "spec": {
                     "containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.32.0",
                                     "command": ["vllm", "serve", "meta-llama/Llama-3.1-8B-Instruct"],
                                     "args": ["--host", "0.0.0.0", "--port", "8000"],
                                     "env": [{"name": "HF_HOME", "value": "/data"}],
                                     "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}]}],
                     "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "20Gi"}}]}}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "vllm-engine-service"},
               "spec": {"selector": {"model": "llama3"}, "ports": [{"port": 80, "targetPort": 8000}]}}
    res = subprocess.run([sys.executable, str(ROOT / "helm/integrations/production-stack/inject-monitor.py")],
                         input=yaml.safe_dump_all([engine, service]), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    dep, svc = list(yaml.safe_load_all(res.stdout))
    assert svc == service  # nothing else changes
    spec = dep["spec"]["template"]["spec"]
    assert spec["initContainers"][0]["name"] == "monitor" and spec["initContainers"][0]["restartPolicy"] == "Always"
    vllm = spec["containers"][0]
    assert {"name": "HF_HOME", "value": "/data"} in vllm["env"]
    assert any(e["name"] == "MISALIGNMENT_MONITOR_CONFIG" for e in vllm["env"])
    assert "monitor.plugin.middleware.MonitorMiddleware" in vllm["args"]
    shm = [v for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert [v["name"] for v in shm] == ["dshm"]  # one shared /dev/shm, the monitor's
    assert sum(m["mountPath"] == "/dev/shm" for m in vllm["volumeMounts"]) == 1
    kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


# ---- dashboards ---------------------------------------------------------------------------------

def test_dashboards_check_mode_passes():
    res = subprocess.run([sys.executable, str(ROOT / "deploy/grafana/dashboards.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dashboards_check_catches_bad_queries():
    sys.path.insert(0, str(ROOT / "deploy/grafana"))
    import json

    import dashboards

    files = dashboards.render()
    doc = json.loads(files["overview.json"])
    doc["panels"][1]["targets"][0]["expr"] = "sum(rate(misalignment_monitor_tokens_scored[5m]))"  # no such metric
    doc["panels"][2]["targets"][0]["expr"] = "sum(rate(vllm:num_requests_running[5m])"  # unbalanced
    files["overview.json"] = json.dumps(doc, indent=2) + "\n"
    problems = "\n".join(dashboards.check(files))
    assert "misalignment_monitor_tokens_scored, which neither the monitor nor vLLM exports" in problems
    assert "does not parse" in problems and "overview.json is stale" in problems
    for board in map(json.loads, dashboards.render().values()):
        names = [v["name"] for v in board["templating"]["list"]]
        assert names[:2] == ["datasource", "model_name"]
        assert all(t["datasource"]["uid"] == "${datasource}" for p in board["panels"] for t in p.get("targets", []))


def test_console_and_ingester_are_off_by_default():
    objs = objects({})
    assert not [o for o in objs if o["metadata"]["name"].endswith(("-console", "-ingester", "-migrations"))]


def test_console_ingester_and_migrations_read_the_store_from_secrets(tmp_path):
    """Database URL, tokens and session key from existing Secrets; migrations before install and upgrade;
    the console's pods never match the vLLM Service's selector; the alert rules link to the console."""
    from monitor.config.models import MonitorConfig

    objs = objects(load(ROOT / "helm/ci/console-values.yaml"))
    assert not any(o["kind"] == "Secret" for o in objs)
    job = kind(objs, "Job", "-migrations")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    containers = {o["metadata"]["name"]: o["spec"]["template"]["spec"]["containers"][0]
                  for o in objs if o["kind"] in ("Deployment", "Job") and not o["metadata"]["name"].endswith("monitor")}
    for name in ("mm-misalignment-monitor-migrations", "mm-misalignment-monitor-ingester", "mm-misalignment-monitor-console"):
        env = {e["name"]: e for e in containers[name]["env"]}
        assert env["MONITOR_STORE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "misalignment-monitor-store", "key": "url"}
        assert containers[name]["securityContext"]["runAsNonRoot"] and containers[name]["securityContext"]["readOnlyRootFilesystem"]
    assert containers["mm-misalignment-monitor-migrations"]["args"] == ["incidents", "migrate"]
    console = kind(objs, "Deployment", "-console")["spec"]["template"]
    vllm_selector = kind(objs, "Service", "monitor")["spec"]["selector"]
    assert not vllm_selector.items() <= console["metadata"]["labels"].items()
    assert kind(objs, "Service", "-console")["spec"]["selector"].items() <= console["metadata"]["labels"].items()
    cfg = MonitorConfig.model_validate(yaml.safe_load(kind(objs, "ConfigMap", "-monitor")["data"]["monitor.yaml"]))
    assert cfg.console.base_url == "https://monitor.example.com" and cfg.console.host == "0.0.0.0"
    assert cfg.console.tokens_file == "/etc/misalignment-monitor/console-tokens/tokens.yaml"
    assert cfg.console.proxy.enabled and cfg.console.proxy.roles == {"sre": "triager", "safety": "admin"}
    mounts = {m["mountPath"] for m in console["spec"]["containers"][0]["volumeMounts"]}
    assert {"/etc/misalignment-monitor/console-tokens", "/etc/misalignment-monitor/console-session",
            "/etc/misalignment-monitor/console-reveal"} <= mounts
    assert cfg.console.reveal_key_file == "/etc/misalignment-monitor/console-reveal/key"
    monitor_cm = kind(objs, "ConfigMap", "-monitor")["data"]
    assert monitor_cm["reveal.pub"] and cfg.evidence.reveal_public_key_file == "/etc/misalignment-monitor/config/reveal.pub"
    ingress = kind(objs, "Ingress", "-console")
    assert ingress["spec"]["rules"][0]["host"] == "monitor.example.com" and ingress["spec"]["tls"]
    rules = {r["alert"]: r for g in kind(objs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]}
    assert '{{ with "https://monitor.example.com" }}' in rules["MisalignmentDetectorFired"]["annotations"]["console_url"]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": kind(objs, "PrometheusRule")["spec"]["groups"]}))
    res = subprocess.run([binary("promtool"), "check", "rules", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    dash = kind(objs, "ConfigMap", "-dashboard-detector")["data"]["detector.json"]
    assert "https://monitor.example.com" in dash and "127.0.0.1:8470" not in dash


def test_store_parts_refuse_what_cannot_work():
    with pytest.raises(helm.HelmError, match="store.existingSecret is required"):
        render({"console": {"enabled": True, "tokens": {"existingSecret": "t"}}})
    with pytest.raises(helm.HelmError, match="needs a way to log in"):
        render({"store": {"existingSecret": "s"}, "console": {"enabled": True}})
    with pytest.raises(helm.HelmError, match="needs kafka.enabled"):
        render({"store": {"existingSecret": "s"}, "ingester": {"enabled": True}})
