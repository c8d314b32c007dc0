"""ASGI middleware for vLLM's OpenAI server: request ids, sampling pins, and acting on verdicts.

    python -m vllm.entrypoints.openai.api_server ... --middleware monitor.plugin.middleware.MonitorMiddleware

Every request carries an `X-Request-Id`: vLLM names the engine request `chatcmpl-<X-Request-Id>`
when the header is present, else a random id the caller never sees. Setting it before vLLM reads
it, and echoing it on the response, gives every alert an id the caller can find.

With `sampling.always` rules in the monitor's config, a request whose headers match one has its id
written for the sidecar (`monitor.transport.pinned`) before vLLM sees it.

On the generation routes, detectors with an action (`monitor.plugin.enforce`) act here: an aborted
request ends with `finish_reason: content_filter` and the alert id (`stop_reason`; and the
`X-Alert-Id` header when the response is not streamed); an annotated one carries `X-Alert-Id`,
`X-Alert-Detector` and `X-Alert-Action` headers, or, streamed, a trailing SSE event after
`data: [DONE]` (where OpenAI clients have stopped reading, so they are not confused by it):

    event: misalignment-monitor.alert
    data: {"alerts": [{"alert_id": ..., "detector": ..., "severity": ..., "action": ..., "score": ...}]}

When vLLM traces requests, each generation request also gets the monitor's span
(`monitor.plugin.tracing`). Pure ASGI (no BaseHTTPMiddleware), so streaming is untouched. A config
that cannot be read leaves requests as they are (logged once).
"""

from __future__ import annotations

import atexit
import json
import logging
import uuid

from monitor.plugin.enforce import CURRENT, Enforcer, Watch
from monitor.transport.pinned import PinnedWriter, pinned_path

HEADER = b"x-request-id"
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
DONE = b"data: [DONE]\n\n"
SSE_EVENT = "misalignment-monitor.alert"
log = logging.getLogger("monitor.plugin")


def _config():
    from monitor.plugin import _load_config

    try:
        return _load_config()
    except Exception as e:  # noqa: BLE001 - a bad config must not take the API server down
        log.error("misalignment-monitor: cannot read the config (%s); the middleware only sets request ids", e)
        return None


def _rules(cfg) -> tuple[dict[bytes, set[bytes]], PinnedWriter | None]:
    """Header name -> values that pin a request, and where pinned ids go; empty when none are configured."""
    if cfg is None or not cfg.sampling.always:
        return {}, None
    rules: dict[bytes, set[bytes]] = {}
    for rule in cfg.sampling.always:
        rules.setdefault(rule.header.lower().encode(), set()).update(v.encode() for v in rule.values)
    path = pinned_path(cfg.transport.directory, cfg.transport.name)
    return rules, PinnedWriter(path, int(cfg.transport.file_mode, 8))


def alert_headers(taken) -> list[tuple[bytes, bytes]]:
    if not taken:
        return []
    return [(b"x-alert-id", ",".join(v.alert_id for v, _ in taken).encode()),
            (b"x-alert-detector", ",".join(v.detector for v, _ in taken).encode()),
            (b"x-alert-action", ",".join(a for _, a in taken).encode())]


def alert_event(taken) -> bytes:
    alerts = [{"alert_id": v.alert_id, "detector": v.detector, "severity": v.severity, "action": a,
               "score": v.score} for v, a in taken]
    return f"event: {SSE_EVENT}\ndata: {json.dumps({'alerts': alerts})}\n\n".encode()


def finish_chunk(first: bytes | None, alert_id: str) -> bytes:
    """The last chunk of an aborted stream, shaped like the stream's first one (chat or completions)."""
    head = json.loads(first[len(b"data: "):]) if first else {}
    chat = head.get("object", "chat.completion.chunk") == "chat.completion.chunk"
    choice = {"index": 0, **({"delta": {}} if chat else {"text": ""}), "logprobs": None,
              "finish_reason": "content_filter", "stop_reason": alert_id}
    chunk = {k: head[k] for k in ("id", "object", "created", "model") if k in head} | {"choices": [choice]}
    return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()


