"""ASGI middleware for vLLM's OpenAI server: every request carries an `X-Request-Id`.

    python -m vllm.entrypoints.openai.api_server ... --middleware monitor.plugin.middleware.RequestIdMiddleware

vLLM names the engine request `chatcmpl-<X-Request-Id>` when the header is present, else a random
id the caller never sees (`--enable-request-id-headers` echoes a *fresh* uuid, not the engine's).
Setting the header before vLLM reads it, and echoing it on the response, gives every alert an id
the caller can find. Pure ASGI (no BaseHTTPMiddleware), so streaming responses are untouched.
"""

from __future__ import annotations

import uuid

HEADER = b"x-request-id"


class RequestIdMiddleware:
    def __init__(self, app) -> None:
        self.app = app

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

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                out = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message = {**message, "headers": out + [(HEADER, rid)]}
            await send(message)

        await self.app(scope, receive, send_with_id)
