"""N replicas behind a router, by trace replay: the cached fraction of the prompts, where N
devices are not available to measure it (docs/benchmarks.md, "Replicas").

    python -m gateway.bench.route_sim [--replicas 2] [--blocks 256] [--workloads gsp,chat]
                                [--scale 1] [--length-scale 0.25] [--imbalance 16]

The prompts of `kvgate bench`'s gsp and chat (block keys of random tokens, the same shapes) are
replayed through N simulated caches — one LRU pool of `--blocks` blocks each, a request's prompt
and output blocks entering it — behind kvgate's router (`KvPrefixRouter.choose`, the production
policy, its index the simulated caches), behind Ray Serve's default router (power of two
choices on requests in flight), and into one cache of N pools. A workload's burst (gsp's
requests, one chat round of every user) is routed before any of it runs, as requests sent at
once are; within a replica, requests run in order, so a request behind another with the same
prefix finds it (kvgate makes it wait for it). Not modelled: time, preemption, the host and disk
tiers.
"""
from __future__ import annotations

import argparse
import collections
import random

from gateway.engines.router import KvPrefixRouter
from store import block_keys, token_bytes

BLOCK = 16


class Cache:
    """One replica's pool: block keys in LRU order."""

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks
        self.keys: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def run(self, prompt: list[bytes], output: list[bytes]) -> int:
        """Serve one request: how many of its prompt's blocks were cached, from the first."""
        hit = next((i for i, k in enumerate(prompt) if k not in self.keys), len(prompt))
        for k in prompt + output:
            self.keys[k] = None
            self.keys.move_to_end(k)
        while len(self.keys) > self.blocks:
            self.keys.popitem(last=False)
        return hit


class Replica:                    # what KvPrefixRouter.choose reads of a RunningReplica
    def __init__(self, name: str) -> None:
        self.replica_id = collections.namedtuple("Id", "unique_id")(name)


class CacheIndex:
    """KvPrefixRouter's view of the replicas: the simulated caches, and what a burst routed."""

    def __init__(self, caches: dict[str, Cache]) -> None:
        self.caches = caches
        self.expected: dict[str, set[bytes]] = collections.defaultdict(set)

    def matched(self, name: str, keys: list[bytes]) -> int:
        held, expected = self.caches[name].keys, self.expected[name]
        return next((i for i, k in enumerate(keys) if k not in held and k not in expected), len(keys))

    def expect(self, name: str, keys: list[bytes]) -> None:
        self.expected[name].update(keys)


def traces(workload: str, scale: float, length_scale: float, rng: random.Random) -> list[list[tuple]]:
    """Bursts of (prompt keys, output keys), kvgate bench's shapes (gateway/bench.py)."""
    n = lambda tokens: max(BLOCK, int(tokens * length_scale))          # noqa: E731
    tok = lambda count: [rng.randrange(3, 30000) for _ in range(count)]  # noqa: E731

    def keys(tokens: list[int]) -> list[bytes]:
        return block_keys(b"\0" * 16, token_bytes(tokens), BLOCK)
    if workload == "gsp":
        burst = []
        for _ in range(max(1, round(8 * scale))):
            prefix = tok(n(2048))
            for _ in range(16):
                prompt = prefix + tok(n(128))
                burst.append((keys(prompt), keys(prompt + tok(n(128)))[len(prompt) // BLOCK:]))
        return [burst]
    histories = [tok(n(1024)) for _ in range(max(1, round(16 * scale)))]
    rounds = []
    for _ in range(8):
        burst = []
        for u, history in enumerate(histories):
            prompt = history + tok(n(64))
            answer = tok(n(128))
            burst.append((keys(prompt), keys(prompt + answer)[len(prompt) // BLOCK:]))
            histories[u] = prompt + answer
        rounds.append(burst)
    return rounds


def replay(bursts: list[list[tuple]], replicas: int, blocks: int, router: str, imbalance: int,
           rng: random.Random) -> float:
    caches = {f"r{i}": Cache(blocks) for i in range(replicas)}
    kv = KvPrefixRouter.__new__(KvPrefixRouter)      # the production policy, without Ray
    kv.imbalance, kv.index = imbalance, CacheIndex(caches)
    hit = total = 0
    for burst in bursts:
        kv.index.expected.clear()
        kv.in_flight = collections.Counter()
        handles = [Replica(name) for name in caches]
        placed = []
        for prompt, output in burst:
            if router == "prefix":
                chosen = kv.choose(handles, prompt)
                kv.index.expect(chosen.replica_id.unique_id, prompt)
            else:                                    # power of two choices on requests in flight
                a, b = rng.sample(handles, 2) if len(handles) > 1 else handles * 2
                chosen = min((a, b), key=lambda r: kv.in_flight[r.replica_id])
            kv.in_flight[chosen.replica_id] += 1
            placed.append((chosen.replica_id.unique_id, prompt, output))
        for name, prompt, output in placed:
            hit += caches[name].run(prompt, output)
            total += len(prompt)
    return hit / total


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gateway.bench.route_sim", description=__doc__.split("\n")[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--blocks", type=int, default=256, help="one replica's pool, in blocks of 16 tokens")
    p.add_argument("--workloads", default="gsp,chat")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--length-scale", type=float, default=0.25)
    p.add_argument("--imbalance", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(f"{a.replicas} replicas of {a.blocks} blocks, scale {a.scale:g}, length scale {a.length_scale:g}")
    print(f"{'workload':<9} {'prefix router':>13} {'default router':>14} {'one replica':>11}  "
          "(full blocks of the prompts cached)")
    for w in a.workloads.split(","):
        bursts = traces(w, a.scale, a.length_scale, random.Random(a.seed))
        rows = [replay(bursts, a.replicas, a.blocks, r, a.imbalance, random.Random(a.seed))
                for r in ("prefix", "default")]
        rows.append(replay(bursts, 1, a.blocks * a.replicas, "prefix", a.imbalance, random.Random(a.seed)))
        print(f"{w:<9} {rows[0]:>13.1%} {rows[1]:>14.1%} {rows[2]:>11.1%}")


if __name__ == "__main__":
    main()
