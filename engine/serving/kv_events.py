"""KV events in vLLM's wire format: which blocks an engine holds, in which tier, as they come
and go — for KV-aware routers (llm-d's precise prefix-cache scorer, Dynamo's KV router, kvgate's
own Ray Serve router). docs/scale-out.md, "KV events".

    ZMQ PUB, multipart [topic, seq (8 bytes, big-endian), payload]
    payload = msgpack [ts, [event, ...]]                       (an EventBatch)
    event   = ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
               lora_id, medium, lora_name(, extra_keys)]
            | ["BlockRemoved", block_hashes, medium]
            | ["AllBlocksCleared"]

This is the array encoding of vLLM's `vllm/distributed/kv_events.py` (msgspec structs with
`array_like=True`, tagged with the class name, trailing default fields omitted). A hash is a
block's 16-byte kvgate key (vLLM's `ExternalBlockHash` is bytes or int); `block_hashes` of one
BlockStored are a chain, each the parent of the next, `parent_block_hash` the first one's parent
(None for the first block of a prompt). `medium` names the tier: "GPU", "CPU" (the host tier),
"DISK". `extra_keys` (one entry per block) marks where a namespace's chain starts, the way vLLM
carries `cache_salt`: `[namespace id]` on the first block of a namespace's chain (block 0, or the
first block after a public prefix), None elsewhere; absent when every entry is None. The id is a
keyed hash of the tenant and salt (`namespace_id`), never the names themselves: a router can tell
namespaces apart, a subscriber cannot learn who they are.

The events carry every tenant's token ids. The sockets bind loopback unless the configuration
names another address, and then only with CURVE (ZMQ's authenticated encryption: this server's
secret key, the subscribers' public keys; anyone else is refused) or an explicit
`allow_unauthenticated` (docs/scale-out.md, "Security").

A ROUTER socket (optional) replays missed batches, as vLLM's does: a subscriber sends
[b"", start seq (8 bytes)] from a DEALER socket and gets [b"", seq, payload] for each buffered
batch from `start` on, then [b"", -1 (8 bytes), b""].
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import time
from dataclasses import dataclass

import msgpack
import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from engine.serving.config import ConfigError, KvEventsConfig, is_local_endpoint
from store import BlockStore, Tier
from store.radix import TIERS, Changes, Node

log = logging.getLogger("kvgate.kv_events")

MEDIUM = {Tier.GPU: "GPU", Tier.HOST: "CPU", Tier.DISK: "DISK"}
END_SEQ = (-1).to_bytes(8, "big", signed=True)


@dataclass
class _Run:
    """Events not yet encoded: a chain of blocks stored in one tier, or blocks removed from one."""
    stored: bool
    tier: Tier
    nodes: list[Node]


class EventLog:
    """The store's placements, as they change (the queue `BlockStore.record_changes` gives),
    gathered into vLLM events. Consecutive stores of one chain in one tier make one BlockStored;
    consecutive removals from one tier one BlockRemoved."""

    def __init__(self, store: BlockStore, namespace_key: bytes) -> None:
        self.store = store
        self.namespace_key = namespace_key     # keys `namespace_id`: secret, drawn at start-up
        self.changes: Changes | None = None    # the store's queue, while attached
        self._cleared = False                  # AllBlocksCleared leads the next batch
        self._held: list[_Run] = []            # what the store held when attached

    def attach(self) -> None:
        """From now on, log the store's changes; starts with AllBlocksCleared and what the store
        holds already (what the disk scan restored)."""
        self._held = [_Run(True, t, [n]) for n in self._parents_first() for t in TIERS if n.has(t)]
        self._cleared = True
        self.changes = self.store.record_changes()
        self.changes.pending.set()

    def detach(self) -> None:
        self.store.stop_recording()

    def _parents_first(self) -> list[Node]:
        return sorted(self.store.index.nodes(), key=lambda n: n.depth)

    def drain(self) -> list[list]:
        """The events logged since the last drain, encoded."""
        runs, self._held = self._held, []
        for node, tier, present in self.changes.take() if self.changes is not None else ():
            last = runs[-1] if runs else None
            if last is not None and last.stored == present and last.tier is tier and \
                    (not present or last.nodes[-1] is node.parent):
                last.nodes.append(node)
            else:
                runs.append(_Run(present, tier, [node]))
        events = [["AllBlocksCleared"]] if self._cleared else []
        events += [self._stored(r) if r.stored else ["BlockRemoved", [n.key for n in r.nodes], MEDIUM[r.tier]]
                   for r in runs]
        self._cleared = False
        return events

    def _stored(self, run: _Run) -> list:
        first = run.nodes[0]
        tokens: list[int] = []
        for n in run.nodes:
            tokens += memoryview(n.token_bytes).cast("I").tolist()
        extra = [self._namespace_key(n) for n in run.nodes]
        event = ["BlockStored", [n.key for n in run.nodes], None if first.parent.is_root else first.parent.key,
                 tokens, self.store.block_size, None, MEDIUM[run.tier], None]
        if any(e is not None for e in extra):
            event.append(extra)
        return event

    def _namespace_key(self, node: Node) -> list | None:
        """[namespace id] on the first block of a namespace's chain, as vLLM puts cache_salt."""
        if node.parent.is_root or node.mixed:
            name = self.store.namespace_name(node.namespace)
            return [namespace_id(self.namespace_key, name)] if name else None
        return None


