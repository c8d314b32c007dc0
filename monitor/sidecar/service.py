"""`monitor sidecar --config FILE`: run the loop, reload config on SIGHUP or when files change."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
from pathlib import Path

import torch

from monitor.config import ConfigError, load_config
from monitor.config.load import ConfigIssue, check_sidecar_paths, detector_files
from monitor.sidecar.loop import Sidecar
from monitor.sinks.decisions import DecisionLog
from monitor.sinks.jsonl import JsonLines

log = logging.getLogger("monitor.sidecar")


def _watched_files(sidecar: Sidecar) -> dict[Path, float]:
    lc = sidecar.loaded
    files = [lc.path] + detector_files([lc.resolve(p) for p in lc.config.detectors])[0]
    files += [lc.resolve(p.path) / "probe.json" for p in lc.config.probes]
    return {f: f.stat().st_mtime for f in files if f.exists()}


def one_scoring_thread() -> None:
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)


def run_sidecar(config: Path, decisions: Path | None = None, stop: threading.Event | None = None,
                watch_every: float = 2.0, incidents: Path | None = None) -> int:
    loaded = load_config(config)
    issues = check_sidecar_paths(loaded, {"--decisions": decisions, "--incidents": incidents})
    if issues:  # before anything starts: a clear error now, not an OSError traceback from a thread later
        raise ConfigError(issues)
    if "OMP_NUM_THREADS" not in os.environ:
        # The sidecar shares the machine with vLLM, whose OpenMP threads are pinned to cores; one
        # scoring thread avoids fighting them (torch's and numpy's BLAS: scoring may use either).
        one_scoring_thread()
    sidecar = Sidecar(loaded)
    decision_log = DecisionLog(decisions) if decisions is not None else None
    if decision_log is not None:
        sidecar.bus.on_detector(decision_log)
    reader = _reply_reader(loaded) if loaded.config.incidents.enabled else None
    kafka = _attach_kafka(sidecar, reader)
    incident_file = _attach_incident_file(sidecar, incidents, reader) if incidents is not None else None
    control = _attach_control(sidecar)
    server = _attach_metrics(sidecar, kafka, control, reader)
    stop = stop or threading.Event()
    reload_requested = threading.Event()
    if threading.current_thread() is threading.main_thread():
        # `kill -USR1 <pid>` writes every thread's stack to stderr: a stalled loop can be diagnosed.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    worker = threading.Thread(target=sidecar.run, args=(stop,), name="sidecar-loop", daemon=True)
    worker.start()
    log.info("sidecar running: %d detector(s) on layers %s, rings %s", len(sidecar.detectors.detectors),
             sidecar.detectors.layers, sidecar.pattern,
             extra={"detectors": [d.spec.name for d in sidecar.detectors.detectors], "layers": sidecar.detectors.layers,
                    "rings": sidecar.pattern})
    mtimes = _watched_files(sidecar)
    while not stop.wait(watch_every):
        current = _watched_files(sidecar)
        if current != mtimes or reload_requested.is_set():
            reload_requested.clear()
            mtimes = current
            try:
                sidecar.reload(load_config(config))
                mtimes = _watched_files(sidecar)
                log.info("config reloaded: %d detector(s)", len(sidecar.detectors.detectors),
                         extra={"detectors": [d.spec.name for d in sidecar.detectors.detectors]})
            except Exception as e:  # noqa: BLE001 - a bad edit must never stop the running monitor
                sidecar.reload_failed()
                if isinstance(e, ConfigError):
                    log.error("config reload failed, keeping the running config: %s", e,
                              extra={"config": str(config), "issues": [str(i) for i in e.issues]})
                else:
                    log.exception("config reload failed, keeping the running config")
    worker.join(timeout=5)
    if server is not None:
        server.close()
    sidecar.close()
    control.close()
    if kafka is not None:
        kafka.close()
    for f in (decision_log, incident_file):
        if f is not None:
            f.close()
    return 0


def _attach_control(sidecar: Sidecar):
    """Verdicts of acting detectors, and heartbeats, to vLLM's API servers (the control channel)."""
    from monitor.sinks.control import ControlSink

    control = ControlSink(sidecar.loaded.config, lambda: [d.spec for d in sidecar.detectors.detectors], os.getpid())
    sidecar.bus.on_detector(control.on_detector)
    sidecar.bus.on_request_end(control.on_request_end)
    return control


def _attach_metrics(sidecar: Sidecar, kafka, control, reader):
    cfg = sidecar.loaded.config.sinks.prometheus
    if not cfg.enabled:
        return None
    from monitor.detectors.drift import DriftTracker
    from monitor.sinks.metrics import MetricsServer, SidecarMetrics

    drift = sidecar.loaded.config.drift
    metrics = SidecarMetrics(sidecar.loaded.config.model.name, sidecar.snapshot,
                             kafka.stats if kafka is not None else None, expose_thresholds=cfg.expose_thresholds,
                             control_stats=control.stats, drift=DriftTracker(
                                 drift.window_requests, drift.window_tokens, drift.min_requests))
    # Token scores name their heads; the detector set in force says what each head is. Both are read on the
    # loop's thread, under its lock, so a reload cannot come between them.
    sidecar.bus.on_tokens(lambda t: metrics.on_tokens(t, sidecar.detectors))
    sidecar.bus.on_detector(metrics.on_detector)
    sidecar.bus.on_slot(metrics.on_slot)
    # After the incident sinks: they have read the reply already, and the reader remembers it.
    sidecar.bus.on_incident(lambda inc: metrics.on_incident(inc, reader(inc) if reader is not None else None))
    if kafka is not None:
        kafka.on_delivered = metrics.on_delivered
    host = os.path.expandvars(cfg.host)
    if "$" in host:
        raise ConfigError([ConfigIssue(sidecar.loaded.path, "sinks.prometheus.host",
                                       f"{cfg.host}: an environment variable in it is not set")])
    return MetricsServer(metrics, sidecar.health, host, cfg.port)


