"""Why did a request miss the cache? Each reason of the cache report produced on purpose: a
prefix never computed, one evicted (which tier, why), one found but recomputed by the
load-or-recompute choice, and one computed by another request meanwhile; the report over HTTP
(opt-in, on the last SSE chunk too) and its counters in /metrics."""
import pytest

from engine.request import Request
from store import Tier
from tests.engine_util import BS, collect, greedy, make_engine, prompt
from tests.http_util import MODEL, metric


async def report(engine, tokens, **kw):
    return (await collect(engine.submit(Request(tokens, greedy(2), cache_report=True, **kw))))[1].cache_report


async def test_never_computed_then_found_then_evicted_with_where_and_why(llama):
    engine = make_engine(llama, gpu=12)          # no host or disk tier: what the GPU evicts is gone
    await engine.start()
    doc = prompt(1, 4 * BS + 1)
    first = await report(engine, doc)
    assert first["first_miss"] == {"block": 0, "reason": "never_computed"} and first["prompt_blocks"] == 4
    again = await report(engine, doc)
    assert again["first_miss"] is None and again["found_blocks"] == {"gpu": 4, "host": 0, "disk": 0}
    for i in range(4):                           # other prompts take the pool: doc's blocks go
        await report(engine, prompt(10 + i, 4 * BS + 1))
    gone = await report(engine, doc)
    miss = gone["first_miss"]
    assert miss["reason"] == "evicted" and miss["block"] == 0 and miss["tier"] == "gpu"
    assert "no room in the host or disk tier" in miss["policy"]
    assert engine.miss_reasons["never_computed"] >= 5 and engine.miss_reasons["evicted"] == 1
    await engine.stop(persist=False)


async def test_blocks_found_in_the_host_tier_but_recomputed_are_reported_with_the_rates(llama):
    engine = make_engine(llama, gpu=8, host=32)
    await engine.start()
    doc = prompt(2, 4 * BS + 1)
    await report(engine, doc)
    for i in range(3):                           # doc's blocks move to the host tier
        await report(engine, prompt(20 + i, 4 * BS + 1))
    engine.costs.host_bytes_per_s, engine.costs.prefill_tokens_per_s = 1.0, 1e9    # copying is slower
    found = await report(engine, doc)
    assert found["found_blocks"]["host"] > 0 and found["recomputed_blocks"] == found["found_blocks"]["host"]
    assert found["load_or_recompute"]["loads_up_to"] == "gpu"
    assert found["load_or_recompute"]["rates"]["host_bytes_per_s"] == 1.0
    assert engine.miss_reasons["recomputed"] == 1
    await engine.stop(persist=False)


async def test_a_request_that_waited_for_another_to_compute_its_prefix_says_so(llama):
    engine = make_engine(llama, gpu=64, max_batched=64, max_seqs=8)
    shared = prompt(3, 6 * BS)
    streams = [engine.submit(Request(shared + [200 + i], greedy(2), cache_report=True)) for i in range(2)]
    while await engine.step():
        pass
    reports = [(await collect(s))[1].cache_report for s in streams]
    assert [r["waited_for_prefix"] for r in reports] == [False, True]
    assert reports[1]["first_miss"]["reason"] == "never_computed"      # at arrival: computed by the first
    assert engine.miss_reasons["being_computed"] == 1


async def test_the_report_over_http_is_opt_in_and_on_the_last_chunk(make_client):
    client = await make_client()
    body = {"model": MODEL, "prompt": "explain the cache " * 4, "max_tokens": 3, "temperature": 0}
    plain = await (await client.post("/v1/completions", json=body)).json()
    assert "cache_report" not in plain["choices"][0]
    full = await (await client.post("/v1/completions", json={**body, "cache_report": True,
                                                               "prompt_cache_key": "docs-bot"})).json()
    assert full["choices"][0]["cache_report"]["first_miss"] is None       # the first request cached it
    assert full["choices"][0]["cache_report"]["prompt_cache_key"] == "docs-bot"   # recorded
    events = (await (await client.post("/v1/completions", json={**body, "prompt": "a new prompt " * 4,
                                                                  "cache_report": True, "stream": True})).text())
    chunks = [line for line in events.splitlines() if '"cache_report"' in line]
    assert len(chunks) == 1 and '"finish_reason": "length"' in chunks[0] and "never_computed" in chunks[0]
    assert await metric(client, "kvgate_cache_misses_total", reason="never_computed") >= 2
    assert await metric(client, "kvgate_cache_misses_total", reason="evicted") == 0
    assert set(full["choices"][0]["cache_report"]["found_blocks"]) == {t.name.lower() for t in Tier}


@pytest.mark.parametrize("mode,read_blocks", [("load", 6), ("auto", 3)])
async def test_the_report_counts_disk_blocks_as_they_came_back(llama, tmp_path, mode, read_blocks):
    """After a restart, a prompt whose 6 blocks are all on disk: read whole ("load"), or half
    computed from the front while the back is read ("auto", equal rates: they meet halfway). The report, usage and
    the miss counter say exactly that: read from disk, recomputed, and nothing else (it once
    counted every disk block found as recomputed, while usage said they came from disk)."""
    from tests.test_engine_tiers import read_lands, restarted_with_a_gated_disk
    document = prompt(1, 24)
    engine, gate = await restarted_with_a_gated_disk(llama, tmp_path, document, mode)
    stream = engine.submit(Request(document + [7, 9], greedy(3), cache_report=True))
    await engine.step()
    await read_lands(engine, gate)
    await engine.start()
    _, last = await collect(stream)
    report = last.cache_report
    assert report["found_blocks"] == {"gpu": 0, "host": 0, "disk": 6}
    assert report["loaded_blocks"] == {"gpu": 0, "host": 0, "disk": read_blocks}
    assert report["recomputed_blocks"] == 6 - read_blocks == engine.recomputed_blocks["disk"]
    assert last.cached_tokens[Tier.DISK] == read_blocks * BS
    assert engine.miss_reasons["recomputed"] == (read_blocks < 6)
    await engine.stop()
