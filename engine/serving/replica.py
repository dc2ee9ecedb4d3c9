"""One kvgate engine as a Ray Serve replica: the class the `EngineReplica` deployment wraps
(gateway/engines/replicas.py deploys it and talks to it). Each replica serves its engine through
the same `EngineShell` as the engine process (engine/serving/shell.py), publishes its KV events
for the prefix router, and keeps its disk tier in a directory of its own.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os

import ray
import zmq
from ray import serve

from engine.config import user_cache_dir
from engine.errors import InvalidRequest
from engine.model import load_model
from engine.serving import wire
from engine.serving.config import KvEventsConfig, ServingConfig
from engine.serving.shell import EngineShell


class EngineReplica:
    """One engine, as a Ray Serve replica (the class `deployment` wraps)."""

    async def __init__(self, config: ServingConfig, events: EventKeys) -> None:
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.config = config = replica_config(config, context.rank.rank)
        model = await asyncio.to_thread(load_model, config.model, config.engine.block_size)
        host = ray.util.get_node_ip_address()     # reached from other nodes: CURVE, the router's key only
        self.shell = await EngineShell.open(config, model, events=KvEventsConfig(
            enabled=True, endpoint=f"tcp://{host}:*", replay_endpoint=f"tcp://{host}:*",
            curve_secret_key=events.server_secret, curve_client_keys=events.router_public),
            namespace_key=bytes.fromhex(events.namespace_key))
        for prefix in config.public_prefixes:    # as the gateway declares them: a replica autoscaling adds has them
            ids = model.encode_chat([{"role": "system", "content": prefix.system}]) if prefix.system \
                else model.tokenizer.encode(prefix.text)
            self.shell.engine.store.declare_public(ids)
        self.info = {**self.shell.info, "replica": self.replica}

    def record_routing_stats(self) -> dict:
        events, engine = self.shell.events, self.shell.engine
        return {"kv_events": events.endpoint, "kv_events_replay": events.replay_endpoint,
                "kv_events_key": events.public_key, "running": engine.num_running, "waiting": engine.num_waiting}

    async def generate(self, request: dict):
        """A request's outputs as wire rows; the replica's id first. Cancelled (the caller went
        away, or aborted it): the request is aborted."""
        yield self.replica
        try:
            stream = self.shell.submit(request)
        except InvalidRequest as e:
            yield ["rejected", str(e)]
            return
        finished = False
        try:
            async for out in stream:
                finished = out.finish_reason is not None
                yield wire.output_to_wire(out)
        finally:
            if not finished:
                self.shell.abort(request["request_id"])

    async def ask(self, request: dict):
        """An operator's message ("stats", "info", or an admin operation), answered by this replica."""
        op, args = request["op"], request.get("args", [])
        if op == "stats":
            return self.shell.stats()
        if op == "info":
            return self.info
        return self.shell.admin(op, args)

    async def __del__(self) -> None:
        """Serve stops the replica: abort what runs, write what fits of the cache to its disk
        tier within its graceful shutdown (server.shutdown_timeout_s; `persist_s` of it)."""
        await self.shell.stop(persist=True, persist_s=self.config.persist_s)


def replica_config(config: ServingConfig, rank: int) -> ServingConfig:
    """`config` for replica `rank`: its disk tier in a directory of its own."""
    disk = config.store.disk
    if not disk.enabled:
        return config
    base = disk.path or os.path.join(user_cache_dir(), "kvgate", "kv")
    os.makedirs(base, exist_ok=True)
    disk = dataclasses.replace(disk, path=os.path.join(base, f"replica-{rank}"))
    store = dataclasses.replace(config.store, disk=disk)
    return dataclasses.replace(config, store=store)


@dataclasses.dataclass(frozen=True)
class EventKeys:
    """The CURVE keys (Z85) of one deployment's KV events: the replicas publish with the server
    secret and let in only the router's public key; the namespace key hashes the namespaces in
    them. Made anew by each `deploy`, handed to the replicas and the router through Ray."""
    server_secret: str
    router_public: str
    router_secret: str
    namespace_key: str

    @classmethod
    def new(cls) -> EventKeys:
        _, server_secret = zmq.curve_keypair()
        router_public, router_secret = zmq.curve_keypair()
        return cls(server_secret.decode(), router_public.decode(), router_secret.decode(), os.urandom(32).hex())
