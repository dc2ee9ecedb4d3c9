"""OpenAI's Responses API for text: POST /v1/responses (streamed or not), GET and DELETE
/v1/responses/{id}.

With `store` (OpenAI's default) the server keeps the conversation: a later request sends only
its new turn with `previous_response_id`, and its prompt is the stored conversation, then the
model's answer, then the new input, rendered by the chat template — whose blocks the cache
holds by construction (the stored turns are the previous request's prompt and output). Stored
responses live in a SQLite file (`responses.path`), so a conversation continues after a restart
(its history then comes from the disk tier); each is its tenant's alone (another tenant's id is
a 404, as a missing one is), and each tenant keeps at most `responses.max_per_tenant` (the
oldest go first). A stored conversation's prompt blocks are kept warm for
`responses.retention_s` (within the tenant's `max_retention_s`).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from aiohttp import web

from engine.sampling import SamplingParams
from engine.sequence import Retention
from gateway import intake
from gateway.errors import APIError
from gateway.generation import Choice, merged, submit
from gateway.keys import CONFIG, METRICS, PROMPTS, RESPONSES, STATE, TENANT, TOOL_PARSER
from gateway.protocol import ResponsesRequest, assistant_call
from gateway.response_store import ResponseStore
from gateway import tools
from gateway.views import (disk_tier_on, end_choices, hold_slots, priority_of, ready, retention_of, tools_offered,
                           write_response)

STORED_PRIORITY = 1      # a stored conversation's retention: above the default priority


def not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", "invalid_request_error", param,
                    "response_not_found" if param is None else "previous_response_not_found")


def _tenant_name(request: web.Request) -> str:
    tenant = request[TENANT]
    return tenant.name if tenant else ""


async def get_response(request: web.Request) -> web.Response:
    record = request.app[RESPONSES].get(_tenant_name(request), request.match_info["id"])
    if record is None:
        raise not_found(request.match_info["id"])
    return web.json_response(record["response"])


async def delete_response(request: web.Request) -> web.Response:
    response_id = request.match_info["id"]
    if not request.app[RESPONSES].delete(_tenant_name(request), response_id):
        raise not_found(response_id)
    return web.json_response({"id": response_id, "object": "response", "deleted": True})


async def create_response(request: web.Request) -> web.StreamResponse:
    app = request.app
    config, state, prompts, store = app[CONFIG], app[STATE], app[PROMPTS], app[RESPONSES]
    engine = ready(app)                                  # the engine, or 503
    req: ResponsesRequest = await intake.read_request(request, ResponsesRequest, prompts.name,
                                                      config.server.body_timeout_s)
    tenant = request[TENANT]
    offered = tools_offered(req, app[TOOL_PARSER])
    history: list[dict] = []
    if req.previous_response_id is not None:
        previous = store.get(_tenant_name(request), req.previous_response_id)
        if previous is None:
            raise not_found(req.previous_response_id, "previous_response_id")
        history = previous["conversation"]
    conversation = history + req.messages()       # what a continuation of this response starts from
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + conversation
    prompts.check_text_length(sum(len(m["content"]) for m in messages), "input")
    functions = [t.for_template() for t in req.tools] if offered else None
    prompt = await intake.off_loop_if_large(sum(len(m["content"]) for m in messages),
                                            prompts.encode_chat, messages, functions)
    room = engine.max_sequence_tokens - len(prompt)
    if room < 1:
        raise APIError(400, f"the conversation is {len(prompt)} tokens; this model's context holds "
                       f"{engine.max_sequence_tokens}", "invalid_request_error", "input", "context_length_exceeded")
    retention = retention_of(req, tenant, disk_tier_on(app))
    if retention is None and req.store and config.responses.retention_s:
        seconds = config.responses.retention_s if tenant is None else min(config.responses.retention_s,
                                                                           tenant.max_retention_s)
        priority = STORED_PRIORITY if tenant is None else min(STORED_PRIORITY, tenant.max_priority)
        retention = Retention(priority, float(seconds)) if seconds > 0 else None
    params = SamplingParams(max_tokens=req.max_output_tokens or room, temperature=req.temperature, top_p=req.top_p)
    hold_slots(state, 1)
    choice = Choice(0, prompt, params)
    started = time.perf_counter()
    try:
        submit(engine, [choice], priority=priority_of(req, tenant), namespace=_tenant_name(request),
               retention=retention, prompt_cache_key=req.prompt_cache_key or "")
        reply = _Reply(req, f"resp_{uuid.uuid4().hex}", prompts.name, offered)
        if req.stream:
            return await _stream(request, choice, reply, conversation)
        async with contextlib.aclosing(merged([choice])) as outputs:
            async for _ in outputs:
                pass
        body = reply.response(choice)
        _keep(store, request, req, body, conversation, choice)
        return await write_response(request, web.json_response(body))
    finally:   # ended and accounted, also when the client went away mid-way
        state.in_flight -= 1
        end_choices(app[METRICS], [choice], started)


def _keep(store: ResponseStore, request: web.Request, req: ResponsesRequest, body: dict, conversation: list[dict],
          choice: Choice) -> None:
    """Store a completed response with its conversation, the answer included (`store`): its
    text, and its calls as an assistant turn's tool calls."""
    if req.store and body["status"] in ("completed", "incomplete"):
        text = next((i["content"][0]["text"] for i in body["output"] if i["type"] == "message"), "")
        answer = {"role": "assistant", "content": text}
        calls = [i for i in body["output"] if i["type"] == "function_call"]
        if calls:              # one assistant turn: its text, then its calls
            answer["tool_calls"] = [assistant_call(c["call_id"], c["name"], c["arguments"], "output", [])
                                    ["tool_calls"][0] for c in calls]
        store.put(_tenant_name(request), body["id"], {"response": body, "conversation": conversation + [answer]})


