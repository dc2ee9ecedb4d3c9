"""HTTP handlers: the OpenAI endpoints, health and metrics."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from engine.sequence import RequestOutput, Retention
from gateway import intake, logprobs, text_views, tools
from gateway.errors import APIError, ClientGone, EngineDead, EngineUnresponsive
from gateway.generation import (
    Choice,
    chat_prompt,
    check_response_size,
    completion_prompts,
    echo_texts,
    merged,
    plan,
    submit,
)
from gateway.keys import CONFIG, ENGINE, METRICS, PROMPTS, RESPONSES, STATE, TENANT, TIERS, TOKEN_TEXT, TOOL_PARSER
from gateway.protocol import ChatCompletionRequest, CompletionRequest, RetentionRequest, error_body, new_id, now, usage

log = logging.getLogger("kvgate.gateway")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, ChatCompletionRequest, chat_prompt, "chat.completion")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, CompletionRequest, completion_prompts, "text_completion")


async def _generate(request: web.Request, schema, prompts_of: Callable, kind: str) -> web.StreamResponse:
    """Read and check the request, hold its sequences' concurrency slots, generate, answer.
    Every check that needs no tokenization comes before it."""
    app, server = request.app, request.app[CONFIG].server
    state, engine, prompts = app[STATE], ready(app), app[PROMPTS]
    req = await intake.read_request(request, schema, prompts.name, server.body_timeout_s)
    offered = tools_offered(req, app[TOOL_PARSER])
    priority = priority_of(req, request[TENANT])
    need = req.num_sequences()
    if need > state.max_per_request:
        raise APIError(400, f"this request asks for {need} sequences (prompts x n); the limit is "
                       f"{state.max_per_request} (server.max_sequences_per_request)", "invalid_request_error", "n")
    hold_slots(state, need)
    choices: list[Choice] = []
    started = time.perf_counter()
    try:
        body_bytes = len(await request.read())      # read already: aiohttp keeps the body
        prompt_ids = await intake.off_loop_if_large(body_bytes, prompts_of, req, prompts)
        choices = plan(req, prompt_ids, engine.max_sequence_tokens)
        check_response_size(req, choices, server.max_response_bytes, engine.max_sequence_tokens)
        if getattr(req, "echo", False) is True:          # completions: the prompt's text first
            texts = echo_texts(req, prompt_ids, prompts)
            for c in choices:
                c.echo = texts[c.index // req.n]
        tenant = request[TENANT]
        submit(engine, choices, priority=priority, namespace=tenant.name if tenant else "",
               cache_salt=req.cache_salt or "", cache_report=req.cache_report,
               retention=retention_of(req, tenant, disk_tier_on(app)),
               prompt_cache_key=req.prompt_cache_key or "")
        response_id = new_id("chatcmpl" if kind == "chat.completion" else "cmpl")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await _stream(request, choices, kind, response_id, include_usage, req.return_token_ids, offered)
        async with contextlib.aclosing(merged(choices)) as outputs:
            async for _ in outputs:
                pass
        return await write_response(request, web.json_response(_full_response(
            choices, kind, response_id, prompts.name, req.return_token_ids, request.app[TOKEN_TEXT], offered)))
    finally:   # every choice is ended and accounted, also when the client went away mid-way
        state.in_flight -= need
        end_choices(app[METRICS], choices, started)


def hold_slots(state, need: int) -> None:
    """Take `need` of the server's concurrent sequences, or answer 429 (the caller gives them
    back: `state.in_flight -= need`). Below the limit, a burst waits in the engine's queue."""
    if state.in_flight + need > state.max_in_flight:
        # says nothing of how many sequences others hold: no tenant learns another's traffic
        raise APIError(429, f"the server is at its limit of {state.max_in_flight} sequences "
                       "(server.max_concurrent_sequences); retry later", "rate_limit_error",
                       headers={"Retry-After": "1"})
    state.in_flight += need


