"""Who is asking: tokens (bearer or login form), signed sessions, a trusted proxy's header; CSRF; login limits.

Tokens: `mmc_<id>_<secret>`, stored in the tokens file as an argon2id hash of the whole token beside its
public id, role (viewer < triager < admin) and whether it may see conversation text. The id finds
the one entry to verify, so a request costs one argon2 check, and a verified token is remembered (by
its SHA-256) for a minute so an API client does not pay it on every call. Removing an entry (or its
expiry passing) ends its sessions at the next request.

Sessions: an itsdangerous-signed cookie naming the identity and its expiry, HttpOnly, SameSite=Lax
(Strict would drop the cookie when the on-call engineer follows the page's link from PagerDuty or
chat, and show a login form instead of the incident), Secure when the console's URL is https.

CSRF: a double-submit token (a random cookie echoed in every form), checked on every POST authenticated
by a cookie or the proxy's header; bearer-token calls carry no ambient credential, so need none.
Hand-written (a dozen lines with `secrets.compare_digest`) rather than starlette-csrf, which is not in
our dependency set and would also have to learn which routes take bearer tokens.

Login limit: failed logins per client address in a sliding minute. Hand-written because slowapi
limits all requests to a route, and a limit that also counts successes would lock out a team that
shares an office NAT.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from monitor.config.models import Console, ProxyAuth, Role

ROLE_RANK = {"viewer": 0, "triager": 1, "admin": 2}
SESSION_COOKIE = "mm_session"
CSRF_COOKIE = "mm_csrf"
TOKEN_PREFIX = "mmc_"


class AuthError(Exception):
    """Authentication failed; the message is safe to show (it never echoes a secret)."""


class TokenEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[a-z0-9]{8,32}$")
    name: str = Field(min_length=1, max_length=256, description="Who holds it: recorded in triage and the audit log.")
    hash: str = Field(pattern=r"^\$argon2id\$", description="argon2id hash of the whole token.")
    role: Role
    text: bool = Field(False, description="May see conversation text.")
    expires: datetime | None = None


class TokensFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[TokenEntry] = Field(default_factory=list)


@dataclass(frozen=True)
class Identity:
    name: str
    role: Role
    text: bool
    via: Literal["token", "session", "proxy"]
    token_id: str | None = None

    def at_least(self, role: Role) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


def new_token(name: str, role: Role, text: bool, expires: datetime | None) -> tuple[str, TokenEntry]:
    """A fresh token and the entry to add to the tokens file (the token itself is shown once, never stored)."""
    from argon2 import PasswordHasher

    tid = secrets.token_hex(6)
    token = f"{TOKEN_PREFIX}{tid}_{secrets.token_urlsafe(24)}"
    return token, TokenEntry(id=tid, name=name, hash=PasswordHasher().hash(token), role=role, text=text, expires=expires)


class TokenStore:
    """The tokens file, reloaded when it changes."""

    def __init__(self, path: Path | None) -> None:
        from argon2 import PasswordHasher

        self.path = path
        self._hasher = PasswordHasher()
        self._mtime: float | None = None
        self._by_id: dict[str, TokenEntry] = {}
        self._verified: dict[str, tuple[str, float]] = {}  # sha256(token) -> (id, when)
        self._lock = threading.Lock()
        self.reload()

    def reload(self) -> None:
        if self.path is None:
            return
        try:
            mtime = self.path.stat().st_mtime
        except OSError as e:
            raise AuthError(f"console.tokens_file: cannot read {self.path} ({e.strerror})") from e
        if mtime == self._mtime:
            return
        try:
            parsed = TokensFile.model_validate(yaml.safe_load(self.path.read_text()) or {})
        except (yaml.YAMLError, ValidationError) as e:
            raise AuthError(f"console.tokens_file {self.path}: {e}") from e
        with self._lock:
            self._by_id = {t.id: t for t in parsed.tokens}
            self._verified.clear()
            self._mtime = mtime

    def entry(self, token_id: str) -> TokenEntry | None:
        """The entry if it still exists and has not expired (sessions call this on every request)."""
        self.reload()
        e = self._by_id.get(token_id)
        if e is None or (e.expires is not None and e.expires <= datetime.now(timezone.utc)):
            return None
        return e

    def verify(self, token: str) -> TokenEntry:
        from argon2.exceptions import VerificationError, InvalidHashError

        if not token.startswith(TOKEN_PREFIX) or token.count("_") < 2:
            raise AuthError("not a console token")
        tid = token[len(TOKEN_PREFIX):].split("_", 1)[0]
        entry = self.entry(tid)
        if entry is None:
            raise AuthError("unknown or expired token")
        digest = hashlib.sha256(token.encode()).hexdigest()
        with self._lock:
            hit = self._verified.get(digest)
        if hit and hit[0] == tid and time.monotonic() - hit[1] < 60:
            return entry
        try:
            self._hasher.verify(entry.hash, token)
        except (VerificationError, InvalidHashError):
            raise AuthError("unknown or expired token") from None
        with self._lock:
            if len(self._verified) > 10_000:
                self._verified.clear()
            self._verified[digest] = (tid, time.monotonic())
        return entry


def session_secret(cfg: Console) -> bytes:
    if cfg.session_secret_file:
        try:
            return Path(cfg.session_secret_file).expanduser().read_bytes().strip()
        except OSError as e:
            raise AuthError(f"console.session_secret_file: cannot read {cfg.session_secret_file} ({e.strerror})") from e
    if os.environ.get(cfg.session_secret_env):
        return os.environ[cfg.session_secret_env].encode()
    return secrets.token_bytes(32)


class Sessions:
    def __init__(self, secret: bytes, hours: float) -> None:
        from itsdangerous import URLSafeTimedSerializer

        self._s = URLSafeTimedSerializer(secret, salt="misalignment-monitor-console-session")
        self.max_age = int(hours * 3600)

    def issue(self, who: Identity) -> str:
        """A session for a token's holder: it names the token, whose entry decides role and permission."""
        return self._s.dumps({"tid": who.token_id})

    def read(self, cookie: str) -> dict | None:
        from itsdangerous import BadSignature

        try:
            return self._s.loads(cookie, max_age=self.max_age)
        except BadSignature:  # also SignatureExpired
            return None


