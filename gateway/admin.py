"""The cache, for an operator: `/admin/cache` (admin key only; docs/api.md, "Admin API").

    GET  /admin/cache           blocks and bytes each tenant's cache holds per tier (no contents)
    POST /admin/cache/warm      {"tenant", "prompt", "retention"?}: compute a prefix into a tenant's
                                cache now, kept at a priority for a while if `retention` says so
    POST /admin/cache/evict     {"tenant", "prompt"}: drop a prefix, and what follows it, from
                                every tier of a tenant's cache (blocks no running request holds)

`prompt` is a text (tokenized as completions are) or token ids; `tenant` a configured tenant's
name ("" or absent without tenants). Retention here is bounded by the engine's limits only: it
is the operator's.
"""
from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, StrictStr

from engine.sampling import SamplingParams
from gateway import intake
from gateway.errors import APIError
from gateway.generation import completion_prompts
from gateway.keys import CONFIG, ENGINE, PROMPTS
from gateway.protocol import RetentionRequest, TokenIds


class PrefixRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: StrictStr = ""
    prompt: StrictStr | TokenIds
    retention: RetentionRequest | None = None


async def cache(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    names = [t.name for t in config.tenants] or [""]
    return web.json_response({"tenants": await request.app[ENGINE].ask("admin", "tenants", [names])})


async def warm(request: web.Request) -> web.Response:
    req, prompt = await _read(request)
    r = req.retention
    stream = request.app[ENGINE].submit(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                                        priority=r.priority if r else 0, namespace=req.tenant,
                                        retention=None if r is None else r.to_engine())
    last = None
    async for out in stream:
        last = out
    if last is None or last.finish_reason not in ("length", "stop"):
        raise APIError(500, "warming the prefix failed", "server_error")
    return web.json_response({"prompt_tokens": last.prompt_tokens, "cached_tokens": last.num_cached_tokens,
                              "retention": None if r is None else r.model_dump()})


async def evict(request: web.Request) -> web.Response:
    req, prompt = await _read(request)
    return web.json_response({"evicted_blocks": await request.app[ENGINE].ask("admin", "evict", [req.tenant, prompt])})


async def _read(request: web.Request) -> tuple[PrefixRequest, list[int]]:
    """The request, its tenant checked, its prompt as token ids (as completions take it)."""
    config = request.app[CONFIG]
    req = intake.parse(await request.read(), PrefixRequest)
    if req.tenant not in ([t.name for t in config.tenants] or [""]):
        raise APIError(400, f"no tenant named {req.tenant!r}", "invalid_request_error", "tenant")
    return req, completion_prompts(req, request.app[PROMPTS])[0]


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/cache", cache)
    app.router.add_post("/admin/cache/warm", warm)
    app.router.add_post("/admin/cache/evict", evict)

