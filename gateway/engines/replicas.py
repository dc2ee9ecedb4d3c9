"""kvgate replicas on Ray Serve, the API process's side: `kvgate serve --replicas N`
(docs/scale-out.md, "Ray Serve").

Each replica of the `EngineReplica` deployment (engine/serving/replica.py) is one kvgate engine.
kvgate's gateway is the ingress: the same aiohttp app (OpenAI API, auth, tenants, SSE) with a
`ReplicaClient` in place of the one engine process's `EngineClient` (both implement `Engines`,
gateway/engines/__init__.py); each request goes through a deployment handle whose router,
`KvPrefixRouter` (gateway/engines/router.py), picks the replica holding its prefix.
Ray is imported only here and on the replicas: kvgate without replicas does not need it.
"""
from __future__ import annotations

import asyncio
import collections
import logging

import ray
import torch
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig

from engine import limits
from engine.model import load_tokenizer
from engine.request import Request
from engine.sequence import RequestOutput
from engine.serving import wire
from engine.serving.replica import EngineReplica, EventKeys
from gateway.config import KvgateConfig
from gateway.engines import ASK_TIMEOUT_S, Engines, RemoteStream
from gateway.errors import EngineUnresponsive
from gateway.metrics import add_up, merge_snapshots
from store import root_key, token_bytes
from store.keys import PublicPrefixes

log = logging.getLogger("kvgate.replicas")
APP = "kvgate"


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
        routing = RequestRouterConfig(request_router_class="gateway.engines.router:KvPrefixRouter",
                                      request_router_kwargs={"imbalance": r.imbalance,
                                                             "curve_public": keys.router_public,
                                                             "curve_secret": keys.router_secret},
                                      request_routing_stats_period_s=1.0)
    deployment = serve.deployment(EngineReplica, name="EngineReplica", ray_actor_options=options,
                                  num_replicas=None if autoscaling else r.num_replicas,
                                  autoscaling_config=autoscaling, max_ongoing_requests=r.max_ongoing_requests,
                                  request_router_config=routing,
                                  graceful_shutdown_timeout_s=config.server.shutdown_timeout_s)
    return serve.run(deployment.bind(config.serving(), keys), name=APP, route_prefix=None)


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
        return self.public.keys(root_key(self.fingerprint, namespace), prompt, self.bounds.block_size).all(prompt)

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

