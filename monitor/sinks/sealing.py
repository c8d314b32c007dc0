"""Redacted values, sealed so that only the console can reveal them.

Redaction replaces personal data before text leaves the sidecar. Some reviews need the value itself
(was that card number a test number?). With `evidence.reveal_public_key_file`, each redacted span's
original is sealed to the console's public key (a libsodium sealed box: X25519 and XSalsa20-Poly1305,
through PyNaCl) and travels with the incident: unreadable in Kafka, in the store and in its backups.
The console that holds the private key opens them for a reader with the text permission who asks,
and the audit log records it. Without the key setting nothing of the originals leaves.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path


class SealingError(ValueError):
    pass


def _nacl():
    try:
        from nacl import public
    except ImportError:
        raise SealingError("sealing redacted values needs PyNaCl: pip install 'misalignment-monitor[redact]' "
                           "(the console: [console])") from None
    return public


def new_keypair() -> tuple[str, str]:
    """(private, public), base64: the private key stays with the console, the public one goes to sidecars."""
    public = _nacl()
    key = public.PrivateKey.generate()
    return base64.b64encode(bytes(key)).decode(), base64.b64encode(bytes(key.public_key)).decode()


def write_keypair(folder: Path) -> tuple[Path, Path]:
    """A new key pair as `folder`/reveal.key (private, 0600) and reveal.pub. Never overwrites: a new key would
    orphan every value sealed to the old one."""
    private, public = folder / "reveal.key", folder / "reveal.pub"
    for p in (private, public):
        if p.exists():
            raise SealingError(f"{p} exists: a new key would orphan every value sealed to the old one; move it "
                               "away first")
    key, pub = new_keypair()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    public.write_text(pub + "\n")
    return private, public


def _key(text: str, what: str, cls):
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return cls(raw)
    except Exception:  # noqa: BLE001 - binascii and nacl raise several kinds; all mean "not a key"
        raise SealingError(f"{what} is not a base64 Curve25519 key of 32 bytes (make one with "
                           "`monitor console reveal-key`)") from None


def read_key_file(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise SealingError(f"{p}: no such key file")
    return p.read_text().strip()


@dataclass(frozen=True)
class Sealed:
    position: int  # the token that carries the replacement
    box: str  # base64 sealed box of the original text of the redacted tokens


class Sealer:
    def __init__(self, public_key_b64: str, what: str = "evidence.reveal_public_key_file") -> None:
        public = _nacl()
        self._box = public.SealedBox(_key(public_key_b64, what, public.PublicKey))

    def seal(self, texts: list[str], out: list[str], hit: list[bool], positions: list[int]) -> list[Sealed]:
        """One sealed box per redacted run: its first token holds the replacement, the rest are empty."""
        sealed, j, n = [], 0, len(out)
        while j < n:
            if hit[j] and out[j]:
                k = j + 1
                while k < n and hit[k] and not out[k]:
                    k += 1
                original = "".join(texts[j:k]).encode()
                sealed.append(Sealed(int(positions[j]), base64.b64encode(self._box.encrypt(original)).decode()))
                j = k
            else:
                j += 1
        return sealed


class Opener:
    def __init__(self, private_key_b64: str, what: str = "console.reveal_key_file") -> None:
        public = _nacl()
        self._box = public.SealedBox(_key(private_key_b64, what, public.PrivateKey))

    def open(self, box_b64: str) -> str:
        try:
            return self._box.decrypt(base64.b64decode(box_b64)).decode()
        except Exception:  # noqa: BLE001
            raise SealingError("a sealed value does not open with this console's key (sealed to another key, "
                               "or damaged)") from None
