"""Prometheus metrics, on a registry of the app's own (no module-level state).

Counters and histograms are updated as requests finish, in the API process. Block and request
gauges and the engine's running totals are read from the engine process when /metrics is
scraped (engine/serving/shell.py `snapshot`, computed there and sent over the pipe), so they are never stale.
"""
from __future__ import annotations

import functools

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.sequence import RequestOutput
from engine.serving.tiers import TierReport

MODEL = "model_name"          # the label on every series
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Metrics:
    """Every series carries the served model's name (`model_name`, as vLLM labels its own), so
    that one Prometheus can tell the servers of different models apart."""

    def __init__(self, tiers: list[TierReport] = (), model: str = "", block_size: int = 0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        one = lambda kind, name, doc, **kw: kind(name, doc, [MODEL], registry=r, **kw).labels(model)  # noqa: E731
        by = lambda kind, name, doc, *labels: _ForModel(kind(name, doc, [MODEL, *labels], registry=r), model)  # noqa: E731
        one(Gauge, "kvgate_model_info", "The served model (1)").set(1)
        gpu_blocks = next((t.blocks for t in tiers if t.tier == "gpu"), 0)
        by(Gauge, "kvgate_cache_config_info", "The KV cache's shape, as KV-aware routers read it (vLLM's "
           "cache_config_info)", "block_size", "num_gpu_blocks").labels(str(block_size), str(gpu_blocks)).set(1)
        self.http_responses = by(Counter, "kvgate_http_responses", "HTTP responses by status code", "status")
        self.e2e = one(Histogram, "kvgate_e2e_request_latency_seconds", "Time from arrival to the last token (or "
                       "the end) of each generation", buckets=_LATENCY_BUCKETS)
        self.prompt_tokens = one(Counter, "kvgate_prompt_tokens", "Prompt tokens of finished requests")
        self.cached_tokens = by(Counter, "kvgate_cached_prompt_tokens", "Prompt tokens served from the KV cache",
                                "tier")
        self.generation_tokens = one(Counter, "kvgate_generation_tokens", "Generated tokens")
        self.requests_total = by(Counter, "kvgate_requests_finished", "Finished requests", "finish_reason")
        self.ttft = one(Histogram, "kvgate_time_to_first_token_seconds", "Time from arrival to the first token",
                        buckets=_LATENCY_BUCKETS)
        self.queue_time = one(Histogram, "kvgate_request_queue_time_seconds", "Time from arrival in the engine "
                              "to admission (its KV blocks granted)", buckets=_LATENCY_BUCKETS)
        self.tpot = one(Histogram, "kvgate_time_per_output_token_seconds", "Mean time per output token after "
                        "the first, per request", buckets=_TPOT_BUCKETS)
        self.stored_responses = one(Gauge, "kvgate_responses_stored", "Responses stored for /v1/responses' "
                                    "previous_response_id (every tenant's)")
        self.dropped_responses = one(Gauge, "kvgate_responses_dropped", "Stored responses dropped since start-up "
                                     "because their tenant had responses.max_per_tenant (the oldest go)")
        self._engine = _EngineCollector({t.tier for t in tiers if t.enabled}, model)
        r.register(self._engine)
        enabled = by(Gauge, "kvgate_tier_enabled", "1 if the KV tier is on, 0 if off (an off tier is not an "
                     "empty one)", "tier")
        capacity = by(Gauge, "kvgate_tier_capacity_bytes", "Bytes the KV tier got at start-up", "tier")
        for t in tiers:
            enabled.labels(t.tier).set(int(t.enabled))
            capacity.labels(t.tier).set(t.bytes)

    def finished(self, last: RequestOutput, ttft: float | None, decode_seconds: float, e2e: float) -> None:
        """Account one finished generation (one choice)."""
        self.e2e.observe(e2e)
        self.prompt_tokens.inc(last.prompt_tokens)
        for tier, n in last.cached_tokens.items():
            self.cached_tokens.labels(tier.name.lower()).inc(n)
        self.generation_tokens.inc(last.completion_tokens)
        self.requests_total.labels(last.finish_reason or "unknown").inc()
        if ttft is not None:
            self.ttft.observe(ttft)
        if last.queued_s is not None:
            self.queue_time.observe(last.queued_s)
        if last.completion_tokens > 1:
            self.tpot.observe(decode_seconds / (last.completion_tokens - 1))

    def responses(self, stored: int, dropped: int) -> None:
        self.stored_responses.set(stored)
        self.dropped_responses.set(dropped)

    def render(self, engine_snapshot: dict) -> bytes:
        """The exposition text, with the engine's part from `engine_snapshot` (`snapshot`)."""
        self._engine.latest = engine_snapshot
        return generate_latest(self.registry)


def add_up(values: list):
    """Several engines' answers (replicas) as one, key by key: numbers added up, anything else
    the first given (None where none is)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if isinstance(present[0], dict):
        return {k: add_up([v.get(k) for v in present]) for k in dict.fromkeys(k for v in present for k in v)}
    if isinstance(present[0], (int, float)) and not isinstance(present[0], bool):
        return sum(present)
    return present[0]


def merge_snapshots(snapshots: list[dict]) -> dict:
    """Several engines' snapshots (replicas) as one: counts and gauges add up, measured rates
    are averaged, the first broken invariant is kept."""
    merged = add_up(snapshots)
    merged["rates"] = {k: sum(s["rates"][k] for s in snapshots if k in s["rates"]) /
                       sum(k in s["rates"] for s in snapshots) for k in merged["rates"]}
    return merged


class _ForModel:
    """A labelled metric whose `labels(...)` puts the model's name first."""

    def __init__(self, metric, model: str) -> None:
        self._metric = metric
        self._model = model

    def labels(self, *values: str):
        return self._metric.labels(self._model, *values)


class _EngineCollector:
    """The engine process's snapshot (`snapshot`) as metric families."""

    def __init__(self, enabled: set[str], model: str) -> None:
        self.latest: dict = {}
        self.enabled = enabled          # tiers that are on: an off tier has no block counts, not zeros
        self.model = model

    def describe(self):
        return []

    def collect(self):
        snap = self.latest
        if not snap:
            return
        blocks = GaugeMetricFamily("kvgate_blocks", "KV blocks per tier and state", labels=[MODEL, "tier", "state"])
        for tier, states in snap["blocks"].items():
            if tier not in self.enabled:
                continue
            for state, n in states.items():
                blocks.add_metric([self.model, tier, state], n)
        yield blocks
        _family = functools.partial(_model_family, self.model)
        yield _family(GaugeMetricFamily, "kvgate_requests", "Requests in the engine", "state", snap["requests"])
        # the names KV-aware routers read (vLLM's num_requests_running / _waiting, kv_cache_usage_perc)
        yield _family(GaugeMetricFamily, "kvgate_num_requests_running", "Requests running in the engine", None,
                      {"": snap["requests"]["running"]})
        yield _family(GaugeMetricFamily, "kvgate_num_requests_waiting", "Requests waiting for admission", None,
                      {"": snap["requests"]["waiting"]})
        gpu = snap["blocks"]["gpu"]
        total = sum(gpu.values())
        yield _family(GaugeMetricFamily, "kvgate_kv_cache_usage_ratio", "Share of the GPU KV pool held by "
                      "running requests (0-1; cached blocks no request holds can be evicted and count as free)",
                      None, {"": gpu["locked"] / total if total else 0.0})
        yield _family(CounterMetricFamily, "kvgate_block_evictions", "Copies evicted per tier", "tier",
                      snap["evictions"])
        yield _family(CounterMetricFamily, "kvgate_hits_recomputed_blocks", "Cached blocks found at arrival but "
                      "computed after all (loading measured slower, the front of a disk read, evicted while "
                      "waiting), by the tier they were found in", "tier", snap["recomputed"])
        disk = snap["disk"]
        if disk is not None:
            yield _family(CounterMetricFamily, "kvgate_disk_writes_skipped", "Blocks that left the GPU "
                          "without being written, by reason (policy: the write policy; no_room: the disk tier "
                          "full of pinned blocks; disk_busy: evicted from the host tier before the queued write "
                          "ran, or no staging slot for a spill; queue_full: the write queue full; paused: "
                          "writes paused after a failure)", "reason", disk["skipped"])
            yield _family(CounterMetricFamily, "kvgate_disk_spilled_blocks", "GPU blocks written to disk "
                          "through the disk tier's staging slots because the host tier had no room", None,
                          {"": disk["spilled"]})
            yield _family(CounterMetricFamily, "kvgate_disk_operations", "Disk tier operations by outcome "
                          "(writes_paused: puts refused while writes pause after a failure; replaced: a "
                          "tier LMDB found damaged while serving, moved aside)", "op",
                          disk["operations"])
        yield _family(CounterMetricFamily, "kvgate_cache_misses", "Requests whose prompt missed the cache, by why "
                      "its first missing block was missing (evicted, never_computed), and those with blocks "
                      "found but recomputed (recomputed: the load-or-recompute choice) or found after waiting "
                      "for another request to compute them (being_computed)", "reason", snap["misses"])
        yield _family(CounterMetricFamily, "kvgate_preemptions", "Running requests preempted for KV room (their "
                      "blocks stay cached: moved to host or disk as the GPU needs the room)", None,
                      {"": snap["preemptions"]})
        yield _family(CounterMetricFamily, "kvgate_admissions_blocked", "Steps in which the most urgent waiting "
                      "request could not get its KV blocks (it waits; so do the requests behind it)", None,
                      {"": snap["admissions_blocked"]})
        yield _family(CounterMetricFamily, "kvgate_engine_steps", "Forward passes, by how they ran (decode, "
                      "mixed: replayed from a CUDA graph; eager: launched op by op)", "run", snap["steps"])
        yield _family(GaugeMetricFamily, "kvgate_measured_rate", "Rates the load-or-recompute choice uses "
                      "(prefill tokens/s, host/disk bytes/s; absent until measured)", "what", snap["rates"])


def _model_family(model: str, kind, name: str, help_text: str, label: str | None, values: dict):
    """A metric family of `kind` with one sample per value, labelled by the model and its key
    (no label: one sample, the key ignored)."""
    family = kind(name, help_text, labels=[MODEL, label] if label else [MODEL])
    for key, value in values.items():
        family.add_metric([model, key] if label else [model], value)
    return family
