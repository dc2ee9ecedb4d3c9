"""The HTTP API through the app factory: responses in OpenAI's format, cached tokens, every bad
input as an OpenAI error object with the right status, tenants, the concurrency limit, and a
client that disconnects mid-stream (its blocks are freed, as /metrics shows)."""
import asyncio
import json

import pytest
import torch

from store import BlockLayout
from tests.conftest import engine_stats, wait_idle
from tests.http_util import MODEL, chat, metric, sse


async def test_models_and_health(make_client):
    client = await make_client()
    health = await (await client.get("/health")).json()
    assert health["status"] == "ok"          # and what each tier got (make_client turns host and disk off)
    # the demo model: 4 layers, 2 KV heads of 32, float32 on the CPU
    block_bytes = BlockLayout(num_layers=4, block_size=16, num_kv_heads=2, head_dim=32, dtype=torch.float32).block_bytes
    assert health["tiers"]["gpu"] == {"enabled": True, "blocks": 256, "bytes": 256 * block_bytes, "sized": "configured"}
    assert health["tiers"]["host"] == {"enabled": False, "blocks": 0, "bytes": 0, "note": "store.host.enabled = false"}
    assert health["tiers"]["disk"] == {"enabled": False, "blocks": 0, "bytes": 0, "note": "store.disk.enabled = false"}
    assert health["engine"] == {"max_num_seqs": 64, "max_num_batched_tokens": 2048}   # chosen for the CPU
    body = await (await client.get("/v1/models")).json()
    assert body["data"][0]["id"] == MODEL and body["object"] == "list"


async def test_chat_completion_and_cached_tokens_on_a_repeated_prefix(make_client):
    client = await make_client()
    system = {"role": "system", "content": "You are a terse assistant. " * 8}
    first = await (await client.post("/v1/chat/completions", json={**chat(), "messages": [
        system, {"role": "user", "content": "first question"}]})).json()
    assert first["object"] == "chat.completion" and first["choices"][0]["message"]["role"] == "assistant"
    assert first["choices"][0]["finish_reason"] == "length"
    u = first["usage"]
    assert u["completion_tokens"] == 8 and u["total_tokens"] == u["prompt_tokens"] + 8
    assert u["prompt_tokens_details"]["cached_tokens"] == 0
    second = await (await client.post("/v1/chat/completions", json={**chat(), "messages": [
        system, {"role": "user", "content": "another question"}]})).json()
    details = second["usage"]["prompt_tokens_details"]
    assert details["cached_tokens"] >= 16 * 13          # the system prompt's full blocks
    assert details["cached_tokens_by_tier"] == {"gpu": details["cached_tokens"], "host": 0, "disk": 0}
    assert await metric(client, "kvgate_cached_prompt_tokens_total", tier="gpu") == details["cached_tokens"]


async def test_chat_stream_in_openai_format(make_client):
    client = await make_client()
    resp = await client.post("/v1/chat/completions",
                             json=chat(stream=True, stream_options={"include_usage": True}))
    assert resp.headers["Content-Type"] == "text/event-stream"
    events = await sse(resp)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    finishes = [c["finish_reason"] for e in events[:-2] for c in e["choices"] if c["finish_reason"]]
    assert finishes == ["length"]
    usage = events[-2]["usage"]
    assert events[-2]["choices"] == [] and usage["completion_tokens"] == 8
    assert all(e["usage"] is None for e in events[:-2])
    text = "".join(c["delta"].get("content", "") for e in events[:-2] for c in e["choices"])
    full = await (await client.post("/v1/chat/completions", json=chat())).json()
    assert text == full["choices"][0]["message"]["content"]     # greedy: the same text
    plain = await sse(await client.post("/v1/chat/completions", json=chat(stream=True)))
    assert "usage" not in plain[-2]


