"""Routing kvgate replicas by cached prefix, on Ray Serve (docs/scale-out.md, "Ray Serve").

`KvPrefixRouter` is a Ray Serve `RequestRouter`: it sends each request to the replica that holds
the longest cached prefix of it — unless that replica has more requests in flight than the
least busy one by more than `imbalance` (SGLang's cache-aware router and Ray's
`PrefixCacheAffinityRouter` balance the same way); without a match, to the least busy replica.
What each replica holds comes from its KV events (engine/serving/kv_events.py): each replica reports
its PUB endpoint in its routing stats, the router subscribes (`EventFeed`). A request's prefix is
counted as held by the replica it was sent to from that moment (`expect`), until its own events
arrive or `EXPECT_S` pass, so a burst of requests behind one new prefix goes to one replica.

A request's `prompt_cache_key` (OpenAI's hint that requests sharing a key share a prefix) is an
affinity: among replicas that match its prompt equally (none yet, often: the first requests of
a burst, events in flight), the one the key's last request went to wins, within the same
imbalance bound. The affinity is per namespace (tenant and salt) and kept for the last
AFFINITY_KEYS keys.

The request (the first argument) is a dict with "block_keys": the kvgate keys of its prompt's
full blocks (gateway/engines/replicas.py computes them), or "replica": a replica to send it to (an
operator's message for every replica).
"""
from __future__ import annotations

import collections
import logging
import queue
import random
import threading
import time

import msgpack
import zmq
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

log = logging.getLogger("kvgate.router")

EXPECT_S = 30.0      # a routed prefix counts as the replica's this long without its events
AFFINITY_KEYS = 65_536   # prompt_cache_keys whose replica is remembered (the least recent go)


class PrefixIndex:
    """Which blocks each replica holds, in any tier (from its events), or is computing (expected).
    Thread-safe: the event feed writes, the router reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, collections.Counter[bytes]] = {}      # replica -> key -> tiers holding it
        self._expected: dict[str, dict[bytes, float]] = {}          # replica -> key -> deadline

    def apply(self, replica: str, payload: bytes) -> None:
        """One EventBatch of `replica`'s."""
        _, events, *_ = msgpack.unpackb(payload)
        with self._lock:
            held = self._held.setdefault(replica, collections.Counter())
            expected = self._expected.setdefault(replica, {})
            for event in events:
                if event[0] == "AllBlocksCleared":
                    held.clear()
                elif event[0] == "BlockStored":
                    held.update(event[1])
                    for key in event[1]:
                        expected.pop(key, None)
                elif event[0] == "BlockRemoved":
                    held.subtract(event[1])
                    for key in event[1]:
                        if held[key] <= 0:
                            del held[key]

    def expect(self, replica: str, keys: list[bytes]) -> None:
        deadline = time.monotonic() + EXPECT_S
        with self._lock:
            expected = self._expected.setdefault(replica, {})
            expected.update((k, deadline) for k in keys)

    def matched(self, replica: str, keys: list[bytes]) -> int:
        """How many of `keys`, from the first, `replica` holds or is computing."""
        now = time.monotonic()
        with self._lock:
            held = self._held.get(replica, {})
            expected = self._expected.get(replica, {})
            for i, key in enumerate(keys):
                if key not in held and expected.get(key, 0) < now:
                    return i
            return len(keys)

    def drop(self, replica: str) -> None:
        with self._lock:
            self._held.pop(replica, None)
            self._expected.pop(replica, None)


class EventFeed:
    """A thread subscribed to every replica's KV events; gaps in a replica's sequence numbers
    are filled from its replay socket. The thread alone owns the sockets: the router asks it to
    watch or forget a replica through a queue, and never waits for it."""

    def __init__(self, index: PrefixIndex, curve_public: str = "", curve_secret: str = "") -> None:
        self.index = index
        self._ctx = zmq.Context.instance()
        self._curve = (curve_public.encode(), curve_secret.encode()) if curve_secret else None   # this client's keys
        # (replica, endpoint, replay endpoint, its CURVE public key)
        self._asks: queue.SimpleQueue[tuple[str, str, str, str]] = queue.SimpleQueue()
        self._known: set[str] = set()                           # replicas asked for (the router's side)
        self._subs: dict[str, tuple[zmq.Socket, str, str]] = {}  # replica -> (SUB socket, replay endpoint, its key)
        self._next: dict[str, int] = {}                        # replica -> next expected seq
        self._thread = threading.Thread(target=self._run, name="kvgate-kv-events", daemon=True)
        self._thread.start()

    def watch(self, replica: str, endpoint: str, replay: str, server_key: str = "") -> None:
        """Subscribe to `replica` (once); `endpoint`, `replay` and its CURVE public key as it
        reports them."""
        if replica not in self._known:
            self._known.add(replica)
            self._asks.put((replica, endpoint, replay, server_key))

    def forget(self, replica: str) -> None:
        self._known.discard(replica)
        self._asks.put((replica, "", "", ""))

    def _socket(self, kind: int, endpoint: str, server_key: str) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        if server_key and self._curve is not None:
            sock.curve_serverkey = server_key.encode()
            sock.curve_publickey, sock.curve_secretkey = self._curve
        sock.connect(endpoint)
        return sock

    def _run(self) -> None:
        poller = zmq.Poller()
        while True:
            while not self._asks.empty():
                replica, endpoint, replay, server_key = self._asks.get()
                if replica in self._subs:                  # forgotten (or watched again): start over
                    poller.unregister(self._subs[replica][0])
                    self._subs.pop(replica)[0].close(linger=0)
                    self.index.drop(replica)
                if endpoint:
                    sub = self._socket(zmq.SUB, endpoint, server_key)
                    sub.setsockopt(zmq.SUBSCRIBE, b"")
                    poller.register(sub, zmq.POLLIN)
                    self._subs[replica], self._next[replica] = (sub, replay, server_key), 0
                    self._replay(replica)                  # what it published before we connected
            ready = dict(poller.poll(50))
            for replica, (sub, _, _) in list(self._subs.items()):
                if sub not in ready:
                    continue
                _, seq, payload = sub.recv_multipart()
                seq = int.from_bytes(seq, "big")
                if seq > self._next[replica]:
                    self._replay(replica)
                if seq >= self._next[replica]:
                    self.index.apply(replica, payload)
                    self._next[replica] = seq + 1

    def _replay(self, replica: str) -> None:
        """The batches of `replica` from the next expected one on."""
        _, endpoint, server_key = self._subs[replica]
        if not endpoint:
            return
        dealer = self._socket(zmq.DEALER, endpoint, server_key)
        try:
            dealer.send_multipart([b"", self._next[replica].to_bytes(8, "big")])
            while dealer.poll(2000):
                _, seq, payload = dealer.recv_multipart()
                if not payload:
                    break
                seq = int.from_bytes(seq, "big")
                if seq >= self._next[replica]:
                    self.index.apply(replica, payload)
                    self._next[replica] = seq + 1
        finally:
            dealer.close(linger=0)


