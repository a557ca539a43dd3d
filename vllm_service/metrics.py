"""A service's metrics for Prometheus: ``register(service)``, read at every scrape.

    from prometheus_client import start_http_server
    from vllm_service import VLLMInferenceService
    from vllm_service.metrics import register

    service = VLLMInferenceService()
    register(service)                              # into prometheus_client's REGISTRY
    start_http_server(9400, addr="127.0.0.1")      # GET http://127.0.0.1:9400/metrics

Needs ``prometheus-client`` (``pip install 'vllm-service[metrics]'``); without it,
:meth:`VLLMInferenceService.metrics` gives the same numbers as plain data. The collector
reads ``service.metrics()`` when scraped (prometheus_client's custom-collector pattern), so
the counting stays in one place, the service's. Every name starts with ``vllm_service_`` and
every series has a ``model`` label. See docs/operators.md for the list.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .async_service import AsyncVLLMInferenceService
from .service import VLLMInferenceService
from .types import Histogram, ServiceMetrics

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

_STATES = ("stopped", "starting", "ready", "retiring", "stopping")


class ServiceCollector:
    """A Prometheus collector of one or more services' :meth:`~VLLMInferenceService.metrics`.

    Holds the services weakly: a service dropped by the app leaves the scrape, and the
    registry does not keep it (and its worker) alive.
    """

    def __init__(self, *services: VLLMInferenceService | AsyncVLLMInferenceService) -> None:
        self._services = [
            weakref.ref(s.service if isinstance(s, AsyncVLLMInferenceService) else s)
            for s in services
        ]

    def collect(self) -> Iterator[Any]:
        """The metric families, one series per service (``model`` label) in each."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        snapshots = [m for m in (self._metrics(ref) for ref in self._services) if m is not None]
        requests = CounterMetricFamily(
            "vllm_service_requests", "Requests answered, by finish_reason.",
            labels=["model", "finish_reason"],
        )
        errors = CounterMetricFamily(
            "vllm_service_request_errors",
            "Failed requests, by error_type (an error result's kind, or the error raised).",
            labels=["model", "error_type"],
        )
        prompt_tokens = CounterMetricFamily(
            "vllm_service_prompt_tokens", "Prompt tokens of the answered requests.",
            labels=["model"],
        )
        generation_tokens = CounterMetricFamily(
            "vllm_service_generation_tokens", "Tokens generated for the answered requests.",
            labels=["model"],
        )
        first_token = HistogramMetricFamily(
            "vllm_service_time_to_first_token_seconds",
            "Seconds from a request's arrival at the engine to its first token.", labels=["model"],
        )
        latency = HistogramMetricFamily(
            "vllm_service_e2e_request_latency_seconds",
            "Seconds from a request's arrival at the engine to its end.", labels=["model"],
        )
        waiting = GaugeMetricFamily(
            "vllm_service_requests_waiting", "Requests in flight with no token yet.",
            labels=["model"],
        )
        running = GaugeMetricFamily(
            "vllm_service_requests_running", "Requests in flight that are generating.",
            labels=["model"],
        )
        state = GaugeMetricFamily(
            "vllm_service_worker_state", "1 for the worker's state now, 0 for the others.",
            labels=["model", "state"],
        )
        restarts = CounterMetricFamily(
            "vllm_service_worker_restarts", "Workers started after the first.", labels=["model"]
        )
        load = GaugeMetricFamily(
            "vllm_service_load_seconds", "How long the current worker took to load the model.",
            labels=["model"],
        )
        version = GaugeMetricFamily(
            "vllm_service_weight_version_info",
            "1, labelled with the weight version of the current worker (empty: the model's own).",
            labels=["model", "weight_version"],
        )
        for m in snapshots:
            for reason, count in sorted(m.finish_reasons.items()):
                requests.add_metric([m.model, reason], count)
            for kind, count in sorted(m.errors.items()):
                errors.add_metric([m.model, kind], count)
            prompt_tokens.add_metric([m.model], m.prompt_tokens)
            generation_tokens.add_metric([m.model], m.generation_tokens)
            first_token.add_metric([m.model], *_buckets(m.time_to_first_token))
            latency.add_metric([m.model], *_buckets(m.latency))
            waiting.add_metric([m.model], m.waiting)
            running.add_metric([m.model], m.running)
            for name in _STATES:
                state.add_metric([m.model, name], 1.0 if m.state == name else 0.0)
            restarts.add_metric([m.model], m.restarts)
            if m.load_seconds is not None:
                load.add_metric([m.model], m.load_seconds)
            if m.state != "stopped":
                version.add_metric(
                    [m.model, "" if m.weight_version is None else str(m.weight_version)], 1.0
                )
        yield from (requests, errors, prompt_tokens, generation_tokens, first_token, latency,
                    waiting, running, state, restarts, load, version)

    @staticmethod
    def _metrics(ref: weakref.ref[VLLMInferenceService]) -> ServiceMetrics | None:
        service = ref()
        return None if service is None else service.metrics()


def _buckets(histogram: Histogram) -> tuple[list[tuple[str, float]], float]:
    """A histogram as prometheus_client's ``add_metric`` takes it: cumulative ``le`` buckets
    (``+Inf`` last) and the sum."""
    from prometheus_client.utils import floatToGoString

    buckets = [(floatToGoString(bound), float(n)) for bound, n in histogram.cumulative()]
    return buckets, histogram.sum


def register(
    *services: VLLMInferenceService | AsyncVLLMInferenceService,
    registry: CollectorRegistry | None = None,
) -> ServiceCollector:
    """Expose ``services``' metrics in ``registry`` (prometheus_client's default ``REGISTRY``
    unless given); returns the collector, for ``registry.unregister`` later.

    Several services go in one call, so that their series share one metric family each.
    """
    if not services:
        raise TypeError("register() needs at least one service")
    if registry is None:
        from prometheus_client import REGISTRY as registry
    collector = ServiceCollector(*services)
    registry.register(collector)
    return collector
