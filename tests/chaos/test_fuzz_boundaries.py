"""Property-based fuzzing of every boundary a value crosses into the monitor (Hypothesis, bounded examples).

Each property says what must hold whatever arrives: no crash, no stall, what is refused is counted or
named, and nothing else is lost. The rules are listed in docs/reliability.md ("Boundaries").
"""

from __future__ import annotations

import json
import math
import struct
import time
import uuid
from dataclasses import dataclass

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.config import ConfigError
from monitor.config.load import load_detectors
from monitor.sinks import strict_json
from monitor.store.db import Store
from monitor.store.ingest import Ingester
from monitor.transport.meta import MetaError, Segment, SlotMeta
from monitor.transport.ring import HEADER_BYTES, SLOT_HEADER
from sidecar_helpers import D, publish_request
from test_ring_faults import ring, sidecar_for

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
ids = st.text(st.characters(codec=None), max_size=40)  # any code point, lone surrogates and NUL included
ints = st.integers(min_value=-(2**40), max_value=2**40)
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), ints, st.none())


# ---- slot metadata and ring slots ----------------------------------------------------------------

@FUZZ
@given(st.binary(max_size=600))
def test_any_metadata_bytes_are_read_or_refused_with_a_meta_error(raw):
    try:
        meta = SlotMeta.from_bytes(raw)
    except MetaError:
        return
    meta.check_rows(8) if meta.n_segments else None  # a MetaError is an allowed answer here too


@FUZZ
@given(st.lists(st.tuples(ids, ids, ids, st.integers(0, 9), st.integers(0, 10**6), st.integers(0, 512),
                          st.integers(0, 10**6), st.integers(0, 512)), max_size=12),
       st.lists(ids, max_size=5), st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)))
def test_metadata_round_trips_whatever_the_ids_hold(segs, finished, t):
    meta = SlotMeta([Segment(*s) for s in segs], finished, t)
    back = SlotMeta.from_bytes(meta.to_bytes())
    assert back == meta


@FUZZ
@given(st.lists(st.tuples(st.integers(-3, 20), st.integers(-3, 20), st.integers(-5, 40)), min_size=1, max_size=4),
       st.integers(0, 8), st.binary(max_size=64), st.booleans())
def test_a_lying_or_garbled_slot_affects_nothing_else(tmp_path_factory, lies, n_rows, garbage, garble):
    """Slots whose segments claim any rows, positions and counts, or whose metadata is garbage: the loop
    never raises, each bad slot is counted, and a well-formed request after them fires and ends."""
    tmp = tmp_path_factory.mktemp("fuzz-ring")
    sidecar, verdicts = sidecar_for(tmp)
    w = ring(tmp)
    sidecar.discover()
    for k, (row, n, start) in enumerate(lies):
        internal = f"chatcmpl-lie{k}-1234abcd"
        meta = SlotMeta((Segment(internal, f"chatcmpl-lie{k}", f"lie{k}", 0, start, n, 2, row),), (internal,),
                        time.time())
        w.publish(k, meta, [torch.full((n_rows, D), 9.0)] if n_rows else None)
    if garble:  # the last lying slot's metadata overwritten with garbage after it was published
        off = HEADER_BYTES + ((w.write_seq - 1) % w.spec.slots) * w.spec.slot_bytes
        b = w._m.mm
        b[off + SLOT_HEADER : off + SLOT_HEADER + len(garbage)] = garbage
        struct.pack_into("<I", b, off + 12, len(garbage))
    publish_request(w, [0.0, 9.0], req="after")
    for _ in range(4):
        sidecar.poll_once()
    snap = sidecar.snapshot()
    assert ("after", True) in verdicts
    assert snap.requests_in_flight == 0 and snap.stats.slots_skipped.get("error", 0) == 0
    assert snap.stats.duplicate_rows >= 0 and snap.stats.uncovered_positions >= 0
    sidecar.close()
    w.close()


# ---- events into the ingester -------------------------------------------------------------------

@dataclass(frozen=True)
class _TP:
    topic: str
    partition: int = 0


@dataclass(frozen=True)
class _Record:
    offset: int
    value: bytes


def _alert(**data) -> dict:
    d = dict(alert_id=str(uuid.uuid4()), revision=0, request_id="r", response_id="chatcmpl-r", sample=0, model="m",
             deployment="d", detector="pii-probe", concept="pii", severity="critical", score=0.9, threshold=0.5,
             aggregation={"kind": "max"}, scope="all", action="none", fired_at_position=3, forward_pass_time=None,
             final=False, labels={}, tokens=[], console_url=None, namespace=None, pod=None)
    d.update(data)
    return {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/misalignment-monitor/d/local",
            "type": "io.misalignment-monitor.alert.v1", "time": "2026-12-04T12:00:00Z", "subject": "r",
            "datacontenttype": "application/json", "data": d}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def ingester(request, tmp_path_factory):
    from monitor.config.models import MonitorConfig

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('fuzz-store')}/s.sqlite"
    else:
        url = request.getfixturevalue("postgres").create_database(f"f_{uuid.uuid4().hex[:12]}")
    ing = Ingester(MonitorConfig.model_validate({"store": {"max_event_bytes": 200_000}}), Store(url))
    yield ing
    ing.store.close()


