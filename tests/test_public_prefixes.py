"""Public prefixes (store/keys.py `Scope`): the blocks of a prefix the operator declares public
are computed once and hit by every tenant; what follows them stays in the requesting tenant's
namespace, by key (no hits across tenants) and so by time (the TTFT test); the namespace mixed
into the first private block's key survives a restart; greedy output over a public hit is
transformers' own."""
import time

from store import Tier
from tests import faults
from tests.conftest import (
    BS,
    admit_from_disk,
    assert_cached_kv,
    assert_loaded_kv,
    finish_request,
    make_store,
    run_request,
)
from tests.engine_util import greedy, make_engine, prompt, run
from tests.http_util import MODEL, chat
from tests.models import hf_greedy

PUBLIC = list(range(1, 3 * BS + 3))            # 3 full blocks, then 2 tokens of a partial one
A_SUFFIX = [200 + i for i in range(2 * BS)]
B_SUFFIX = [300 + i for i in range(2 * BS)]


def test_public_blocks_are_shared_and_what_follows_is_each_tenants_own():
    store = make_store(gpu=32)
    assert store.declare_public(PUBLIC) == 3            # full blocks only
    head = PUBLIC[:3 * BS]
    assert run_request(store, "a1", head + A_SUFFIX, namespace="a").num_cached_tokens == 0
    # b: the public blocks hit, a's suffix does not, though its tokens are the same
    assert run_request(store, "b1", head + A_SUFFIX, namespace="b").cached_tokens[Tier.GPU] == 3 * BS
    assert run_request(store, "a2", head + A_SUFFIX, namespace="a").cached_tokens[Tier.GPU] == 5 * BS
    assert run_request(store, "b2", head + B_SUFFIX, namespace="b").cached_tokens[Tier.GPU] == 3 * BS

    roots = {ns: store.root_key(ns) for ns in ("a", "b")}
    counts = store.blocks_by_namespace()
    assert {k: v[Tier.GPU] for k, v in counts.items()} == {store.public_root: 3, roots["a"]: 2, roots["b"]: 4}
    assert store.index.gpu_blocks == {store.public_root: 3, roots["a"]: 2, roots["b"]: 4}   # max_kv_share's count
    last_public = store.match(store.scope("a", head), head).nodes[-1]
    private = {c.namespace: c for c in last_public.children.values()}     # a's and b's first private blocks
    assert set(private) == {roots["a"], roots["b"]} and all(c.mixed == c.namespace for c in private.values())
    assert last_public.mixed == b"" and all(g.mixed == b"" for c in private.values() for g in c.children.values())

    # the scope of a prompt: only leading blocks equal to a declared prefix's are public
    assert store.scope("a", head + A_SUFFIX).shared == 3
    assert store.scope("a", PUBLIC[:2 * BS] + A_SUFFIX).shared == 2
    assert store.scope("a", A_SUFFIX + head).shared == 0
    assert store.scope("a", head[:BS - 1]).shared == 0

    # an evicted tenant prefix takes only that tenant's blocks; a public one takes what follows it
    assert store.evict_prefix(store.scope("a", head + A_SUFFIX), head + A_SUFFIX) == 2
    assert run_request(store, "b3", head + A_SUFFIX, namespace="b").cached_tokens[Tier.GPU] == 5 * BS  # b's stay
    assert store.evict_prefix(store.public_root, head) == 3 + 4           # with b's two suffixes
    assert store.index.num_nodes == 0
    store.check_integrity()


async def test_public_and_private_blocks_survive_a_restart(tmp_path):
    head = PUBLIC[:3 * BS]
    store = make_store(tmp_path, gpu=32, disk_blocks=64)
    store.declare_public(PUBLIC)
    run_request(store, "a", head + A_SUFFIX, namespace="a")
    run_request(store, "b", head + A_SUFFIX, namespace="b")
    store.persist()
    await store.flush()
    store.close()

    store = make_store(tmp_path, gpu=32, host=16, disk_blocks=64)   # the restart: declared again (the config)
    store.declare_public(PUBLIC)
    counts = {k: v[Tier.DISK] for k, v in store.blocks_by_namespace().items()}
    assert counts == {store.public_root: 3, store.root_key("a"): 2, store.root_key("b"): 2}
    matches = {ns: store.match(store.scope(ns, head + A_SUFFIX), head + A_SUFFIX) for ns in ("a", "b")}
    assert all(m.tiers == (Tier.DISK,) * 5 for m in matches.values())
    for ns in matches:                     # each tenant's suffix is found under its own scope, KV exact
        seq, filled = await admit_from_disk(store, ns, head + A_SUFFIX, namespace=ns)
        assert seq.num_cached_tokens // BS + filled == 5   # the public part: on the GPU after the first
        assert_cached_kv(store, seq, head + A_SUFFIX)
        assert_loaded_kv(store, seq, head + A_SUFFIX, filled)
        finish_request(store, seq, head + A_SUFFIX)
    assert len(store.match(store.scope("c", head + A_SUFFIX), head + A_SUFFIX).nodes) == 3   # the public part
    store.close()


