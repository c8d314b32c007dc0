"""Broken SAE and probe files are refused by `monitor check-config` (and the sidecar), naming the file.

Each case is a file a user could plausibly ship: a damaged cfg.json, an encoder of another shape, a
training run that produced NaN, a probe whose standardisation is NaN.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from monitor.config import ConfigError, load_config
from monitor.scoring.probe import LinearProbe, ProbeMetadata
from sidecar_helpers import D, tiny_monitor


@pytest.fixture()
def config(tmp_path):
    return tiny_monitor(tmp_path, {"prometheus": {"enabled": False}})


def problems(cfg) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    return "\n".join(str(i) for i in e.value.issues)


def edit_sae(tmp_path, **tensors) -> None:
    path = tmp_path / "sae/sae_weights.safetensors"
    t = load_file(str(path))
    t.update(tensors)
    save_file(t, str(path))


def test_a_damaged_sae_cfg_names_the_file(config, tmp_path):
    (tmp_path / "sae/cfg.json").write_text('{"d_in": 16, "d_sae": ')
    assert f"{tmp_path / 'sae/cfg.json'} is not readable JSON" in problems(config)
    (tmp_path / "sae/cfg.json").write_text('{"d_in": "sixteen", "d_sae": 8}')
    assert "cfg.json: d_in must be a positive integer, is 'sixteen'" in problems(config)


def test_an_encoder_of_the_wrong_shape_is_refused(config, tmp_path):
    edit_sae(tmp_path, W_enc=torch.zeros(D, 4))
    assert "sae_weights.safetensors: W_enc has shape [16, 4], cfg.json says [16, 8] (d_in x d_sae)" in problems(config)


def test_nan_in_a_watched_feature_is_refused(config, tmp_path):
    w = load_file(str(tmp_path / "sae/sae_weights.safetensors"))["W_enc"]
    w[5, 6] = float("nan")  # an unwatched feature: harmless to the detectors, accepted
    edit_sae(tmp_path, W_enc=w)
    load_config(config)
    w[0, 3] = float("nan")  # feature 3 is what detector `feat` reads
    edit_sae(tmp_path, W_enc=w)
    assert "W_enc holds NaN or infinite values at watched features [3]" in problems(config)


def test_a_probe_with_nan_std_is_refused_by_the_cli(config, tmp_path):
    meta = ProbeMetadata(name="p", concept="c", model="tiny", layer=2, d_in=D, standardize=True)
    std = torch.ones(D)
    std[2] = float("nan")
    LinearProbe(torch.ones(1, D), torch.zeros(1), meta, torch.zeros(D), torch.ones(D)).save(tmp_path / "probe")
    path = tmp_path / "probe/probe.safetensors"
    t = load_file(str(path))
    t["std"] = std
    save_file(t, str(path))
    doc = yaml.safe_load(config.read_text())
    doc["probes"] = [{"name": "p", "path": "probe"}]
    config.write_text(yaml.safe_dump(doc))
    r = subprocess.run([sys.executable, "-m", "monitor.cli", "check-config", str(config)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1
    assert f"{path}: probe 'p': std holds NaN or infinite values" in r.stderr


def test_credential_paths_expand_variables_or_say_which_is_unset(config, tmp_path, monkeypatch):
    secret = tmp_path / "secrets/password"
    secret.parent.mkdir()
    secret.write_text("s3cret\n")
    doc = yaml.safe_load(config.read_text())
    doc["sinks"]["kafka"] = {"enabled": True, "sasl_mechanism": "PLAIN", "sasl_username": "u",
                             "security_protocol": "SASL_PLAINTEXT", "sasl_password_file": "$SECRETS_DIR/password"}
    config.write_text(yaml.safe_dump(doc))
    monkeypatch.delenv("SECRETS_DIR", raising=False)
    assert "sinks.kafka.sasl_password_file: $SECRETS_DIR/password: an environment variable in it is not set" \
        in problems(config)
    monkeypatch.setenv("SECRETS_DIR", str(secret.parent))
    from monitor.sinks.kafka import client_options

    lc = load_config(config)
    assert client_options(lc.config.sinks.kafka, lc.path.parent)["sasl_plain_password"] == "s3cret"