def _reply_reader(lc):
    """The model's tokenizer, loaded once, reading flagged requests' replies (None: replies are not read)."""
    from monitor.config.load import reads_reply, tokenizer_dir
    from monitor.sinks.reply import ReplyReader

    if not reads_reply(lc):
        return None
    field = "evidence.text" if lc.config.evidence.text == "flagged" else "evidence.read_reply"
    try:
        from transformers import AutoTokenizer
    except ImportError:  # the sidecar's core install leaves it out (docs/deploy.md, the sidecar's dependencies)
        raise ConfigError([ConfigIssue(lc.path, field, "needs the model's tokenizer, read with transformers, which "
                                       "is not installed here: pip install 'misalignment-monitor[text]'")]) from None
    return ReplyReader(AutoTokenizer.from_pretrained(tokenizer_dir(lc)))


def _incident_builder(lc, who: dict, reader):
    """Incident events as `evidence` says: text (from the model's tokenizer, redacted) only under `flagged`."""
    from monitor.sinks.incidents import IncidentBuilder

    cfg = lc.config
    recognizers = None
    if cfg.evidence.text == "flagged" and cfg.evidence.recognize:
        from monitor.sinks.recognizers import PiiRecognizers

        try:
            recognizers = PiiRecognizers(list(cfg.evidence.recognize), cfg.evidence.recognize_min_score)
        except RuntimeError as e:
            raise ConfigError([ConfigIssue(lc.path, "evidence.recognize", str(e))]) from None
    sealer = None
    if cfg.evidence.text == "flagged" and cfg.evidence.reveal_public_key_file:
        from monitor.sinks.sealing import Sealer, SealingError, read_key_file

        try:
            sealer = Sealer(read_key_file(lc.resolve(cfg.evidence.reveal_public_key_file)))
        except SealingError as e:
            raise ConfigError([ConfigIssue(lc.path, "evidence.reveal_public_key_file", str(e))]) from None
    return IncidentBuilder(**who, text=cfg.evidence.text, redaction=list(cfg.evidence.redact),
                           tokenizer=reader.tokenizer if reader is not None else None, recognizers=recognizers,
                           reply=reader, sealer=sealer, max_bytes=cfg.incidents.max_event_bytes)


def _who(lc) -> dict:
    """What every event says about where it comes from."""
    from monitor.sinks.events import FeatureExplanations

    cfg = lc.config
    labels = {s.name: lc.resolve(s.labels) for s in cfg.saes if s.labels}
    return dict(model=cfg.model.name, deployment=cfg.deployment.name, pod=os.environ.get("POD_NAME"),
                namespace=cfg.deployment.namespace, explanations=FeatureExplanations.load(labels))


def _attach_incident_file(sidecar: Sidecar, path: Path, reader):
    """`--incidents FILE`: incident events as JSON lines, under the same text policy as Kafka's."""
    if not sidecar.loaded.config.incidents.enabled:
        raise ConfigError([ConfigIssue(sidecar.loaded.path, "incidents.enabled", "--incidents needs incidents enabled")])
    builder = _incident_builder(sidecar.loaded, _who(sidecar.loaded), reader)
    out = JsonLines(path)
    sidecar.bus.on_incident(lambda inc: out.write(builder.build(inc)))
    return out


def _attach_kafka(sidecar: Sidecar, reader):
    """Alert events to Kafka when `sinks.kafka.enabled`: built on the loop's thread, sent by the sink's."""
    lc = sidecar.loaded
    cfg = lc.config
    if not cfg.sinks.kafka.enabled:
        return None
    from monitor.sinks.events import EventBuilder
    from monitor.sinks.kafka import KafkaSink

    who = _who(lc)
    builder = EventBuilder(**who, console_url=cfg.console.base_url)
    sink = KafkaSink(cfg.sinks.kafka, base_dir=lc.path.parent)

    def on_update(u) -> None:
        event = builder.build(u)
        if event is not None:
            sink.submit(event)

    sidecar.bus.on_detector(on_update)
    if cfg.incidents.enabled:
        incidents = _incident_builder(lc, who, reader)
        sidecar.bus.on_incident(lambda inc: sink.submit(incidents.build(inc), topic=cfg.sinks.kafka.incident_topic))
        log.info("incident events to Kafka topic %s (text: %s)", cfg.sinks.kafka.incident_topic, cfg.evidence.text,
                 extra={"topic": cfg.sinks.kafka.incident_topic, "text_policy": cfg.evidence.text})
    log.info("alert events to Kafka topic %s at %s", cfg.sinks.kafka.topic, ",".join(cfg.sinks.kafka.bootstrap_servers))
    return sink
