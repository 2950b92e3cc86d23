"""Counters, gauges and histograms, rendered as Prometheus text exposition (format 0.0.4).

Thread-safe: the HTTP threads and the engine thread update them; `/metrics` renders them.
"""

from __future__ import annotations

import math
import threading

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    escaped = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped)) + "}"


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, registry: "Registry", name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels
        self.lock = registry.lock
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}
        registry.metrics.append(self)

    def _key(self, labels: dict) -> tuple[str, ...]:
        return tuple(str(labels[n]) for n in self.label_names)

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in sorted(self.values.items())]


class Counter(_Metric):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels) -> None:
        with self.lock:
            key = self._key(labels)
            self.values[key] = self.values.get(key, 0.0) + amount


class Gauge(_Metric):
    kind = "gauge"

    def set(self, value: float, **labels) -> None:
        with self.lock:
            self.values[self._key(labels)] = float(value)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, registry: "Registry", name: str, help: str, buckets: tuple[float, ...]):
        super().__init__(registry, name, help)
        self.buckets = tuple(buckets) + (math.inf,)
        self.counts = [0] * len(self.buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        with self.lock:
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self.counts[i] += 1
            self.sum += value
            self.count += 1

    def lines(self) -> list[str]:
        out = [f'{self.name}_bucket{{le="{_number(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {self.count}"]


class Registry:
    def __init__(self):
        self.lock = threading.Lock()
        self.metrics: list[_Metric] = []

    def render(self) -> str:
        out = []
        with self.lock:
            for m in self.metrics:
                out += [f"# HELP {m.name} {m.help}", f"# TYPE {m.name} {m.kind}", *m.lines()]
        return "\n".join(out) + "\n"


class ServerMetrics:
    """Every metric `shardrt serve` exposes."""

    def __init__(self):
        r = self.registry = Registry()
        self.requests = Counter(r, "shardrt_requests_total",
                                "HTTP requests by endpoint and status (499: the client went away first)",
                                ("endpoint", "status"))
        self.generations = Counter(r, "shardrt_generations_total", "Generations by finish reason "
                                   "(stop, length, cancelled, error)", ("finish_reason",))
        self.prompt_tokens = Counter(r, "shardrt_prompt_tokens_total", "Prompt tokens of finished generations")
        self.generation_tokens = Counter(r, "shardrt_generation_tokens_total", "Tokens generated")
        self.ttft = Histogram(r, "shardrt_time_to_first_token_seconds",
                              "From arrival (queue wait included) to the first generated token", TTFT_BUCKETS)
        self.decode_tokens = Counter(r, "shardrt_decode_tokens_total", "Tokens produced by decode steps "
                                     "(after the first); divide by shardrt_decode_seconds_total for tokens/s")
        self.decode_seconds = Counter(r, "shardrt_decode_seconds_total", "Time spent in decode steps")
        self.decode_rate = Gauge(r, "shardrt_decode_tokens_per_second", "Decode tokens/s of the last generation")
        self.queue_depth = Gauge(r, "shardrt_queue_depth", "Requests waiting for the engine")
        self.queue_rejected = Counter(r, "shardrt_queue_rejected_total", "Requests refused with 503: queue full")
        self.running = Gauge(r, "shardrt_running", "Generations in progress (0 or 1)")
        self.prefix_hits = Counter(r, "shardrt_prefix_cache_hits_total", "Prompts that reused a cached prefix")
        self.prefix_misses = Counter(r, "shardrt_prefix_cache_misses_total", "Prompts with no cached prefix")
        self.prefix_reused = Counter(r, "shardrt_prefix_cache_reused_tokens_total", "Prompt tokens not prefilled")
        self.prefix_stores = Counter(r, "shardrt_prefix_cache_stores_total", "KV snapshots taken into the prefix cache")
        self.prefix_shared = Counter(r, "shardrt_prefix_shared_requests_total",
                                     "Prompts that copied their prefix from a running request's KV")
        self.prefix_shared_tokens = Counter(r, "shardrt_prefix_shared_tokens_total",
                                            "Prompt tokens copied from a running request instead of prefilled")
        self.stage_forwards = Counter(r, "shardrt_stage_forwards_total", "Forward calls per stage", ("stage",))
        self.stage_seconds = Counter(r, "shardrt_stage_forward_seconds_total", "Time in forward per stage", ("stage",))
        self.spec_drafted = Counter(r, "shardrt_spec_drafted_tokens_total", "Speculative tokens proposed")
        self.spec_accepted = Counter(r, "shardrt_spec_accepted_tokens_total", "Speculative tokens accepted")
        self.spec_handovers = Counter(r, "shardrt_spec_handovers_total",
                                      "Speculative generations that joined the batch when another request came")
        self.pflash_prompts = Counter(r, "shardrt_pflash_prompts_total",
                                      "Prompts that asked for PFlash, by outcome (compressed, passed_through)",
                                      ("outcome",))
        self.pflash_prompt_tokens = Counter(r, "shardrt_pflash_prompt_tokens_total",
                                            "Target tokens of the prompts PFlash compressed")
        self.pflash_kept_tokens = Counter(r, "shardrt_pflash_kept_tokens_total",
                                          "Target tokens PFlash kept of them (what the target prefilled)")
        self.pflash_drafter_seconds = Counter(r, "shardrt_pflash_drafter_seconds_total",
                                              "Time the drafter spent reading and scoring prompts")
        self.up = Gauge(r, "shardrt_up", "1 when every stage is ready, else 0")
        self.restarts = Counter(r, "shardrt_restarts_total", "Cluster restarts after a stage died")
        self.last_restart = Gauge(r, "shardrt_last_restart_seconds", "How long the last cluster restart took")

    def render(self) -> str:
        return self.registry.render()
