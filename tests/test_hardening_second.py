"""The second adversarial report (issue 24), item by item: each test failed on the code before
it and passes now. docs/reliability.md has the table."""
import asyncio
import json
import os
import signal
import time

import pytest

from engine.fairness import TenantShare
from engine.request import Request
from tests.conftest import wait_idle
from tests.engine_util import BS, collect, greedy, make_engine, prompt
from tests.http_util import MODEL, chat

TENANTS = [{"name": "a", "api_key": "sk-a"}, {"name": "b", "api_key": "sk-b"}]
A, B = {"Authorization": "Bearer sk-a"}, {"Authorization": "Bearer sk-b"}
ADMIN = {"Authorization": "Bearer sk-admin"}


async def error_of(resp, status: int) -> dict:
    body = await resp.json()
    assert resp.status == status, body
    return body["error"]


# ---- 2. logit_bias keys that str.isdigit() takes -----------------------------------------------

async def test_logit_bias_keys_are_ascii_token_ids_only(make_client):
    client = await make_client()
    for key in ("²", "٣", "３", "1" * 4301, "-1", "", "1.0", " 1"):
        resp = await client.post("/v1/chat/completions", json=chat(logit_bias={key: 1}))
        err = await error_of(resp, 400)
        assert err["param"] == "logit_bias", err
    ok = await client.post("/v1/chat/completions", json=chat(logit_bias={"007": 1}))
    assert ok.status == 200


# ---- 3. memory amplification: the response's size is bounded before generating -----------------

async def test_a_response_that_could_outgrow_the_budget_is_refused_before_it_runs(make_client):
    client = await make_client(server={"max_response_bytes": 1 << 16})
    big = chat(n=8, max_tokens=64, logprobs=True, top_logprobs=20)      # 8 x 64 x (8 + 64 x 21) bytes
    err = await error_of(await client.post("/v1/chat/completions", json=big), 400)
    assert err["param"] == "top_logprobs" and err["code"] == "response_too_large", err
    err = await error_of(await client.post("/v1/completions", json={
        "model": MODEL, "prompt": "x", "n": 8, "max_tokens": 64, "logprobs": 5}), 400)
    assert err["param"] == "logprobs"
    err = await error_of(await client.post("/v1/completions", json={
        "model": MODEL, "prompt": "x", "n": 64, "max_tokens": 200}), 400)
    assert err["param"] == "max_tokens"
    stats = await wait_idle(client)
    assert stats["blocks"]["gpu"]["locked"] == 0


async def test_the_budget_is_an_upper_bound_of_the_real_response(make_client):
    """Just under the budget, the response (every logprob entry of the demo model's tokens)
    fits it: the estimate per token is not too small."""
    budget = 1 << 16
    client = await make_client(server={"max_response_bytes": budget})
    per_token = 8 + 64 * 21
    body = chat("tell me", n=2, max_tokens=budget // per_token // 2, logprobs=True, top_logprobs=20,
                ignore_eos=True)
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200
    raw = await resp.read()
    assert len(raw) <= budget, (len(raw), budget)
    assert len(json.loads(raw)["choices"][0]["logprobs"]["content"]) == body["max_tokens"]


# ---- 4. a frozen engine shows in /health; /metrics never hangs ---------------------------------

async def test_a_frozen_engine_process_shows_in_health_and_nothing_hangs(make_client):
    client = await make_client(server={"heartbeat_timeout_s": 2})
    from gateway.keys import ENGINE
    pid = client.app[ENGINE].process.pid
    assert (await client.get("/health")).status == 200
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 30
        while (resp := await client.get("/health")).status == 200:
            assert time.monotonic() < deadline, "/health never noticed the frozen engine"
            await asyncio.sleep(0.1)
        body = await resp.json()
        assert resp.status == 503 and body["status"] == "engine_unresponsive" and "heartbeat" in body["reason"]
        for method, path, kw in (("get", "/metrics", {}), ("post", "/v1/chat/completions", {"json": chat()})):
            async with asyncio.timeout(5):           # answered at once, not after the engine wakes
                resp = await getattr(client, method)(path, **kw)
            err = await error_of(resp, 503)
            assert "heartbeat" in err["message"] and resp.headers["Retry-After"]
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while (await client.get("/health")).status != 200:
        assert time.monotonic() < deadline, "/health did not recover"
        await asyncio.sleep(0.1)
    assert (await client.post("/v1/chat/completions", json=chat())).status == 200


