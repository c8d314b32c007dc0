"""`monitor check-config`: good files pass; each bad one names the file, the field and the problem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from sae_lens import SAE, JumpReLUSAEConfig

from monitor.cli import main
from monitor.config import ConfigError, load_config
from monitor.scoring import LinearProbe, ProbeMetadata

D_MODEL, N_LAYERS, D_SAE = 32, 6, 128


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    """A model folder, an SAE, a probe, a detector pack and a config that uses them all."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model/config.json").write_text(json.dumps({"num_hidden_layers": N_LAYERS, "hidden_size": D_MODEL}))
    SAE.from_dict(JumpReLUSAEConfig(d_in=D_MODEL, d_sae=D_SAE).to_dict()).save_model(tmp_path / "sae")
    meta = ProbeMetadata(name="pii", concept="pii", model="m", layer=3, d_in=D_MODEL)
    LinearProbe(torch.zeros(1, D_MODEL), torch.zeros(1), meta).save(tmp_path / "probe")
    (tmp_path / "detectors").mkdir()
    write(tmp_path / "detectors/pii.yaml", {
        "name": "pii-probe", "concept": "pii", "inputs": [{"probe": "pii"}],
        "aggregation": {"kind": "rolling_mean_max", "window": 4}, "threshold": 0.7, "severity": "critical",
    })
    write(tmp_path / "detectors/feat.yaml", {
        "name": "pii-feature", "concept": "pii", "inputs": [{"sae": "s", "feature": 7}],
        "aggregation": {"kind": "count_above", "token_threshold": 1.0, "min_tokens": 2}, "threshold": 2,
    })
    write(tmp_path / "monitor.yaml", base_config())
    return tmp_path


def base_config() -> dict:
    return {
        "model": {"name": "m", "path": "model"},
        "taps": [{"layer": 3}],
        "saes": [{"name": "s", "layer": 3, "path": "sae"}],
        "probes": [{"name": "pii", "path": "probe"}],
        "detectors": ["detectors"],
    }


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_good_config_loads(workspace):
    loaded = load_config(workspace / "monitor.yaml")
    assert loaded.config.tapped_layers == [3]
    assert {d.spec.name for d in loaded.detectors} == {"pii-probe", "pii-feature"}
    assert loaded.saes["s"].d_sae == D_SAE and loaded.d_model == D_MODEL
    # Defaults that matter for safety: loopback, Kafka off (and no setting can put text into events).
    assert loaded.config.sinks.prometheus.host == "127.0.0.1" and not loaded.config.sinks.kafka.enabled


def test_cli_ok_and_exit_code(workspace, capsys):
    assert main(["check-config", str(workspace / "monitor.yaml")]) == 0
    assert "ok (1 tapped layer(s) [3], 1 SAE(s), 1 probe(s), 2 detector(s))" in capsys.readouterr().out


def mutate(cfg: dict, path: str, value) -> dict:
    node = cfg
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return cfg