def end_choices(metrics, choices: list[Choice], started: float) -> None:
    """End every submitted choice (aborting the unfinished) and account it in /metrics."""
    for c in choices:
        if c.stream is None:
            continue
        c.stream.close()          # aborts it unless it has ended
        if c.last is None:
            metrics.requests_total.labels("abort").inc()
            continue
        last = c.last if c.last.finish_reason else dataclasses.replace(c.last, finish_reason="abort")
        ttft = c.first_token_at - started if c.first_token_at else None
        decode = (c.last_token_at - c.first_token_at) if c.first_token_at else 0.0
        metrics.finished(last, ttft, decode, (c.last_token_at or time.perf_counter()) - started)


@dataclass(frozen=True)
class _Tools:
    """Tools a chat request offers the model: how its replies carry calls, and whether several
    calls may be returned (`parallel_tool_calls`)."""
    parser: str
    parallel: bool

    def calls(self, text: str) -> tuple[str | None, list[tools.ToolCall]]:
        content, calls = tools.parse(self.parser, text)
        return content, self.limit(calls)

    def limit(self, calls: list[tools.ToolCall]) -> list[tools.ToolCall]:
        return calls if self.parallel else calls[:1]


def tools_offered(req, parser: str) -> _Tools | None:
    """None if the request offers the model no tools; tools for a model whose chat template
    takes none: 400."""
    if not getattr(req, "offers_tools", lambda: False)():
        return None
    if not parser:
        raise APIError(400, "this model's chat template takes no tools (model.tool_call_parser: docs/api.md)",
                       "invalid_request_error", "tools")
    return _Tools(parser, req.parallel_tool_calls is not False)


def _finish_reason(reason: str | None, calls: list) -> str | None:
    """"tool_calls" when the model stopped after calling."""
    return "tool_calls" if calls and reason == "stop" else reason


# OpenAI's prompt_cache_retention = "24h": the whole prompt kept for a day, above the default priority
EXTENDED_RETENTION = RetentionRequest(priority=1, duration_s=86_400)


def retention_of(req, tenant, disk_on: bool) -> Retention | None:
    """The request's `retention` — or, for `prompt_cache_retention: "24h"`, a day's retention of
    the whole prompt (it needs the disk tier: a day of prompts outgrows memory) — within its
    tenant's bounds: its `max_priority` and `max_retention_s` (400 naming the field beyond them)."""
    r = getattr(req, "retention", None)          # kvgate's own field (not on /v1/responses)
    if req.prompt_cache_retention == "24h":
        if r is not None:
            raise APIError(400, "set one of retention and prompt_cache_retention", "invalid_request_error",
                           "prompt_cache_retention")
        if not disk_on:
            raise APIError(400, 'prompt_cache_retention "24h" needs the disk tier, which is off on this server '
                           "(store.disk.enabled)", "invalid_request_error", "prompt_cache_retention")
        r = EXTENDED_RETENTION
    if r is None:
        return None
    named = "prompt_cache_retention" if r is EXTENDED_RETENTION else None
    if tenant is not None and r.priority > tenant.max_priority:
        raise APIError(400, f"a retention priority of {r.priority} is above this API key's maximum of "
                       f"{tenant.max_priority}", "invalid_request_error", named or "retention.priority")
    if tenant is not None and r.duration_s > tenant.max_retention_s:
        raise APIError(400, f"a retention of {r.duration_s:g} s is longer than this API key's maximum of "
                       f"{tenant.max_retention_s:g} s (tenants.max_retention_s)", "invalid_request_error",
                       named or "retention.duration_s")
    return r.to_engine()


def disk_tier_on(app: web.Application) -> bool:
    return any(t.tier == "disk" and t.enabled for t in app[TIERS])


def priority_of(req, tenant) -> int:
    """The request's priority (kvgate's field; not on /v1/responses): its own, within its
    tenant's `max_priority`, or the tenant's."""
    asked = getattr(req, "priority", None)
    if tenant is None:
        return asked if asked is not None else 0
    if asked is None:
        return tenant.priority
    if asked > tenant.max_priority:
        raise APIError(400, f"priority {asked} is above this API key's maximum of {tenant.max_priority}",
                       "invalid_request_error", "priority")
    return asked


