"""JSON that every strict parser takes (RFC 8259): what leaves the sidecar is written with this.

Python's `json.dumps` writes `NaN` and `Infinity` for non-finite floats, and `\\ud800`-style escapes
for lone surrogates: PostgreSQL's JSON types, Go's and Java's parsers and JavaScript's `JSON.parse`
with a schema refuse one or the other. Here a non-finite number becomes `null` (the schemas allow
null where a score may be missing) and a lone surrogate becomes U+FFFD, so one bad value changes
one field, never whether the whole event can be read.
"""

from __future__ import annotations

import json
import math
import re

_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def clean(obj):
    """`obj` with non-finite floats as None and lone surrogates as U+FFFD (containers copied only when needed)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, str):
        return _LONE_SURROGATE.sub("\ufffd", obj) if _has_surrogate(obj) else obj
    if isinstance(obj, dict):
        return {clean(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def dumps(obj, **kwargs) -> str:
    """`json.dumps` that never writes NaN, Infinity or a lone surrogate (compact by default)."""
    kwargs.setdefault("separators", (",", ":"))
    return json.dumps(clean(obj), allow_nan=False, **kwargs)
