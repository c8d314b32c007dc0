"""Incidents from the sidecar on a real ring with known rows (no vLLM): the trace, its caps, feature
context from the full SAE encode, the incident event (schema, text policy, redaction, size cap)."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch
import yaml
from sae_lens import SAE

from monitor.config import ConfigError, load_config
from monitor.config.models import Redaction
from monitor.sidecar.loop import Sidecar
from monitor.sinks.incidents import IncidentBuilder, incident_schema, redact
from monitor.transport.meta import Segment, SlotMeta
from monitor.transport.ring import RingSpec, RingWriter
from sidecar_helpers import D, tiny_monitor

IDS = [48213, 48214, 48215, 48216, 48217, 48218, 48219, 48220]  # distinctive: searchable in any output


def sidecar(tmp_path, **incidents) -> tuple[Sidecar, RingWriter]:
    cfg = tiny_monitor(tmp_path, sinks={})
    doc = yaml.safe_load(cfg.read_text())
    doc["incidents"] = incidents
    cfg.write_text(yaml.safe_dump(doc))
    side = Sidecar(load_config(cfg), device="cpu")
    ring = RingWriter(tmp_path / "rings/k-x.ring", RingSpec(slots=16, slot_rows=8, d_model=D, layers=(2,),
                                                           dtype=torch.float32))
    side.discover()
    return side, ring


def rows_for(x0: list[float]) -> torch.Tensor:
    """Feature 3 of the tiny SAE is relu(x[0]); other dimensions carry a pattern the full encode sees."""
    torch.manual_seed(0)
    x = torch.randn(len(x0), D) * 0.1
    x[:, 0] = torch.tensor(x0)
    return x


def send(ring, req: str, chunks: list[list[float]], n_prompt: int, ids: list[int] | None = IDS,
         finish: bool = True) -> torch.Tensor:
    """One request, one slot per chunk (a prefill and decode steps), rows starting at position 0."""
    internal = f"chatcmpl-{req}-12345678"
    x = rows_for([v for c in chunks for v in c])
    start = 0
    for k, chunk in enumerate(chunks):
        n = len(chunk)
        seg = Segment(internal, f"chatcmpl-{req}", req, 0, start, n, n_prompt, 0)
        last = finish and k == len(chunks) - 1
        ring.publish(k, SlotMeta((seg,), (internal,) if last else (), 100.0 + k), [x[start:start + n]],
                     None if ids is None else np.array(ids[start:start + n], dtype=np.int32))
        start += n
    return x


def test_fired_request_becomes_an_incident_with_its_trace_and_context(tmp_path):
    side, ring = sidecar(tmp_path, context_window=1, top_features=3)
    got = []
    side.bus.on_incident(got.append)
    x = send(ring, "fire", [[0.0, 1.0, 2.0, 7.0], [3.0], [0.5]], n_prompt=4)
    side.poll_once()
    (inc,) = got
    t = inc.trace
    assert t.positions.tolist() == [0, 1, 2, 3, 4, 5] and t.token_ids.tolist() == IDS[:6]
    # every watched input, per token, as scored: feature 3 = relu(x0)
    assert np.allclose(t.inputs["s/3"], [0, 1, 2, 7, 3, 0.5])
    # the running max from position 1 (row 0 is never in scope), over chunks
    pos, run = t.running["feat"]
    assert pos.tolist() == [1, 2, 3, 4, 5] and np.allclose(run, [1, 2, 7, 7, 7])
    (v,) = inc.verdicts
    assert v.fired and v.fired_at == 3 and inc.n_prompt == 4 and inc.end_time == 102.0
    # context: the evidence tokens (top 5 by score) and one token either side, from the full encode
    evidence = {e.position for e in v.evidence}
    want = {p + d for p in evidence for d in (-1, 0, 1)} & set(range(6))
    assert {c.position for c in inc.context} == want
    sae = SAE.load_from_disk(tmp_path / "sae")
    for c in inc.context:
        acts = sae.encode(x[c.position : c.position + 1])[0]
        top = acts.topk(3)
        assert [f for f, _ in c.features] == [i for i, a in zip(top.indices.tolist(), top.values.tolist()) if a > 0]
        assert np.allclose([a for _, a in c.features], [a for a in top.values.tolist() if a > 0], atol=1e-5)
    assert side.budget.used == 0  # released once the incident is made


def test_benign_request_leaves_nothing(tmp_path):
    side, ring = sidecar(tmp_path)
    got = []
    side.bus.on_incident(got.append)
    send(ring, "calm", [[0.0, 1.0, 2.0], [1.0]], n_prompt=3, finish=False)
    side.poll_once()
    assert side.budget.used == 4 and side.traces.kept[side.requests["chatcmpl-calm-12345678"].slot] == 4
    ring.publish(9, SlotMeta((), ("chatcmpl-calm-12345678",)), None)
    side.poll_once()
    assert got == [] and side.budget.used == 0 and side.stats.incidents == 0


def test_trace_caps_are_counted(tmp_path):
    side, ring = sidecar(tmp_path, max_trace_tokens=3, max_trace_tokens_total=5)
    got = []
    side.bus.on_incident(got.append)
    send(ring, "a", [[0.0, 6.0, 1.0, 1.0]], n_prompt=2, finish=False)  # 3 kept, 1 over the request cap
    send(ring, "b", [[0.0, 1.0, 1.0]], n_prompt=2, finish=False)  # 2 kept, 1 over the total cap
    side.poll_once()
    snap = side.snapshot().trace
    assert (snap.used, snap.capped_request, snap.capped_total) == (5, 1, 1)
    ring.publish(9, SlotMeta((), ("chatcmpl-a-12345678",)), None)
    side.poll_once()
    (inc,) = got
    assert inc.trace.positions.tolist() == [0, 1, 2] and inc.untraced_tokens == 1
    assert inc.trace.running["feat"][0].tolist() == [1, 2]  # running scores only where the trace has tokens
    assert side.budget.used == 2


def test_incident_event_validates_and_text_none_sends_no_ids(tmp_path):
    side, ring = sidecar(tmp_path)
    got = []
    side.bus.on_incident(got.append)
    send(ring, "fire", [[0.0, 1.0, 9.0, 2.0]], n_prompt=3)
    side.poll_once()
    event = IncidentBuilder(model="tiny", deployment="unit").build(got[0])
    jsonschema.validate(event, incident_schema())
    d = event["data"]
    assert event["type"] == "io.misalignment-monitor.incident.v1" and event["subject"] == "fire"
    assert d["alert_ids"] == [d["detectors"][0]["alert_id"]] and d["prompt_tokens"] == 3
    assert d["trace"]["token_ids"] is None and d["trace"]["text"] is None and d["text_policy"] == "none"
    assert d["detectors"][0]["definition"]["aggregation"] == {"kind": "max"}
    assert d["trace"]["running"]["feat"]["scores"] == [1.0, 9.0, 9.0]
    text = json.dumps(event)
    assert not any(str(i) in text for i in IDS)  # no token id of the request, anywhere in the event


class CharTokenizer:
    """Each id is a character (id - 48200 + ord('a')): enough to see redaction work token by token."""

    def decode(self, ids):
        return "".join(chr(i - 48213 + ord("a")) for i in ids)


def test_redaction_applies_before_text_leaves():
    texts = ["My", " SSN", " is", " 512", "-44", "-8810", "."]
    out, hit, names = redact(texts, [Redaction(name="ssn", pattern=r"\d{3}-\d{2}-\d{4}", replacement="[SSN]")])
    assert out == ["My", " SSN", " is", "[SSN]", "", "", "."] and names == ["ssn"]
    assert hit == [False, False, False, True, True, True, False]  # a redacted token's id is withheld too
    assert redact(texts, [Redaction(name="none", pattern="zzz")]) == (texts, [False] * 7, [])


def test_flagged_text_with_redaction_and_size_cap(tmp_path):
    side, ring = sidecar(tmp_path)
    got = []
    side.bus.on_incident(got.append)
    send(ring, "fire", [[0.0, 1.0, 9.0, 2.0, 0.0, 0.0, 0.0, 0.0]], n_prompt=3)
    side.poll_once()
    b = IncidentBuilder(model="tiny", deployment="unit", text="flagged", tokenizer=CharTokenizer(),
                        redaction=[Redaction(name="cd", pattern="cd", replacement="#")])
    d = b.build(got[0])["data"]
    assert d["trace"]["text"] == ["a", "b", "#", "", "e", "f", "g", "h"] and d["redacted_by"] == ["cd"]
    assert d["trace"]["token_ids"] == [IDS[0], IDS[1], None, None, *IDS[4:8]]
    full = len(json.dumps(IncidentBuilder(model="tiny", deployment="unit").build(got[0]), separators=(",", ":")))
    small = IncidentBuilder(model="tiny", deployment="unit", max_bytes=full - 200)
    trimmed = small.build(got[0])
    jsonschema.validate(trimmed, incident_schema())
    t = trimmed["data"]["trace"]
    assert t["trimmed"]["dropped_tokens"] > 0 and t["trimmed"]["kept_tokens"] == len(t["positions"])
    assert {e["position"] for e in trimmed["data"]["detectors"][0]["evidence"]} <= set(t["positions"])


def test_flagged_needs_a_tokenizer_and_bad_rules_are_named(tmp_path):
    cfg = tiny_monitor(tmp_path, sinks={})
    doc = yaml.safe_load(cfg.read_text())
    doc["evidence"] = {"text": "flagged", "redact": [{"name": "bad", "pattern": "(unclosed"}]}
    cfg.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    msg = str(e.value)
    assert "evidence.redact[0].pattern: not a valid regular expression" in msg
    doc["evidence"] = {"text": "flagged"}
    cfg.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="evidence.tokenizer: `text: flagged` needs a tokenizer"):
        load_config(cfg)


def test_trace_leaves_out_a_head_whose_columns_changed_mid_request():
    """A reload that changes an SAE's watched features mid-request: that head's rows no longer line up,
    so the incident leaves it out instead of failing (the other heads stay); a request that starts
    after the change has it."""
    from monitor.detectors.trace import TraceBudget, TraceStore

    store = TraceStore(TraceBudget(per_request=100, total=100), window=0, capacity=2)
    one, two = np.array([0]), np.array([1])
    store.open(one)
    store.add(one, np.array([0]), np.array([2]), np.array([0, 1]), None,
              {"sae:s": np.ones((2, 2)), "probe:p": np.zeros((2, 1))})
    store.add(one, np.array([0]), np.array([1]), np.array([2]), None,
              {"sae:s": np.ones((1, 3)), "probe:p": np.zeros((1, 1))})
    store.open(two)
    store.add(two, np.array([0]), np.array([1]), np.array([0]), None,
              {"sae:s": np.full((1, 3), 2.0), "probe:p": np.ones((1, 1))})
    columns = {"sae:s": ("s/1", "s/2", "s/3"), "probe:p": ("p/score",)}
    arrays = store.arrays(0, columns)
    assert set(arrays.inputs) == {"p/score"} and arrays.inputs["p/score"].tolist() == [0, 0, 0]
    later = store.arrays(1, columns)
    assert later.inputs["s/3"].tolist() == [2.0] and later.positions.tolist() == [0]


def test_context_rows_are_capped_and_fired_requests_keep_theirs():
    """`incidents.max_context_rows`: when full, the request held longest that has not fired gives its rows
    back; a fired request's rows are never taken; what finds no room is counted."""
    from monitor.detectors.trace import TraceBudget, TraceStore

    budget = TraceBudget(per_request=100, total=100)
    store = TraceStore(budget, window=0, capacity=4, max_context_rows=4)
    fired = {2}
    rows = {2: torch.arange(12, dtype=torch.float32).reshape(6, 2)}
    positions = np.arange(6)
    for slot in (0, 1, 2):
        store.open(np.array([slot]))

    def keep(slot, evidence):
        store.keep_rows(np.array([slot]), np.array([0]), np.array([6]), positions, rows, {slot},
                        lambda s: evidence, lambda s: s in fired)

    keep(0, {0, 1})
    keep(1, {2, 3})
    assert budget.context_rows == 4
    keep(2, {4, 5})  # full: request 0 (held longest, not fired) makes room
    assert set(store.rows) == {1, 2} and budget.context_evicted == 2 and budget.context_rows == 4
    assert store.rows[2][4][2].tolist() == [8.0, 9.0]
    fired.add(1)
    store.open(np.array([3]))
    keep(3, {0})  # every holder has fired: nothing to take, the row is counted
    assert 3 not in store.rows or not store.rows[3]
    assert budget.context_dropped == 1 and budget.context_rows == 4
    store.release(np.array([1, 2]))
    assert budget.context_rows == 0


