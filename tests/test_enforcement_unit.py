"""The middleware acting on the sidecar's verdicts, against a stand-in for vLLM's engine and serving.

The real thing (vLLM on CPU, the real model and sidecar) is in test_enforcement.py; here each path of
the middleware is driven on its own, quickly: abort (streamed and not), annotate, late verdicts,
fail-open, fail-closed, other API servers' requests, a flooded or dead socket.
"""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest
import yaml

from monitor.plugin.middleware import MonitorMiddleware
from monitor.transport.control import (ControlReceiver, ControlSender, End, Heartbeat, Verdict, decode, encode,
                                       socket_path)


class FakeEngine:
    """Like AsyncLLM: `generate` yields a growing text, one token per `step`; `abort` ends it with "abort"."""

    def __init__(self, tokens: int = 20, step: float = 0.01) -> None:
        self.tokens, self.step = tokens, step
        self.aborted: list[str] = []

    async def generate(self, prompt, params, request_id, **kwargs):
        text = ""
        for i in range(self.tokens):
            await asyncio.sleep(self.step)
            if request_id in self.aborted:
                yield SimpleNamespace(finished=True, outputs=[SimpleNamespace(text=text, finish_reason="abort",
                                                                              stop_reason=None)])
                return
            text += "x"
            last = i == self.tokens - 1
            yield SimpleNamespace(finished=last, outputs=[SimpleNamespace(text=text, finish_reason="length" if last
                                                                          else None, stop_reason=None)])

    async def abort(self, request_id):
        self.aborted.append(request_id)


