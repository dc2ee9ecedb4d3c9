"""kvgate replicas on Ray Serve (gateway/engines/replicas.py, gateway/engines/router.py): the router's
policy, pinned without Ray; then two replicas of the demo model on a local Ray, through kvgate's
gateway: requests sharing a prefix land on one replica and hit its cache, unique prompts spread
evenly, and a replica killed mid-run loses no request that had not started streaming."""
import asyncio
import collections

import msgpack
import pytest

serve = pytest.importorskip("ray.serve")

from gateway.engines.router import KvPrefixRouter, PrefixIndex  # noqa: E402
from tests.http_util import MODEL  # noqa: E402

ReplicaId = collections.namedtuple("ReplicaId", "unique_id")
PUBLIC = "a public preamble that every request may share, word for word, " * 3


class FakeReplica:                 # what the router reads of a RunningReplica
    def __init__(self, name: str) -> None:
        self.replica_id = ReplicaId(name)


def router_of(imbalance: int, held: dict[str, list[bytes]], loads: dict[str, int]):
    router = KvPrefixRouter.__new__(KvPrefixRouter)     # its policy, without a Ray handle
    router.imbalance = imbalance
    router.index = PrefixIndex()
    router.affinity = collections.OrderedDict()
    for name, keys in held.items():
        router.index.apply(name, msgpack.packb([0.0, [["BlockStored", keys, None, [1] * 16 * len(keys), 16,
                                                       None, "GPU", None]]]))
    replicas = {name: FakeReplica(name) for name in loads}
    router.in_flight = collections.Counter({replicas[n].replica_id: v for n, v in loads.items()})
    return router, replicas


def test_the_longest_match_wins_unless_it_is_busier_by_more_than_the_imbalance():
    keys = [b"k1", b"k2", b"k3"]
    router, r = router_of(4, {"a": keys[:1], "b": keys[:2]}, {"a": 0, "b": 4, "c": 0})
    assert router.choose(list(r.values()), keys) is r["b"]            # 2 blocks beat 1; 4 - 0 <= 4
    router.in_flight[r["b"].replica_id] = 5
    assert router.choose(list(r.values()), keys) in (r["a"], r["c"])  # too busy: the least busy
    assert {router.choose(list(r.values()), [b"new"]).replica_id.unique_id for _ in range(40)} == {"a", "c"}
    router.index.apply("b", msgpack.packb([0.0, [["BlockRemoved", [b"k2"], "GPU"]]]))
    router.in_flight[r["b"].replica_id] = 0
    router.in_flight[r["a"].replica_id] = 1
    assert router.index.matched("b", keys) == 1 and router.choose(list(r.values()), keys) is r["b"]  # tie: less busy
    router.index.expect("c", keys)                   # routed there just now: counts as c's
    assert router.index.matched("c", keys) == 3 and router.choose(list(r.values()), keys) is r["c"]


def test_a_prompt_cache_key_goes_where_its_last_request_went_among_equal_matches():
    """No replica holds the prompt yet: the key's replica wins over a less busy one (within the
    imbalance); a longer match elsewhere still wins; the same key of another tenant has no pull."""
    router, r = router_of(4, {"c": [b"k1"]}, {"a": 0, "b": 0, "c": 0})
    key = ("tenant-1", None, "support-bot")
    first = router.choose([r["a"], r["b"]], [b"x1"], key)
    other = r["b"] if first is r["a"] else r["a"]
    router.in_flight[first.replica_id] = 3                               # busier, within 4
    assert all(router.choose([r["a"], r["b"]], [b"x2"], key) is first for _ in range(20))
    assert {router.choose([r["a"], r["b"]], [b"x3"], ("tenant-2", None, "support-bot")).replica_id
            for _ in range(20)} == {other.replica_id}                   # not its key: the least busy
    router.in_flight[first.replica_id] = 5                               # too busy: the least busy
    assert router.choose([r["a"], r["b"]], [b"x4"], key) is other
    assert router.choose(list(r.values()), [b"k1"], key) is r["c"]      # a match beats the key