async def test_greedy_output_over_a_public_hit_matches_generate(llama):
    engine = make_engine(llama)
    await engine.start()
    public = prompt(1, 5 * BS + 1)
    engine.store.declare_public(public)
    await run(engine, public + prompt(2, 9), greedy(4), namespace="a")
    follow_up = public + prompt(3, 7)
    tokens, last = await run(engine, follow_up, greedy(10), namespace="b")
    assert last.cached_tokens[Tier.GPU] == 5 * BS
    assert tokens == hf_greedy(llama, follow_up, 10)
    await engine.stop()


# ---- over HTTP: the configuration's public prefixes, the admin API, timing -------------------

TENANTS = [{"name": "a", "api_key": "sk-a"}, {"name": "b", "api_key": "sk-b"}]
ADMIN = {"Authorization": "Bearer sk-admin"}
SYSTEM = "You are the assistant of the bookshop on the corner. Answer briefly and politely. " * 2


async def usage(client, key: str, prompt: str = "", messages=None) -> tuple[int, int]:
    """(prompt tokens, cached tokens) of one request of tenant `key`."""
    if messages:
        resp = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                 json=chat(max_tokens=1, messages=messages))
    else:
        resp = await client.post("/v1/completions", headers={"Authorization": f"Bearer {key}"},
                                 json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
    assert resp.status == 200, await resp.text()
    u = (await resp.json())["usage"]
    return u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"]


async def test_a_configured_system_prompt_is_hit_by_every_tenant_and_nothing_after_it(make_client):
    client = await make_client(tenants=TENANTS, server={"admin_api_key": "sk-admin"},
                               public_prefixes=[{"system": SYSTEM}])
    listed = await (await client.get("/admin/cache", headers=ADMIN)).json()
    public = listed["public"]["gpu"]                     # computed at start-up, before any request
    assert public > 2 and listed["public"]["prefixes"] == 1
    assert listed["tenants"]["a"]["gpu"] == listed["tenants"]["b"]["gpu"] == 0
    secret = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "my order number is 88231, " * 3}]
    _, cached = await usage(client, "sk-a", messages=secret)
    assert 0 < cached <= public * 16                     # the public part only (the block size is 16)
    assert (await usage(client, "sk-b", messages=secret))[1] == cached     # a's suffix is not b's
    assert (await usage(client, "sk-a", messages=secret))[1] > cached       # but it is a's
    listed = await (await client.get("/admin/cache", headers=ADMIN)).json()
    assert listed["tenants"]["a"]["gpu"] > 0 and listed["public"]["gpu"] == public


async def test_the_admin_api_declares_and_evicts_public_prefixes(make_client):
    client = await make_client(tenants=TENANTS, server={"admin_api_key": "sk-admin"})
    doc = "the shared catalogue of the bookshop, every title in order, " * 3
    assert (await usage(client, "sk-a", doc))[1] == 0
    assert (await usage(client, "sk-b", doc))[1] == 0    # not public yet: b computes it again
    declared = await client.post("/admin/cache/public", headers=ADMIN, json={"prompt": doc})
    body = await declared.json()
    assert declared.status == 200 and body["public_blocks"] > 0 and body["cached_tokens"] == 0
    n, cached = await usage(client, "sk-b", doc + " and the question of b")
    assert cached == body["public_blocks"] * 16
    assert (await usage(client, "sk-a", doc + " and the question of b"))[1] == cached   # b's tail is b's
    evicted = await client.post("/admin/cache/evict", headers=ADMIN, json={"public": True, "prompt": doc})
    assert (await evicted.json())["evicted_blocks"] >= body["public_blocks"]
    assert (await usage(client, "sk-a", doc))[1] == 0
    for bad, param in (({"prompt": "x"}, "prompt"), ({"system": "a", "prompt": "b"}, "prompt"),
                       ({"prompt": doc, "tenant": "a"}, "tenant"), ({"prompt": [100_000] * 40}, "prompt")):
        resp = await client.post("/admin/cache/public", headers=ADMIN, json=bad)
        assert resp.status == 400 and (await resp.json())["error"]["param"] == param
    both = await client.post("/admin/cache/evict", headers=ADMIN, json={"public": True, "tenant": "a", "prompt": doc})
    assert both.status == 400 and (await both.json())["error"]["param"] == "public"


async def test_no_tenant_learns_another_tenants_suffix_by_timing(make_client):
    """Every step takes at least 20 ms (an injected delay) and computes at most one block, so a
    request's time to first token counts the blocks it computes: with a hit on another tenant's
    suffix it would be several steps shorter. Tenant b's first token after a's prompt comes as late
    as after a prompt nobody sent; a's own repeat shows what a hit looks like."""
    client = await make_client(entry=faults.slow_forward, tenants=TENANTS, server={"admin_api_key": "sk-admin"},
                               engine={"max_num_batched_tokens": 16}, public_prefixes=[{"text": SYSTEM}])

    async def ttft(key: str, suffix: str) -> float:
        start = time.perf_counter()
        _, cached = await usage(client, key, SYSTEM + suffix)
        assert cached > 0                                # the public prefix, at least
        return time.perf_counter() - start

    secret, unseen = " the private question of a, " * 6, " a question nobody asked yet, " * 6
    await ttft("sk-a", secret)
    a_hit = await ttft("sk-a", secret)
    b_after_a = await ttft("sk-b", secret)
    b_fresh = await ttft("sk-b", unseen)
    assert b_after_a > 3 * a_hit                         # a hit would be as fast as a's repeat ...
    assert b_after_a > 0.5 * b_fresh                     # ... b's is as slow as a prompt nobody sent
