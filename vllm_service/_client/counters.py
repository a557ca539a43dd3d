"""The service's counters: every request's outcome, counted once where its result arrives.

    Dispatcher.results(call, futures)  (generate, chat, batches, streams, asyncio alike)
      -> Counters.record(outcomes): finish reasons, error kinds, tokens, the timings'
         histograms
    Dispatcher.metrics() -> Counters.snapshot() + the worker's state -> ServiceMetrics
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Sequence

from ..types import (
    LATENCY_BUCKETS,
    TIME_TO_FIRST_TOKEN_BUCKETS,
    EmbeddingResult,
    GenerationResult,
    Histogram,
)


class _Observed:
    """A histogram being filled: counts per bucket, their sum and count."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le).
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def frozen(self) -> Histogram:
        return Histogram(self.buckets, tuple(self.counts), self.sum, self.count)


class Counters:
    """What a service's requests came to, since it was made; safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._finish_reasons: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._first_token = _Observed(TIME_TO_FIRST_TOKEN_BUCKETS)
        self._latency = _Observed(LATENCY_BUCKETS)

    def record(
        self, outcomes: Sequence[GenerationResult | EmbeddingResult | BaseException]
    ) -> None:
        """Count each request's result, or the error its call raised for it."""
        with self._lock:
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    self._errors[type(outcome).__name__] += 1
                    continue
                self._finish_reasons[outcome.finish_reason] += 1
                if outcome.error_type is not None:
                    self._errors[outcome.error_type] += 1
                self._prompt_tokens += outcome.prompt_tokens
                self._generation_tokens += outcome.completion_tokens
                timings = outcome.timings
                if timings is None:
                    continue
                self._latency.observe(timings.latency_seconds)
                if timings.time_to_first_token_seconds is not None:
                    self._first_token.observe(timings.time_to_first_token_seconds)

    def snapshot(self) -> dict[str, object]:
        """The counts now, as :class:`~vllm_service.types.ServiceMetrics` fields."""
        with self._lock:
            return {
                "finish_reasons": dict(self._finish_reasons),
                "errors": dict(self._errors),
                "prompt_tokens": self._prompt_tokens,
                "generation_tokens": self._generation_tokens,
                "time_to_first_token": self._first_token.frozen(),
                "latency": self._latency.frozen(),
            }
