"""OpenTelemetry for a ``controlplane`` process: on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set, and then exporting spans over OTLP/HTTP (protobuf) in
batches; off otherwise, with no SDK loaded at all (``core.telemetry``'s helpers return at once).

The standard variables apply: ``OTEL_SERVICE_NAME`` (default ``controlplane-<process>``),
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_BSP_*`` for batching,
``OTEL_TRACES_SAMPLER``; ``OTEL_SDK_DISABLED=true`` keeps tracing off whatever else is set."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

from core import telemetry

log = logging.getLogger(__name__)
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def configure_tracing(process: str, environ: Mapping[str, str] = os.environ) -> Callable[[], None] | None:
    """Start exporting this process's spans if an OTLP endpoint is configured; returns the function
    that flushes and stops the exporter at exit (None when tracing stays off)."""
    if not wanted(environ):
        return None
    # Imported here: a process without tracing never loads the SDK or the exporter.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {"service.namespace": "controlplane", "cp.process": process}
    if not environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = f"controlplane-{process}"
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    telemetry.enable(provider.get_tracer("controlplane"))
    endpoint = next(environ[name] for name in ENDPOINT_VARIABLES if environ.get(name, "").strip())
    log.info("tracing on: spans go to %s over OTLP/HTTP", endpoint)

    def shutdown() -> None:
        telemetry.disable()
        provider.shutdown()  # flushes what is still batched

    return shutdown
