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
"DISK". `extra_keys` (one entry per block) carries the namespace the way vLLM carries
`cache_salt`: `[namespace]` on the first block of a namespace's chain (block 0, or the first
block after a public prefix), None elsewhere; absent when every entry is None.

A ROUTER socket (optional) replays missed batches, as vLLM's does: a subscriber sends
[b"", start seq (8 bytes)] from a DEALER socket and gets [b"", seq, payload] for each buffered
batch from `start` on, then [b"", -1 (8 bytes), b""].
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

import msgpack
import zmq
import zmq.asyncio

from gateway.config import ConfigError, KvEventsConfig
from store import BlockStore, Tier
from store.radix import TIERS, Node

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
    """The store's placements, as they change (RadixIndex.listener), gathered into vLLM events.
    Consecutive stores of one chain in one tier make one BlockStored; consecutive removals from
    one tier one BlockRemoved."""

    def __init__(self, store: BlockStore) -> None:
        self.store = store
        self._runs: list[_Run] = []
        self._cleared = False               # AllBlocksCleared leads the next batch
        self.on_change = lambda: None       # called on the first change after a `drain`

    def attach(self) -> None:
        """From now on, log the store's changes; starts with AllBlocksCleared and what the store
        holds already (what the disk scan restored)."""
        self._runs = [_Run(True, t, [n]) for n in self._parents_first() for t in TIERS if n.has(t)]
        self._cleared = True
        self.store.index.listener = self._changed
        self.on_change()

    def detach(self) -> None:
        self.store.index.listener = None

    def _parents_first(self) -> list[Node]:
        return sorted(self.store.index.nodes(), key=lambda n: n.depth)

    def _changed(self, node: Node, tier: Tier, present: bool) -> None:
        if not self._runs and not self._cleared:
            self.on_change()
        last = self._runs[-1] if self._runs else None
        if last is not None and last.stored == present and last.tier is tier and \
                (not present or last.nodes[-1] is node.parent):
            last.nodes.append(node)
        else:
            self._runs.append(_Run(present, tier, [node]))

    def drain(self) -> list[list]:
        """The events logged since the last drain, encoded."""
        events = [["AllBlocksCleared"]] if self._cleared else []
        events += [self._stored(r) if r.stored else ["BlockRemoved", [n.key for n in r.nodes], MEDIUM[r.tier]]
                   for r in self._runs]
        self._runs, self._cleared = [], False
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
        """[namespace] on the first block of a namespace's chain, as vLLM puts cache_salt."""
        if node.parent.is_root or node.mixed:
            name = self.store.namespace_name(node.namespace)
            return [name] if name else None
        return None


class KVEventPublisher:
    """Publishes an EventLog's events over ZMQ, one batch per turn of the event loop in which
    something changed; keeps the last `buffer_steps` batches for replay. Sends never wait: a
    subscriber slower than `hwm` batches loses some (and asks for a replay)."""

    def __init__(self, store: BlockStore, config: KvEventsConfig, data_parallel_rank: int | None = None) -> None:
        self.config = config
        self.rank = data_parallel_rank
        self.log = EventLog(store)
        self._ctx = zmq.asyncio.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(config.hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(config.endpoint)
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._replay = None
        self.replay_endpoint = ""
        if config.replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(config.replay_endpoint)
            self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self._topic = config.topic.encode()
        self._buffer: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=config.buffer_steps)
        self._seq = 0
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.log.on_change = lambda: loop.call_soon(self.flush)
        self.log.attach()
        if self._replay is not None:
            self._tasks.append(asyncio.create_task(self._serve_replays()))

    def flush(self) -> None:
        events = self.log.drain()
        if not events:
            return
        batch = [time.time(), events] + ([] if self.rank is None else [self.rank])
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


def open_events(config: KvEventsConfig, store: BlockStore,
                data_parallel_rank: int | None = None) -> KVEventPublisher | None:
    """The publisher `config` asks for, started (None if disabled). Raises ConfigError if an
    endpoint cannot be bound."""
    if not config.enabled:
        return None
    try:
        publisher = KVEventPublisher(store, config, data_parallel_rank)
    except zmq.ZMQError as e:
        raise ConfigError(f"kv_events: cannot bind {config.endpoint} / {config.replay_endpoint or '-'}: {e}") from None
    publisher.start()
    log.info("KV events on %s (replays: %s)", publisher.endpoint, publisher.replay_endpoint or "off")
    return publisher
