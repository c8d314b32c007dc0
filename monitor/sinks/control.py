"""Verdicts back to vLLM: detectors with `action: abort | annotate` tell the API servers (the control channel).

On the sidecar's thread, a fire of an acting detector becomes one `Verdict` message to every API
server, and a finished request an `End` (so an API server holding a response for late verdicts
can let it go). A thread of its own sends a heartbeat every `enforcement.heartbeat_s` and looks for
API servers that came or went. Nothing here waits on an API server: a full or missing one is
skipped and counted (fail open).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from monitor.config.models import DetectorSpec, MonitorConfig
from monitor.detectors.updates import DetectorUpdate
from monitor.transport.control import ControlSender, End, Heartbeat, SenderStats, Verdict

log = logging.getLogger("monitor.sinks")


def acting(specs: list[DetectorSpec]) -> tuple[str, ...]:
    return tuple(sorted({s.action for s in specs if s.action != "none" and s.mode == "live"}))


class ControlSink:
    def __init__(self, cfg: MonitorConfig, detectors: Callable[[], list[DetectorSpec]], pid: int) -> None:
        self.sender = ControlSender(cfg.transport.directory, cfg.transport.name)
        self.detectors = detectors  # the detector set in force (a reload may change who acts)
        self.actions = acting(detectors())  # refreshed with each heartbeat
        self.every = cfg.enforcement.heartbeat_s
        self.pid = pid
        self._lock = threading.Lock()  # the loop's thread and the heartbeat thread share the sender
        self._stop = threading.Event()
        self._denied_logged: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="control-heartbeat", daemon=True)
        self._thread.start()

    def stats(self) -> SenderStats:
        return self.sender.stats

    def on_detector(self, u: DetectorUpdate) -> None:
        spec = u.detector
        # Only the page tier acts: a record-tier fire is evidence kept, never a request stopped.
        if not (u.fired_now or u.escalated_now) or not u.paged or spec.action == "none" or spec.mode == "shadow" \
                or u.alert_id is None:
            return
        msg = Verdict(external_id=u.external_id, request_id=u.request_id, alert_id=u.alert_id, detector=spec.name,
                      severity=spec.severity, action=spec.action, score=float(u.score), position=int(u.fired_at or 0),
                      step_time=u.step_time)
        with self._lock:
            took = self.sender.send(msg)
        log.info("%s ordered on request %s by detector %s (%d API server(s) told)", spec.action, u.request_id,
                 spec.name, took, extra={"action": spec.action, "request_id": u.request_id, "detector": spec.name,
                                         "alert_id": u.alert_id, "api_servers": took})

    def on_request_end(self, external_id: str) -> None:
        if not self.actions:  # no API server waits for verdicts: nothing to say
            return
        with self._lock:
            self.sender.send(End(external_id))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    self.sender.discover()
                    self.actions = acting(self.detectors())
                    self.sender.send(Heartbeat(self.pid, self.actions))
                    denied = set(self.sender.denied) - self._denied_logged
                for path in denied:
                    self._denied_logged.add(path)
                    log.error("cannot write to vLLM's control socket %s (%s): detectors' actions will not reach "
                              "that API server; give the sidecar write access (same fsGroup, transport.file_mode "
                              "0660)", path, self.sender.denied[path], extra={"socket": path})
            except Exception:  # noqa: BLE001 - the heartbeat thread must outlive any one bad turn
                log.exception("control channel heartbeat failed")
            self._stop.wait(self.every)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sender.close()
