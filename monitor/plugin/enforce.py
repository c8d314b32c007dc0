"""Acting on verdicts inside vLLM's API server: abort or annotate a request the sidecar flags.

Only the API server that owns a request can stop it the way vLLM itself does (`AsyncLLM.abort`:
the scheduler frees its KV blocks and the caller's stream ends cleanly), and vLLM gives plugins no
handle on it. So the middleware (`monitor.plugin.middleware`) makes one `Enforcer` per API-server
process, which:

  - wraps `engine_client.generate` on the instance vLLM's serving classes call, to learn which
    engine request ids belong to which HTTP request (a context variable set by the middleware
    carries the `Watch` into the call), and to rewrite the final output of a request it aborted:
    `finish_reason` "abort" becomes "content_filter" and `stop_reason` the alert id, which vLLM
    passes through to the caller (the last chunk of a stream, or the response);
  - listens on the control socket (`monitor.transport.control`) from the event loop, never
    blocking it: a `Verdict` for a request it owns is recorded, and an abort verdict schedules
    `engine_client.abort(external id)`;
  - under `enforcement.fail_closed`, refuses new requests and aborts those in flight while the
    sidecar sends no heartbeat (otherwise, with the sidecar gone, nothing is aborted: fail open).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from monitor.config.models import MonitorConfig
from monitor.transport.control import ControlError, ControlReceiver, End, Heartbeat, Verdict, socket_path

log = logging.getLogger("monitor.plugin")

FAILED_CLOSED = "misalignment-monitor: sidecar unavailable"  # stop_reason of a request aborted under fail_closed


@dataclass
class Watch:
    """One generation request of this API server, from the middleware's side."""

    request_id: str  # its X-Request-Id
    external_ids: list[str] = field(default_factory=list)  # the engine request ids of its generators
    pending: set[str] = field(default_factory=set)  # those the sidecar has not yet reported finished
    verdicts: list[Verdict] = field(default_factory=list)
    abort: Verdict | None = None  # the verdict that ordered the abort
    aborted: bool = False  # the abort took effect (the engine ended the request for it)
    failed_closed: bool = False
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    span: Any = None  # the monitor's OpenTelemetry span, when vLLM traces

    def taken(self) -> list[tuple[Verdict, str]]:
        """Each verdict with the action actually taken on the request: an abort that came after the request had
        finished is reported as what it became, an annotation."""
        return [(v, "abort" if v is self.abort and self.aborted else "annotate") for v in self.verdicts]


CURRENT: contextvars.ContextVar[Watch | None] = contextvars.ContextVar("misalignment_monitor_watch", default=None)


