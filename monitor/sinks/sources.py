"""What sinks read from the loop that feeds them: plain snapshots, taken by the loop under its lock.

Sinks never hold the loop itself: the sidecar hands the metrics sink a callable returning a
`LoopSnapshot`, so a scrape sees one consistent view and nothing the loop mutates, and one returning
`LoopHealth`, read without the loop's lock so that a wedged loop is reported, not waited for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import time

from monitor.detectors.runtime import DetectorSet
from monitor.detectors.trace import TraceBudget
from monitor.transport.ring import RingTotals


@dataclass
class LoopStats:
    """Counters the scoring loop keeps (it owns and mutates them; sinks get copies)."""

    slots: int = 0
    tokens_scored: int = 0
    requests_seen: int = 0
    requests_finished: int = 0
    requests_expired: int = 0
    duplicate_rows: int = 0
    late_rows: int = 0  # rows of a request that had already ended (a late or second copy): ignored
    nonfinite_rows: int = 0  # rows with a NaN or infinite score: left out of every detector, one by one
    requests_sampled_out: int = 0  # not scored: left out by `sampling`
    requests_over_limit: int = 0  # not scored: `sampling.max_requests` were tracked already
    requests_no_rows: int = 0  # not scored: its end arrived, none of its rows (dropped, or before we attached)
    uncovered_positions: int = 0
    incidents: int = 0  # fired requests that finished and became an incident
    slots_skipped: dict[str, int] = field(default_factory=dict)  # slots not scored, by reason
    reloads_ok: int = 0
    reloads_failed: int = 0
    last_reload_ok: bool = True  # False while a rejected edit waits to be fixed (the old config runs)
    config_loaded_at: float = field(default_factory=time.time)
    restart_required: list[str] = field(default_factory=list)  # config sections edited that apply only at a restart


@dataclass(frozen=True)
class LoopHealth:
    heartbeat_age_s: float  # seconds since the loop last iterated
    detectors: int  # detectors in force


@dataclass(frozen=True)
class LoopSnapshot:
    stats: LoopStats  # a copy
    requests_in_flight: int
    rings: RingTotals  # attached rings plus those already detached: totals never go back
    rings_attached: int
    ring_lag_slots: int
    ring_capacity_slots: int
    heartbeat_age_s: float  # seconds since the loop last iterated
    detectors: DetectorSet  # the set in force (replaced whole on reload, never mutated)
    trace: TraceBudget | None = None  # a copy: tokens traced now, and tokens not kept (per cap); None when off
    taps_off: int = 0  # vLLM producers that could not make their ring (the tap is off there)
