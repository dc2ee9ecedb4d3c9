"""One open engine, as the engine process (engine/serving/process.py) and a Ray replica
(engine/serving/replica.py) both serve it: started on the tiers planned for this machine, with its
tenants' shares and its KV events, answering submits, aborts, stats and operators' operations,
and saying what the API side needs of it (`info`). The two differ only in how messages reach
it: a ZMQ pipe, or a Ray deployment handle.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from engine import cache_admin
from engine.engine import Engine
from engine.model import LoadedModel
from engine.request import Request
from engine.sequence import RequestOutput, RequestStream
from engine.serving.config import KvEventsConfig, ServingConfig
from engine.serving.kv_events import KVEventPublisher, open_events
from engine.serving.tiers import describe_kv, kv_arithmetic, open_engine

log = logging.getLogger("kvgate.engine")


class EngineShell:
    def __init__(self, engine: Engine, events: KVEventPublisher | None, info: dict) -> None:
        self.engine = engine
        self.events = events
        self.info = info               # the "ready" message: `engine_info`

    @classmethod
    async def open(cls, config: ServingConfig, model: LoadedModel,
                   on_output: Callable[[RequestOutput], None] | None = None,
                   events: KvEventsConfig | None = None, namespace_key: bytes | None = None) -> EngineShell:
        """Open the store on the planned tiers and start the engine (`on_output`: every output,
        for a shell that sends them in batches; `events`: the KV events' configuration, the
        config's by default). Raises ConfigError naming a key, or what the start raised."""
        engine, reports = open_engine(config, model, lambda store: Engine(
            model, config.engine, store, detokenize=False, on_output=on_output,
            tenants=dict(config.tenants)))
        publisher = open_events(events or config.kv_events, engine.store, namespace_key)
        try:
            await engine.start()
        except BaseException:
            if publisher is not None:
                publisher.close()
            raise
        kv = kv_arithmetic(reports, engine.config.block_size, engine.store.layout.block_bytes)
        log.info("serving %s on %s; KV tiers: %s; steps: %s", model.name, model.device,
                 ", ".join(r.describe() for r in reports), engine.config.describe(engine.configured))
        log.info("KV: %s", describe_kv(kv))
        return cls(engine, publisher, engine_info(engine, reports, kv))

    def submit(self, request: dict) -> RequestStream:
        """A request as `Request.to_wire` wrote it; raises InvalidRequest."""
        return self.engine.submit(Request.from_wire(request))

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def stats(self) -> dict:
        return snapshot(self.engine)

    def admin(self, op: str, args: list):
        """An operator's operation (checked in the API process's gateway/admin.py)."""
        return cache_admin.run(self.engine.store, op, args)

    async def stop(self, persist: bool, persist_s: float | None = None) -> None:
        """Abort what runs, persist (choosing and copying blocks for at most `persist_s`), close."""
        try:
            await self.engine.stop(persist=persist, persist_s=persist_s)
        finally:
            if self.events is not None:
                self.events.close()


def engine_info(engine: Engine, reports: list, kv: dict) -> dict:
    """What the API side needs of a started engine (EngineClient.adopt): its "ready" message."""
    model, b = engine.loaded, engine.bounds
    return {"name": model.name, "device": str(model.device), "fingerprint": model.fingerprint,
            "max_sequence_tokens": engine.max_sequence_tokens,
            "bounds": [b.vocab_size, b.max_model_len, b.block_size, b.gpu_blocks, b.has_tokenizer],
            "tiers": [{"tier": r.tier, **r.as_dict()} for r in reports], "kv": kv,
            "steps": {"max_num_seqs": engine.config.max_num_seqs,
                      "max_num_batched_tokens": engine.config.max_num_batched_tokens}}


def snapshot(engine: Engine) -> dict:
    """The engine's and the store's state and running totals, as plain values (msgpack can
    carry them): what /metrics and /health read, computed in the engine process."""
    stats = engine.store.stats()
    name = lambda tier: tier.name.lower()  # noqa: E731
    disk = stats.disk
    return {
        "blocks": {name(t): {k: getattr(s, k) for k in ("free", "cached", "locked")} for t, s in stats.tiers.items()},
        "requests": {"running": engine.num_running, "waiting": engine.num_waiting},
        "evictions": {name(t): s.evictions for t, s in stats.tiers.items()},
        "recomputed": {"gpu": 0, "host": 0, "disk": 0, **engine.recomputed_blocks},
        "disk": None if disk is None else {
            "skipped": {"policy": 0, "no_room": 0, "disk_busy": 0, **stats.writes_skipped,
                        "queue_full": disk.pending_full, "paused": disk.writes_paused},
            "spilled": stats.overload.get("spilled", 0),
            "operations": dataclasses.asdict(disk)},
        "preemptions": engine.scheduler.num_preemptions,
        "misses": {"evicted": 0, "never_computed": 0, "recomputed": 0, "being_computed": 0, **engine.miss_reasons},
        "admissions_blocked": engine.scheduler.num_blocked_admissions,
        "steps": {"decode": 0, "mixed": 0, "eager": 0, **engine.runner.steps},
        "rates": {what: v for what, v in engine.costs.rates().items() if v is not None},
        "integrity_error": None if engine.integrity_error is None else str(engine.integrity_error),
    }