async def test_completions_with_text_token_ids_several_prompts_and_n(make_client):
    client = await make_client()
    body = await (await client.post("/v1/completions", json={"model": MODEL, "prompt": "Once upon",
                                                             "max_tokens": 5, "temperature": 0})).json()
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 5
    ids = await (await client.post("/v1/completions", json={"model": MODEL, "prompt": [10, 20, 30],
                                                            "max_tokens": 3})).json()
    assert ids["usage"]["prompt_tokens"] == 3
    many = await (await client.post("/v1/completions", json={
        "model": MODEL, "prompt": ["a b c", "d e f"], "n": 2, "max_tokens": 4, "seed": 3,
        "temperature": 0.9})).json()
    assert sorted(c["index"] for c in many["choices"]) == [0, 1, 2, 3]
    assert many["usage"]["completion_tokens"] == 16
    events = await sse(await client.post("/v1/completions", json={
        "model": MODEL, "prompt": "x", "max_tokens": 3, "stream": True}))
    assert events[-1] == "[DONE]" and events[0]["object"] == "text_completion"


async def test_chat_without_max_tokens_fits_a_pool_smaller_than_the_context(make_client):
    client = await make_client(store={"gpu": {"num_blocks": 8}})    # 128 tokens, context 4096
    body = {k: v for k, v in chat(ignore_eos=True).items() if k != "max_tokens"}
    resp = await client.post("/v1/chat/completions", json=body)
    usage = (await resp.json())["usage"]
    assert resp.status == 200 and usage["prompt_tokens"] + usage["completion_tokens"] == 128


async def test_return_token_ids(make_client):
    client = await make_client()
    body = {"model": MODEL, "prompt": [10, 20, 30], "max_tokens": 5, "temperature": 0,
            "return_token_ids": True}
    full = await (await client.post("/v1/completions", json=body)).json()
    assert len(full["choices"][0]["token_ids"]) == 5
    events = await sse(await client.post("/v1/completions", json={**body, "stream": True}))
    streamed = [t for e in events[:-1] for c in e["choices"] for t in c.get("token_ids", [])]
    assert streamed == full["choices"][0]["token_ids"]


async def test_extension_fields_and_unknown_fields(make_client):
    """kvgate's extensions are taken; a field neither OpenAI's nor kvgate's is a 400 naming it
    (OpenAI's rule), never silently ignored."""
    client = await make_client()
    resp = await client.post("/v1/chat/completions", json=chat(
        priority=5, top_k=3, ignore_eos=True, max_tokens=6, user="someone", frequency_penalty=0))
    assert resp.status == 200 and (await resp.json())["usage"]["completion_tokens"] == 6
    resp = await client.post("/v1/chat/completions", json=chat(some_future_field={"x": 1}))
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "some_future_field"


@pytest.mark.parametrize("body,status,param,code", [
    (b"{not json", 400, None, None),
    (b"[1, 2]", 400, None, None),
    (json.dumps({"model": MODEL}), 400, "messages", None),
    (json.dumps(chat(max_tokens="8")), 400, "max_tokens", None),
    (json.dumps(chat(max_tokens=-1)), 400, "max_tokens", None),
    (json.dumps(chat(max_tokens=10**9)), 400, "max_tokens", "context_length_exceeded"),
    (json.dumps(chat(temperature=3)), 400, "temperature", None),
    (json.dumps(chat(top_p=0)), 400, "top_p", None),
    (json.dumps(chat(priority=1.5)), 400, "priority", None),
    (json.dumps({**chat(), "messages": [{"role": "wizard", "content": "x"}]}), 400, "messages.0.role", None),
    (json.dumps(chat(content="word " * 5000)), 400, "max_tokens", "context_length_exceeded"),
    (json.dumps(chat(tools=[{"type": "function"}])), 400, "tools.0.function", None),
    (json.dumps(chat(logprobs="yes")), 400, "logprobs", None),
    (json.dumps(chat(logprobs=True, top_logprobs=21)), 400, "top_logprobs", None),
    (json.dumps(chat(response_format={"type": "json_object"})), 400, "response_format", None),
    (json.dumps(chat(echo=True)), 400, "echo", None),
    (json.dumps(chat(model="gpt-9")), 404, "model", "model_not_found"),
])
async def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(make_client, body, status, param,
                                                                           code):
    client = await make_client()
    resp = await client.post("/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    err = (await resp.json())["error"]
    assert resp.status == status and set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["code"] == code and err["message"]
    assert (await client.post("/v1/chat/completions", json=chat())).status == 200


async def test_size_route_and_method_errors(make_client):
    client = await make_client(server={"max_body_bytes": 4096})
    resp = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 10000})
    assert resp.status == 413 and (await resp.json())["error"]["message"]
    resp = await client.get("/v1/nowhere")
    assert resp.status == 404 and (await resp.json())["error"]["type"] == "not_found_error"
    resp = await client.get("/v1/completions")
    assert resp.status == 405 and "error" in await resp.json()


