"""Prometheus metrics of one server, in a registry of its own (two apps in one process never mix).

Counters and histograms are updated by the engine as requests finish and steps run; the gauges
(running and waiting requests, resident adapters, vLLM's ``lora_requests_info``) are read from the
engine when Prometheus scrapes, so they are never stale.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EngineState(Collector):
    """Gauges read at scrape time from ``snapshot()`` (a dict the engine fills)."""

    def __init__(self, snapshot: Callable[[], dict]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.snapshot()
        for prefix in ("adaptune_", "vllm:"):
            yield GaugeMetricFamily(f"{prefix}num_requests_running", "Requests in the running batch",
                                    value=s["running"])
            yield GaugeMetricFamily(f"{prefix}num_requests_waiting", "Requests waiting for a batch slot",
                                    value=s["waiting"])
        yield GaugeMetricFamily("adaptune_lora_adapters_resident", "LoRA adapters loaded in the model",
                                value=len(s["resident"]))
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on LoRA requests (vLLM's labels)",
                                 labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([",".join(s["running_adapters"]), ",".join(s["waiting_adapters"]), str(s["max_loras"])],
                        time.time())
        yield info


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("adaptune_requests", "Finished requests", ["adapter", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("adaptune_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r)
        self.generation_tokens = Counter("adaptune_generation_tokens", "Tokens generated", ["adapter"], registry=r)
        self.batch_size = Histogram("adaptune_batch_size", "Rows in each decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.ttft = Histogram("adaptune_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.step_seconds = Histogram("adaptune_decode_step_seconds", "Time of one decode step of the batch",
                                      buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1), registry=r)

    def watch(self, snapshot: Callable[[], dict]) -> None:
        self.registry.register(EngineState(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)
