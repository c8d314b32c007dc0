"""Adding a token to the tokens file (`monitor console token`): the token is printed once, only its hash is kept."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import yaml
from pydantic import ValidationError

from monitor.console.auth import TokensFile, new_token


def add_token(path: Path, name: str, role: str, text: bool, expires: datetime | None) -> str:
    path = Path(path)
    current = TokensFile()
    if path.exists():
        try:
            current = TokensFile.model_validate(yaml.safe_load(path.read_text()) or {})
        except (yaml.YAMLError, ValidationError) as e:
            raise ValueError(f"{path}: not a tokens file ({e})") from e
    token, entry = new_token(name, role, text, expires)  # type: ignore[arg-type]
    current.tokens.append(entry)
    body = yaml.safe_dump(current.model_dump(mode="json", exclude_none=True), sort_keys=False)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # hashes only, but nobody else's business
    with os.fdopen(fd, "w") as f:
        f.write("# misalignment-monitor console tokens: argon2id hashes, never the tokens themselves.\n" + body)
    os.replace(tmp, path)
    return token
