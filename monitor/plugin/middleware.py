"""ASGI middleware for vLLM's OpenAI server: every request carries an `X-Request-Id`.

    python -m vllm.entrypoints.openai.api_server ... --middleware monitor.plugin.middleware.RequestIdMiddleware

vLLM names the engine request `chatcmpl-<X-Request-Id>` when the header is present, else a random
id the caller never sees (`--enable-request-id-headers` echoes a *fresh* uuid, not the engine's).
Setting the header before vLLM reads it, and echoing it on the response, gives every alert an id
the caller can find. Pure ASGI (no BaseHTTPMiddleware), so streaming responses are untouched.

With `sampling.always` rules in the monitor's config, a request whose headers match one has its id
written for the sidecar (`monitor.transport.pinned`) before vLLM sees it: it is scored whatever
`sampling.fraction` says. A config that cannot be read leaves requests as they are (logged once).
"""

from __future__ import annotations

import logging
import uuid

from monitor.transport.pinned import PinnedWriter, pinned_path

HEADER = b"x-request-id"
log = logging.getLogger("monitor.plugin")


def _rules() -> tuple[dict[bytes, set[bytes]], PinnedWriter | None]:
    """Header name -> values that pin a request, and where pinned ids go; empty when none are configured."""
    from monitor.plugin import _load_config

    try:
        cfg = _load_config()
    except Exception as e:  # noqa: BLE001 - a bad config must not take the API server down
        log.error("misalignment-monitor: cannot read the config for sampling rules (%s); none apply", e)
        return {}, None
    if cfg is None or not cfg.sampling.always:
        return {}, None
    rules: dict[bytes, set[bytes]] = {}
    for rule in cfg.sampling.always:
        rules.setdefault(rule.header.lower().encode(), set()).update(v.encode() for v in rule.values)
    return rules, PinnedWriter(pinned_path(cfg.transport.directory, cfg.transport.name), int(cfg.transport.file_mode, 8))


class RequestIdMiddleware:
    def __init__(self, app) -> None:
        self.app = app
        self.rules, self.pinned = _rules()

    async def __call__(self, scope, receive, send) -> None:
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

        await self.app(scope, receive, send_with_id)
