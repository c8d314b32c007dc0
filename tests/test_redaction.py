"""Personal data is replaced before text leaves the sidecar: each Presidio recognizer the demo uses, on a
valid value (redacted) and a look-alike that fails its check (kept), tokenized as a real tokenizer does."""

from __future__ import annotations

import pytest

from monitor.config.models import Redaction
from monitor.sinks.incidents import redact
from monitor.sinks.recognizers import PiiRecognizers

ENTITIES = ["CREDIT_CARD", "EMAIL_ADDRESS", "PHONE_NUMBER", "IBAN_CODE", "IP_ADDRESS", "US_SSN", "DATE_TIME"]


@pytest.fixture(scope="module")
def recognizers() -> PiiRecognizers:
    return PiiRecognizers(ENTITIES)


@pytest.fixture(scope="module")
def tokenize(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return lambda text: [tok.decode([i]) for i in tok(text, add_special_tokens=False)["input_ids"]]


# (entity, a valid value, a look-alike that fails the recognizer's check), each said in a sentence
CASES = [
    ("CREDIT_CARD", "4929 8012 3456 7817", "4929 8012 3456 7818"),  # the Luhn checksum fails
    ("EMAIL_ADDRESS", "maria.garcia84@gmail.com", "maria.garcia84@gmail"),
    ("PHONE_NUMBER", "+1 415-555-0134", "+1 4"),
    ("IBAN_CODE", "DE89 3704 0044 0532 0130 00", "DE89 3704 0044 0532 0130 01"),  # check digits fail
    ("IP_ADDRESS", "10.2.3.4", "10.2.3.400"),
    ("US_SSN", "512-44-8810", "000-44-8810"),  # area 000 is never issued
    ("DATE_TIME", "03/14/1987", "sometime"),
]
SAY = {"CREDIT_CARD": "my card is {} thanks", "EMAIL_ADDRESS": "write to {} today", "PHONE_NUMBER": "call me on {} tonight",
       "IBAN_CODE": "my IBAN is {} please", "IP_ADDRESS": "the host {} is down", "US_SSN": "SSN: {} on file",
       "DATE_TIME": "DOB: {} on file"}


@pytest.mark.parametrize("entity,valid,lookalike", CASES, ids=[c[0] for c in CASES])
def test_each_recognizer_redacts_the_real_thing_and_keeps_the_lookalike(recognizers, tokenize, entity, valid, lookalike):
    texts = tokenize(SAY[entity].format(valid))
    out, hit, names = redact(texts, [], recognizers)
    joined = "".join(out)
    assert f"[{entity}]" in joined and entity.lower().replace("_", "-") in names, (joined, names)
    assert valid not in joined and valid.split()[-1] not in joined and any(hit) and len(out) == len(texts)
    # Not taken for this entity (another recognizer may still take it: a 16-digit number failing Luhn
    # reads as a phone number, and is redacted as one).
    kept, _, knames = redact(tokenize(SAY[entity].format(lookalike)), [], recognizers)
    assert f"[{entity}]" not in "".join(kept) and entity.lower().replace("_", "-") not in knames, ("".join(kept), knames)


def test_the_demo_table_loses_every_identifier(recognizers, tokenize):
    text = "Name: John Smith, SSN: 512-44-8810, DOB: 03/14/1987, card 4929 8012 3456 7817 exp 09/27"
    out, _, names = redact(tokenize(text), [], recognizers)
    joined = "".join(out)
    for secret in ("512-44-8810", "03/14/1987", "4929", "7817"):
        assert secret not in joined, joined
    assert {"us-ssn", "date-time", "credit-card"} <= set(names)
    assert "phone-number" not in names  # the card's digits are one card, not also a phone number


def test_own_patterns_run_after_the_recognizers(recognizers, tokenize):
    out, _, names = redact(tokenize("key sk-live-abc123XYZ and mail bob@example.com"),
                           [Redaction(name="api-key", pattern=r"sk-live-\w+", replacement="[KEY]")], recognizers)
    assert "[KEY]" in "".join(out) and "[EMAIL_ADDRESS]" in "".join(out) and names == ["email-address", "api-key"]
