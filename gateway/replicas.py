"""kvgate replicas on Ray Serve: `kvgate serve --replicas N` (docs/scale-out.md, "Ray Serve").

Each replica of the `EngineReplica` deployment is one kvgate engine (model, scheduler, every KV
tier; its disk tier in a directory of its own) publishing its KV events. kvgate's gateway is the
ingress: the same aiohttp app (OpenAI API, auth, tenants, SSE) with a `ReplicaClient` in place of
the one engine process's `EngineClient` (both implement `Engines`, gateway/engines.py);
each request goes through a deployment handle whose router, `KvPrefixRouter`
(gateway/prefix_router.py), picks the replica holding its prefix. Each replica serves its engine
through the same `EngineShell` as the engine process (gateway/engine_shell.py).
Ray is imported only here: kvgate without replicas does not need it.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os

import ray
import torch
import zmq
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig

from engine import limits
from engine.errors import InvalidRequest
from engine.model import load_model, load_tokenizer
from engine.request import Request
from engine.sequence import RequestOutput
from gateway import engine_wire as wire
from gateway.config import KvEventsConfig, KvgateConfig
from gateway.engines import ASK_TIMEOUT_S, Engines, RemoteStream
from gateway.engine_shell import EngineShell
from gateway.errors import EngineUnresponsive
from gateway.metrics import add_up, merge_snapshots
from gateway.tiers import user_cache_dir
from store import root_key, token_bytes
from store.keys import PublicPrefixes

log = logging.getLogger("kvgate.replicas")
APP = "kvgate"


class EngineReplica:
    """One engine, as a Ray Serve replica (the class `deployment` wraps)."""

    async def __init__(self, config: KvgateConfig, events: EventKeys) -> None:
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        config = replica_config(config, context.rank.rank)
        self.persist_s = config.server.shutdown_timeout_s * wire.PERSIST_SHARE
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
        tier within its graceful shutdown (server.shutdown_timeout_s)."""
        await self.shell.stop(persist=True, persist_s=self.persist_s)


def replica_config(config: KvgateConfig, rank: int) -> KvgateConfig:
    """`config` for replica `rank`: its disk tier in a directory of its own."""
    disk = config.store.disk
    if not disk.enabled:
        return config
    base = disk.path or os.path.join(user_cache_dir(), "kvgate", "kv")
    os.makedirs(base, exist_ok=True)
    disk = dataclasses.replace(disk, path=os.path.join(base, f"replica-{rank}"))
    store = dataclasses.replace(config.store, disk=disk)
    return dataclasses.replace(config, store=store)


async def open_replicas(config: KvgateConfig) -> ReplicaClient:
    """Join (or start) Ray, run the replicas, and learn them: the gateway's engine."""
    if not ray.is_initialized():
        ray.init(address=config.replicas.ray_address or None, logging_level=logging.WARNING,
                 include_dashboard=False)
    serve.start(proxy_location="Disabled")     # kvgate's gateway is the ingress: no Serve HTTP proxy
    handle = await asyncio.to_thread(deploy, config)
    info = await handle.ask.remote({"op": "info"})
    tokenizer = await asyncio.to_thread(load_tokenizer, config.model)
    client = ReplicaClient(handle, info, tokenizer)
    await client.discover(config.replicas.num_replicas)
    return client


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


def deploy(config: KvgateConfig):
    """Run the `EngineReplica` deployment as `config.replicas` says; returns its handle."""
    r = config.replicas
    keys = EventKeys.new()
    gpus = r.num_gpus if r.num_gpus >= 0 else float(torch.cuda.is_available())
    options = {"num_cpus": r.num_cpus, "num_gpus": gpus}
    autoscaling = None
    if r.max_replicas > r.num_replicas:
        autoscaling = AutoscalingConfig(min_replicas=r.num_replicas, max_replicas=r.max_replicas,
                                        target_ongoing_requests=r.target_ongoing_requests)
    routing = RequestRouterConfig(request_routing_stats_period_s=1.0)
    if r.router == "prefix":
        routing = RequestRouterConfig(request_router_class="gateway.prefix_router:KvPrefixRouter",
                                      request_router_kwargs={"imbalance": r.imbalance,
                                                             "curve_public": keys.router_public,
                                                             "curve_secret": keys.router_secret},
                                      request_routing_stats_period_s=1.0)
    deployment = serve.deployment(EngineReplica, name="EngineReplica", ray_actor_options=options,
                                  num_replicas=None if autoscaling else r.num_replicas,
                                  autoscaling_config=autoscaling, max_ongoing_requests=r.max_ongoing_requests,
                                  request_router_config=routing,
                                  graceful_shutdown_timeout_s=config.server.shutdown_timeout_s)
    return serve.run(deployment.bind(config, keys), name=APP, route_prefix=None)