@FUZZ
@given(st.lists(st.one_of(
    st.builds(lambda rid, det, score, model: _alert(request_id=rid, detector=det, score=score, model=model),
              st.one_of(ids, st.text(min_size=500, max_size=700)), ids, numbers, ids),
    st.binary(max_size=200).map(lambda b: {"raw": b})), min_size=1, max_size=6))
def test_any_event_is_stored_or_dead_lettered_and_the_batch_goes_on(ingester, events):
    """Whatever a batch holds, the ingester neither raises nor stalls: every record is stored, a
    duplicate, or a dead letter with its reason, on SQLite and PostgreSQL alike."""
    records = []
    for k, e in enumerate(events):
        raw = e["raw"] if "raw" in e else json.dumps(e).encode("utf-8", "surrogatepass")
        records.append(_Record(k, raw))
    before = (ingester.stats.stored, ingester.stats.duplicates, ingester.stats.dead_letters)
    ingester._store({_TP("misalignment-monitor.alerts", int(time.time_ns() % 10**6)): records})
    after = (ingester.stats.stored, ingester.stats.duplicates, ingester.stats.dead_letters)
    assert sum(after) - sum(before) == len(records)


# ---- console query strings ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def console(tmp_path_factory):
    from test_console import Site

    tmp = tmp_path_factory.mktemp("fuzz-console")
    site = Site(tmp, f"sqlite:///{tmp}/c.sqlite", [])
    yield site.client(site.viewer)
    site.store.close()


@FUZZ
@given(st.dictionaries(st.sampled_from(["since", "until", "from", "to", "detector", "severity", "status",
                                        "verdict", "cursor", "limit", "model"]),
                       st.one_of(st.text(max_size=60), st.integers().map(str), st.sampled_from(
                           ["9" * 30, "99999999999d", "0001-01-01T00:00:00+23:59", "now-999999w"])), max_size=4))
def test_no_query_string_is_a_500(console, params):
    for path in ("/api/incidents", "/incidents"):
        r = console.get(path, params=params)
        assert r.status_code in (200, 400, 422), (path, params, r.status_code, r.text[:300])


# ---- detector packs -----------------------------------------------------------------------------

leaf = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=12))
value = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)
pack = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.just("d"), st.text(max_size=10)), "concept": st.text(max_size=8),
    "inputs": st.one_of(st.just([{"probe": "p"}]), value), "aggregation": st.one_of(st.just({"kind": "max"}), value),
    "threshold": numbers, "severity": st.one_of(st.just("critical"), value), "scope": value, "extra": value})


def written(tmp_path_factory, name: str, doc):
    """`doc` as YAML in a fresh folder of its own."""
    path = tmp_path_factory.mktemp("fuzz-yaml") / name
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return path


@FUZZ
@given(pack)
def test_any_detector_pack_is_loaded_or_refused_naming_the_file(tmp_path_factory, doc):
    path = written(tmp_path_factory, "d.yaml", doc)
    try:
        detectors, issues = load_detectors([path.parent])
    except ConfigError as e:  # allowed: it names the file
        issues, detectors = e.issues, []
    assert bool(detectors) != bool(issues)
    for issue in issues:
        assert str(path) in str(issue)
    for d in detectors:
        assert math.isfinite(d.spec.threshold)


config_doc = st.fixed_dictionaries({"model": st.just({"name": "m", "num_layers": 4, "d_model": 8})}, optional={
    "taps": st.one_of(st.just([{"layer": 1}]), value), "scoring": value, "sampling": value, "transport": value,
    "incidents": value, "sinks": value, "store": value, "console": value, "extra": value})


@FUZZ
@given(config_doc)
def test_any_config_is_loaded_or_refused_naming_the_file(tmp_path_factory, doc):
    from monitor.config import load_config

    try:
        load_config(written(tmp_path_factory, "monitor.yaml", doc))
    except ConfigError as e:
        assert e.issues and all(i.file and i.message for i in e.issues)  # each names a file and says what


# ---- what leaves the sidecar --------------------------------------------------------------------

@FUZZ
@given(value)
def test_whatever_an_event_holds_it_is_strict_json(doc):
    text = strict_json.dumps({"data": doc})
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text}"))
    text.encode("utf-8")