class Enforcer:
    def __init__(self, cfg: MonitorConfig) -> None:
        self.cfg = cfg.enforcement
        self.transport = cfg.transport
        self.by_external: dict[str, Watch] = {}
        self.actions: tuple[str, ...] = ()  # what the sidecar's detectors do, from its heartbeat
        self.last_heartbeat = float("-inf")
        self.sidecar_pid: int | None = None
        self.engine = None
        self.receiver: ControlReceiver | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()

    # ---- start-up (lifespan, or the first request) --------------------------------------------
    def start(self, app) -> None:
        if self.loop is not None:
            return
        engine = getattr(getattr(app, "state", None), "engine_client", None)
        if engine is None or not hasattr(engine, "generate"):
            return  # not vLLM's app state yet: tried again on the next request
        self.loop = asyncio.get_running_loop()
        self.engine = engine
        original = engine.generate
        enforcer = self

        def generate(prompt, sampling_params, request_id, *args, **kwargs):
            watch = CURRENT.get()
            inner = original(prompt, sampling_params, request_id, *args, **kwargs)
            return inner if watch is None else enforcer._watched(inner, watch, request_id)

        engine.generate = generate  # the serving classes hold this same instance
        try:
            path = socket_path(self.transport.directory, self.transport.name)
            self.receiver = ControlReceiver(path, int(self.transport.file_mode, 8))
        except (OSError, ControlError) as e:
            log.error("misalignment-monitor: cannot open the control socket (%s); detectors' actions will not "
                      "reach this API server", e)
            return
        self.loop.add_reader(self.receiver.fileno(), self._accept)
        self._spawn(self._watchdog())
        log.info("misalignment-monitor control channel at %s (fail_closed=%s)", path, self.cfg.fail_closed)

    def close(self) -> None:
        """At exit: the socket file goes with the process (the loop has usually stopped by then)."""
        if self.receiver is None:
            return
        if self.loop is not None and not self.loop.is_closed():
            for fd in [self.receiver.fileno(), *self.receiver.conns]:
                try:
                    self.loop.remove_reader(fd)
                except (RuntimeError, ValueError, OSError):  # a loop being torn down
                    pass
        self.receiver.close()
        self.receiver = None

    # ---- the sidecar's state ------------------------------------------------------------------
    def alive(self) -> bool:
        return time.monotonic() - self.last_heartbeat < self.cfg.sidecar_timeout_s

    def refuses(self) -> bool:
        """New generation requests are refused: fail_closed, and no sidecar."""
        return self.cfg.fail_closed and not self.alive()

    # ---- requests ------------------------------------------------------------------------------
    async def _watched(self, inner, watch: Watch, external_id: str):
        watch.external_ids.append(external_id)
        watch.pending.add(external_id)
        self.by_external[external_id] = watch
        try:
            async for out in inner:
                if out.finished and (watch.abort is not None or watch.failed_closed):
                    self._rewrite(out, watch)
                yield out
        finally:
            await inner.aclose()  # a caller that went away still aborts the request (vLLM's own handling)

    @staticmethod
    def _rewrite(out, watch: Watch) -> None:
        for o in out.outputs:
            if o.finish_reason != "abort":
                continue  # finished on its own before the abort landed
            if watch.abort is not None:
                o.finish_reason = "content_filter"
                o.stop_reason = watch.abort.alert_id
                watch.aborted = True
            else:
                o.stop_reason = FAILED_CLOSED

    def forget(self, watch: Watch) -> None:
        for ext in watch.external_ids:
            if self.by_external.get(ext) is watch:
                del self.by_external[ext]

    async def settle(self, watch: Watch) -> None:
        """Wait (bounded) until the sidecar has seen the request end, so that late verdicts still reach the caller."""
        # A killed sidecar's connection closes at once: no waiting for it until its heartbeat times out.
        connected = self.receiver is not None and bool(self.receiver.conns)
        if (self.cfg.verdict_wait_ms <= 0 or not self.actions or not self.alive() or not connected
                or not watch.pending or watch.ended.is_set()):
            return
        try:
            await asyncio.wait_for(watch.ended.wait(), self.cfg.verdict_wait_ms / 1000)
        except asyncio.TimeoutError:
            pass

    # ---- the control channel (on the event loop; never blocks) --------------------------------
    def _accept(self) -> None:
        if self.receiver is None:
            return
        for fd in self.receiver.accept():
            self.loop.add_reader(fd, self._readable, fd)

    def _readable(self, fd: int) -> None:
        if self.receiver is None:
            return
        messages, still_open = self.receiver.receive(fd)
        if not still_open:
            self.loop.remove_reader(fd)
        for msg in messages:
            if isinstance(msg, Heartbeat):
                if not self.alive():
                    log.info("misalignment-monitor sidecar (pid %d) is up; actions: %s", msg.pid,
                             ", ".join(msg.actions) or "none")
                self.last_heartbeat = time.monotonic()
                self.actions = msg.actions
                self.sidecar_pid = msg.pid
            elif isinstance(msg, Verdict):
                self._verdict(msg)
            elif isinstance(msg, End):
                watch = self.by_external.get(msg.external_id)
                if watch is not None:
                    watch.pending.discard(msg.external_id)
                    if not watch.pending:
                        watch.ended.set()

    def _verdict(self, v: Verdict) -> None:
        watch = self.by_external.get(v.external_id)
        if watch is None:
            return  # another API server's request (or one that has ended)
        watch.verdicts.append(v)
        if watch.span is not None:
            from monitor.plugin.tracing import record_verdict

            record_verdict(watch.span, v)
        if v.action == "abort" and watch.abort is None:
            watch.abort = v
            self._spawn(self._abort(v.external_id, v.alert_id))

    async def _abort(self, external_id: str, why: str) -> None:
        try:
            await self.engine.abort(external_id)
            log.info("misalignment-monitor aborted request %s (%s)", external_id, why,
                     extra={"external_id": external_id, "alert_id": why})
        except Exception:  # noqa: BLE001 - a failed abort must not take the API server down
            log.exception("misalignment-monitor: aborting %s failed; the request runs on", external_id)

    async def _watchdog(self) -> None:
        """Under fail_closed, requests in flight when the sidecar goes away are aborted."""
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            if not self.refuses():
                continue
            for watch in {id(w): w for w in self.by_external.values()}.values():
                if watch.failed_closed or watch.abort is not None:
                    continue
                watch.failed_closed = True
                log.warning("misalignment-monitor: no sidecar heartbeat for %.0f s and fail_closed is set: aborting "
                            "request %s", self.cfg.sidecar_timeout_s, watch.request_id,
                            extra={"request_id": watch.request_id})
                for ext in watch.external_ids:
                    self._spawn(self._abort(ext, FAILED_CLOSED))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # a reference, or the loop may drop the task mid-flight
        task.add_done_callback(self._tasks.discard)