async def test_tenants_need_their_key_and_never_share_a_cache(make_client, monkeypatch):
    monkeypatch.setenv("KEY_B", "sk-bbb")
    client = await make_client(tenants=[{"name": "a", "api_key": "sk-aaa", "priority": 1},
                                        {"name": "b", "api_key_env": "KEY_B"}])
    prompt = chat(content="a shared document " * 20)
    for headers in ({}, {"Authorization": "Bearer sk-nope"}, {"Authorization": "sk-aaa"}):
        resp = await client.post("/v1/chat/completions", json=prompt, headers=headers)
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_api_key"
    assert (await client.get("/health")).status == 200           # open
    a = {"Authorization": "Bearer sk-aaa"}
    b = {"Authorization": "Bearer sk-bbb"}
    await client.post("/v1/chat/completions", json=prompt, headers=a)
    again_a = await (await client.post("/v1/chat/completions", json=prompt, headers=a)).json()
    first_b = await (await client.post("/v1/chat/completions", json=prompt, headers=b)).json()
    assert again_a["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert first_b["usage"]["prompt_tokens_details"]["cached_tokens"] == 0   # a's prompt is a's


async def test_concurrency_limit_answers_429_with_retry_after(make_client):
    client = await make_client(server={"max_concurrent_sequences": 1, "max_sequences_per_request": 1})
    long = await client.post("/v1/chat/completions", json=chat(max_tokens=400, ignore_eos=True, stream=True))
    await long.content.readline()                  # it is running
    resp = await client.post("/v1/chat/completions", json=chat())
    assert resp.status == 429 and resp.headers["Retry-After"] == "1"
    assert (await resp.json())["error"]["type"] == "rate_limit_error"
    long.close()


async def test_client_disconnect_mid_stream_frees_its_blocks(make_client):
    client = await make_client()
    resp = await client.post("/v1/chat/completions", json=chat(max_tokens=4000, ignore_eos=True, stream=True))
    for _ in range(5):
        await resp.content.readline()              # a few chunks arrive...
    assert await metric(client, "kvgate_blocks", tier="gpu", state="locked") > 0
    resp.close()                                   # ...and the client goes away
    for _ in range(500):                           # the server notices within a step or two
        if await metric(client, "kvgate_requests", state="running") == 0:
            break
        await asyncio.sleep(0.01)
    assert await metric(client, "kvgate_requests", state="running") == 0
    assert await metric(client, "kvgate_requests_finished_total", finish_reason="abort") == 1
    assert await metric(client, "kvgate_blocks", tier="gpu", state="locked") == 0
    await engine_stats(client)                     # no broken invariant in the engine process


async def test_metrics_count_tokens_and_latency(make_client):
    client = await make_client()
    await client.post("/v1/chat/completions", json=chat(max_tokens=5))
    assert await metric(client, "kvgate_generation_tokens_total") == 5
    assert await metric(client, "kvgate_prompt_tokens_total") > 0
    assert await metric(client, "kvgate_time_to_first_token_seconds_count") == 1
    assert await metric(client, "kvgate_time_per_output_token_seconds_count") == 1
    assert await metric(client, "kvgate_blocks", tier="gpu", state="free") > 0
    assert await metric(client, "kvgate_hits_recomputed_blocks_total", tier="disk") == 0
    # on the CPU every step runs eagerly: one prompt step (the demo prompt fits one), then 4 decodes
    assert await metric(client, "kvgate_engine_steps_total", run="eager") == 5
    assert await metric(client, "kvgate_engine_steps_total", run="mixed") == 0
    assert await metric(client, "kvgate_preemptions_total") == 0
    assert await metric(client, "kvgate_admissions_blocked_total") == 0
    assert await metric(client, "kvgate_measured_rate", what="prefill_tokens_per_s", default=-1) == -1
    # a prefill of at least engine.costs.MIN_PREFILL_TOKENS is timed: the rate is measured
    await client.post("/v1/completions", json={"model": MODEL, "prompt": [65] * 300, "max_tokens": 1})
    assert await metric(client, "kvgate_measured_rate", what="prefill_tokens_per_s") > 0


async def test_stop_strings_are_applied_in_the_api_process_as_the_engine_would(make_client):
    """The engine process sends token ids; the API process detokenizes and cuts at a stop string:
    the text ends before it, the tokens through the one that completed it are kept (and counted),
    the request is stopped in the engine, and streaming gives the same as a full response."""
    client = await make_client()
    body = {"model": MODEL, "prompt": "The tiers", "max_tokens": 40, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    full = (await (await client.post("/v1/completions", json=body)).json())["choices"][0]
    stop = full["text"][12:15]                      # a string the unstopped output contains
    cut = full["text"].index(stop)
    done = await (await client.post("/v1/completions", json={**body, "stop": [stop]})).json()
    choice = done["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == full["text"][:cut]
    n = done["usage"]["completion_tokens"]
    assert choice["token_ids"] == full["token_ids"][:n] and n < 40
    events = await sse(await client.post("/v1/completions", json={**body, "stop": [stop], "stream": True}))
    chunks = [c for e in events[:-1] for c in e["choices"]]
    assert "".join(c["text"] for c in chunks) == choice["text"]
    assert [t for c in chunks for t in c["token_ids"]] == choice["token_ids"]
    assert chunks[-1]["finish_reason"] == "stop"
    await wait_idle(client)                         # the aborts reach the engine within a step


async def test_tokenize_detokenize_version_and_one_model(make_client):
    """vLLM's /tokenize and /detokenize in the API process: the chat form gives exactly the ids
    a chat completion is computed from (its usage says how many); /version; /v1/models/{id}."""
    client = await make_client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|end|> there"}]
    tok = await (await client.post("/tokenize", json={"model": MODEL, "messages": messages})).json()
    done = await (await client.post("/v1/chat/completions", json={**chat(), "messages": messages})).json()
    assert tok["count"] == len(tok["tokens"]) == done["usage"]["prompt_tokens"] and tok["max_model_len"] == 4096
    text = await (await client.post("/tokenize", json={"model": MODEL, "prompt": "kv cache"})).json()
    back = await (await client.post("/detokenize", json={"model": MODEL, "tokens": text["tokens"]})).json()
    assert back == {"prompt": "kv cache"} and text["count"] == 8          # the demo tokenizer: a byte a token
    for path, body, param in [("/tokenize", {"model": MODEL}, "prompt"),
                              ("/tokenize", {"model": MODEL, "prompt": "a", "messages": messages}, "prompt"),
                              ("/detokenize", {"model": MODEL, "tokens": [10**6]}, "tokens"),
                              ("/detokenize", {"model": MODEL, "tokens": ["a"]}, "tokens.0")]:
        resp = await client.post(path, json=body)
        assert resp.status == 400 and (await resp.json())["error"]["param"] == param, (path, body)
    resp = await client.post("/tokenize", json={"model": "nope", "prompt": "a"})
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
    from gateway.text_views import version
    assert await (await client.get("/version")).json() == {"version": version()}
    card = await (await client.get(f"/v1/models/{MODEL}")).json()
    listed = (await (await client.get("/v1/models")).json())["data"][0]
    assert card == listed and card["id"] == MODEL
    resp = await client.get("/v1/models/other")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"


async def test_metrics_a_kv_aware_router_reads(make_client):
    """Running totals are counters; the gauges llm-d's endpoint picker and vLLM-style routers
    read: requests running / waiting, the KV usage ratio (blocks held by running requests), the
    cache's block size and GPU block count; the model; responses by status; end-to-end latency."""
    client = await make_client()
    text = await (await client.get("/metrics")).text()
    assert "# TYPE kvgate_block_evictions_total counter" in text
    assert "# TYPE kvgate_hits_recomputed_blocks_total counter" in text
    assert await metric(client, "kvgate_kv_cache_usage_ratio") == 0
    assert await metric(client, "kvgate_cache_config_info", block_size=16, num_gpu_blocks=256) == 1
    assert await metric(client, "kvgate_model_info", model_name=MODEL) == 1
    resp = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 40, "max_tokens": 2000,
                                                      "ignore_eos": True, "stream": True})
    for _ in range(3):
        await resp.content.readline()              # generating: 3 blocks of 16 held, of 256
    assert await metric(client, "kvgate_num_requests_running") == 1
    assert await metric(client, "kvgate_num_requests_waiting") == 0
    assert 0 < await metric(client, "kvgate_kv_cache_usage_ratio") <= 4 / 256
    resp.close()
    await wait_idle(client)
    assert await metric(client, "kvgate_kv_cache_usage_ratio") == 0   # its cached blocks count as free
    await client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert await metric(client, "kvgate_http_responses_total", status=404) == 1
    assert await metric(client, "kvgate_http_responses_total", status=200) >= 5
    assert await metric(client, "kvgate_e2e_request_latency_seconds_count") == 1
    samples = [line for line in (await (await client.get("/metrics")).text()).splitlines()
               if line.startswith("kvgate_")]
    assert len(samples) > 40 and all(f'model_name="{MODEL}"' in line for line in samples)   # every series


async def test_the_kv_arithmetic_at_start_up_and_on_v1_cache(make_client, tmp_path):
    """What a token of KV costs for this model and what each tier holds, in tokens and
    conversations: the demo model's 4 layers x K and V x 2 heads x 32 dims x 4 bytes = 2,048 bytes."""
    client = await make_client(store={"host": {"num_blocks": 64}})
    kv = await (await client.get("/v1/cache")).json()
    assert kv["bytes_per_token"] == 4 * 2 * 2 * 32 * 4 and kv["block_size"] == 16
    gpu, host, disk = kv["tiers"]["gpu"], kv["tiers"]["host"], kv["tiers"]["disk"]
    assert gpu["tokens"] == 256 * 16 and gpu["conversations"] == 256 * 16 // kv["conversation_tokens"]
    assert gpu["bytes"] == gpu["tokens"] * kv["bytes_per_token"] and host["tokens"] == 64 * 16
    assert not disk["enabled"] and disk["tokens"] == 0
    assert gpu["now"] == {"free": 256, "cached": 0, "locked": 0}
    await client.post("/v1/completions", json={"model": MODEL, "prompt": "y" * 40, "max_tokens": 1})
    assert (await (await client.get("/v1/cache")).json())["tiers"]["gpu"]["now"]["cached"] == 2
    from engine.serving.tiers import TierReport, describe_kv, kv_arithmetic
    line = describe_kv(kv_arithmetic([TierReport("gpu", True, 50_000, 0), TierReport("disk", False)], 16, 2 << 20))
    assert line == ("131,072 bytes of KV per token; gpu 800,000 tokens (~390 conversations), "
                    "counting a conversation as 2,048 tokens")          # Llama-3-8B in bf16


async def test_a_batch_of_token_id_lists_gives_a_choice_each(make_client):
    client = await make_client()
    body = {"model": MODEL, "max_tokens": 3, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    batch = await (await client.post("/v1/completions", json={**body, "prompt": [[65, 66, 67], [70, 71]]})).json()
    alone = [await (await client.post("/v1/completions", json={**body, "prompt": p})).json()
             for p in ([65, 66, 67], [70, 71])]
    assert [c["index"] for c in batch["choices"]] == [0, 1]
    assert [c["token_ids"] for c in batch["choices"]] == [a["choices"][0]["token_ids"] for a in alone]
    assert batch["usage"]["prompt_tokens"] == 5
    for bad, param in (([[65], []], "prompt"), ([[65], ["a"]], "prompt"), ([[10**9]], "prompt")):
        resp = await client.post("/v1/completions", json={**body, "prompt": bad})
        assert resp.status == 400 and (await resp.json())["error"]["param"].startswith(param), bad


async def test_a_chat_template_file_replaces_the_tokenizers(make_client, tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                        "{% if add_generation_prompt %}[assistant]{% endif %}")
    client = await make_client(model={"chat_template": str(template)})
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    tok = await (await client.post("/tokenize", json={"model": MODEL, "messages": messages})).json()
    text = await (await client.post("/detokenize", json={"model": MODEL, "tokens": tok["tokens"]})).json()
    assert text["prompt"] == "[system]Be brief.[user]Hi[assistant]"
    done = await (await client.post("/v1/chat/completions", json={**chat(), "messages": messages})).json()
    assert done["usage"]["prompt_tokens"] == tok["count"]


async def test_sampling_options_change_greedy_output_as_they_say(make_client):
    client = await make_client()
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}

    async def tokens(**kw) -> list[int]:
        resp = await client.post("/v1/completions", json={**body, **kw})
        assert resp.status == 200, await resp.text()
        return (await resp.json())["choices"][0]["token_ids"]
    plain = await tokens()
    assert await tokens(logit_bias={"70": 100}) == [70] * 6
    first = plain[0]
    held = await tokens(stop_token_ids=[first], min_tokens=5)     # the stop token is held back 5 tokens
    assert await tokens(stop_token_ids=[first]) == [first] and first not in held[:5]
    repeated = max(set(plain), key=plain.count)
    if plain.count(repeated) > 1:                                   # a penalty on repeats changes the output
        assert await tokens(frequency_penalty=2, presence_penalty=2) != plain
    assert await tokens(min_p=0.5) == plain                          # min_p never changes a greedy choice
    resp = await client.post("/v1/completions", json={**body, "logit_bias": {"x": 1}})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "logit_bias"
    resp = await client.post("/v1/completions", json={**body, "logit_bias": {"100000": 1}})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "logit_bias"


async def test_a_stop_tokens_text_is_not_returned(make_client):
    client = await make_client()
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    full = (await (await client.post("/v1/completions", json=body)).json())["choices"][0]
    stop = full["token_ids"][3]
    cut = full["token_ids"].index(stop)
    for stream in (False, True):
        resp = await client.post("/v1/completions", json={**body, "stop_token_ids": [stop], "stream": stream})
        if stream:
            chunks = [c for e in (await sse(resp))[:-1] for c in e["choices"]]
            text, ids = "".join(c["text"] for c in chunks), [t for c in chunks for t in c["token_ids"]]
        else:
            choice = (await resp.json())["choices"][0]
            text, ids = choice["text"], choice["token_ids"]
        assert ids == full["token_ids"][:cut + 1]               # the stop token is counted and returned
        assert full["text"].startswith(text) and len(text) == cut   # a byte a token: its text is not