UNAVAILABLE = json.dumps({"error": {
    "message": "the misalignment monitor is unavailable and enforcement.fail_closed is set: no unwatched "
               "generation is served; retry shortly", "type": "ServiceUnavailableError", "code": 503}}).encode()


class MonitorMiddleware:
    def __init__(self, app) -> None:
        self.app = app
        cfg = _config()
        self.rules, self.pinned = _rules(cfg)
        self.enforcer = Enforcer(cfg) if cfg is not None and cfg.taps else None
        if self.enforcer is not None:
            atexit.register(self.enforcer.close)  # the socket file goes with the process
        self._tracer = None

    async def __call__(self, scope, receive, send) -> None:
        if self.enforcer is not None and scope["type"] in ("lifespan", "http"):
            self.enforcer.start(scope.get("app"))  # once vLLM's state is there; a no-op afterwards
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = list(scope.get("headers", []))
        rid = next((v for k, v in headers if k.lower() == HEADER), None)
        if not rid:
            rid = uuid.uuid4().hex.encode()
            headers = [(k, v) for k, v in headers if k.lower() != HEADER] + [(HEADER, rid)]
            scope = {**scope, "headers": headers}
        if self.pinned is not None and any(v in self.rules.get(k.lower(), ()) for k, v in headers):
            try:
                self.pinned.add(rid.decode(errors="replace"))
            except OSError as e:  # the request is served anyway; it is only left to `sampling.fraction`
                log.warning("misalignment-monitor: cannot pin request %s for sampling (%s)", rid, e)

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                out = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message = {**message, "headers": out + [(HEADER, rid)]}
            await send(message)

        if self.enforcer is None or scope.get("method") != "POST" or scope.get("path") not in GENERATION_PATHS:
            await self.app(scope, receive, send_with_id)
            return
        await self._generation(scope, receive, send_with_id, rid.decode(errors="replace"))

    async def _generation(self, scope, receive, send, rid: str) -> None:
        enforcer = self.enforcer
        if enforcer.refuses():
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"retry-after", b"5")]})
            await send({"type": "http.response.body", "body": UNAVAILABLE})
            return
        watch = Watch(rid)
        tracer = self._tracer or self._find_tracer()
        if tracer is not None:
            from monitor.plugin import tracing

            watch.span, headers = tracing.start_span(tracer, list(scope.get("headers", [])), rid, scope["path"])
            scope = {**scope, "headers": headers}
        state = {"stream": False, "status": None, "first": None, "finished": False}

        async def send_acting(message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                state["status"] = message.get("status")
                headers = message.get("headers", [])
                state["stream"] = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                      for k, v in headers)
                if not state["stream"]:
                    await enforcer.settle(watch)  # the body is complete: late verdicts can still go in the headers
                message = {**message, "headers": list(headers) + alert_headers(watch.taken())}
            elif kind == "http.response.body" and state["stream"]:
                body = message.get("body", b"")
                if state["first"] is None and body.startswith(b"data: {"):
                    state["first"] = body
                if b'"finish_reason":"' in body:
                    state["finished"] = True
                done = body.endswith(DONE)
                if watch.aborted and not state["finished"] and (done or b'"choices":[]' in body):
                    # vLLM sends no last chunk for a request stopped before its first token: the caller
                    # still gets one with the reason and the alert id (before the usage chunk, as OpenAI's).
                    body = finish_chunk(state["first"], watch.abort.alert_id) + body
                    state["finished"] = True
                if done:
                    await enforcer.settle(watch)
                    taken = watch.taken()
                    if taken:
                        body += alert_event(taken)
                message = {**message, "body": body}
            await send(message)

        token = CURRENT.set(watch)
        try:
            await self.app(scope, receive, send_acting)
        finally:
            CURRENT.reset(token)
            enforcer.forget(watch)
            if watch.span is not None:
                from monitor.plugin import tracing

                tracing.end_span(watch.span, watch.taken(), state["status"], watch.aborted)

    def _find_tracer(self):
        # vLLM installs its tracer provider while the engine starts; looked up until found (cheap when absent).
        from monitor.plugin.tracing import tracer

        self._tracer = tracer()
        return self._tracer