def proxy_identity(cfg: ProxyAuth, client: str | None, headers) -> Identity | None:
    """The user the trusted proxy names; None when there is no header; AuthError when it is not to be trusted."""
    user = headers.get(cfg.user_header)
    if user is None or not cfg.enabled:
        return None
    try:
        addr = ipaddress.ip_address(client or "")
    except ValueError:
        addr = None
    if addr is None or not any(addr in ipaddress.ip_network(n, strict=False) for n in cfg.trusted_proxies):
        raise AuthError(f"{cfg.user_header} is accepted only from the configured proxy, not from {client}")
    groups = {g.strip() for g in headers.get(cfg.groups_header, "").split(",") if g.strip()}
    roles = [cfg.roles[g] for g in groups if g in cfg.roles]
    if roles:
        role = max(roles, key=ROLE_RANK.get)
    elif cfg.default_role == "viewer":
        role = "viewer"
    else:
        raise AuthError(f"{user} is in no group that has a console role")
    return Identity(name=user.strip()[:256], role=role, text=bool(groups & set(cfg.text_groups)), via="proxy")


class LoginLimiter:
    """At most `per_minute` failed logins per client address in any sliding minute."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._fails: dict[str, deque] = {}
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> int:
        """Seconds until this client may try again (0: now)."""
        now = time.monotonic()
        with self._lock:
            q = self._fails.get(client)
            while q and now - q[0] > 60:
                q.popleft()
            if not q or len(q) < self.per_minute:
                return 0
            return int(60 - (now - q[0])) + 1

    def failed(self, client: str) -> None:
        with self._lock:
            if len(self._fails) > 100_000:  # a scan from many addresses must not grow this without bound
                self._fails.clear()
            self._fails.setdefault(client, deque()).append(time.monotonic())


def csrf_ok(cookie: str | None, submitted: str | None) -> bool:
    return bool(cookie) and bool(submitted) and secrets.compare_digest(cookie, submitted)


def new_csrf() -> str:
    return secrets.token_urlsafe(24)
