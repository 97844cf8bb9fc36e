"""Prometheus metrics: vLLM's metric names under a `winnow:` prefix, with bounded labels
(the served model name and the finish reason, never raw user input)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from winnow.engine.outputs import RequestOutput

if TYPE_CHECKING:
    from winnow.engine.async_engine import AsyncEngine

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class EngineCollector(Collector):
    """Gauges read from the engine's stats at scrape time."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self._engine = engine
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self._engine.stats()
        labels = ["model_name"]
        values = [self._model_name]
        for name, doc, value in (
            ("winnow:num_requests_running", "Sequences in the running batch.", stats.running),
            ("winnow:num_requests_waiting", "Sequences waiting to be scheduled.", stats.waiting),
            (
                "winnow:kv_cache_usage_perc",
                "Fraction of KV-cache blocks in use (1 = full).",
                1.0 - stats.kv_blocks_free / max(stats.kv_blocks_total, 1),
            ),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            gauge.add_metric(values, value)
            yield gauge
        preemptions = CounterMetricFamily(
            "winnow:num_preemptions", "Sequences preempted for recompute.", labels=labels
        )
        preemptions.add_metric(values, stats.preemptions)
        yield preemptions


class ServerMetrics:
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine, model_name))
        labels = ["model_name"]
        self.prompt_tokens = Counter(
            "winnow:prompt_tokens", "Prompt tokens processed.", labels, registry=self.registry
        )
        self.generation_tokens = Counter(
            "winnow:generation_tokens", "Tokens generated.", labels, registry=self.registry
        )
        self.request_success = Counter(
            "winnow:request_success",
            "Finished choices, by finish reason.",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "winnow:time_to_first_token_seconds",
            "Time from submission to the first generated token.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e_latency = Histogram(
            "winnow:e2e_request_latency_seconds",
            "Time from submission to the last token.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def first_token(self, seconds: float) -> None:
        self.time_to_first_token.labels(self.model_name).observe(seconds)

    def choice_finished(self, finish_reason: str) -> None:
        self.request_success.labels(self.model_name, finish_reason).inc()

    def request_finished(self, final: RequestOutput, seconds: float) -> None:
        self.prompt_tokens.labels(self.model_name).inc(final.prompt_tokens)
        self.generation_tokens.labels(self.model_name).inc(final.completion_tokens)
        self.e2e_latency.labels(self.model_name).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
