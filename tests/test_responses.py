"""OpenAI's Responses API (gateway/responses.py) through the official client: a stored response
is continued with previous_response_id and hits the cache, streamed events come in OpenAI's
order, GET and DELETE; a stored conversation is its tenant's alone; unsupported fields and a
conversation past the context are 400s naming them; the store is bounded and survives a restart."""
import openai
import pytest

from gateway.response_store import ResponseStore
from tests.http_util import MODEL

TENANTS = [{"name": "a", "api_key": "sk-a"}, {"name": "b", "api_key": "sk-b"}]


def official(client, key: str = "sk-a") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=key, max_retries=0)


async def test_a_stored_response_is_continued_from_the_cache_then_fetched_and_deleted(make_client):
    client = await make_client(tenants=TENANTS)
    api = official(client)
    first = await api.responses.create(model=MODEL, input="Tell me about blocks. " * 8, instructions="Be brief.",
                                       max_output_tokens=8, temperature=0)
    assert first.status == "incomplete" and first.incomplete_details.reason == "max_output_tokens"
    assert first.output[0].content[0].text == first.output_text and first.usage.output_tokens == 8
    assert first.usage.input_tokens_details.cached_tokens == 0
    second = await api.responses.create(model=MODEL, input="And tiers?", previous_response_id=first.id,
                                        instructions="Be brief.", max_output_tokens=4, temperature=0)
    # its prompt is the first one's prompt and answer, then the new turn: the first's blocks hit
    # (instructions are not carried over, as OpenAI has it: the client sends them again)
    assert second.usage.input_tokens > first.usage.input_tokens + 8
    assert second.usage.input_tokens_details.cached_tokens >= (first.usage.input_tokens // 16) * 16 - 16 > 0
    assert second.previous_response_id == first.id
    fetched = await api.responses.retrieve(first.id)
    assert fetched.id == first.id and fetched.output_text == first.output_text
    await api.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        await api.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as gone:              # a deleted one cannot be continued
        await api.responses.create(model=MODEL, input="more", previous_response_id=first.id)
    assert gone.value.body["param"] == "previous_response_id"
    unstored = await api.responses.create(model=MODEL, input="hi", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        await api.responses.retrieve(unstored.id)


async def test_streamed_events_come_in_openais_order_and_add_up_to_the_text(make_client):
    client = await make_client()
    api = official(client)
    stream = await api.responses.create(model=MODEL, input="Stream, please.", max_output_tokens=12,
                                        temperature=0, stream=True)
    events = [e async for e in stream]
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-4].text == events[-1].response.output_text
    again = await api.responses.create(model=MODEL, input="Stream, please.", max_output_tokens=12, temperature=0)
    assert again.output_text == text                                # the same, not streamed
    assert (await api.responses.retrieve(events[-1].response.id)).output_text == text   # stored at the end


async def test_another_tenants_response_is_not_found(make_client):
    client = await make_client(tenants=TENANTS)
    mine = await official(client, "sk-a").responses.create(model=MODEL, input="secret plans", max_output_tokens=2)
    theirs = official(client, "sk-b")
    with pytest.raises(openai.NotFoundError):
        await theirs.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        await theirs.responses.create(model=MODEL, input="go on", previous_response_id=mine.id)
    with pytest.raises(openai.NotFoundError):
        await theirs.responses.delete(mine.id)
    assert (await official(client, "sk-a").responses.retrieve(mine.id)).id == mine.id   # still there


@pytest.mark.parametrize("extra,param", [
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input"),
    ({"truncation": "auto"}, "truncation"),
    ({"prompt_cache_retention": "24h"}, "prompt_cache_retention"),    # the test servers have no disk tier
])
async def test_unsupported_fields_are_400s_naming_them(make_client, extra, param):
    client = await make_client()
    resp = await client.post("/v1/responses", json={"model": MODEL, "input": "hi", **extra})
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["param"].split(".")[0].split("[")[0] == param, error


async def test_a_conversation_past_the_context_is_a_400_naming_input(make_client):
    client = await make_client(model={"max_model_len": 64})
    resp = await client.post("/v1/responses", json={"model": MODEL, "input": "words " * 80})
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["param"] == "input" and error["code"] == "context_length_exceeded"


def test_the_store_keeps_each_tenants_newest_and_survives_a_reopen(tmp_path):
    store = ResponseStore(str(tmp_path / "r.sqlite3"), max_per_tenant=2)
    for i in range(3):
        store.put("a", f"resp_{i}", {"response": {"id": f"resp_{i}"}, "conversation": []})
    store.put("b", "resp_b", {"response": {"id": "resp_b"}, "conversation": []})
    assert store.get("a", "resp_0") is None and store.dropped == 1          # the oldest went
    assert store.get("b", "resp_1") is None                                # not b's
    store.close()
    reopened = ResponseStore(str(tmp_path / "r.sqlite3"), max_per_tenant=2)   # a restart
    assert reopened.get("a", "resp_2") == {"response": {"id": "resp_2"}, "conversation": []}
    assert reopened.count() == 3 and reopened.delete("a", "resp_1") and not reopened.delete("a", "resp_1")


async def test_function_tools_and_call_items_reach_the_template_as_chat_renders_them(make_client, tmp_path):
    """Tools in the Responses shape, a call the model made and its output, sent back as input
    items: the prompt is the one /tokenize renders for the same chat messages and tools."""
    from tests.test_gateway_tools import CITY, HERMES_TEMPLATE, WEATHER
    template = tmp_path / "hermes.jinja"
    template.write_text(HERMES_TEMPLATE)
    client = await make_client(model={"chat_template": str(template)})
    api = official(client)
    items = [{"role": "user", "content": "Weather in Oslo?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "12 C, rain"}]
    tool = {"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": CITY}
    reply = await api.responses.create(model=MODEL, input=items, tools=[tool], max_output_tokens=4, temperature=0)
    messages = [items[0], {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 C, rain"}]
    shown = await (await client.post("/tokenize", json={"model": MODEL, "messages": messages,
                                                        "tools": [WEATHER]})).json()
    assert reply.usage.input_tokens == shown["count"]
    bad = await client.post("/v1/responses", json={"model": MODEL, "input": [
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "not json"}]})
    assert bad.status == 400 and (await bad.json())["error"]["param"] == "input[0].arguments"
    refused = await make_client()                       # the demo's own template takes no tools
    resp = await refused.post("/v1/responses", json={"model": MODEL, "input": "x", "tools": [tool]})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "tools"


def test_a_reply_with_calls_is_function_call_items_and_stored_as_the_assistants_calls(tmp_path):
    from engine.sampling import SamplingParams
    from engine.sequence import RequestOutput
    from gateway.generation import Choice
    from gateway.protocol import ResponsesRequest
    from gateway.responses import _Reply
    from gateway.views import _Tools
    from store import Tier
    from tests.test_openai_schema import check, validator
    text = 'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    req = ResponsesRequest(model=MODEL, input="Weather in Oslo?",
                           tools=[{"type": "function", "name": "get_weather"}])
    choice = Choice(0, [1, 2], SamplingParams(), text=[text],
                    last=RequestOutput("r", [], "", "stop", 10, 30, {t: 0 for t in Tier}))
    body = _Reply(req, "resp_1", MODEL, _Tools("hermes", True)).response(choice)
    check(validator("Response"), body)
    message, call = body["output"]
    assert message["content"][0]["text"] == "Checking." and body["status"] == "completed"
    assert (call["type"], call["name"], call["arguments"]) == ("function_call", "get_weather", '{"city": "Oslo"}')
    assert call["call_id"].startswith("call_") and call["id"].startswith("fc_")
    from gateway.keys import TENANT
    from gateway.responses import _keep
    store = ResponseStore(str(tmp_path / "r.sqlite3"), max_per_tenant=4)
    _keep(store, {TENANT: None}, req, body, [{"role": "user", "content": "Weather in Oslo?"}], choice)
    assert store.get("", "resp_1")["conversation"][1:] == [      # one assistant turn, as the template takes it
        {"role": "assistant", "content": "Checking.", "tool_calls": [{"id": call["call_id"], "type": "function",
                                                                      "function": {"name": "get_weather",
                                                                                   "arguments": {"city": "Oslo"}}}]}]


async def test_stored_responses_are_counted_in_metrics(make_client):
    from tests.http_util import metric
    client = await make_client(responses={"max_per_tenant": 1})
    before = await metric(client, "kvgate_responses_stored", default=0.0)
    for text in ("one", "two"):
        await client.post("/v1/responses", json={"model": MODEL, "input": text, "max_output_tokens": 1})
    assert await metric(client, "kvgate_responses_dropped") >= 1            # the bound of 1 dropped the first
    assert await metric(client, "kvgate_responses_stored") <= before + 1
