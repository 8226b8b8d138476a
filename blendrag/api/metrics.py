"""Prometheus metrics of one app, in a registry of its own (two apps in a process never collide)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from blendrag.stats import GenerationStats

# TTFT of a blended prompt on CPU runs from milliseconds (tiny models) to seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, store) -> None:
        self.registry = CollectorRegistry()
        # Running sums for the ratio gauges (prometheus_client counters expose no public read).
        self._totals = {"hit": 0, "miss": 0, "prompt": 0, "recomputed": 0}
        self.requests = Counter(
            "blendrag_http_requests",
            "HTTP requests by route template, method and status code",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "blendrag_ttft_seconds",
            "Prefill time to the first token, by prefill mode",
            ["mode"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.chunk_kv = Counter(
            "blendrag_kv_chunk_lookups",
            "Chunk KV lookups in the store while building prompts (hit: reused, miss: computed)",
            ["result"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "blendrag_prompt_tokens", "Prompt tokens prefilled", registry=self.registry
        )
        self.recomputed_tokens = Counter(
            "blendrag_recomputed_tokens",
            "Prompt tokens computed in the last layer (the rest came from reused KV)",
            registry=self.registry,
        )
        hit_rate = Gauge(
            "blendrag_kv_cache_hit_rate", "Chunk KV hits / lookups since start", registry=self.registry
        )
        hit_rate.set_function(lambda: _ratio(self._totals["hit"], self._totals["hit"] + self._totals["miss"]))
        fraction = Gauge(
            "blendrag_recomputed_token_fraction",
            "Recomputed / prefilled prompt tokens since start (of prompts whose recomputed count is known)",
            registry=self.registry,
        )
        fraction.set_function(lambda: _ratio(self._totals["recomputed"], self._totals["prompt"]))
        self.registry.register(_StoreStats(store))

    def observe_generation(self, stats: GenerationStats) -> None:
        """A stat the backend could not give (None) is left out, never counted as 0."""
        if stats.ttft_s is not None:
            self.ttft.labels(stats.mode).observe(stats.ttft_s)
        self.chunk_kv.labels("hit").inc(stats.cache_hits)
        self.chunk_kv.labels("miss").inc(stats.cache_misses)
        self._totals["hit"] += stats.cache_hits
        self._totals["miss"] += stats.cache_misses
        self.prompt_tokens.inc(stats.n_tokens)
        if stats.n_recomputed is not None:
            self.recomputed_tokens.inc(stats.n_recomputed)
            # The fraction's denominator only counts prompts whose recomputed tokens are known.
            self._totals["prompt"] += stats.n_tokens
            self._totals["recomputed"] += stats.n_recomputed

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


class _StoreStats(Collector):
    """KV store bytes and event counts per tier, read at scrape time from the store's counters.

    ``unavailable`` counts calls a remote tier (Redis) could not serve: while it grows, queries
    compute KV instead of loading it (same answers, higher TTFT): the operator's warning sign.
    """

    def __init__(self, store) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        store = self.store
        tiers = {"all": store}
        if hasattr(store, "tiers"):
            tiers = dict(zip(store.names, store.tiers, strict=True))
        size = GaugeMetricFamily(
            "blendrag_kv_store_bytes", "Bytes of chunk KV held, by tier", labels=["tier"]
        )
        events = CounterMetricFamily(
            "blendrag_kv_store_events",
            "KV store calls by tier and outcome (hits, misses, corrupt, puts, evictions, unavailable)",
            labels=["tier", "event"],
        )
        for tier, store in tiers.items():
            size.add_metric([tier], store.nbytes())
            for event, n in store.stats.items():
                events.add_metric([tier, event], n)
        yield size
        yield events
