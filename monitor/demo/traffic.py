"""The demo's traffic: scripted chat requests, each with the detectors it should trip."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from monitor.stack.vllm_server import VLLMServer


@dataclass
class DemoRequest:
    name: str
    messages: list[dict]
    expect: list[str]
    request_id: str = ""
    answer: str = ""
    error: str | None = None
    sent_at: float = 0.0


def load_requests(path: Path, run_tag: str) -> list[DemoRequest]:
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            r = DemoRequest(doc["name"], doc["messages"], list(doc.get("expect", [])))
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{path}:{i}: expected {{\"name\", \"messages\", \"expect\"}}: {e}")
        r.request_id = f"demo-{run_tag}-{r.name}"
        out.append(r)
    return out


def send(server: VLLMServer, requests: list[DemoRequest], concurrency: int = 4, max_tokens: int = 32) -> None:
    """Every request through the OpenAI API; an error is kept with its request and the rest go on."""

    def one(r: DemoRequest) -> None:
        r.sent_at = time.time()
        try:
            body, _ = server.chat(r.messages, max_tokens=max_tokens, request_id=r.request_id)
            r.answer = body["choices"][0]["message"]["content"]
        except Exception as e:  # noqa: BLE001 - report it with the request, go on with the rest
            r.error = f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, requests))