async def test_an_unanswered_question_to_the_engine_times_out():
    """EngineClient.ask gives up (EngineUnresponsive) instead of waiting forever."""
    from gateway.engines.pipe import EngineClient
    from gateway.errors import EngineUnresponsive

    class Silent:                                    # an engine process that never answers
        info = {"name": "m", "bounds": [1, 1, 1, 1, False], "max_sequence_tokens": 1, "steps": {}, "tiers": [],
                "fingerprint": "f", "kv": {}}
        from_engine = None

        def send(self, *msg):
            pass

        async def wait_exit(self):
            await asyncio.Event().wait()

    client = EngineClient.__new__(EngineClient)
    client.process, client.dead, client._stats = Silent(), None, {}
    client._tokens, client._last_beat = iter(range(10)), time.monotonic()
    with pytest.raises(EngineUnresponsive, match="not answered"):
        await client.ask("stats", timeout_s=0.05)
    assert client._stats == {}


# ---- 7. cache_report does not time other tenants ------------------------------------------------

async def test_with_tenants_the_report_gives_no_eviction_time(llama):
    for tenants, timed in ((None, True), ({"a": TenantShare(1.0, 0, 1.0)}, False)):
        engine = make_engine(llama, gpu=12, tenants=tenants)
        await engine.start()
        doc = prompt(1, 4 * BS + 1)
        await collect(engine.submit(Request(doc, greedy(2), namespace="a")))
        for i in range(4):                        # another namespace's requests take the pool
            await collect(engine.submit(Request(prompt(10 + i, 4 * BS + 1), greedy(2), namespace="b")))
        _, last = await collect(engine.submit(Request(doc, greedy(2), namespace="a", cache_report=True)))
        miss = last.cache_report["first_miss"]
        assert miss["reason"] == "evicted" and miss["tier"] == "gpu"
        assert (miss["at"] is not None) == timed, miss
        await engine.stop(persist=False)


async def test_waiting_for_a_public_prefix_another_computes_is_not_reported(llama):
    """It still waits (one compute for both), but whether someone else is sending the public
    prefix now is not its report's to say; its own namespace's blocks are."""
    engine = make_engine(llama, gpu=64, max_batched=64, max_seqs=8)
    shared = prompt(3, 6 * BS)
    engine.store.declare_public(shared)
    streams = [engine.submit(Request(shared + prompt(40 + i, 2 * BS), greedy(2), cache_report=True, namespace=ns))
               for i, ns in enumerate(("a", "b"))]
    while await engine.step():
        pass
    lasts = [(await collect(s))[1] for s in streams]
    assert [last.cache_report["waited_for_prefix"] for last in lasts] == [False, False]
    assert lasts[1].num_cached_tokens == 6 * BS          # it did wait, and found the shared blocks
    await engine.stop(persist=False)


# ---- 11. smaller ones ---------------------------------------------------------------------------

async def test_a_retention_that_ends_before_it_starts_is_refused(make_client):
    client = await make_client(tenants=TENANTS, server={"admin_api_key": "sk-admin"})
    for start, end in ((10, 5), (8, 8)):
        body = chat(retention={"priority": 1, "duration_s": 10, "start": start, "end": end})
        err = await error_of(await client.post("/v1/chat/completions", json=body, headers=A), 400)
        assert err["param"] == "retention.end", err
    err = await error_of(await client.post("/admin/cache/warm", headers=ADMIN, json={
        "tenant": "a", "prompt": "x" * 40, "retention": {"priority": 1, "duration_s": 9, "start": 4, "end": 1}}), 400)
    assert err["param"] == "retention.end"


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", chat(temperature="hot"), "temperature"),
    ("/v1/chat/completions", chat(stop=5), "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": 5}, "prompt"),
    ("/v1/chat/completions", chat(top_p=[1]), "top_p"),
])
async def test_400s_name_the_field_as_the_client_wrote_it(make_client, path, body, param):
    client = await make_client()
    err = await error_of(await client.post(path, json=body), 400)
    assert err["param"] == param and err["message"].startswith(f"{param}: "), err
    for tag in (".int", ".str", ".float", ".list", "function-"):
        assert tag not in err["message"], err


async def test_the_admin_api_names_the_field_of_a_public_prefix(make_client):
    client = await make_client(server={"admin_api_key": "sk-admin"})
    for body in ({}, {"prompt": "x" * 64, "system": "y"}):
        err = await error_of(await client.post("/admin/cache/public", headers=ADMIN, json=body), 400)
        assert err["param"] == "prompt" and "exactly one of prompt and system" in err["message"], err
        assert not err["message"].startswith(":")


