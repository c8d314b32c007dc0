"""Per-worker capture: the tap buffers, the ring, and what happens after each forward step.

On CPU the step's rows are ready when `execute_model` returns, so they are copied straight into the
ring (a memcpy of n x d_model per layer) before the next step can overwrite the tap buffers.

On GPU nothing may wait on the device. After each step the rows are copied, in stream order, into
one of K device staging slots (fast, device-to-device); a side stream then copies that slot into
pinned host memory and records an event; a publisher thread waits on that event (in its own thread,
never the inference thread) and writes the ring. With every staging slot busy, the step is dropped
and counted.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import socket
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from monitor.config.models import MonitorConfig
from monitor.plugin.attribution import split_segments, v1_segments, v2_segments
from monitor.plugin.tap import install_taps
from monitor.transport.meta import Segment, SlotMeta, wire_id
from monitor.transport.ring import RingError, RingSpec, RingWriter

log = logging.getLogger("monitor.plugin")


def _host() -> str:
    return socket.gethostname().replace("/", "_")


def ring_path(cfg: MonitorConfig, rank: int) -> Path:
    return Path(cfg.transport.directory) / f"{cfg.transport.name}-{_host()}-{os.getpid()}-r{rank}.ring"


def _write_off_marker(ring: Path, reason: str) -> None:
    """`<ring>.off`: why this producer has no ring (the sidecar exports how many there are)."""
    try:  # best effort: the disk that had no room for the ring may have none for this either
        ring.with_suffix(".off").write_text(json.dumps({"reason": reason, "pid": os.getpid(), "t": time.time()}) + "\n")
    except OSError:
        pass


MAX_UNSENT_FINISHED = 4096
RETRY_ENDS_EVERY_S = 0.05


class _Publisher:
    """Splits a step into ring slots and writes them; rows come as per-layer [n, d] CPU tensors."""

    def __init__(self, ring: RingWriter, retry_every: float = RETRY_ENDS_EVERY_S) -> None:
        self.ring = ring
        self.lock = threading.Lock()  # the GPU path writes from the publisher thread
        # Requests whose end was announced in a dropped slot: a lost end would leave the request open in
        # the sidecar (no verdict until it expires), so it rides on the next slot that gets through.
        self.unsent_finished: list[str] = []
        self._unsent_since = 0.0
        self._step = 0
        # The last step before a quiet spell is often the very one that carries the ends (vLLM sends them
        # in one step with nothing scheduled): with no next step to ride on they would wait for the next
        # request. A thread retries them once the reader has made room, off the inference thread.
        self._ends_waiting = threading.Event()
        self._retry_every = retry_every
        threading.Thread(target=self._retry_ends, name="misalignment-monitor-ends", daemon=True).start()

    def publish(self, step: int, segments: list[Segment], finished: list[str], rows: list[torch.Tensor] | None,
                t: float, token_ids: np.ndarray | None = None) -> None:
        # `t`: wall-clock time the step's forward pass returned; the sidecar measures detection latency from it.
        with self.lock:
            self._step = step
            if self.unsent_finished:
                finished, self.unsent_finished = self.unsent_finished + list(finished), []
            chunks = split_segments(segments, self.ring.spec.slot_rows) if segments else []
            if not chunks and finished:
                self._finished_only(step, finished, t)
            for k, (first, n, segs) in enumerate(chunks):
                self._chunk(step, first, n, segs, finished if k == len(chunks) - 1 else [], t, rows, token_ids)

    def _chunk(self, step: int, first: int, n: int, segs: list[Segment], finished: list[str], t: float,
               rows: list[torch.Tensor] | None, token_ids: np.ndarray | None) -> None:
        if not self.ring.has_room():  # full (no or slow reader): count it, build nothing
            self.ring.drop(n)
            self._keep_unsent(finished)
            return
        meta = SlotMeta(tuple(segs), tuple(finished), t)
        payload = meta.to_bytes()
        if len(payload) > self.ring.spec.meta_bytes and (len(segs) > 1 or finished):
            # Too many requests for one slot's metadata: the same rows over two slots, never dropped.
            if len(segs) == 1:
                self._chunk(step, first, n, segs, [], t, rows, token_ids)
                self._finished_only(step, finished, t)
                return
            half = len(segs) // 2
            cut = segs[half].row
            left = segs[:half]
            right = [replace(s, row=s.row - cut) for s in segs[half:]]
            self._chunk(step, first, cut, left, [], t, rows, token_ids)
            self._chunk(step, first + cut, n - cut, right, finished, t, rows, token_ids)
            return
        if not self.ring.publish(step, meta, [r[first : first + n] for r in rows] if rows is not None else None,
                                 None if token_ids is None else token_ids[first : first + n], payload):
            self._keep_unsent(finished)

    def _finished_only(self, step: int, finished: list[str], t: float) -> None:
        meta = SlotMeta((), tuple(finished), t)
        payload = meta.to_bytes()
        if len(payload) > self.ring.spec.meta_bytes and len(finished) > 1:
            half = len(finished) // 2
            self._finished_only(step, finished[:half], t)
            self._finished_only(step, finished[half:], t)
            return
        if not self.ring.publish(step, meta, None, None, payload):
            self._keep_unsent(finished)

    def drop(self, n_rows: int, finished: list[str]) -> None:
        with self.lock:
            self.ring.drop(n_rows)
            self._keep_unsent(finished)

    def _keep_unsent(self, finished: list[str]) -> None:
        # Bounded: with no reader for hours every step drops, and vLLM's memory must not grow for it. A
        # reader that attaches later never saw those requests, so only the newest ends can still matter.
        if not finished:
            return
        if not self.unsent_finished:
            self._unsent_since = time.time()  # when they ended: the sidecar measures latency from it
        self.unsent_finished += finished
        del self.unsent_finished[:-MAX_UNSENT_FINISHED]
        self._ends_waiting.set()

    def _retry_ends(self) -> None:
        while True:
            self._ends_waiting.wait()
            time.sleep(self._retry_every)
            with self.lock:
                if self.ring.closed:
                    return
                try:
                    if self.unsent_finished and self.ring.has_room():
                        finished, self.unsent_finished = self.unsent_finished, []
                        self._finished_only(self._step, finished, self._unsent_since)
                except ValueError:  # the ring was unmapped at exit while this thread looked at it
                    return
                if not self.unsent_finished:
                    self._ends_waiting.clear()


class _GpuStager:
    def __init__(self, n_layers: int, max_tokens: int, d_model: int, dtype: torch.dtype, device: torch.device,
                 publisher: _Publisher, slots: int = 2) -> None:
        self.stage = [torch.empty(n_layers, max_tokens, d_model, dtype=dtype, device=device) for _ in range(slots)]
        self.pinned = [torch.empty(n_layers, max_tokens, d_model, dtype=dtype, pin_memory=True) for _ in range(slots)]
        self.side = torch.cuda.Stream(device=device)
        self.free: deque[int] = deque(range(slots))
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.publisher = publisher
        threading.Thread(target=self._run, name="misalignment-monitor-publisher", daemon=True).start()

    def submit(self, buffers: list[torch.Tensor], n: int, step: int, segments: list[Segment], finished: list[str],
               t: float, token_ids: np.ndarray | None) -> None:
        if not self.free:  # every staging slot still in flight: drop, never wait
            self.publisher.drop(n, finished)
            return
        k = self.free.popleft()
        main = torch.cuda.current_stream()
        for li, buf in enumerate(buffers):
            self.stage[k][li, :n].copy_(buf[:n], non_blocking=True)
        staged = torch.cuda.Event()
        staged.record(main)
        self.side.wait_event(staged)
        with torch.cuda.stream(self.side):
            for li in range(len(buffers)):  # contiguous per layer: a strided D2H copy may synchronize
                self.pinned[k][li, :n].copy_(self.stage[k][li, :n], non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.side)
        self.jobs.put((k, copied, n, step, segments, finished, t, token_ids))

    def _run(self) -> None:
        while True:
            k, copied, n, step, segments, finished, t, token_ids = self.jobs.get()
            try:
                copied.synchronize()  # this thread only
                rows = [self.pinned[k][li, :n] for li in range(self.pinned[k].shape[0])]
                self.publisher.publish(step, segments, finished, rows, t, token_ids)
            except Exception:  # noqa: BLE001 - the publisher must outlive any one bad step
                log.exception("publishing a step failed")
                self.publisher.ring.count_error()
            finally:
                self.free.append(k)


class Capture:
    """Created in a worker after `load_model`; `after_step` runs after each `execute_model`."""

    def __init__(self, cfg: MonitorConfig, worker) -> None:
        runner = worker.model_runner
        vcfg = worker.vllm_config
        self.v2 = bool(getattr(vcfg, "use_v2_model_runner", False) or getattr(worker, "use_v2_model_runner", False))
        model = runner.get_model()
        d_model = vcfg.model_config.get_hidden_size()
        dtype = vcfg.model_config.dtype
        max_tokens = int(getattr(runner, "max_num_tokens", 0) or vcfg.scheduler_config.max_num_batched_tokens)
        device = torch.device(getattr(runner, "device", "cpu"))
        self.buffers = install_taps(model, cfg.tapped_layers, max_tokens, d_model, dtype, device)
        self.layers = sorted(self.buffers)
        self._ordered = [self.buffers[layer] for layer in self.layers]  # ring layer order
        rank = int(getattr(worker, "rank", 0))
        try:
            from vllm.distributed import get_tensor_model_parallel_rank

            tp_rank = get_tensor_model_parallel_rank()
        except Exception:  # noqa: BLE001 - not initialised in some single-process set-ups
            tp_rank = 0
        # The residual stream is replicated across tensor-parallel ranks: one of them publishes.
        self.active = bool(self.layers) and tp_rank == 0
        self.ring: RingWriter | None = None
        self.stager: _GpuStager | None = None
        self.step = 0
        self.failed = False
        if not self.active:
            return
        t = cfg.transport
        spec = RingSpec(slots=t.slots, slot_rows=t.slot_rows, d_model=d_model, layers=tuple(self.layers), dtype=dtype,
                        overwrite=t.overflow == "overwrite_oldest")
        path = ring_path(cfg, rank)
        try:
            self.ring = RingWriter(path, spec, int(cfg.transport.file_mode, 8))
        except RingError as e:
            # Fail open: vLLM serves unwatched; the marker tells the sidecar (and its metrics) why.
            self.active = False
            log.error("misalignment-monitor tap disabled: %s", e)
            _write_off_marker(path, str(e))
            return
        for marker in path.parent.glob(f"{cfg.transport.name}-{_host()}-*.off"):
            marker.unlink(missing_ok=True)  # left by an earlier try on this host: this one has its ring
        self.publisher = _Publisher(self.ring)
        if device.type == "cuda":
            self.stager = _GpuStager(len(self.layers), max_tokens, d_model, dtype, device, self.publisher)
        atexit.register(self.close)  # mark the ring closed and unlink it; a reader drains what it mapped
        log.info("misalignment-monitor tapping layers %s into %s (%s)", self.layers, self.ring.path, device.type)

    def after_step(self, runner, scheduler_output) -> None:
        if not self.active or self.failed:
            return
        try:
            t = time.time()
            self.step += 1
            # token_ids is a fresh array, not a view of vLLM's batch: the GPU path publishes it a step later.
            segments, token_ids = (v2_segments if self.v2 else v1_segments)(runner, scheduler_output)
            finished = sorted(wire_id(r) for r in scheduler_output.finished_req_ids or ())
            n = sum(s.n for s in segments)
            if not segments and not finished:
                return
            if self.stager is not None and n:
                self.stager.submit(self._ordered, n, self.step, segments, finished, t, token_ids)
            else:
                self.publisher.publish(self.step, segments, finished, [b[:n] for b in self._ordered] if n else None, t,
                                       token_ids)
        except Exception:  # noqa: BLE001 - fail open: log once, stop tapping, keep serving
            self.failed = True
            log.exception("misalignment-monitor capture failed; the tap is disabled, vLLM keeps serving")
            if self.ring is not None:
                self.ring.count_error()

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
            self.active = False
