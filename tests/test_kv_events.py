"""KV events (engine/serving/kv_events.py): a subscriber written from the published schema (vLLM's
array-encoded EventBatch, BlockStored / BlockRemoved / AllBlocksCleared with `medium`) rebuilds,
from the stream alone, exactly the store's view of which block is in which tier — after a random
workload that fills, demotes, evicts and restores across GPU, host and disk — and the replay
socket serves what a late subscriber missed."""
import asyncio
import random

import msgpack
import pytest
import zmq
import zmq.asyncio

from gateway.config import ConfigError, KvEventsConfig, build_config
from engine.serving.kv_events import KVEventPublisher, namespace_id
from store import Tier, chain_key, token_bytes
from tests.engine_util import greedy, make_engine, prompt, run
from tests.http_util import MODEL

MEDIUMS = {"GPU": Tier.GPU, "CPU": Tier.HOST, "DISK": Tier.DISK}
LOCAL = KvEventsConfig(enabled=True, endpoint="tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*")


class Subscriber:
    """What a router keeps: per medium, the block hashes an engine holds — from the events only."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.held: dict[str, set[bytes]] = {m: set() for m in MEDIUMS}
        self.tokens: dict[bytes, bytes] = {}        # hash -> its block's token ids
        self.namespaces: dict[bytes, str] = {}      # first block of a namespace's chain -> its name
        self.seqs: list[int] = []

    def apply(self, seq: int, payload: bytes) -> None:
        self.seqs.append(seq)
        ts, events, *rank = msgpack.unpackb(payload)
        assert isinstance(ts, float) and rank == []
        for event in events:
            tag, *fields = event
            if tag == "AllBlocksCleared":
                assert fields == []
                for held in self.held.values():
                    held.clear()
            elif tag == "BlockStored":
                hashes, parent, tokens, block_size, lora_id, medium, lora_name, *extra = fields
                assert block_size == self.block_size and lora_id is None and lora_name is None
                assert len(tokens) == block_size * len(hashes) and medium in MEDIUMS
                extra_keys = extra[0] if extra else [None] * len(hashes)
                assert len(extra_keys) == len(hashes)
                for i, (h, key) in enumerate(zip(hashes, extra_keys)):
                    block = token_bytes(tokens[i * block_size:(i + 1) * block_size])
                    if parent is not None and key is None:   # a plain link: the hash names parent + tokens
                        assert h == chain_key(parent, block)
                    if key is not None:
                        self.namespaces[h] = key[0]
                    self.tokens[h] = block
                    self.held[medium].add(h)
                    parent = h
            elif tag == "BlockRemoved":
                hashes, medium = fields
                assert set(hashes) <= self.held[medium], "removed a block it never stored"
                self.held[medium] -= set(hashes)
            else:
                raise AssertionError(f"unknown event {tag}")


def store_view(store) -> dict[str, set[bytes]]:
    return {m: {n.key for n in store.index.nodes() if n.has(t)} for m, t in MEDIUMS.items()}


async def replay(endpoint: str, start: int) -> list[tuple[int, bytes]]:
    req = zmq.asyncio.Context.instance().socket(zmq.DEALER)     # one request, many replies
    req.connect(endpoint)
    req.send_multipart([b"", start.to_bytes(8, "big")])
    got = []
    while True:
        _, seq, payload = await asyncio.wait_for(req.recv_multipart(), 5)
        if not payload:
            assert int.from_bytes(seq, "big", signed=True) == -1
            break
        got.append((int.from_bytes(seq, "big"), payload))
    req.close(linger=0)
    return got


async def test_a_subscriber_rebuilds_the_stores_view_across_tiers_and_a_restart(llama, tmp_path):
    disk = str(tmp_path / "kv")
    engine = make_engine(llama, gpu=12, host=8, disk=disk, disk_blocks=256)
    publisher = KVEventPublisher(engine.store, LOCAL)
    publisher.start()
    await engine.start()
    sub = zmq.asyncio.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(publisher.endpoint)
    rng = random.Random(7)
    shared = prompt(99, 9)
    for i in range(24):               # shared prefixes, new prompts, returns: GPU -> host -> disk
        p = shared + prompt(rng.randrange(6), rng.randrange(3, 14)) if rng.random() < 0.6 else prompt(100 + i, 19)
        await run(engine, p, greedy(3), namespace=rng.choice(["", "a", "b"]))
    await engine.store.flush()        # the disk writes land: where blocks are no longer up to timing
    await asyncio.sleep(0)            # the turn's batch goes out
    publisher.flush()

    sub_view = Subscriber(engine.store.block_size)   # a late subscriber: everything through replay
    for seq, payload in await replay(publisher.replay_endpoint, 0):
        sub_view.apply(seq, payload)
    assert sub_view.seqs == list(range(len(sub_view.seqs)))
    view = store_view(engine.store)
    assert all(view.values()), f"the workload should leave blocks in every tier: {view}"
    assert sub_view.held == view
    assert {n.key for n in engine.store.index.nodes()} <= set(sub_view.tokens)
    key = publisher.log.namespace_key        # tenant "" carries no extra key; the others a keyed hash
    assert set(sub_view.namespaces.values()) == {namespace_id(key, "a"), namespace_id(key, "b")}

    live = Subscriber(engine.store.block_size)       # the live stream, from the first batch it got
    seq, payload = None, None
    while await sub.poll(100):
        _, seq_bytes, payload = await sub.recv_multipart()
        seq = int.from_bytes(seq_bytes, "big")
    assert seq == sub_view.seqs[-1]                  # the PUB stream carried the same batches
    await engine.stop(persist=True)
    publisher.close()
    sub.close(linger=0)

    engine = make_engine(llama, gpu=12, host=8, disk=disk, disk_blocks=256)   # a restart
    publisher = KVEventPublisher(engine.store, LOCAL)
    publisher.start()
    await asyncio.sleep(0)
    batches = await replay(publisher.replay_endpoint, 0)
    assert msgpack.unpackb(batches[0][1])[1][0] == ["AllBlocksCleared"]
    for seq, payload in batches:
        live.apply(seq, payload)
    assert live.held == store_view(engine.store) and live.held["DISK"] and not live.held["GPU"]
    publisher.close()
    engine.store.close()


async def test_the_engine_process_publishes_no_tenant_name_or_salt(make_client, unused_tcp_port_factory):
    """The tenant's namespace travels as a keyed hash: neither its name nor a request's
    cache_salt is anywhere in the stream."""
    port, replay_port = unused_tcp_port_factory(), unused_tcp_port_factory()
    client = await make_client(tenants=[{"name": "acme", "api_key": "sk-acme"}],
                               kv_events={"enabled": True, "endpoint": f"tcp://127.0.0.1:{port}",
                                          "replay_endpoint": f"tcp://127.0.0.1:{replay_port}"})
    for salt in (None, "s3cret-salt"):
        resp = await client.post("/v1/completions", headers={"Authorization": "Bearer sk-acme"},
                                 json={"model": MODEL, "prompt": "a prompt of a few blocks, " * 6, "max_tokens": 2,
                                       "cache_salt": salt})
        assert resp.status == 200
    sub, payloads = Subscriber(16), []
    for _ in range(50):          # the batch is sent in the turn after the step; replays find it
        for seq, payload in await replay(f"tcp://127.0.0.1:{replay_port}", len(sub.seqs)):
            sub.apply(seq, payload)
            payloads.append(payload)
        if len(sub.namespaces) == 2:
            break
        await asyncio.sleep(0.02)
    assert len(sub.held["GPU"]) >= 6
    ids = list(sub.namespaces.values())
    assert len(set(ids)) == 2 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)   # two namespaces, hashed
    stream = b"".join(payloads)
    assert b"acme" not in stream and b"s3cret" not in stream


def test_kv_events_stay_on_this_machine_unless_authenticated_or_allowed():
    """Loopback by default; a bind beyond it needs CURVE keys or an explicit allow_unauthenticated."""
    from engine.serving.config import is_local_endpoint
    default = KvEventsConfig(enabled=True)
    assert is_local_endpoint(default.endpoint) and is_local_endpoint(default.replay_endpoint)
    for endpoint in ("tcp://*:5557", "tcp://0.0.0.0:5557", "tcp://10.1.2.3:5557", "tcp://eth0:5557"):
        with pytest.raises(ConfigError, match="kv_events.endpoint.*loopback"):
            build_config({"kv_events": {"enabled": True, "endpoint": endpoint}})
        with pytest.raises(ConfigError, match="kv_events.replay_endpoint"):
            build_config({"kv_events": {"enabled": True, "replay_endpoint": endpoint}})
        build_config({"kv_events": {"enabled": True, "endpoint": endpoint, "allow_unauthenticated": True}})
        public, secret = zmq.curve_keypair()
        build_config({"kv_events": {"enabled": True, "endpoint": endpoint, "curve_secret_key": secret.decode(),
                                    "curve_client_keys": public.decode()}})
    for endpoint in ("tcp://127.0.0.1:1", "tcp://localhost:1", "tcp://[::1]:1", "ipc:///tmp/x", "inproc://x"):
        build_config({"kv_events": {"enabled": True, "endpoint": endpoint}})
    with pytest.raises(ConfigError, match="curve_client_keys"):        # a secret alone lets anyone in
        build_config({"kv_events": {"curve_secret_key": zmq.curve_keypair()[1].decode()}})
    with pytest.raises(ConfigError, match="curve_secret_key"):
        build_config({"kv_events": {"curve_secret_key": "not a key", "curve_client_keys": "x"}})


async def test_with_curve_only_the_configured_subscribers_receive():
    server_public, server_secret = zmq.curve_keypair()
    allowed_public, allowed_secret = zmq.curve_keypair()
    stranger_public, stranger_secret = zmq.curve_keypair()
    config = KvEventsConfig(enabled=True, endpoint="tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*",
                            curve_secret_key=server_secret.decode(), curve_client_keys=allowed_public.decode())
    from tests.conftest import make_store
    store = make_store()
    publisher = KVEventPublisher(store, config)
    assert publisher.public_key == server_public.decode()
    ctx = zmq.asyncio.Context.instance()

    def subscriber(keys) -> zmq.asyncio.Socket:
        sub = ctx.socket(zmq.SUB)
        if keys is not None:
            sub.curve_serverkey = server_public
            sub.curve_publickey, sub.curve_secretkey = keys
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(publisher.endpoint)
        return sub
    subs = {"allowed": subscriber((allowed_public, allowed_secret)),
            "stranger": subscriber((stranger_public, stranger_secret)), "plain": subscriber(None)}
    publisher.start()
    got = {name: 0 for name in subs}
    for _ in range(40):                        # PUB drops what it sends before a subscriber joins
        from tests.conftest import run_request
        run_request(store, object(), list(range(_ * 8, _ * 8 + 8)))
        await asyncio.sleep(0.02)
        for name, sub in subs.items():
            while await sub.poll(0):
                await sub.recv_multipart()
                got[name] += 1
        if got["allowed"] >= 3:
            break
    assert got["allowed"] >= 3 and got["stranger"] == 0 and got["plain"] == 0, got
    for sub in subs.values():
        sub.close(linger=0)
    publisher.close()
    store.close()


@pytest.mark.parametrize("bad", [{"endpoint": "http://x"}, {"replay_endpoint": "5558"}, {"buffer_steps": 0}])
def test_kv_events_settings_are_checked(bad):
    from gateway.config import ConfigError, build_config
    with pytest.raises(ConfigError, match="kv_events"):
        build_config({"kv_events": bad})
