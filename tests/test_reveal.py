"""Revealing a redacted value: sealed in the sidecar to the console's public key, opened only by the
console that holds the private key, for a reader with the text permission who asks, and audited."""

from __future__ import annotations

import json
import stat

import pytest

from incident_factory import make_events
from monitor.cli import main
from monitor.config.models import Redaction
from monitor.sinks.sealing import Sealer, read_key_file
from test_console import CHATS, NOW, Site

CARD = "4111 1111 1111 1111"
RULES = [Redaction(name="card", pattern=r"\b\d{4} \d{4} \d{4} \d{4}\b", replacement="[CARD]")]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture()
def keys(tmp_path, capsys):
    assert main(["console", "reveal-key", "--out", str(tmp_path / "keys")]) == 0
    capsys.readouterr()
    private, public = tmp_path / "keys/reveal.key", tmp_path / "keys/reveal.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert main(["console", "reveal-key", "--out", str(tmp_path / "keys")]) == 2  # never over an old key
    assert "exists" in capsys.readouterr().err
    return private, public


def sealed_incident(tokenizer, public, request_id="card-1"):
    return make_events(tokenizer, CHATS[0][1], CHATS[0][2], request_id=request_id, when=NOW, redaction=RULES,
                       sealer=Sealer(read_key_file(public)))


def test_the_value_travels_sealed_and_opens_only_in_the_console(tmp_path, tokenizer, keys):
    private, public = keys
    alerts, incident = sealed_incident(tokenizer, public)
    data = incident["data"]
    assert CARD not in json.dumps(incident) and CARD not in json.dumps(alerts)  # Kafka, the store: sealed
    assert "[CARD]" in "".join(data["trace"]["text"]) and len(data["sealed"]) == 1
    site = Site(tmp_path, f"sqlite:///{tmp_path}/incidents.sqlite", [(alerts, incident)],
                reveal_key_file=str(private))
    alert = data["alert_ids"][0]
    triager = site.client(site.triager)
    page = triager.get(f"/incidents/{alert}").text
    assert CARD not in page and 'id="reveal"' in page
    shown = triager.get(f"/incidents/{alert}?reveal=true")
    assert shown.status_code == 200 and 'id="revealed"' in shown.text
    assert "4111" in shown.text  # each digit is its own token in the strip
    audit = site.client(site.admin).get("/audit").text
    assert "reveal" in audit and alert in audit
    # Without the text permission: refused, not revealed.
    r = site.client(site.blind_triager).get(f"/incidents/{alert}?reveal=true")
    assert r.status_code == 403 and "4111" not in r.text
    assert 'id="reveal"' not in site.client(site.blind_triager).get(f"/incidents/{alert}").text


def test_a_console_without_the_key_cannot_reveal(tmp_path, tokenizer, keys):
    _, public = keys
    alerts, incident = sealed_incident(tokenizer, public)
    site = Site(tmp_path, f"sqlite:///{tmp_path}/incidents.sqlite", [(alerts, incident)])
    alert = incident["data"]["alert_ids"][0]
    c = site.client(site.triager)
    assert 'id="reveal"' not in c.get(f"/incidents/{alert}").text
    r = c.get(f"/incidents/{alert}?reveal=true")
    assert r.status_code == 404 and "no reveal key" in r.text


def test_a_key_that_is_not_one_is_named(tmp_path, tokenizer):
    from monitor.sinks.sealing import SealingError

    bad = tmp_path / "bad.pub"
    bad.write_text("not a key\n")
    with pytest.raises(SealingError, match="not a base64 Curve25519 key"):
        Sealer(read_key_file(bad))
    with pytest.raises(SealingError, match="no such key file"):
        read_key_file(tmp_path / "missing.pub")
