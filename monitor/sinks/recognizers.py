"""Personal data in a conversation's text, found by Microsoft Presidio's recognizers before the text
leaves the sidecar.

Presidio's pattern recognizers check more than a regular expression could: a card number must pass
the Luhn checksum, an IBAN its check digits, an SSN must not be one of the invalid ranges, and each
match gets a confidence raised by context words ("card", "SSN"). Only the recognizers that need no
language model are used (no spaCy model to download into a sidecar image). Imported only when a
config asks for them: Presidio pulls spaCy (~5 s to import).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Found:
    start: int
    end: int
    entity: str
    score: float


def _offline_email_recognizer():
    """Presidio's e-mail recognizer validates the domain with tldextract, which downloads the public suffix
    list on first use; a sidecar has no egress, so it reads the snapshot tldextract ships."""
    import tldextract
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return bool(extract(pattern_text).fqdn)

    return OfflineEmailRecognizer()


def _recognizer(entity: str):
    from presidio_analyzer import predefined_recognizers as r

    if entity == "EMAIL_ADDRESS":
        return _offline_email_recognizer()
    return {"CREDIT_CARD": r.CreditCardRecognizer, "PHONE_NUMBER": r.PhoneRecognizer, "IBAN_CODE": r.IbanRecognizer,
            "IP_ADDRESS": r.IpRecognizer, "US_SSN": r.UsSsnRecognizer, "DATE_TIME": r.DateRecognizer,
            "CRYPTO": r.CryptoRecognizer, "US_BANK_NUMBER": r.UsBankRecognizer, "US_PASSPORT": r.UsPassportRecognizer,
            "US_DRIVER_LICENSE": r.UsLicenseRecognizer, "UK_NHS": r.NhsRecognizer,
            "MEDICAL_LICENSE": r.MedicalLicenseRecognizer}[entity]()


class PiiRecognizers:
    """The configured entities' recognizers, built once (at sidecar start, not at the first incident)."""

    def __init__(self, entities: list[str], min_score: float = 0.35) -> None:
        try:
            self._by_entity = {e: _recognizer(e) for e in entities}
        except ImportError as e:
            raise RuntimeError(f"evidence.recognize needs Microsoft Presidio ({e.name} is not installed): "
                               "pip install 'misalignment-monitor[redact]'") from None
        self.min_score = min_score

    def find(self, text: str) -> list[Found]:
        out = []
        for entity, rec in self._by_entity.items():
            for r in rec.analyze(text, [entity], None):
                if r.score >= self.min_score:
                    out.append(Found(r.start, r.end, r.entity_type, r.score))
        return sorted(out, key=lambda f: (f.start, -f.end))