def test_each_request_remembers_its_own_last_rows_across_polls():
    """The rows kept for an evidence token's earlier neighbours: after polls of long (prefill) and short
    (decode) segments, out of row order, each request's recent columns point at its own last `window`
    rows, with their values (a row's value here is 1000 x request + position)."""
    from monitor.detectors.trace import TraceBudget, TraceStore

    w = 3
    store = TraceStore(TraceBudget(per_request=100, total=1000), window=w, capacity=4)
    slots = np.array([0, 1, 2])
    store.open(slots)
    next_pos = {0: 0, 1: 0, 2: 0}

    def poll(counts, order):
        counts = np.array(counts)
        first = np.empty(len(order), dtype=np.int64)  # request order[i]'s rows sit at `first` in the slot
        at = 0
        for s in order:
            first[s] = at
            at += counts[s]
        positions = np.empty(at, dtype=np.int64)
        values = torch.empty(at, 2)
        for s in order:
            p = np.arange(next_pos[s], next_pos[s] + counts[s])
            positions[first[s]:first[s] + counts[s]] = p
            values[first[s]:first[s] + counts[s], 0] = torch.from_numpy(1000 * s + p).float()
            next_pos[s] += int(counts[s])
        store.keep_rows(slots, first, counts, positions, {7: values}, set(), lambda s: set())

    def check():
        for s in (0, 1, 2):
            want = list(range(max(0, next_pos[s] - w), next_pos[s]))
            got = []
            for col in range(w):
                row = store._recent_row(s, col)
                if row is not None:
                    got.append(int(row[7][0]) - 1000 * s)
            assert got == want[-len(got):] and len(got) == min(w, next_pos[s]), (s, got, want)

    poll([5, 9, 4], [2, 0, 1])  # prefill-shaped: every request brings >= window rows
    check()
    poll([1, 1, 1], [0, 1, 2])  # decode: one each; the older two columns come from the last poll
    check()
    poll([2, 1, 7], [1, 2, 0])
    check()
