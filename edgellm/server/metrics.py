"""/metrics: Prometheus text format, read from the runtime at scrape time.

Names follow llama.cpp's server (``llamacpp:*``) where the meaning is the same, so
existing dashboards work; the rest are ``edgellm_*``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edgellm.runtime.manager import Runtime

disable_created_metrics()  # *_created series only add noise on a device


class RuntimeCollector(Collector):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Any]:
        rt = self.runtime
        totals = rt.totals()
        yield CounterMetricFamily(
            "llamacpp:prompt_tokens", "Prompt tokens processed.", value=totals.prompt_tokens
        )
        yield CounterMetricFamily(
            "llamacpp:prompt_seconds", "Prompt processing time.", value=totals.prompt_seconds
        )
        yield CounterMetricFamily(
            "llamacpp:tokens_predicted", "Generated tokens.", value=totals.generated_tokens
        )
        yield CounterMetricFamily(
            "llamacpp:tokens_predicted_seconds", "Generation time.", value=totals.decode_seconds
        )
        yield CounterMetricFamily(
            "edgellm_prompt_tokens_reused",
            "Prompt tokens taken from the prefix cache.",
            value=totals.reused_prompt_tokens,
        )
        yield CounterMetricFamily(
            "llamacpp:n_decode", "Decode steps (one token per sequence).", value=totals.decode_steps
        )
        yield CounterMetricFamily(
            "edgellm_decode_step_sequences",
            "Sequences decoded, summed over steps (divide by "
            "llamacpp:n_decode_total for the mean batch).",
            value=totals.decode_step_sequences,
        )
        loaded = rt.loaded()
        busy = sum(m.slots_busy for m in loaded)
        yield GaugeMetricFamily("llamacpp:requests_processing", "Requests in a slot.", value=busy)
        yield GaugeMetricFamily(
            "llamacpp:requests_deferred", "Requests waiting.", value=rt.queue_depth()
        )
        yield GaugeMetricFamily(
            "edgellm_queue_depth", "Requests waiting for a slot or a load.", value=rt.queue_depth()
        )
        slots = GaugeMetricFamily("edgellm_busy_slots", "Busy slots per model.", labels=["model"])
        for m in loaded:
            slots.add_metric([m.name], m.slots_busy)
        yield slots
        yield GaugeMetricFamily("edgellm_loaded_models", "Models loaded.", value=len(loaded))
        rates = {
            unit: GaugeMetricFamily(
                f"edgellm_{unit}_per_second",
                f"{what} per second over the last 5 s.",
                labels=["model"],
            )
            for unit, what in (("tokens", "Generated tokens"), ("rows", "ONNX rows run"))
        }
        for m in loaded:
            rates[m.rate_unit].add_metric([m.name], m.rate)
        yield from rates.values()
        mem = GaugeMetricFamily(
            "edgellm_model_memory_bytes", "Estimated memory per loaded model.", labels=["model"]
        )
        for m in loaded:
            mem.add_metric([m.name], m.memory_mb * 1024 * 1024)
        yield mem
        for key, value in rt.stats.items():
            yield CounterMetricFamily(f"edgellm_model_{key}", f"Model {key}.", value=value)


class GovernorCollector(Collector):
    def __init__(self, governor: Any) -> None:
        self.governor = governor

    def collect(self) -> Iterator[Any]:
        g = self.governor
        yield GaugeMetricFamily(
            "edgellm_governor_level",
            "0 normal, 1 elevated, 2 throttled, 3 critical.",
            value=g.level,
        )
        readings = GaugeMetricFamily(
            "edgellm_governor_reading", "The governor's readings.", labels=["name"]
        )
        for name, value in sorted(g.readings.items()):
            if value is not None:
                readings.add_metric([name], value)
        yield readings
        yield CounterMetricFamily(
            "edgellm_governor_cancelled",
            "Generations cancelled at the critical level.",
            value=g.cancelled,
        )
        yield CounterMetricFamily(
            "edgellm_governor_recovered",
            "Stuck or dead engines recovered by the stability watch.",
            value=g.watch.recovered,
        )
        yield CounterMetricFamily(
            "edgellm_governor_suspected_leaks",
            "Memory growth reported as a suspected leak.",
            value=g.watch.leaks,
        )


class Metrics:
    def __init__(self, runtime: Runtime, governor: Any = None) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(RuntimeCollector(runtime))
        if governor is not None:
            self.registry.register(GovernorCollector(governor))
        self.requests = Counter(
            "edgellm_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.refused = Counter(
            "edgellm_rate_limited",
            "Requests answered 429: a principal over max_in_flight or per_minute, or an "
            "address after too many failed authentications.",
            ["reason"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