class ReplicaClient(Engines):
    """The engine interface over the deployment: the gateway's view of the replicas."""

    def __init__(self, handle, info: dict, tokenizer=None) -> None:
        self.handle = handle
        self.tokenizer = tokenizer
        self.adopt(info)
        self.public = PublicPrefixes(self.fingerprint)      # as the replicas have them: for routing keys
        self.replicas: set[str] = {info["replica"]}          # learned from answers (operator broadcasts)
        self.served: collections.Counter[str] = collections.Counter()   # requests each replica took
        self._tasks: dict[str, asyncio.Task] = {}

    def block_keys(self, prompt: list[int], namespace: str) -> list[bytes]:
        """The keys the replicas cache `prompt`'s full blocks under (what the router matches)."""
        scope = self.public.scope(root_key(self.fingerprint, namespace), prompt, self.bounds.block_size)
        return scope.keys(token_bytes(prompt), self.bounds.block_size)

    def submit(self, request: Request) -> RemoteStream:
        limits.check_request(self.bounds, request.prompt_ids, request.params, request.priority)
        sent = {**request.to_wire(), "block_keys": self.block_keys(list(request.prompt_ids), request.cache_namespace)}
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._tasks[request.request_id] = asyncio.create_task(self._pump(sent, queue))
        return self.stream(request, queue)

    async def _pump(self, request: dict, queue: asyncio.Queue) -> None:
        """Stream a request's outputs into `queue`. A replica that fails before its first
        output: the request goes to another (once); after it: the stream ends with "error"."""
        request_id = request["request_id"]
        sent = False
        for attempt in range(2):
            try:
                async for row in self.handle.options(stream=True).generate.remote(request):
                    if isinstance(row, str):      # the replica's id comes first
                        self.replicas.add(row)
                        self.served[row] += 1
                    elif row[0] == "rejected":
                        log.error("a replica refused request %s: %s", request_id, row[1])
                        break
                    else:
                        sent = True
                        queue.put_nowait(wire.output_from_wire(row))
                        if row[3] is not None:       # finish_reason
                            self._tasks.pop(request_id, None)
                            return
                break
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("request %s failed on its replica (%s: %s)%s", request_id, type(e).__name__, e,
                            "" if sent or attempt else "; sent to another")
                if sent:
                    break
        self._tasks.pop(request_id, None)
        queue.put_nowait(RequestOutput(request_id, [], "", "error", 0, 0, {}))

    def abort(self, request_id: str) -> None:
        task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()            # Ray cancels the replica's generator: it aborts the request

    def abort_all(self) -> None:
        for request_id in list(self._tasks):
            self.abort(request_id)

    async def stats(self) -> dict:
        """Every known replica's snapshot, merged (gateway/metrics.py `merge_snapshots`)."""
        return merge_snapshots(await self._every_replica({"op": "stats"}))

    async def _every_replica(self, request: dict) -> list:
        try:
            async with asyncio.timeout(ASK_TIMEOUT_S):
                return await asyncio.gather(*(self.handle.ask.remote({**request, "replica": r})
                                              for r in sorted(self.replicas)))
        except TimeoutError:
            raise EngineUnresponsive(f"a replica has not answered for {ASK_TIMEOUT_S:g} s") from None

    def silent_for(self) -> float:
        """0: Ray Serve health-checks the replicas and replaces one that stops answering."""
        return 0.0

    async def ask(self, kind: str, *args):
        """"stats", or ("admin", op, args): an operator's operation, on every replica known (the
        answers of "usage" summed; others: the first)."""
        if kind == "stats":
            return await self.stats()
        op, op_args = args
        answers = await self._every_replica({"op": op, "args": op_args})
        if op == "public" and isinstance(answers[0], int):     # else the bound refused it everywhere
            self.public.declare(token_bytes(op_args[0]), self.bounds.block_size)
        if op == "usage":      # blocks and bytes add up; the prefixes are the same everywhere
            total = add_up(answers)
            return {**total, "public": {**total["public"], "prefixes": self.public.count}}
        return add_up(answers) if op == "evict" else answers[0]

    async def discover(self, expected: int, tries: int = 50) -> None:
        """Learn the replicas' ids (for operators' broadcasts): ask until `expected` answered."""
        for _ in range(tries):
            if len(self.replicas) >= expected:
                return
            info = await self.handle.ask.remote({"op": "info"})
            self.replicas.add(info["replica"])
            await asyncio.sleep(0.05)

    async def close(self, persist: bool = True, keep_process: bool = False, timeout_s: float = 0.0) -> None:
        """Abort what runs and delete the deployment (`timeout_s`: Ray Serve's own graceful
        shutdown bounds each replica's stop)."""
        self.abort_all()
        if not keep_process:
            serve.delete(APP)        # each replica persists its cache as it stops (EngineReplica.__del__)