class _Reply:
    """The response object of one generation, in OpenAI's shape, and its streamed events."""

    def __init__(self, req: ResponsesRequest, response_id: str, model: str, offered) -> None:
        self.req = req
        self.offered = offered             # views.tools_offered: how replies carry calls (None: no tools)
        self.calls: list[tools.ToolCall] | None = None   # the reply's calls, once parsed
        self.call_ids: list[str] = []
        self.id = response_id
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.model = model
        self.created_at = int(time.time())
        self.sequence = 0
        self.streamed = False              # a stream showed the message item: it stays in the output
        self.text = ""

    def response(self, choice: Choice | None, status: str | None = None) -> dict:
        """The response object: in progress (`choice` None), or as `choice` ended."""
        req, last = self.req, None if choice is None else choice.last
        output, usage, incomplete, error = [], None, None, None
        if last is not None:
            status = {"length": "incomplete", "error": "failed", "abort": "cancelled"}.get(last.finish_reason,
                                                                                           "completed")
            if status == "incomplete":
                incomplete = {"reason": "max_output_tokens"}
            if status == "failed":
                error = {"code": "server_error", "message": "the engine failed this request"}
            text = "".join(choice.text)
            if self.calls is None:                  # parsed once (a stream parses as it ends)
                text, self.calls = self.offered.calls(text) if self.offered else (text, [])
                text = text or ""
                self.call_ids = [f"call_{uuid.uuid4().hex[:24]}" for _ in self.calls]
            else:
                text = self.text
            self.text = text
            item_status = "completed" if status == "completed" else "incomplete"
            output = ([self.message(text, item_status)] if text or not self.calls or self.streamed else []) + \
                [self.call(i, item_status) for i in range(len(self.calls))]
            cached = sum(last.cached_tokens.values())
            usage = {"input_tokens": last.prompt_tokens,
                     # cache_write_tokens: the prompt tokens computed (their full blocks are cached now)
                     "input_tokens_details": {"cached_tokens": cached,
                                              "cache_write_tokens": last.prompt_tokens - cached,
                                              "cached_tokens_by_tier": {t.name.lower(): n for t, n in
                                                                        last.cached_tokens.items()}},
                     "output_tokens": last.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": last.prompt_tokens + last.completion_tokens}
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "model": self.model, "output": output, **({"usage": usage} if usage else {}), "error": error,
                "incomplete_details": incomplete, "instructions": req.instructions,
                "previous_response_id": req.previous_response_id, "max_output_tokens": req.max_output_tokens,
                "temperature": req.temperature, "top_p": req.top_p, "store": req.store,
                "parallel_tool_calls": req.parallel_tool_calls is not False, "tool_choice": "auto", "tools": [],
                "text": {"format": {"type": "text"}}, "truncation": req.truncation, "metadata": req.metadata or {},
                **({"user": req.user} if req.user is not None else {}), "background": False,
                "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
                "prompt_cache_key": req.prompt_cache_key}

    def message(self, text: str, status: str) -> dict:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [self.part(text)]}

    def call(self, i: int, status: str, arguments: str | None = None) -> dict:
        c = self.calls[i]
        return {"type": "function_call", "id": f"fc_{self.call_ids[i].removeprefix('call_')}",
                "call_id": self.call_ids[i], "name": c.name,
                "arguments": c.arguments if arguments is None else arguments, "status": status}

    @staticmethod
    def part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def event(self, kind: str, **fields) -> bytes:
        """One server-sent event: its type as the event's name and in its data."""
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


