"""The service's Prometheus metrics, in a registry of their own (one per server instance).

Engine gauges (queue depth, running generations) are read at scrape time through
callbacks, so the hot path only increments counters and observes histograms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_INTER_TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0)


class CancelCause(StrEnum):
    STOP = "stop"
    CLOSE = "close"
    DISCONNECT = "disconnect"
    SHUTDOWN = "shutdown"
    REVOKED = "revoked"


class Metrics:
    def __init__(
        self,
        *,
        queue_depth: Callable[[], float],
        running: Callable[[], float],
        pending_writes: Callable[[], float] = lambda: 0,
        unsettled: Callable[[], float] = lambda: 0,
        reused: Callable[[], Mapping[str, float]] = dict,
    ) -> None:
        """``reused``: the engines' prompt positions copied from another KV cache, by how
        (``shared``: another chat's cache of the same user; ``forked``: the first choice of the
        same request), read at scrape time."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(
            "localchat_time_to_first_token_seconds",
            "From send to the first generated token",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inter_token = Histogram(
            "localchat_inter_token_latency_seconds",
            "Time between successive token frames of one generation",
            buckets=_INTER_TOKEN_BUCKETS_S,
            registry=r,
        )
        self.generated_tokens = Counter(
            "localchat_generated_tokens", "Tokens generated for clients", registry=r
        )
        self.prompt_tokens = Counter(
            "localchat_prompt_tokens",
            "Prompt tokens by source: served from a chat's KV cache or computed",
            ["source"],
            registry=r,
        )
        self.generations = Counter(
            "localchat_generations", "Finished generations by reason", ["reason"], registry=r
        )
        self.cancellations = Counter(
            "localchat_cancellations", "Cancelled generations by cause", ["cause"], registry=r
        )
        for cause in CancelCause:
            self.cancellations.labels(cause=cause.value)
        for source in ("cache", "computed"):
            self.prompt_tokens.labels(source=source)
        self.connections = Gauge("localchat_open_connections", "Open WebSocket connections", registry=r)
        self.sessions = Gauge("localchat_open_sessions", "Open chat sessions", registry=r)
        Gauge("localchat_queue_depth", "Generations waiting for the decoder", registry=r).set_function(
            queue_depth
        )
        Gauge("localchat_running_generations", "Generations prefilling or decoding", registry=r).set_function(
            running
        )
        Gauge(
            "localchat_pending_writes", "Writes kept in memory until the database is back", registry=r
        ).set_function(pending_writes)

        Gauge(
            "localchat_unsettled_chats",
            "Finished chats whose KV caches the idle engine still re-prefills (background work)",
            registry=r,
        ).set_function(unsettled)

        r.register(_ReusedTokens(reused))

    def describe_instance(self, name: str, instance_id: str) -> None:
        """``localchat_instance_info{instance_name, instance_id} 1``: which replica answered the
        scrape (each replica has its own registry; Prometheus adds its own ``instance`` label)."""
        Gauge(
            "localchat_instance_info",
            "This replica: its --instance-name and the id its replies are owned by",
            ["instance_name", "instance_id"],
            registry=self.registry,
        ).labels(instance_name=name, instance_id=instance_id).set(1)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _ReusedTokens(Collector):
    def __init__(self, read: Callable[[], Mapping[str, float]]) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "localchat_prompt_tokens_reused",
            "Prompt tokens copied from another KV cache instead of computed, by how: shared (another "
            "chat of the same user) or forked (the first choice of the same request, OpenAI's n)",
            labels=["how"],
        )
        counts = self._read()
        for how in ("shared", "forked"):
            family.add_metric([how], counts.get(how, 0))
        yield family
