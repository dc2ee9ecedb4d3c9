"""Retention a request asks for (engine.Retention; store `admit(retention=...)`): its prompt
blocks are kept at a retention priority until a deadline, in every tier, then fall back to
their own — pinned against the eviction order it changes; and its bounds over HTTP."""
import pytest

from engine.request import Request
from engine.sequence import Retention
from store import Tier
from tests.conftest import make_store, run_request
from tests.engine_util import BS, collect, greedy, make_engine, prompt
from tests.http_util import MODEL


@pytest.mark.parametrize("seconds_later,kept", [(5.0, True), (11.0, False)])
def test_a_retained_prefix_outlives_more_recent_blocks_until_its_deadline(seconds_later, kept):
    """An 8-block pool: a 2-block prefix retained (priority 5 for 10 s) and used first (least
    recent), then 6 blocks of others. A request needing 2 more evicts by priority, then LRU:
    within the 10 s the others' oldest go; after them, the prefix (its own priority 0 again)."""
    store = make_store(gpu=8)
    now = [100.0]
    store.index.clock = lambda: now[0]
    bs = store.block_size
    kept_prefix = list(range(1, 1 + 2 * bs))
    run_request(store, "k", kept_prefix, retention=(0, 2, 5, 10.0))
    for i in range(3):
        run_request(store, f"o{i}", [100 + 10 * i + j for j in range(2 * bs)])
    now[0] += seconds_later
    run_request(store, "new", [500 + j for j in range(2 * bs)])
    assert (store.match(store.root_key(), kept_prefix).tiers == (Tier.GPU, Tier.GPU)) == kept
    assert (store.match(store.root_key(), list(range(100, 100 + 2 * bs))).tiers == ()) == kept


def test_only_blocks_wholly_inside_the_token_range_are_retained():
    assert Retention(5, 10.0, start=3, end=50).blocks(prompt_len=40, block_size=16) == (1, 2, 5, 10.0)
    assert Retention(5, 10.0).blocks(prompt_len=40, block_size=16) == (0, 2, 5, 10.0)


async def test_the_engine_retains_what_a_request_asks_for(llama):
    engine = make_engine(llama, gpu=16)
    await engine.start()
    doc = prompt(1, 4 * BS + 1)
    await collect(engine.submit(Request(doc, greedy(2), retention=Retention(7, 60.0, start=0, end=2 * BS))))
    nodes = engine.store.match(engine.store.root_key(), doc).nodes
    assert [n.retain_priority for n in nodes] == [7, 7, 0, 0]
    assert all(n.retain_until > engine.store.index.clock() + 50 for n in nodes[:2])
    await engine.stop(persist=False)


async def test_retention_over_http_is_bounded_by_the_tenant(make_client):
    tenants = [{"name": "a", "api_key": "sk-a", "max_priority": 5, "max_retention_s": 600}]
    client = await make_client(tenants=tenants)
    auth = {"Authorization": "Bearer sk-a"}
    body = {"model": MODEL, "prompt": "keep this prompt warm " * 4, "max_tokens": 2}
    warm = {"priority": 5, "duration_s": 600}
    ok = await client.post("/v1/completions", headers=auth, json={**body, "retention": warm})
    assert ok.status == 200
    for retention, param in (({"priority": 6, "duration_s": 60}, "retention.priority"),
                             ({"priority": 1, "duration_s": 601}, "retention.duration_s"),
                             ({"priority": 1, "duration_s": 0}, "retention.duration_s")):
        resp = await client.post("/v1/completions", headers=auth, json={**body, "retention": retention})
        assert resp.status == 400 and (await resp.json())["error"]["param"] == param


def test_prompt_cache_retention_24h_is_a_days_retention_of_the_whole_prompt():
    """OpenAI's "24h" maps onto kvgate's retention: the whole prompt, a day, priority 1 (above
    the default); "in_memory" is the default (none)."""
    from gateway.protocol import CompletionRequest
    from gateway.views import retention_of
    ask = lambda **kw: CompletionRequest(model=MODEL, prompt="x", **kw)  # noqa: E731
    assert retention_of(ask(prompt_cache_retention="24h"), None, disk_on=True) == Retention(1, 86_400.0, 0, None)
    assert retention_of(ask(prompt_cache_retention="in_memory"), None, disk_on=True) is None


async def test_prompt_cache_retention_over_http_needs_the_disk_tier_and_the_tenants_bound(make_client, tmp_path):
    disk = {"disk": {"enabled": True, "path": str(tmp_path / "kv"), "max_bytes": 100_000_000}}
    tenants = [{"name": "day", "api_key": "sk-day", "max_retention_s": 86_400, "max_priority": 1},
               {"name": "hour", "api_key": "sk-hour", "max_retention_s": 3600, "max_priority": 1}]
    client = await make_client(tenants=tenants, store=disk)
    body = {"model": MODEL, "prompt": "keep this prompt for a day " * 4, "max_tokens": 2,
            "prompt_cache_retention": "24h"}

    async def post(key: str, **extra):
        return await client.post("/v1/completions", headers={"Authorization": f"Bearer {key}"}, json={**body, **extra})
    assert (await post("sk-day")).status == 200
    refused = await post("sk-hour")
    error = (await refused.json())["error"]
    assert refused.status == 400 and error["param"] == "prompt_cache_retention" and "3600 s" in error["message"]
    both = await post("sk-day", retention={"priority": 1, "duration_s": 60})
    assert both.status == 400 and (await both.json())["error"]["param"] == "prompt_cache_retention"
    bad = await post("sk-day", prompt_cache_retention="forever")
    assert bad.status == 400 and (await bad.json())["error"]["param"] == "prompt_cache_retention"


async def test_prompt_cache_retention_24h_without_a_disk_tier_is_a_400_that_says_so(make_client):
    client = await make_client()                    # the test servers' default: no disk tier
    resp = await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "prompt_cache_retention": "24h"})
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["param"] == "prompt_cache_retention" and "disk tier" in error["message"]
