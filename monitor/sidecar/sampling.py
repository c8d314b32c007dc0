"""Which requests the sidecar scores (`sampling`): a fraction chosen by request id, plus pinned requests.

The choice is made once, at a request's first rows, and holds for its whole life: a request is
scored whole or not at all. It depends only on the request id (a hash), so it is the same on every
sidecar and every restart, and all samples of one request go together.
"""

from __future__ import annotations

import hashlib

from monitor.config.models import Sampling
from monitor.transport.pinned import PinnedReader


def chosen(request_id: str, fraction: float) -> bool:
    """Deterministic: the request id's hash, read as a number in [0, 1), is below `fraction`."""
    if fraction >= 1.0:
        return True
    h = int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "big")
    return h < fraction * 2**64


class Sampler:
    def __init__(self, cfg: Sampling, pinned: PinnedReader) -> None:
        self.fraction = cfg.fraction
        self.pinned = pinned if cfg.always else None

    def admit(self, request_id: str) -> bool:
        if chosen(request_id, self.fraction):
            return True
        return self.pinned is not None and request_id in self.pinned
