"""HTTP handlers: the OpenAI endpoints, health and metrics."""
from __future__ import annotations

import dataclasses
import json
import time

from aiohttp import web
from pydantic import ValidationError

from gateway.errors import APIError
from gateway.generation import Choice, chat_prompt, completion_prompts, merged, plan, submit
from gateway.keys import ENGINE, METRICS, STATE, TENANT
from gateway.protocol import ChatCompletionRequest, CompletionRequest, error_body, new_id, now, usage


async def chat_completions(request: web.Request) -> web.StreamResponse:
    req = await _parse(request, ChatCompletionRequest)
    engine = request.app[ENGINE]
    return await _generate(request, req, [chat_prompt(req, engine.loaded)], "chat.completion")


async def completions(request: web.Request) -> web.StreamResponse:
    req = await _parse(request, CompletionRequest)
    engine = request.app[ENGINE]
    return await _generate(request, req, completion_prompts(req, engine.loaded), "text_completion")


async def _generate(request: web.Request, req, prompts: list[list[int]], kind: str) -> web.StreamResponse:
    engine = request.app[ENGINE]
    if req.model != engine.loaded.name:
        raise APIError(404, f"The model `{req.model}` does not exist", "invalid_request_error",
                       "model", "model_not_found")
    tenant = request[TENANT]
    choices = plan(req, prompts, engine.max_sequence_tokens)
    priority = req.priority if req.priority is not None else (tenant.priority if tenant else 0)
    started = time.perf_counter()
    submit(engine, choices, priority, tenant.name if tenant else "")
    response_id = new_id("chatcmpl" if kind == "chat.completion" else "cmpl")
    try:
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await _stream(request, choices, kind, response_id, include_usage, req.return_token_ids)
        async for _ in merged(choices):
            pass
        return web.json_response(_full_response(choices, kind, response_id, engine.loaded.name,
                                                req.return_token_ids))
    finally:   # every choice is accounted, also when the client went away mid-way
        metrics = request.app[METRICS]
        for c in choices:
            if c.last is None:
                metrics.requests_total.labels("abort").inc()
                continue
            last = c.last if c.last.finish_reason else dataclasses.replace(c.last, finish_reason="abort")
            ttft = c.first_token_at - started if c.first_token_at else None
            decode = (c.last_token_at - c.first_token_at) if c.first_token_at else 0.0
            metrics.finished(last, ttft, decode)


def _full_response(choices: list[Choice], kind: str, response_id: str, model: str, token_ids: bool) -> dict:
    if any(c.last.finish_reason == "error" for c in choices):
        raise APIError(500, "the engine failed while generating this response", "server_error")
    out = {"id": response_id, "object": kind, "created": now(), "model": model, "choices": [],
           "usage": _usage(choices)}
    for c in choices:
        text = "".join(c.text)
        if kind == "chat.completion":
            out["choices"].append({"index": c.index, "message": {"role": "assistant", "content": text},
                                   "logprobs": None, "finish_reason": c.last.finish_reason})
        else:
            out["choices"].append({"index": c.index, "text": text, "logprobs": None,
                                   "finish_reason": c.last.finish_reason})
        if token_ids:
            out["choices"][-1]["token_ids"] = c.token_ids
    return out


async def _stream(request: web.Request, choices: list[Choice], kind: str, response_id: str,
                  include_usage: bool, token_ids: bool) -> web.StreamResponse:
    engine = request.app[ENGINE]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
    base = {"id": response_id, "object": chunk_kind, "created": now(), "model": engine.loaded.name}
    extra = {"usage": None} if include_usage else {}

    async def event(obj: dict) -> None:
        await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

    async def send(choices_part: list[dict]) -> None:
        await event({**base, "choices": choices_part, **extra})

    if kind == "chat.completion":
        await send([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None} for c in choices])
    async for c, out in merged(choices):
        if out.finish_reason == "error":
            await event(error_body("the engine failed while generating this response", "server_error"))
            continue
        if not out.text and out.finish_reason is None and not token_ids:
            continue
        if kind == "chat.completion":
            delta = {"content": out.text} if out.text else {}
            part = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": out.finish_reason}
        else:
            part = {"index": c.index, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}
        if token_ids:
            part["token_ids"] = out.token_ids
        await send([part])
    if include_usage:
        await event({**base, "choices": [], "usage": _usage(choices)})
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def _usage(choices: list[Choice]) -> dict:
    """Prompt tokens and cached tokens counted once per prompt; completions of every choice."""
    by_prompt = {}
    for c in choices:
        by_prompt.setdefault(id(c.prompt), c.last)
    lasts = list(by_prompt.values())
    cached = {}
    for last in lasts:
        for tier, n in last.cached_tokens.items():
            cached[tier] = cached.get(tier, 0) + n
    return usage(sum(x.prompt_tokens for x in lasts), sum(c.last.completion_tokens for c in choices), cached)


async def _parse(request: web.Request, schema):
    try:
        body = await request.json()
    except json.JSONDecodeError as e:
        raise APIError(400, f"the body is not valid JSON: {e}", "invalid_request_error") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", "invalid_request_error")
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        # the location, without pydantic's names for union branches ("function-after[...]", ...)
        param = ".".join(str(p) for p in err["loc"] if isinstance(p, int) or "[" not in p)
        raise APIError(400, f"{param}: {err['msg']}", "invalid_request_error", param or None) from None


async def models(request: web.Request) -> web.Response:
    loaded = request.app[ENGINE].loaded
    return web.json_response({"object": "list", "data": [{
        "id": loaded.name, "object": "model", "created": request.app[STATE].started, "owned_by": "kvgate",
        "max_model_len": loaded.max_model_len, "vocab_size": loaded.model.config.vocab_size}]})


async def health(request: web.Request) -> web.Response:
    if request.app[STATE].stopping:
        return web.json_response({"status": "stopping"}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