# (what is wrong, how to break the config, the file it should name, the field path, words of the message)
BAD_CONFIGS = [
    ("unknown key", lambda c: mutate(c, "scoring.devcie", "cpu"), "monitor.yaml", "scoring.devcie", "unknown key"),
    ("wrong type", lambda c: mutate(c, "taps.0.layer", "three"), "monitor.yaml", "taps[0].layer", "valid integer"),
    ("bad enum", lambda c: mutate(c, "scoring.device", "tpu"), "monitor.yaml", "scoring.device", "'auto', 'cpu' or 'cuda'"),
    ("layer the model lacks", lambda c: mutate(c, "taps", [{"layer": 3}, {"layer": 6}]), "monitor.yaml", "taps[1].layer",
     "layer 6 does not exist; the model has layers 0..5"),
    ("missing SAE folder", lambda c: mutate(c, "saes.0.path", "nowhere"), "monitor.yaml", "saes[0].path", "cfg.json not found"),
    ("missing probe folder", lambda c: mutate(c, "probes.0.path", "gone"), "monitor.yaml", "probes[0].path", "file not found"),
    ("missing model folder", lambda c: mutate(c, "model.path", "no-model"), "monitor.yaml", "model.path", "monitor model prepare"),
    ("SAE layer not tapped", lambda c: mutate(c, "saes.0.layer", 2), "monitor.yaml", "saes[0].layer", "not tapped"),
    ("missing detector pack", lambda c: mutate(c, "detectors", ["packs/none"]), "none", "", "detector pack not found"),
    ("secret in clear", lambda c: mutate(c, "sinks", {"kafka": {"sasl_password": "hunter2"}}), "monitor.yaml", "sinks.kafka",
     "must not be written in the config file"),
    ("SASL without password source", lambda c: mutate(c, "sinks", {"kafka": {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN"}}),
     "monitor.yaml", "sinks.kafka", "sasl_password_file"),
    ("duplicate tap", lambda c: mutate(c, "taps", [{"layer": 3}, {"layer": 3}]), "monitor.yaml", "taps", "listed twice"),
    ("public bind is fine but bad port", lambda c: mutate(c, "sinks", {"prometheus": {"port": 70000}}), "monitor.yaml",
     "sinks.prometheus.port", "less than or equal to 65535"),
    ("duplicate names", lambda c: mutate(c, "probes.0.name", "s"), "monitor.yaml", "", "repeated: ['s']"),
    ("removed setting", lambda c: mutate(c, "privacy", {"include_text": False}), "monitor.yaml", "",
     "`privacy.include_text` never had an effect"),
]


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_names_file_field_and_problem(workspace, case, capsys):
    _, breaker, file_name, loc, words = case
    write(workspace / "monitor.yaml", breaker(base_config()))
    assert main(["check-config", str(workspace / "monitor.yaml")]) == 1
    err = capsys.readouterr().err
    line = next((ln for ln in err.splitlines() if words in ln), None)
    assert line is not None, f"no error line mentions {words!r}:\n{err}"
    assert file_name in line and (f": {loc}: " in line if loc else True), line


def test_feature_index_outside_sae(workspace):
    write(workspace / "detectors/feat.yaml", {
        "name": "pii-feature", "concept": "pii", "inputs": [{"sae": "s", "feature": D_SAE}],
        "aggregation": {"kind": "max"}, "threshold": 1,
    })
    with pytest.raises(ConfigError) as e:
        load_config(workspace / "monitor.yaml")
    assert str(e.value) == (
        f"{workspace / 'detectors/feat.yaml'}: inputs[0].feature: feature {D_SAE} is outside SAE 's' (d_sae={D_SAE})"
    )


def test_probe_width_differs_from_tapped_layer(workspace):
    meta = ProbeMetadata(name="pii", concept="pii", model="m", layer=3, d_in=D_MODEL * 2)
    LinearProbe(torch.zeros(1, D_MODEL * 2), torch.zeros(1), meta).save(workspace / "probe")
    with pytest.raises(ConfigError, match=r"probes\[0\]\.path: probe width d_in=64 differs from the tapped layers' width 32 x 1 layer"):
        load_config(workspace / "monitor.yaml")


def test_sae_width_differs_from_model(workspace):
    SAE.from_dict(JumpReLUSAEConfig(d_in=D_MODEL + 1, d_sae=D_SAE).to_dict()).save_model(workspace / "sae")
    with pytest.raises(ConfigError, match=r"saes\[0\]\.path: SAE reads width d_in=33"):
        load_config(workspace / "monitor.yaml")


def test_detector_errors(workspace):
    write(workspace / "detectors/bad.yaml", {
        "name": "Bad Name", "concept": "pii", "inputs": [{"probe": "nope"}],
        "aggregation": {"kind": "ema_max", "alpha": 1.5}, "threshold": 0.5, "severity": "page-me",
    })
    with pytest.raises(ConfigError) as e:
        load_config(workspace / "monitor.yaml")
    text = str(e.value)
    bad = str(workspace / "detectors/bad.yaml")
    assert f"{bad}: name: String should match pattern" in text
    assert f"{bad}: aggregation.ema_max.alpha: Input should be less than or equal to 1" in text
    assert f"{bad}: severity: Input should be 'critical', 'warning' or 'info'" in text


def test_detector_input_type_errors_name_the_field(workspace):
    write(workspace / "detectors/feat.yaml", {
        "name": "pii-feature", "concept": "pii", "inputs": [{"sae": "s", "feature": "seven"}, {"probe": "pii", "wieght": 2}],
        "aggregation": {"kind": "max"}, "threshold": 1,
    })
    with pytest.raises(ConfigError) as e:
        load_config(workspace / "monitor.yaml")
    text = str(e.value)
    assert "feat.yaml: inputs[0].feature: Input should be a valid integer" in text
    assert "feat.yaml: inputs[1].wieght: unknown key" in text


def test_detector_unknown_probe_and_duplicate_name(workspace):
    write(workspace / "detectors/dup.yaml", {
        "name": "pii-probe", "concept": "pii", "inputs": [{"probe": "missing"}],
        "aggregation": {"kind": "max"}, "threshold": 0.5,
    })
    with pytest.raises(ConfigError) as e:
        load_config(workspace / "monitor.yaml")
    text = str(e.value)
    assert "dup.yaml: inputs[0].probe: no probe named 'missing' in monitor.yaml (have: ['pii'])" in text
    assert "detector 'pii-probe' is also defined in" in text


def test_yaml_syntax_and_duplicate_keys(workspace):
    write(workspace / "monitor.yaml", "taps:\n  - layer: 3\n  - layer: [\n")
    with pytest.raises(ConfigError, match=r"monitor.yaml: line \d+, column \d+: not valid YAML"):
        load_config(workspace / "monitor.yaml")
    write(workspace / "monitor.yaml", "taps: []\ntaps: [{layer: 3}]\n")
    with pytest.raises(ConfigError, match="key 'taps' appears twice"):
        load_config(workspace / "monitor.yaml")


def test_all_problems_reported_at_once(workspace):
    cfg = base_config()
    cfg["saes"][0]["path"] = "nowhere"
    cfg["probes"][0]["path"] = "gone"
    write(workspace / "monitor.yaml", cfg)
    with pytest.raises(ConfigError) as e:
        load_config(workspace / "monitor.yaml")
    assert len(e.value.issues) >= 2


def test_console_script(workspace):
    """The installed `monitor` command, as a user runs it."""
    exe = Path(sys.executable).parent / "monitor"
    ok = subprocess.run([str(exe), "check-config", str(workspace / "monitor.yaml")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    write(workspace / "monitor.yaml", mutate(base_config(), "taps.0.layer", -1))
    bad = subprocess.run([str(exe), "check-config", str(workspace / "monitor.yaml")], capture_output=True, text=True)
    assert bad.returncode == 1 and "taps[0].layer: Input should be greater than or equal to 0" in bad.stderr


def test_shipped_demo_config_is_valid():
    """The repo's demo config and every shipped detector pack validate (model folder aside)."""
    root = Path(__file__).resolve().parent.parent
    loaded = load_config(root / "deploy/local/monitor.yaml")
    names = {d.spec.concept for d in loaded.detectors}
    assert {"pii", "prompt_injection", "harmful_request"} <= names


def test_reference_page_matches_the_models():
    """docs/configuration.md is generated from the models; a stale page fails here."""
    from monitor.config.reference import page, render

    assert page().read_text() == render(), "run: python -m monitor.config.reference"


def test_the_config_layer_sizes_rings_as_the_transport_does():
    import torch

    from monitor.config.load import ring_bytes
    from monitor.transport.ring import RingSpec

    for slots, rows, d, layers in ((1024, 512, 4096, 1), (64, 7, 576, 3), (2, 1, 16, 32)):
        assert ring_bytes(slots, rows, d, layers) == RingSpec(slots, rows, d, tuple(range(layers)),
                                                              torch.bfloat16).file_bytes


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_a_threshold_that_can_never_fire_is_refused(workspace, value):
    """Issue 29, finding 5: `threshold: .nan` (and the infinities) passed check-config with exit 0, and
    the detector never fired. Every number in a config or pack must be finite."""
    pack = workspace / "detectors/pii.yaml"
    pack.write_text(pack.read_text().replace("threshold: 0.7", f"threshold: {value}"))
    feat = workspace / "detectors/feat.yaml"
    feat.write_text(feat.read_text().replace("token_threshold: 1.0", f"token_threshold: {value}"))
    with pytest.raises(ConfigError) as e:
        load_config(workspace / "monitor.yaml")
    text = str(e.value)
    assert f"{pack}: threshold: Input should be a finite number" in text
    assert f"{feat}: aggregation.count_above.token_threshold: Input should be a finite number" in text


def test_paths_the_sidecar_writes_are_checked_for_its_user(workspace):
    """Issue 29, finding 5: a spool folder the sidecar's user cannot write passed check-config, then the
    sidecar died with a raw OSError. check-config, run as that user, now names the field; so does the
    sidecar, before it starts anything."""
    import io
    import shutil
    import tempfile

    from as_user import exit_code_as

    ws = Path(tempfile.mkdtemp(prefix="mm-paths-"))
    try:
        shutil.copytree(workspace, ws, dirs_exist_ok=True)
        spool = ws / "spool"
        spool.mkdir()
        cfg = base_config() | {"sinks": {"kafka": {"enabled": True, "spool_dir": str(spool)}}}
        write(ws / "monitor.yaml", cfg)
        for p in [ws, *ws.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)  # readable by anyone, writable by root only

        def as_nobody(argv: list[str], expect: str) -> int:
            def check() -> int:
                err = io.StringIO()
                sys.stderr = err
                code = main(argv)
                return code if expect in err.getvalue() else 3
            return exit_code_as(65534, 65534, check)

        assert main(["check-config", str(ws / "monitor.yaml")]) == 0  # root may write there
        want = f"sinks.kafka.spool_dir: {spool} is not writable by uid 65534"
        assert as_nobody(["check-config", str(ws / "monitor.yaml")], want) == 1
        assert as_nobody(["sidecar", "--config", str(ws / "monitor.yaml")], want) == 1
        assert as_nobody(["sidecar", "--config", str(ws / "monitor.yaml"), "--decisions", str(ws / "d.jsonl")],
                         f"--decisions: {ws} is not writable by uid 65534") == 1
    finally:
        shutil.rmtree(ws, ignore_errors=True)


def test_recognizers_without_presidio_are_a_config_error_naming_the_extra(workspace, model_dir, monkeypatch, capsys):
    """`evidence.recognize` on a sidecar image without Presidio: check-config says so, before the sidecar
    would start and fail."""
    import importlib.util

    cfg = base_config() | {"evidence": {"text": "flagged", "recognize": ["CREDIT_CARD"],
                                          "tokenizer": str(model_dir)}}
    path = write(workspace / "monitor.yaml", cfg)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "presidio_analyzer" else real(name, *a))
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "evidence.recognize" in err and "misalignment-monitor[redact]" in err
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert main(["check-config", str(path)]) == 0