class KvPrefixRouter(RequestRouter):
    def initialize_state(self, imbalance: int = 16, curve_public: str = "", curve_secret: str = "") -> None:
        self.imbalance = imbalance
        self.index = PrefixIndex()
        self.feed = EventFeed(self.index, curve_public, curve_secret)
        self.in_flight: collections.Counter[ReplicaID] = collections.Counter()
        self._routed: dict[str, ReplicaID] = {}      # internal request id -> replica
        self.affinity: collections.OrderedDict[tuple, str] = collections.OrderedDict()  # key -> replica

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        for r in candidate_replicas:
            stats = r.routing_stats or {}
            if stats.get("kv_events"):
                self.feed.watch(r.replica_id.unique_id, stats["kv_events"], stats.get("kv_events_replay", ""),
                                stats.get("kv_events_key", ""))
        if pending_request is None or not candidate_replicas:
            return [candidate_replicas]
        request = pending_request.args[0] if pending_request.args else {}
        if request.get("replica"):           # an operator's message for one replica (if it is gone: any)
            pinned = [r for r in candidate_replicas if r.replica_id.unique_id == request["replica"]]
            return [pinned or candidate_replicas]
        keys = request.get("block_keys") or []
        hint = (request.get("namespace"), request.get("cache_salt"), request["prompt_cache_key"]) \
            if request.get("prompt_cache_key") else None
        chosen = self.choose(candidate_replicas, keys, hint)
        self.index.expect(chosen.replica_id.unique_id, keys)
        self._count(pending_request.metadata.internal_request_id, chosen.replica_id)
        return [[chosen], [r for r in candidate_replicas if r is not chosen]]

    def _count(self, request_id: str, replica_id: ReplicaID | None) -> None:
        """Count `request_id` in flight on `replica_id` (None: no longer), from the moment it is
        chosen: requests routed at once see each other's choices."""
        previous = self._routed.pop(request_id, None)
        if previous is not None:
            self.in_flight[previous] -= 1
        if replica_id is not None:
            self._routed[request_id] = replica_id
            self.in_flight[replica_id] += 1

    def choose(self, replicas: list[RunningReplica], keys: list[bytes], hint: tuple | None = None) -> RunningReplica:
        """The replica with the longest match — among equal matches the one `hint` (a
        prompt_cache_key) last went to — if not busier than the least busy by more than
        `imbalance`; else (and with neither a match nor a hint) the least busy, ties at random."""
        load = {r: self.in_flight[r.replica_id] for r in replicas}
        matched = {r: self.index.matched(r.replica_id.unique_id, keys) for r in replicas}
        affine = self.affinity.get(hint) if hint is not None else None
        least = min(load.values())
        order = list(replicas)
        random.shuffle(order)
        best = max(order, key=lambda r: (matched[r], r.replica_id.unique_id == affine, -load[r]))
        if (matched[best] or best.replica_id.unique_id == affine) and load[best] - least <= self.imbalance:
            chosen = best
        else:
            chosen = min(order, key=lambda r: load[r])
        if hint is not None:
            self.affinity[hint] = chosen.replica_id.unique_id
            self.affinity.move_to_end(hint)
            if len(self.affinity) > AFFINITY_KEYS:
                self.affinity.popitem(last=False)
        return chosen

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self._count(pending_request.metadata.internal_request_id, replica_id)     # where it went after all

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._count(internal_request_id, None)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.in_flight.pop(replica_id, None)
        self.feed.forget(replica_id.unique_id)
