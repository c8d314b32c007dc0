"""Helpers for the capture tests: collect what the tap publishes, and the transformers reference."""

from __future__ import annotations

import dataclasses
import glob
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from monitor.stack.vllm_server import free_port
from monitor.transport.ring import RingReader

LAYER = 15


def capture_config(folder: Path, detectors: bool = False, slots: int = 1024) -> Path:
    """A monitor config tapping layer 15 into rings under `folder`."""
    root = Path(__file__).resolve().parent.parent
    text = f"""
model: {{name: smollm2-135m-instruct, num_layers: 30, d_model: 576}}
taps: [{{layer: {LAYER}}}]
transport: {{directory: {folder}, name: test, slots: {slots}, slot_rows: 128}}
sinks: {{prometheus: {{port: {free_port()}}}}}
"""
    if detectors:
        text += f"""
saes: [{{name: demo-l15, layer: 15, path: {root}/artifacts/demo/sae-l15}}]
probes:
  - {{name: pii, path: {root}/artifacts/demo/probes/pii}}
  - {{name: prompt_injection, path: {root}/artifacts/demo/probes/prompt_injection}}
  - {{name: harmful_request, path: {root}/artifacts/demo/probes/harmful_request}}
detectors: [{root}/detectors]
"""
    path = folder / "monitor.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@dataclass
class Received:
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> row
    token_ids: dict[int, int] = field(default_factory=dict)  # position -> the row's input token id
    segments: list[dict] = field(default_factory=list)
    finished: bool = False


class Collector:
    """Reads every ring in a folder, like the sidecar, keeping rows by (internal id, position)."""

    def __init__(self, folder: Path, pattern: str = "test-*.ring") -> None:
        self.folder, self.pattern = folder, pattern
        self.readers: dict[str, RingReader] = {}
        self.reqs: dict[str, Received] = {}
        self.duplicates = 0

    def poll(self) -> int:
        for p in glob.glob(str(self.folder / self.pattern)):
            if p not in self.readers:
                self.readers[p] = RingReader(p)
        n = 0
        for r in self.readers.values():
            for slot in r.poll(100000):
                n += 1
                for seg in slot.meta.segments:
                    rec = self.reqs.setdefault(seg.req, Received())
                    rec.segments.append(dataclasses.asdict(seg))
                    for k in range(seg.n):
                        pos = seg.start + k
                        if pos in rec.rows:
                            self.duplicates += 1
                        rec.rows[pos] = slot.rows[0][seg.row + k]
                        if slot.token_ids is not None:
                            rec.token_ids[pos] = int(slot.token_ids[seg.row + k])
                for req in slot.meta.finished:
                    self.reqs.setdefault(req, Received()).finished = True
        return n

    def drain(self, quiet: float = 1.0, timeout: float = 30.0) -> None:
        deadline, last = time.time() + timeout, time.time()
        while time.time() < deadline:
            if self.poll():
                last = time.time()
            elif time.time() - last > quiet:
                return
            time.sleep(0.05)

    def by_request_id(self, request_id: str) -> dict[str, Received]:
        return {req: rec for req, rec in self.reqs.items() if rec.segments and rec.segments[0]["request_id"] == request_id}

    def counters(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for r in self.readers.values():
            for k, v in r.counters().items():
                total[k] = total.get(k, 0) + v
        return total


def token_ids_from_response(choice: dict) -> list[int]:
    """Generated token ids, from logprobs with return_tokens_as_token_ids."""
    return [int(t["token"].split(":", 1)[1]) for t in choice["logprobs"]["content"]]


def cosines(got: dict[int, torch.Tensor], ref: torch.Tensor) -> dict[int, float]:
    return {p: float(torch.nn.functional.cosine_similarity(row.float(), ref[p].float(), dim=0)) for p, row in got.items()}