async def test_version_is_open_and_tokenize_needs_no_model(make_client):
    client = await make_client(tenants=TENANTS)
    resp = await client.get("/version")
    assert resp.status == 200 and "version" in await resp.json()
    resp = await client.post("/tokenize", headers=A, json={"prompt": "hello"})
    assert resp.status == 200 and (await resp.json())["count"] > 0
    resp = await client.post("/detokenize", headers=A, json={"tokens": [104, 105]})
    assert resp.status == 200
    resp = await client.post("/tokenize", headers=A, json={"model": "other", "prompt": "x"})
    assert resp.status == 404                            # a model, if named, must be this one


async def test_after_an_admin_eviction_the_report_names_the_tier(make_client):
    client = await make_client(tenants=TENANTS, server={"admin_api_key": "sk-admin"})
    doc = "the operating manual of the bookshop, section one, " * 4
    body = {"model": MODEL, "prompt": doc, "max_tokens": 1}
    assert (await client.post("/v1/completions", headers=A, json=body)).status == 200
    resp = await client.post("/admin/cache/evict", headers=ADMIN, json={"tenant": "a", "prompt": doc})
    assert (await resp.json())["evicted_blocks"] > 0
    resp = await client.post("/v1/completions", headers=A, json={**body, "cache_report": True})
    miss = (await resp.json())["choices"][0]["cache_report"]["first_miss"]
    assert miss["reason"] == "evicted" and miss["tier"] == "gpu" and "admin API" in miss["policy"], miss


# ---- 5. shutdown bounded, start-up interruptible ------------------------------------------------

def test_a_shutdown_persists_what_fits_before_its_deadline(tmp_path):
    """Placement.persist stops queueing at its deadline and says how many blocks it left."""
    from tests.conftest import make_store, run_request
    from tests.test_store_disk import prompt as disk_prompt
    store = make_store(tmp_path, gpu=16, host=0, disk_blocks=64)
    for i in range(1, 4):
        run_request(store, i, disk_prompt(i), flush=False)
    cached = sum(not n.on_disk for n in store.index.nodes())
    assert store.persist(time.monotonic() - 1) == (0, cached)          # no time left: nothing queued
    queued, left = store.persist(time.monotonic() + 60)
    assert queued == cached and left == 0
    store.close()


def test_sigterm_while_the_engine_starts_stops_the_start(tmp_path):
    """A supervisor's SIGTERM during start-up is obeyed at once: no "serving", exit 0."""
    import subprocess
    import sys

    from tests.conftest import child_env
    from tests.test_gateway_server import free_port
    cmd = [sys.executable, "-m", "gateway", "serve", "--port", str(free_port()), "--set", 'model.device="cpu"',
           "--set", 'model.path="builtin:tiny"',
           "--set", "store.disk.enabled=false", "--set", "store.host.enabled=false"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 60      # until the engine process is spawned: the server is starting it
    while not subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "spawn_main"], capture_output=True).stdout:
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "kvgate: serving" not in out and "stopped while starting" in out, out


async def test_the_port_answers_while_the_app_winds_down(unused_tcp_port):
    """The app's shutdown and cleanup (the engine persisting its cache) run while the port still
    answers — 503s — and only then is it closed: no refused connections while the server lives."""
    import aiohttp
    from aiohttp import web

    from gateway.server import make_runner
    in_cleanup, done = asyncio.Event(), asyncio.Event()

    async def ctx(app):
        yield
        in_cleanup.set()
        await done.wait()

    async def handler(request):
        return web.json_response({"status": "stopping"}, status=503, headers={"Retry-After": "5"})
    app = web.Application()
    app.cleanup_ctx.append(ctx)
    app.router.add_get("/health", handler)
    runner = make_runner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    winding = asyncio.ensure_future(runner.wind_down())
    await asyncio.wait_for(in_cleanup.wait(), 10)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{unused_tcp_port}/health") as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "5"
        done.set()
        await winding
        await runner.cleanup()
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"http://127.0.0.1:{unused_tcp_port}/health")


# ---- 10. a burst is queued, not refused -------------------------------------------------------

def test_the_admission_limit_is_what_the_engine_can_keep_waiting():
    from gateway.config import ServerConfig, build_config
    auto = ServerConfig()
    assert auto.admission_limits(2048, 64) == (64 + 4096, 64)      # 1 GiB of queued 2k prompts: capped
    assert auto.admission_limits(32768, 64) == (64 + 512, 64)      # longer contexts: fewer wait
    assert auto.admission_limits(1 << 20, 64) == (256, 64)         # never below 256
    small = build_config({"server": {"max_concurrent_sequences": 8}}).server   # below 64 alone: starts
    assert small.admission_limits(2048, 64) == (8, 8)