async def serving(scope, receive, send):
    """Like vLLM's chat route: `stream` in the query string chooses SSE."""
    engine = scope["app"].state.engine_client
    rid = dict(scope["headers"])[b"x-request-id"].decode()
    gen = engine.generate("prompt", None, f"chatcmpl-{rid}")
    if scope.get("query_string") == b"stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        first = {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
        await send({"type": "http.response.body", "body": f"data: {json.dumps(first)}\n\n".encode(),
                    "more_body": True})
        async for out in gen:
            o = out.outputs[0]
            if not o.text:
                continue  # as vLLM: nothing generated yet, no chunk (not even the last one)
            chunk = {"text": o.text[-1:], "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
            data = json.dumps(chunk, separators=(",", ":"))
            await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(),
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    async for out in gen:
        last = out
    o = last.outputs[0]
    body = json.dumps({"text": o.text, "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    def make(engine: FakeEngine | None = None, **enforcement):
        rings = tmp_path / "r"
        rings.mkdir(exist_ok=True)
        cfg = tmp_path / "m.yaml"
        cfg.write_text(yaml.safe_dump({
            "model": {"name": "tiny", "num_layers": 4, "d_model": 8}, "taps": [{"layer": 2}],
            "transport": {"directory": str(rings), "name": "k"},
            "enforcement": {"heartbeat_s": 0.05, "sidecar_timeout_s": 0.3, **enforcement}}))
        monkeypatch.setenv("MISALIGNMENT_MONITOR_CONFIG", str(cfg))
        engine = engine or FakeEngine()
        app = SimpleNamespace(state=SimpleNamespace(engine_client=engine))
        mw = MonitorMiddleware(serving)
        sidecar = ControlSender(rings, "k")
        return mw, app, engine, sidecar
    return make


async def request(mw, app, rid: str, stream: bool = False):
    sent = []

    async def send(m):
        sent.append(m)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "app": app,
             "query_string": b"stream" if stream else b"", "headers": [(b"x-request-id", rid.encode())]}
    await mw(scope, None, send)
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


async def started(mw, app, sidecar, actions=("abort",)):
    """The middleware's control socket is up and the sidecar has said hello."""
    mw.enforcer.start(app)
    assert sidecar.discover(), "the middleware opened no control socket"
    sidecar.send(Heartbeat(1, tuple(actions)))
    await asyncio.sleep(0.01)


def verdict(rid: str, action: str = "abort", alert: str = "a-1") -> Verdict:
    return Verdict(external_id=f"chatcmpl-{rid}", request_id=rid, alert_id=alert, detector="pii-probe",
                   severity="critical", action=action, score=0.9, position=3, step_time=time.time())


async def flagged(mw, app, sidecar, rid: str, messages: list, stream: bool = False, actions=("abort",)):
    """A request under way, then the sidecar's messages about it, each after a moment; its response."""
    await started(mw, app, sidecar, actions)
    call = asyncio.ensure_future(request(mw, app, rid, stream=stream))
    for msg in messages:
        await asyncio.sleep(0.04)
        sidecar.send(msg)
    return await call


def sse(body: bytes) -> list[str]:
    return [e for e in body.decode().split("\n\n") if e]


def test_abort_ends_a_response_with_content_filter_and_the_alert_id(setup):
    mw, app, engine, sidecar = setup()
    status, headers, body = asyncio.run(flagged(mw, app, sidecar, "r1", [verdict("r1")]))
    out = json.loads(body)
    assert status == 200 and out["finish_reason"] == "content_filter" and out["stop_reason"] == "a-1"
    assert 0 < len(out["text"]) < 20  # stopped early: the partial text up to the abort
    assert headers["x-alert-id"] == "a-1" and headers["x-alert-action"] == "abort"
    assert headers["x-alert-detector"] == "pii-probe" and engine.aborted == ["chatcmpl-r1"]


def test_abort_of_a_stream_ends_it_with_a_content_filter_chunk_then_done_then_the_alert(setup):
    mw, app, engine, sidecar = setup()
    status, headers, body = asyncio.run(flagged(mw, app, sidecar, "r2", [verdict("r2"), End("chatcmpl-r2")],
                                                stream=True))
    events = sse(body)
    done = events.index("data: [DONE]")
    last = json.loads(events[done - 1].removeprefix("data: "))
    assert last["finish_reason"] == "content_filter" and last["stop_reason"] == "a-1"
    assert done < 19  # ended early
    trailer = events[done + 1].split("\n")
    assert trailer[0] == "event: misalignment-monitor.alert"
    assert json.loads(trailer[1].removeprefix("data: "))["alerts"][0] == {
        "alert_id": "a-1", "detector": "pii-probe", "severity": "critical", "action": "abort", "score": 0.9}


def test_a_stream_aborted_before_its_first_token_still_ends_with_content_filter(setup):
    """vLLM sends no last chunk for a request with no tokens; the middleware adds one before [DONE]."""
    mw, app, engine, sidecar = setup(FakeEngine(step=0.05))

    async def run():
        await started(mw, app, sidecar)
        call = asyncio.ensure_future(request(mw, app, "r0", stream=True))
        await asyncio.sleep(0.01)  # before the first token
        sidecar.send(verdict("r0", alert="early"))
        return await call

    status, headers, body = asyncio.run(run())
    events = sse(body)
    done = events.index("data: [DONE]")
    last = json.loads(events[done - 1].removeprefix("data: "))
    assert last["id"] == "chatcmpl-r0" and last["object"] == "chat.completion.chunk"
    assert last["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "content_filter",
                                "stop_reason": "early"}]
    assert [e for e in events if '"finish_reason":"' in e] == [events[done - 1]]  # exactly one last chunk


def test_annotate_lets_the_request_finish_and_names_the_alert(setup):
    mw, app, engine, sidecar = setup()
    status, headers, body = asyncio.run(flagged(mw, app, sidecar, "r3", [verdict("r3", action="annotate", alert="a-3")],
                                                actions=("annotate",)))
    out = json.loads(body)
    assert out["finish_reason"] == "length" and len(out["text"]) == 20 and engine.aborted == []
    assert headers["x-alert-id"] == "a-3" and headers["x-alert-action"] == "annotate"


def test_a_verdict_on_the_last_token_still_reaches_the_caller(setup):
    """The response waits (at most verdict_wait_ms) for the sidecar to report the request's end."""
    mw, app, engine, sidecar = setup(FakeEngine(tokens=3), verdict_wait_ms=2000)

    async def run():
        await started(mw, app, sidecar, actions=("abort",))
        call = asyncio.ensure_future(request(mw, app, "r4"))
        await asyncio.sleep(0.15)  # the request has finished; the response is held for the sidecar
        assert not call.done()
        sidecar.send(verdict("r4", alert="late"))
        sidecar.send(End("chatcmpl-r4"))
        return await call

    t0 = time.monotonic()
    status, headers, body = asyncio.run(run())
    assert time.monotonic() - t0 < 1.5  # released by End, not by the timeout
    # Too late to stop it: the caller is told, as an annotation.
    assert json.loads(body)["finish_reason"] == "length"
    assert headers["x-alert-id"] == "late" and headers["x-alert-action"] == "annotate"


def test_without_a_sidecar_requests_run_to_the_end_without_waiting(setup):
    mw, app, engine, sidecar = setup(verdict_wait_ms=2000)

    async def run():
        mw.enforcer.start(app)
        t0 = time.monotonic()
        result = await request(mw, app, "r5")
        return result, time.monotonic() - t0

    (status, headers, body), took = asyncio.run(run())
    assert status == 200 and json.loads(body)["finish_reason"] == "length" and "x-alert-id" not in headers
    assert took < 1.0  # no sidecar heartbeat: nothing to wait for


def test_fail_closed_refuses_without_a_sidecar_and_aborts_in_flight_when_it_goes(setup):
    mw, app, engine, sidecar = setup(FakeEngine(tokens=100), fail_closed=True)

    async def run():
        mw.enforcer.start(app)
        refused = await request(mw, app, "r6")
        sidecar.discover()
        sidecar.send(Heartbeat(1, ()))
        await asyncio.sleep(0.01)
        call = asyncio.ensure_future(request(mw, app, "r7"))  # served while the sidecar is alive ...
        return refused, await call  # ... and aborted once it has been silent for sidecar_timeout_s

    (status, headers, body), (status2, _, body2) = asyncio.run(run())
    assert status == 503 and headers["retry-after"] == "5" and b"fail_closed" in body
    out = json.loads(body2)
    assert status2 == 200 and out["finish_reason"] == "abort" and "sidecar unavailable" in out["stop_reason"]
    assert engine.aborted == ["chatcmpl-r7"]


def test_verdicts_on_other_api_servers_requests_and_junk_are_ignored(setup):
    mw, app, engine, sidecar = setup()

    async def run():
        await started(mw, app, sidecar)
        call = asyncio.ensure_future(request(mw, app, "mine"))
        await asyncio.sleep(0.05)
        sidecar.send(verdict("someone-elses"))
        conn = sidecar.conns[sidecar.receivers[0]]
        conn.send(b"\x00not json")
        conn.send(json.dumps({"v": 99, "kind": "verdict"}).encode())
        return await call

    status, headers, body = asyncio.run(run())
    assert json.loads(body)["finish_reason"] == "length" and engine.aborted == [] and "x-alert-id" not in headers
    assert mw.enforcer.receiver.bad == 2


def test_sender_counts_a_full_receiver_and_forgets_a_dead_one(tmp_path):
    receiver = ControlReceiver(socket_path(tmp_path, "k", pid=1))
    sender = ControlSender(tmp_path, "k")
    assert sender.discover() == [str(receiver.path)]
    (fd,) = receiver.accept()
    msg = End("x" * 200)
    sent = sum(sender.send(msg) for _ in range(100_000) if sender.stats.dropped == 0)
    # A busy API server holds hundreds of messages (a datagram socket would hold 10); the overflow is
    # dropped and counted, never waited for.
    assert sender.stats.dropped == 1 and sent > 100
    messages, still_open = receiver.receive(fd, limit=100_000)
    assert len(messages) == sent and still_open
    receiver.close()  # the API server went away
    assert sender.send(msg) == 0 and sender.receivers == [] and sender.discover() == []


def test_messages_round_trip_and_bad_ones_are_named():
    v = verdict("r")
    assert decode(encode(v)) == v and decode(encode(Heartbeat(3, ("abort",)))) == Heartbeat(3, ("abort",))
    with pytest.raises(ValueError, match="version-1"):
        decode(b'{"v": 2, "kind": "end", "external_id": "x"}')
    with pytest.raises(ValueError, match="bad control message"):
        decode(b'{"v": 1, "kind": "end"}')


def test_socket_path_too_long_is_an_error_naming_the_setting(tmp_path):
    with pytest.raises(ValueError, match="shorten transport.directory"):
        socket_path(tmp_path / ("d" * 120), "k")


def test_the_sidecar_tells_api_servers_what_acting_detectors_decide(tmp_path):
    """Through the real loop: an abort detector fires -> one Verdict; the request ends -> End; heartbeats
    name the actions in force; a detector without an action sends nothing."""
    import torch

    from monitor.config import load_config
    from monitor.sidecar.loop import Sidecar
    from monitor.sinks.control import ControlSink
    from monitor.transport.meta import SlotMeta
    from test_sidecar_streams import monitor_config, one_request, ring

    cfg = monitor_config(tmp_path)
    det = tmp_path / "det/max.yaml"
    det.write_text(yaml.safe_dump({**yaml.safe_load(det.read_text()), "action": "abort"}))
    loaded = load_config(cfg)
    side = Sidecar(loaded, device="cpu")
    producer = ring(tmp_path)
    receiver = ControlReceiver(socket_path(tmp_path / "rings", "k", pid=1))
    sink = ControlSink(loaded.config, lambda: [d.spec for d in side.detectors.detectors], pid=99)
    try:
        side.bus.on_detector(sink.on_detector)
        side.bus.on_request_end(sink.on_request_end)
        deadline = time.time() + 10
        while not sink.sender.receivers and time.time() < deadline:
            time.sleep(0.05)
        (fd,) = receiver.accept()
        side.discover()
        segs, x = one_request("a", 4, 3.0)  # feature 1 at 3.0: over `max`'s 2.2
        producer.publish(0, SlotMeta(segs, (), time.time()), [torch.from_numpy(x)])
        side.poll_once()
        producer.publish(1, SlotMeta((), (segs[0].req,), None), None)
        side.poll_once()
        messages = [m for m in receiver.receive(fd)[0]]
    finally:
        sink.close()
        receiver.close()
    beats = [m for m in messages if isinstance(m, Heartbeat)]
    assert beats and beats[0] == Heartbeat(99, ("abort",))
    (v,) = [m for m in messages if isinstance(m, Verdict)]  # `count-all` fired too, but does not act
    assert (v.external_id, v.request_id, v.detector, v.action) == ("chatcmpl-a", "a", "max", "abort")
    assert 0 <= v.position < 4
    assert v.score >= 2.2 and v.alert_id
    assert [m for m in messages if isinstance(m, End)] == [End("chatcmpl-a")]
    assert sink.stats().sent == len(messages) and sink.stats().dropped == 0


def test_check_config_names_a_control_socket_path_too_long_when_detectors_act(tmp_path):
    from monitor.config import ConfigError, load_config
    from test_sidecar_streams import monitor_config

    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    cfg = monitor_config(tmp_path, transport={"directory": str(deep), "name": "k"})
    load_config(cfg)  # no detector acts: no socket is needed
    det = tmp_path / "det/max.yaml"
    det.write_text(yaml.safe_dump({**yaml.safe_load(det.read_text()), "action": "annotate"}))
    with pytest.raises(ConfigError, match="transport.directory.*over the 107 a Unix socket allows"):
        load_config(cfg)


def test_only_the_pods_group_may_connect_to_the_control_socket():
    """Authentication is the socket file's mode: with 0660 in a group-owned folder (the chart's fsGroup), a
    process of another uid in that group connects, as the sidecar does; one outside the group cannot."""
    import os
    import tempfile
    from pathlib import Path

    from as_user import exit_code_as

    if os.geteuid() != 0:
        pytest.skip("switching uid needs root")
    folder = Path(tempfile.mkdtemp(dir="/dev/shm"))
    os.chown(folder, 0, 4242)
    os.chmod(folder, 0o2775)  # anyone may look in: the socket's own mode is what refuses
    receiver = ControlReceiver(socket_path(folder, "k", pid=1), mode=0o660)
    assert receiver.path.stat().st_gid == 4242 and (receiver.path.stat().st_mode & 0o777) == 0o660

    def connects() -> int:
        """0: connected and sent; 3: found the socket and was refused (EACCES); 2: anything else."""
        sender = ControlSender(folder, "k")
        return 0 if sender.discover() and sender.send(End("x")) == 1 else 3 if sender.denied else 2

    try:
        same_group, other = exit_code_as(65532, 4242, connects), exit_code_as(65533, 4343, connects)
        accepted = receiver.accept()
        got = [m for fd in accepted for m in receiver.receive(fd)[0]]
    finally:
        receiver.close()
        folder.rmdir()
    assert (same_group, other) == (0, 3) and got == [End("x")]