def _full_response(choices: list[Choice], kind: str, response_id: str, model: str, token_ids: bool,
                   token_text: logprobs.TokenText, offered: _Tools | None) -> dict:
    if any(c.last.finish_reason == "error" for c in choices):
        raise APIError(500, "the engine failed while generating this response", "server_error")
    out = {"id": response_id, "object": kind, "created": now(), "model": model, "choices": [],
           "usage": _usage(choices)}
    for c in choices:
        text = "".join(c.text)
        scored = c.params.logprobs is not None
        if kind == "chat.completion":
            message, reason = {"role": "assistant", "content": text, "refusal": None}, c.last.finish_reason
            content, calls = offered.calls(text) if offered is not None else (text, [])
            if calls:
                message = {"role": "assistant", "content": content, "refusal": None,
                           "tool_calls": [t.to_openai() for t in calls]}
                reason = _finish_reason(reason, calls)
            out["choices"].append({"index": c.index, "message": message,
                                   "logprobs": logprobs.chat(c.logprobs, c.token_ids, token_text) if scored else None,
                                   "finish_reason": reason})
        else:
            out["choices"].append({
                "index": c.index, "text": c.echo + text,
                "logprobs": logprobs.completion(c.logprobs, c.token_ids, token_text, 0)[0] if scored else None,
                "finish_reason": c.last.finish_reason})
        if token_ids:
            out["choices"][-1]["token_ids"] = c.token_ids
        if c.last.cache_report is not None:
            out["choices"][-1]["cache_report"] = c.last.cache_report
    return out


async def write_response(request: web.Request, resp: web.StreamResponse,
                         data: bytes | None = None) -> web.StreamResponse:
    """Write (the headers on first use, then `data`, or the whole body of a prepared-less
    response) within the write timeout; a client that takes nothing for that long is gone."""
    timeout = request.app[CONFIG].server.write_timeout_s
    try:
        async with asyncio.timeout(timeout):   # no task per write, unlike wait_for (3x the cost)
            if data is None:
                await _prepare_and_end(request, resp)
            else:
                await resp.write(data)
    except TimeoutError:              # the caller aborts its requests, then drops the connection
        raise ClientGone(f"took none of the response for {timeout:g} s") from None
    except ConnectionError as e:
        raise ClientGone(str(e) or "closed the connection") from None
    return resp


async def _prepare_and_end(request: web.Request, resp: web.StreamResponse) -> None:
    await resp.prepare(request)
    await resp.write_eof()


async def _stream(request: web.Request, choices: list[Choice], kind: str, response_id: str,
                  include_usage: bool, token_ids: bool, offered: _Tools | None) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
    base = {"id": response_id, "object": chunk_kind, "created": now(), "model": request.app[PROMPTS].name}
    extra = {"usage": None} if include_usage else {}
    token_text = request.app[TOKEN_TEXT]
    offsets = {c.index: len(c.echo) for c in choices}       # completions' text_offset, per choice
    replies = {c.index: tools.StreamedReply(offered.parser) for c in choices} if offered else {}

    async def event(obj: dict) -> None:
        await write_response(request, resp, b"data: " + json.dumps(obj).encode() + b"\n\n")

    async def send(choices_part: list[dict]) -> None:
        await event({**base, "choices": choices_part, **extra})

    try:
        await resp.prepare(request)
        if kind == "chat.completion":
            await send([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None} for c in choices])
        elif any(c.echo for c in choices):
            await send([{"index": c.index, "text": c.echo, "logprobs": None, "finish_reason": None}
                        for c in choices])
        async with contextlib.aclosing(merged(choices)) as outputs:
            async for c, out in outputs:
                calls = []
                if replies:                # tools offered: what may be a call is held back
                    text = replies[c.index].feed(out.text)
                    if out.finish_reason is not None:
                        tail, calls = replies[c.index].finish()
                        calls = offered.limit(calls)
                        text += tail
                    out = dataclasses.replace(out, text=text, finish_reason=_finish_reason(out.finish_reason, calls))
                if out.text or out.finish_reason is not None or token_ids or out.logprobs:
                    part = _chunk_choice(kind, c, out, token_ids)
                    if calls:
                        part["delta"]["tool_calls"] = [t.to_openai(i) for i, t in enumerate(calls)]
                    if out.logprobs is not None and kind == "chat.completion":
                        part["logprobs"] = logprobs.chat(out.logprobs, out.token_ids, token_text)
                    elif out.logprobs is not None:
                        part["logprobs"], offsets[c.index] = logprobs.completion(
                            out.logprobs, out.token_ids, token_text, offsets[c.index])
                    await send([part])
                if out.finish_reason == "error":     # the choice ends, then the error says why
                    await event(error_body("the engine failed while generating this response", "server_error"))
        if include_usage:
            await event({**base, "choices": [], "usage": _usage(choices)})
        await write_response(request, resp, b"data: [DONE]\n\n")
        await resp.write_eof()
    except (ClientGone, ConnectionError) as e:     # `_generate` aborts its requests
        log.info("client %s went away mid-stream (%s); its requests are aborted", request.remote, e)
        if request.transport is not None:
            request.transport.close()
    return resp


