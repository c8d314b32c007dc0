"""Rows to the scoring device ahead of their turn.

The sidecar reads up to 8 slots a poll. On a GPU each slot's rows are copied on a side stream as soon
as the slot is read, so the copy of slot k+1 runs while the host works on slot k's detectors; the
scoring stream waits only for its own slot's copy (an event, not a host sync). From a page-locked
ring (`RingReader(pin_memory=True)`) the copy is a DMA straight from shared memory. On a CPU there is
nothing to move: the rows are handed back as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Staged:
    rows: list[torch.Tensor]  # on the scoring device, per layer in ring order
    copied: torch.cuda.Event | None = None  # when the side stream's copy is done (None: nothing to wait for)


class DeviceStager:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def stage(self, rows: list[torch.Tensor]) -> Staged:
        """Start moving one slot's rows (host tensors that stay valid until `ready`'s caller is done)."""
        if self.stream is None or not rows:
            return Staged(list(rows))
        with torch.cuda.stream(self.stream):
            moved = [r.to(self.device, non_blocking=True) for r in rows]
            copied = torch.cuda.Event()
            copied.record(self.stream)
        return Staged(moved, copied)

    def ready(self, staged: Staged) -> list[torch.Tensor]:
        """The slot's device rows, usable on the current stream (which waits for their copy, on the device)."""
        if staged.copied is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(staged.copied)
            for r in staged.rows:  # made on the side stream, used on this one: freed only once this one is done
                r.record_stream(current)
            staged.copied = None
        return staged.rows
