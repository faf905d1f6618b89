"""Prometheus metrics, one registry per app (two apps in one process never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _EngineCollector:
    """Reads engine.stats() at scrape time: every numeric counter, plus the cache hit rates."""

    def __init__(self, stats_fn, inflight_fn):
        self._stats = stats_fn
        self._inflight = inflight_fn

    def collect(self):
        try:
            stats = dict(self._stats())
        except Exception:  # noqa: BLE001 - a scrape must answer even if the engine is gone
            stats = {}
        g = GaugeMetricFamily("qwenvl_requests_in_flight", "HTTP requests being served")
        g.add_metric([], self._inflight())
        yield g
        queue = stats.get("num_waiting", 0)
        g = GaugeMetricFamily("qwenvl_queue_depth", "requests waiting to be scheduled")
        g.add_metric([], float(queue))
        yield g
        for key, value in sorted(stats.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                g = GaugeMetricFamily(f"qwenvl_engine_{key}", f"engine.stats()['{key}']")
                g.add_metric([], float(value))
                yield g
        yield from _replica_metrics(stats.get("replicas"))
        rates = {
            "prefix": (stats.get("prefix_cache_hit_tokens"), stats.get("prefix_cache_queried_tokens")),
            "encoder": (stats.get("encoder_cache_hits"),
                        (stats.get("encoder_cache_hits") or 0) + (stats.get("encoder_cache_misses") or 0)),
        }
        for name, (hits, total) in rates.items():
            g = GaugeMetricFamily(f"qwenvl_{name}_cache_hit_rate", f"{name} cache hits / lookups since start")
            g.add_metric([], float(hits) / total if hits is not None and total else 0.0)
            yield g


def _replica_metrics(replicas):
    """`serve --replicas`: each replica's numeric stats as qwenvl_replica_<key>{replica="name"}."""
    if not isinstance(replicas, dict):
        return
    def numeric(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    keys = sorted({k for s in replicas.values() for k, v in s.items() if numeric(v)})
    for key in keys:
        g = GaugeMetricFamily(f"qwenvl_replica_{key}", f"per engine replica: stats()['{key}']", labels=["replica"])
        for name, s in sorted(replicas.items()):
            if numeric(s.get(key)):
                g.add_metric([name], float(s[key]))
        yield g


class Metrics:
    def __init__(self, stats_fn, inflight_fn):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("qwenvl_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.ttft = Histogram("qwenvl_time_to_first_token_seconds", "arrival to first generated token",
                              ["route"], buckets=_TTFT_BUCKETS, registry=r)
        self.latency = Histogram("qwenvl_request_latency_seconds", "arrival to last token",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("qwenvl_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("qwenvl_generation_tokens", "generated tokens of finished requests",
                                         registry=r)
        r.register(_EngineCollector(stats_fn, inflight_fn))

    def render(self) -> bytes:
        return generate_latest(self.registry)