def _chunk_choice(kind: str, c: Choice, out: RequestOutput, token_ids: bool) -> dict:
    if kind == "chat.completion":
        part = {"index": c.index, "delta": {"content": out.text} if out.text else {}}
    else:
        part = {"index": c.index, "text": out.text}
    part |= {"logprobs": None, "finish_reason": out.finish_reason}
    if token_ids:
        part["token_ids"] = out.token_ids
    if out.cache_report is not None:                  # on the last chunk of a choice that asked
        part["cache_report"] = out.cache_report
    return part


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


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [text_views.model_card(request)]})


def ready(app: web.Application):
    """The engine, if it can take work now: EngineDead once it has exited, a 503 while the server
    stops, EngineUnresponsive while it sends no heartbeat (a frozen engine takes nothing new)."""
    engine, timeout_s = app[ENGINE], app[CONFIG].server.heartbeat_timeout_s
    if engine.dead:
        raise EngineDead(engine.dead)
    if app[STATE].stopping:
        raise APIError(503, "the server is shutting down", "server_error", headers={"Retry-After": "5"})
    silent = engine.silent_for()
    if silent > timeout_s:
        raise EngineUnresponsive(f"the engine process has sent no heartbeat for {silent:.1f} s "
                                 f"(server.heartbeat_timeout_s = {timeout_s:g})")
    return engine


async def health(request: web.Request) -> web.Response:
    try:
        engine = ready(request.app)
    except EngineDead as e:
        return web.json_response({"status": "engine_dead", "reason": str(e)}, status=503)
    except EngineUnresponsive as e:
        return web.json_response({"status": "engine_unresponsive", "reason": str(e)}, status=503)
    except APIError:
        return web.json_response({"status": "stopping"}, status=503)
    tiers = {r.tier: {k: v for k, v in r.as_dict().items() if k != "path"} for r in request.app.get(TIERS, [])}
    return web.json_response({"status": "ok", "tiers": tiers, "engine": engine.steps})


async def cache(request: web.Request) -> web.Response:
    """The KV arithmetic of this deployment and what each tier holds now (no token contents)."""
    engine = ready(request.app)
    blocks = (await engine.stats())["blocks"]
    tiers = {name: {**t, "now": blocks.get(name)} for name, t in engine.kv["tiers"].items()}
    return web.json_response({**engine.kv, "tiers": tiers})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus' scrape: a 503 at once for a frozen engine, within ASK_TIMEOUT_S for a slow one."""
    snapshot = await ready(request.app).stats()
    stored = request.app[RESPONSES]
    request.app[METRICS].responses(stored.count(), stored.dropped)
    return web.Response(body=request.app[METRICS].render(snapshot),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
