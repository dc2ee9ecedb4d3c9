"""Every kind of chat and completions response kvgate sends, streamed and not, validated against
OpenAI's own published schemas (tests/openai/schemas.json, cut out of OpenAI's OpenAPI
description by tests/openai/extract.py). kvgate's extensions are extra fields, which the schemas
allow; everything OpenAI's clients read must be there, with OpenAI's types."""
import json
import os

import jsonschema
import pytest

from tests.http_util import MODEL, chat, sse

with open(os.path.join(os.path.dirname(__file__), "openai", "schemas.json")) as f:
    SPEC = json.load(f)


def completion_chunk_schema() -> dict:
    """CreateCompletionResponse as a stream chunk: the spec says the streamed and whole objects
    share one shape, but OpenAI's chunks carry `finish_reason: null` until a choice's last, and
    `usage: null` but in the last chunk (with include_usage); only those two may be null here."""
    schemas = json.loads(json.dumps(SPEC["components"]["schemas"]))
    chunk = schemas["CreateCompletionResponse"]
    reason = chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
    reason["type"], reason["enum"] = ["string", "null"], [*reason["enum"], None]
    chunk["properties"]["usage"] = {"anyOf": [chunk["properties"]["usage"], {"type": "null"}]}
    schemas["CompletionStreamChunk"] = chunk
    return {"components": {"schemas": schemas}}


def validator(name: str, spec: dict = SPEC) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": spec["components"]})


CHAT, CHAT_CHUNK, COMPLETION = (validator(n) for n in (
    "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "CreateCompletionResponse"))
COMPLETION_CHUNK = validator("CompletionStreamChunk", completion_chunk_schema())


def check(v: jsonschema.Draft202012Validator, doc: dict) -> None:
    errors = sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5]) + f"\n{doc}"


TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]

CHATS = {
    "plain": chat(),
    "n and seed": chat(n=2, seed=3, temperature=0.8),
    "logprobs": chat(logprobs=True, top_logprobs=3),
    "stop": chat(stop=["e"], max_tokens=16),
    "cache report and token ids": chat(cache_report=True, return_token_ids=True),
}
COMPLETIONS = {
    "plain": {"model": MODEL, "prompt": "hello", "max_tokens": 6},
    "batch": {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 4, "n": 2},
    "logprobs": {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 5, "logprobs": 2},
    "echo": {"model": MODEL, "prompt": "hello", "max_tokens": 4, "echo": True},
}


async def responses(client, path: str, bodies: dict[str, dict], stream: bool) -> list[list[dict]]:
    """Each body's response: [the object], or its stream's chunks (the last carrying usage)."""
    out = []
    for name, body in bodies.items():
        body = {**body, "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
        resp = await client.post(path, json=body)
        assert resp.status == 200, (name, await resp.text())
        if not stream:
            out.append([await resp.json()])
            continue
        events = await sse(resp)
        assert events[-1] == "[DONE]" and events[-2]["usage"] is not None, name
        out.append(events[:-1])
    return out


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_and_completions_responses_match_openais_schemas(make_client, stream):
    client = await make_client()
    for docs in await responses(client, "/v1/chat/completions", CHATS, stream):
        for doc in docs:
            check(CHAT_CHUNK if stream else CHAT, doc)
    for docs in await responses(client, "/v1/completions", COMPLETIONS, stream):
        for doc in docs:
            check(COMPLETION_CHUNK if stream else COMPLETION, doc)
        if stream:
            check(COMPLETION, {**docs[-1], "choices": []})     # the usage chunk is a whole object


async def test_a_tool_call_response_matches_openais_schema(make_client):
    """A reply in the hermes format, as the server turns it into OpenAI's tool_calls (whole and
    streamed): the demo model writes no such reply, so the parser is given one."""
    from gateway.tools import parse
    content, calls = parse("hermes", '<tool_call>{"name": "lookup", "arguments": {"q": 1}}</tool_call>')
    message = {"role": "assistant", "content": content, "refusal": None, "tool_calls": [c.to_openai() for c in calls]}
    check(CHAT, {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": MODEL,
                 "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
             "choices": [{"index": 0, "delta": {"tool_calls": [c.to_openai(i) for i, c in enumerate(calls)]},
                          "logprobs": None, "finish_reason": "tool_calls"}]}
    check(CHAT_CHUNK, chunk)


def test_the_schemas_are_strict_enough_to_fail():
    """A response missing what OpenAI's clients read fails: the check can fail."""
    with pytest.raises(AssertionError, match="finish_reason"):
        check(COMPLETION, {"id": "x", "object": "text_completion", "created": 1, "model": MODEL,
                           "choices": [{"index": 0, "text": "", "logprobs": None}]})
    with pytest.raises(AssertionError, match="object"):
        check(CHAT, {"id": "x", "object": "chat.completions", "created": 1, "model": MODEL, "choices": []})


# the event types of a streamed text response, and their schemas
RESPONSE_EVENTS = {"response.created": "ResponseCreatedEvent", "response.in_progress": "ResponseInProgressEvent",
                   "response.output_item.added": "ResponseOutputItemAddedEvent",
                   "response.content_part.added": "ResponseContentPartAddedEvent",
                   "response.output_text.delta": "ResponseTextDeltaEvent",
                   "response.output_text.done": "ResponseTextDoneEvent",
                   "response.content_part.done": "ResponseContentPartDoneEvent",
                   "response.output_item.done": "ResponseOutputItemDoneEvent",
                   "response.completed": "ResponseCompletedEvent", "response.incomplete": "ResponseIncompleteEvent",
                   "response.failed": "ResponseFailedEvent"}


async def test_responses_and_their_events_match_openais_schemas(make_client):
    """POST /v1/responses (and GET of the stored one), and every event of the same streamed."""
    client = await make_client()
    body = {"model": MODEL, "input": "Schemas, please.", "instructions": "Be brief.", "temperature": 0,
            "metadata": {"run": "schema"}, "max_output_tokens": 4}
    whole = await (await client.post("/v1/responses", json=body)).json()
    check(validator("Response"), whole)
    check(validator("Response"), await (await client.get(f"/v1/responses/{whole['id']}")).json())
    resp = await client.post("/v1/responses", json={**body, "stream": True})
    text = await resp.text()
    events = [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]
    names = [line[len("event: "):] for line in text.splitlines() if line.startswith("event: ")]
    assert names == [e["type"] for e in events] and events[-1]["type"] in ("response.completed", "response.incomplete")
    for event in events:
        check(validator(RESPONSE_EVENTS[event["type"]]), event)