async def test_a_burst_beyond_the_old_limit_is_queued_not_refused(make_client):
    client = await make_client()
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 1, "temperature": 0}
    statuses = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(300)))
    assert [r.status for r in statuses] == [200] * 300
    stats = await wait_idle(client)
    assert stats["blocks"]["gpu"]["locked"] == 0
    small = await make_client(server={"max_concurrent_sequences": 4})
    slow = {**body, "max_tokens": 64, "ignore_eos": True}
    statuses = await asyncio.gather(*(small.post("/v1/completions", json=slow) for _ in range(12)))
    refused = [r for r in statuses if r.status == 429]
    assert refused and all(r.headers["Retry-After"] for r in refused)
    from gateway.keys import STATE                # the refusal tells nothing of what others hold
    holding = asyncio.ensure_future(small.post("/v1/completions", json={**slow, "n": 3}))
    for _ in range(1000):
        if small.app[STATE].in_flight == 3:
            break
        await asyncio.sleep(0.01)
    refused = await small.post("/v1/completions", json={**slow, "n": 2})
    message = (await refused.json())["error"]["message"]
    assert refused.status == 429 and "3" not in message and "4" in message, message   # the limit only
    assert (await holding).status == 200


async def test_kvgate_bench_honours_retry_after(unused_tcp_port):
    import aiohttp
    from aiohttp import web

    from gateway.bench.client import Client, Progress
    answers = iter([(429, "0"), (503, "0"), (200, None)])

    async def completions(request):
        status, retry = next(answers)
        if status != 200:
            return web.json_response({"error": {"message": "busy"}}, status=status, headers={"Retry-After": retry})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"choices": [{"index": 0, "text": "x", "token_ids": [7]}],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n")
        return resp
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    client = Client(f"http://127.0.0.1:{unused_tcp_port}/v1", MODEL, None)
    async with aiohttp.ClientSession() as client.session:
        sample = await client.complete("gsp", [1, 2, 3], 1, Progress("gsp", 1))
    assert sample.token_ids == [7] and client.retries == 2
    await runner.cleanup()


# ---- 8. public prefixes are bounded -------------------------------------------------------------

async def test_public_prefixes_may_hold_at_most_a_quarter_of_the_gpu_pool(make_client):
    client = await make_client(tenants=TENANTS, server={"admin_api_key": "sk-admin"})   # 256 GPU blocks
    declared, refused = 0, None
    for i in range(10):
        resp = await client.post("/admin/cache/public", headers=ADMIN, json={"prompt": f"document {i}: " + "x" * 300})
        if resp.status != 200:
            refused = await error_of(resp, 400)
            break
        declared += (await resp.json())["public_blocks"]
    assert refused is not None and refused["code"] == "public_prefixes_full" and refused["param"] == "prompt", refused
    assert 64 - 20 < declared <= 64                 # a quarter of 256, less the one that did not fit
    usage = await (await client.get("/admin/cache", headers=ADMIN)).json()
    assert usage["public"]["gpu"] <= 64
    assert (await client.post("/v1/chat/completions", json=chat(), headers=A)).status == 200


def test_a_declaration_past_the_public_bound_declares_nothing():
    from store.errors import PublicPrefixesFull
    from store.keys import PublicPrefixes
    public = PublicPrefixes("fp")
    assert public.declare(bytes(4 * 16 * 4), 4, max_blocks=16) == 16
    with pytest.raises(PublicPrefixesFull, match="at most 16"):
        public.declare(bytes(range(4)) * 4, 4, max_blocks=16)      # a 17th block
    assert public.declare(bytes(4 * 16 * 4), 4, max_blocks=16) == 16   # declared again: no new block
    assert len(public.declared) == 16


async def test_a_body_shorter_than_its_length_is_answered_and_closed_at_the_deadline(make_client):
    """The 408 comes at server.body_timeout_s and the connection ends a lingering second later
    (aiohttp's default of 10 s made a 30 s timeout a 40 s wait)."""
    client = await make_client(server={"body_timeout_s": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n" + b'{"model": "builtin:tiny"')
    await writer.drain()
    start = time.monotonic()
    async with asyncio.timeout(30):
        data = await reader.read()                  # to the end of the connection
    writer.close()
    assert data.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - start < 0.5 + 1.0 + 3.0      # deadline + lingering + slack; was 10.5