def namespace_id(key: bytes, namespace: str) -> str:
    """What KV events say of a namespace (tenant and salt): a keyed hash, 16 bytes in hex. Equal
    for equal namespaces under one key; without the key, no name can be tried against it."""
    return hashlib.blake2b(namespace.encode("utf-8", "surrogatepass"), key=key, digest_size=16).hexdigest()


class KVEventPublisher:
    """Publishes an EventLog's events over ZMQ, one batch per turn of the event loop in which
    something changed; keeps the last `buffer_steps` batches for replay. Sends never wait: a
    subscriber slower than `hwm` batches loses some (and asks for a replay)."""

    def __init__(self, store: BlockStore, config: KvEventsConfig, namespace_key: bytes | None = None) -> None:
        self.config = config
        self.log = EventLog(store, namespace_key or os.urandom(32))
        self._ctx = zmq.asyncio.Context.instance()
        self._auth: AsyncioAuthenticator | None = None
        self.public_key = ""                 # this server's CURVE public key (Z85), with CURVE
        if config.secret_key:                # only the configured subscribers' keys are let in
            self._auth = AsyncioAuthenticator(self._ctx, log=log)
            self._auth.start()
            self._auth.configure_curve_callback("*", _AllowedKeys(config.client_keys))
            self.public_key = zmq.curve_public(config.secret_key.encode()).decode()
        self._pub = self._socket(zmq.PUB, config.endpoint)
        self._pub.set_hwm(config.hwm)
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._replay = None
        self.replay_endpoint = ""
        if config.replay_endpoint:
            self._replay = self._socket(zmq.ROUTER, config.replay_endpoint)
            self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self._topic = config.topic.encode()
        self._buffer: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=config.buffer_steps)
        self._seq = 0
        self._tasks: list[asyncio.Task] = []

    def _socket(self, kind: int, endpoint: str) -> zmq.asyncio.Socket:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self._auth is not None:
            sock.curve_server = True
            sock.curve_secretkey = self.config.secret_key.encode()
            sock.curve_publickey = self.public_key.encode()
        sock.bind(endpoint)
        return sock

    def start(self) -> None:
        self.log.attach()
        self._tasks.append(asyncio.create_task(self._publish()))
        if self._replay is not None:
            self._tasks.append(asyncio.create_task(self._serve_replays()))

    async def _publish(self) -> None:
        """One batch per loop turn that changed the store: woken by the first change queued."""
        while True:
            await self.log.changes.pending.wait()
            self.flush()

    def flush(self) -> None:
        events = self.log.drain()
        if not events:
            return
        batch = [time.time(), events]
        payload = msgpack.packb(batch)
        seq = self._seq.to_bytes(8, "big")
        try:
            self._pub.send_multipart([self._topic, seq, payload], flags=zmq.NOBLOCK)
        except zmq.Again:           # a PUB socket drops rather than blocks; kept for replay
            pass
        self._buffer.append((self._seq, payload))
        self._seq += 1

    async def _serve_replays(self) -> None:
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3:
                log.warning("KV events: a replay request of %d frames; ignored", len(frames))
                continue
            client, _, start = frames
            first = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= first:
                    await self._replay.send_multipart([client, b"", seq.to_bytes(8, "big"), payload])
            await self._replay.send_multipart([client, b"", END_SEQ, b""])

    def close(self) -> None:
        self.flush()
        self.log.detach()
        for t in self._tasks:
            t.cancel()
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        if self._auth is not None:
            self._auth.stop()


class _AllowedKeys:
    """The ZAP authenticator's CURVE check: a subscriber's public key must be one configured."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = {k.encode() for k in keys}

    def callback(self, domain: str, key: bytes) -> bool:      # `key`: the subscriber's, Z85
        return key in self.keys


def open_events(config: KvEventsConfig, store: BlockStore,
                namespace_key: bytes | None = None) -> KVEventPublisher | None:
    """The publisher `config` asks for, started (None if disabled). Raises ConfigError if an
    endpoint cannot be bound."""
    if not config.enabled:
        return None
    try:
        publisher = KVEventPublisher(store, config, namespace_key)
    except zmq.ZMQError as e:
        raise ConfigError(f"kv_events: cannot bind {config.endpoint} / {config.replay_endpoint or '-'}: {e}") from None
    publisher.start()
    exposed = not (is_local_endpoint(config.endpoint) and is_local_endpoint(config.replay_endpoint))
    if exposed and not config.secret_key:
        log.warning("KV events on %s with NO authentication (kv_events.allow_unauthenticated): anyone who "
                    "reaches it reads every tenant's token ids", publisher.endpoint)
    log.info("KV events on %s (replays: %s; %s)", publisher.endpoint, publisher.replay_endpoint or "off",
             "CURVE, %d subscriber keys" % len(config.client_keys) if config.secret_key else "no authentication")
    return publisher
