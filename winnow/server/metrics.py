"""Prometheus metrics: vLLM's metric names under a `winnow:` prefix, with bounded labels
(the served model name and the finish reason, never raw user input); the engine gauges the
routers read are exported under vLLM's own `vllm:` names too."""

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


# The label vLLM puts beside model_name on its engine gauges: the engine's index in a data-
# parallel group (one engine per Winnow server).
VLLM_ENGINE_INDEX = "0"


class EngineCollector(Collector):
    """Gauges read from the engine's stats at scrape time, under Winnow's names and again under
    the vLLM names that routers (vllm-router, smg, the Gateway API Inference Extension) read."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self._engine = engine
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self._engine.stats()
        kv_usage = 1.0 - stats.kv_blocks_free / max(stats.kv_blocks_total, 1)
        gauges = (
            ("num_requests_running", "Sequences in the running batch.", stats.running),
            ("num_requests_waiting", "Sequences waiting to be scheduled.", stats.waiting),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", kv_usage),
        )
        counters = (
            ("num_preemptions", "Sequences preempted for recompute.", stats.preemptions),
            (
                "prefix_cache_queries",
                "Tokens looked up in the prefix cache.",
                stats.prefix_queried_tokens,
            ),
            ("prefix_cache_hits", "Tokens found in the prefix cache.", stats.prefix_hit_tokens),
        )
        winnow = (["model_name"], [self._model_name])
        vllm = (["model_name", "engine"], [self._model_name, VLLM_ENGINE_INDEX])
        for prefix, (labels, values) in (("winnow:", winnow), ("vllm:", vllm)):
            for name, doc, value in gauges:
                gauge = GaugeMetricFamily(prefix + name, doc, labels=labels)
                gauge.add_metric(values, value)
                yield gauge
            for name, doc, value in counters:
                counter = CounterMetricFamily(prefix + name, doc, labels=labels)
                counter.add_metric(values, value)
                yield counter
        # vLLM's older name of kv_cache_usage_perc, still read by some routers.
        legacy = GaugeMetricFamily("vllm:gpu_cache_usage_perc", "KV-cache usage.", labels=vllm[0])
        legacy.add_metric(vllm[1], kv_usage)
        yield legacy
        yield self._cache_config_info()

    def _cache_config_info(self) -> Metric:
        """vLLM's info gauge (value 1) whose labels describe the KV cache."""
        config = self._engine.engine.config
        labels = {
            "engine": VLLM_ENGINE_INDEX,
            "block_size": str(config.block_size),
            "cache_dtype": config.kv_cache_dtype,
            "enable_prefix_caching": str(config.enable_prefix_caching),
            "gpu_memory_utilization": str(config.gpu_memory_utilization),
            "num_gpu_blocks": str(self._engine.stats().kv_blocks_total),
        }
        info = GaugeMetricFamily(
            "vllm:cache_config_info", "Information of the KV cache.", labels=list(labels)
        )
        info.add_metric(list(labels.values()), 1.0)
        return info


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
