"""The monitor's verdicts in vLLM's traces (OpenTelemetry), when vLLM traces (`--otlp-traces-endpoint`).

vLLM makes its `llm_request` span only when a request finishes, gives plugins no handle on it, and
makes none for an aborted request. So the middleware opens its own span around each generation
request, a child of the caller's `traceparent`, and writes its own context back into that header:
vLLM's span then nests under it, and the verdicts recorded on it (detector, score, alert id,
action) sit beside vLLM's timings in a trace viewer, aborted requests included.

It uses the tracer provider vLLM installs globally in the API server (same exporter, same
endpoint); without one (no `--otlp-traces-endpoint`), nothing is traced and headers stay as they are.
"""

from __future__ import annotations

from monitor.transport.control import Verdict

TRACER_NAME = "misalignment-monitor"
SPAN_NAME = "misalignment-monitor request"
PREFIX = "misalignment_monitor"


def tracer():
    """vLLM's tracer provider's tracer, or None when no SDK provider is installed (tracing off)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    return provider.get_tracer(TRACER_NAME)


def start_span(t, headers: list[tuple[bytes, bytes]], request_id: str, path: str):
    """Open the request's span from the caller's trace headers; returns (span, headers naming it as parent)."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagator = TraceContextTextMapPropagator()
    carrier = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers}
    parent = propagator.extract(carrier)
    span = t.start_span(SPAN_NAME, context=parent, kind=trace.SpanKind.SERVER,
                        attributes={f"{PREFIX}.request_id": request_id, "url.path": path,
                                    "http.request.method": "POST"})
    out: dict[str, str] = {}
    propagator.inject(out, context=trace.set_span_in_context(span, parent))
    names = {k.encode() for k in out}
    rewritten = [(k, v) for k, v in headers if k.lower() not in names]
    rewritten += [(k.encode(), v.encode("latin-1")) for k, v in out.items()]
    return span, rewritten


def record_verdict(span, v: Verdict) -> None:
    span.add_event(f"{PREFIX}.verdict", {
        f"{PREFIX}.detector": v.detector, f"{PREFIX}.score": v.score, f"{PREFIX}.alert_id": v.alert_id,
        f"{PREFIX}.action": v.action, f"{PREFIX}.severity": v.severity, f"{PREFIX}.position": v.position})


def end_span(span, taken: list[tuple[Verdict, str]], status: int | None, aborted: bool) -> None:
    if taken:
        span.set_attribute(f"{PREFIX}.alert_ids", [v.alert_id for v, _ in taken])
        span.set_attribute(f"{PREFIX}.detectors", [v.detector for v, _ in taken])
        span.set_attribute(f"{PREFIX}.actions", [a for _, a in taken])
    if aborted:
        span.set_attribute("gen_ai.response.finish_reasons", ["content_filter"])
    if status is not None:
        span.set_attribute("http.response.status_code", status)
    span.end()