async def test_two_replicas_route_by_prefix_spread_unique_prompts_and_survive_a_kill(aiohttp_client):
    import ray

    from gateway.app import init_app
    from gateway.config import build_config
    from gateway.keys import ENGINE
    config = build_config({"model": {"path": "builtin:tiny", "device": "cpu"}, "engine": {"max_num_seqs": 8},
                           "store": {"gpu": {"num_blocks": 256}, "host": {"enabled": False},
                                     "disk": {"enabled": False}},
                           "replicas": {"num_replicas": 2, "num_cpus": 0.5},
                           "public_prefixes": [{"text": PUBLIC}]})
    client = await aiohttp_client(init_app(config))
    engine = client.app[ENGINE]
    assert len(engine.replicas) == 2
    stats = await engine.stats()                     # /metrics and /health: both replicas, merged
    assert sum(stats["blocks"]["gpu"].values()) == 2 * 256

    async def complete(prompt: str) -> int:
        resp = await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
        assert resp.status == 200, await resp.text()
        return (await resp.json())["usage"]["prompt_tokens_details"]["cached_tokens"]

    try:       # the public prefix, computed at start-up on one replica: routed there, by its public keys
        cached = [await complete(PUBLIC + f" and question {i}") for i in range(3)]
        assert all(c >= 48 for c in cached), cached
        for group in range(4):        # each group's first request computes its prefix; the rest hit it
            prefix = f"group {group} shares this long system prompt, word for word, " * 4
            before = collections.Counter(engine.served)
            cached = [await complete(prefix + f"question {i}") for i in range(4)]
            assert cached[0] == 0 and all(c >= 64 for c in cached[1:]), cached
            assert len(engine.served - before) == 1            # one replica took the whole group
        before = collections.Counter(engine.served)
        await asyncio.gather(*(complete(f"unique prompt number {i} " * 5) for i in range(16)))
        spread = engine.served - before
        assert sorted(spread.values()) == [8, 8] or min(spread.values()) >= 6, spread

        victim = sorted(engine.replicas)[0]                   # killed while requests run
        running = [asyncio.ensure_future(complete(f"a request beside the kill {i} " * 3)) for i in range(8)]
        await asyncio.sleep(0)
        ray.kill(ray.get_actor(f"SERVE_REPLICA::kvgate#EngineReplica#{victim}", namespace="serve"))
        statuses = await asyncio.gather(*running, return_exceptions=True)
        assert all(not isinstance(s, BaseException) for s in statuses), statuses
        for i in range(6):            # new requests go to the replica that is left (or its replacement)
            await complete(f"after the kill {i} " * 3)
    finally:
        await client.close()
        ray.shutdown()


def test_a_trace_replay_keeps_one_replicas_hit_rate_with_prefix_routing_only():
    """gateway/bench/route_sim.py, small: 4 replicas behind kvgate's router cache what one replica of
    all 4 pools caches; Ray's default router, much less."""
    import random

    from gateway.bench.route_sim import replay, traces
    for workload in ("gsp", "chat"):
        bursts = traces(workload, 0.5, 0.125, random.Random(1))
        prefix, default = (replay(bursts, 4, 400, r, 16, random.Random(1)) for r in ("prefix", "default"))
        one = replay(bursts, 1, 1600, "prefix", 16, random.Random(1))
        assert abs(prefix - one) < 0.02 and default < prefix - 0.1, (workload, prefix, default, one)


def test_replicas_snapshots_merge_into_one():
    from gateway.metrics import merge_snapshots
    a = {"blocks": {"gpu": {"free": 10, "cached": 5, "locked": 1}}, "requests": {"running": 2, "waiting": 0},
         "rates": {"prefill_tokens_per_s": 100.0, "disk_read_bytes_per_s": 4.0}, "disk": None, "integrity_error": None}
    b = {"blocks": {"gpu": {"free": 1, "cached": 14, "locked": 1}}, "requests": {"running": 3, "waiting": 4},
         "rates": {"prefill_tokens_per_s": 300.0}, "disk": None, "integrity_error": "block 3 leaked"}
    merged = merge_snapshots([a, b])
    assert merged["blocks"] == {"gpu": {"free": 11, "cached": 19, "locked": 2}}
    assert merged["requests"] == {"running": 5, "waiting": 4}
    assert merged["rates"] == {"prefill_tokens_per_s": 200.0, "disk_read_bytes_per_s": 4.0}   # rates: the mean
    assert merged["disk"] is None and merged["integrity_error"] == "block 3 leaked"