async def _stream(request: web.Request, choice: Choice, reply: _Reply, conversation: list[dict]) -> web.StreamResponse:
    """The Responses event stream: created, in progress, the message and its text part added,
    a delta per output, the text, part and message done; each function call (with tools:
    text that may be a call is held back and parsed at the end) added, its arguments, done;
    then completed (or incomplete, failed). The client going away aborts the request (the
    caller's `finally`)."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    reply.streamed = True
    item = {"item_id": reply.message_id, "output_index": 0}
    held = tools.StreamedReply(reply.offered.parser) if reply.offered else None
    send = lambda data: write_response(request, resp, data)  # noqa: E731
    await send(reply.event("response.created", response=reply.response(None, "in_progress")))
    await send(reply.event("response.in_progress", response=reply.response(None, "in_progress")))
    await send(reply.event("response.output_item.added", output_index=0, item={
        "type": "message", "id": reply.message_id, "status": "in_progress", "role": "assistant", "content": []}))
    await send(reply.event("response.content_part.added", **item, content_index=0, part=reply.part("")))
    shown: list[str] = []                  # the text streamed: the message's content
    async with contextlib.aclosing(merged([choice])) as outputs:
        async for _, out in outputs:
            text = out.text if held is None else held.feed(out.text)
            if held is not None and out.finish_reason is not None:
                tail, calls = held.finish()
                text += tail
                reply.calls = reply.offered.limit(calls)
                reply.call_ids = [f"call_{uuid.uuid4().hex[:24]}" for _ in reply.calls]
                reply.text = "".join(shown) + text
            shown.append(text)
            if text:
                await send(reply.event("response.output_text.delta", **item, content_index=0, delta=text,
                                       logprobs=[]))
    body = reply.response(choice)
    text = body["output"][0]["content"][0]["text"] if body["output"] else ""
    await send(reply.event("response.output_text.done", **item, content_index=0, text=text, logprobs=[]))
    await send(reply.event("response.content_part.done", **item, content_index=0, part=reply.part(text)))
    if body["output"]:
        await send(reply.event("response.output_item.done", output_index=0, item=body["output"][0]))
    for i, call in enumerate(body["output"][1:], 1):
        await send(reply.event("response.output_item.added", output_index=i,
                               item={**call, "arguments": "", "status": "in_progress"}))
        await send(reply.event("response.function_call_arguments.delta", item_id=call["id"], output_index=i,
                               delta=call["arguments"]))
        await send(reply.event("response.function_call_arguments.done", item_id=call["id"], output_index=i,
                               name=call["name"], arguments=call["arguments"]))
        await send(reply.event("response.output_item.done", output_index=i, item=call))
    _keep(request.app[RESPONSES], request, reply.req, body, conversation, choice)
    final = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(body["status"],
                                                                                       "response.failed")
    await send(reply.event(final, response=body))
    await asyncio.shield(resp.write_eof())
    return resp
