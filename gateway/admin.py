"""The cache, for an operator: `/admin/cache` (admin key only; docs/api.md, "Admin API").

    GET  /admin/cache           blocks and bytes each tenant's cache, and the public prefixes',
                                hold per tier (no contents)
    POST /admin/cache/warm      {"tenant", "prompt", "retention"?}: compute a prefix into a tenant's
                                cache now, kept at a priority for a while if `retention` says so
    POST /admin/cache/evict     {"tenant" | "public": true, "prompt"}: drop a prefix, and what
                                follows it, from every tier of a tenant's cache (or a public
                                prefix, and every tenant's blocks after it): blocks no running
                                request holds
    POST /admin/cache/public    {"prompt" | "system", "retention"?}: declare a prefix public (its
                                blocks shared by every tenant from now on) and compute it

`prompt` is a text (tokenized as completions are) or token ids; `system` a chat's system message
(rendered by the chat template); `tenant` a configured tenant's name ("" or absent without
tenants). Retention here is bounded by the engine's limits only: it is the operator's.
"""
from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr

from engine import limits
from engine.errors import InvalidRequest
from engine.request import Request
from engine.sampling import SamplingParams
from gateway import intake
from gateway.config import ConfigError
from gateway.errors import APIError
from gateway.generation import completion_prompts
from gateway.keys import CONFIG, ENGINE, PROMPTS
from gateway.protocol import RetentionRequest, TokenIds

WARM = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)   # computing a prefix: one token


class PrefixRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: StrictStr = ""
    prompt: StrictStr | TokenIds
    retention: RetentionRequest | None = None


class EvictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: StrictStr = ""
    public: StrictBool = False     # the prompt's public prefix, not a tenant's blocks
    prompt: StrictStr | TokenIds


class PublicRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: StrictStr | TokenIds | None = None
    system: StrictStr | None = None
    retention: RetentionRequest | None = None

    def check(self) -> None:
        if (self.prompt is None) == (self.system is None):
            raise InvalidRequest("give exactly one of prompt and system", "prompt")


async def cache(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    names = [t.name for t in config.tenants] or [""]
    return web.json_response(await request.app[ENGINE].ask("admin", "usage", [names]))


async def warm(request: web.Request) -> web.Response:
    req = intake.parse(await request.read(), PrefixRequest)
    _check_tenant(request.app, req.tenant)
    return web.json_response(await _warm(request.app, _prompt(request.app, req), req.tenant, req.retention))


async def evict(request: web.Request) -> web.Response:
    req = intake.parse(await request.read(), EvictRequest)
    if req.public and req.tenant:
        raise APIError(400, "a public prefix is no tenant's: give tenant or public, not both",
                       "invalid_request_error", "public")
    if not req.public:
        _check_tenant(request.app, req.tenant)
    evicted = await request.app[ENGINE].ask("admin", "evict", [req.tenant, _prompt(request.app, req), req.public])
    return web.json_response({"evicted_blocks": evicted})


async def public(request: web.Request) -> web.Response:
    req = intake.parse(await request.read(), PublicRequest)
    return web.json_response(await declare_public(request.app, req))


async def declare_public_prefixes(app: web.Application) -> None:
    """At start-up: the configuration's `[[public_prefixes]]`. Raises ConfigError."""
    for i, p in enumerate(app[CONFIG].public_prefixes):
        try:
            await declare_public(app, PublicRequest(prompt=p.text or None, system=p.system or None))
        except (APIError, InvalidRequest) as e:
            raise ConfigError(f"public_prefixes[{i}]: {e}") from None


async def declare_public(app: web.Application, req: PublicRequest) -> dict:
    """Make the full blocks of the request's prefix public, then compute them (once, for every
    tenant)."""
    prompts = app[PROMPTS]
    if req.system is not None:
        prompt = prompts.encode_chat([{"role": "system", "content": req.system}])
    else:
        prompt = _prompt(app, req)
    limits.check_request(app[ENGINE].bounds, prompt, WARM, 0)     # before it is declared
    blocks = await app[ENGINE].ask("admin", "public", [prompt])
    if isinstance(blocks, str):              # the public blocks' bound (store.PUBLIC_MAX_SHARE)
        raise APIError(400, blocks, "invalid_request_error", "prompt", "public_prefixes_full")
    if not blocks:
        raise APIError(400, f"the prefix is {len(prompt)} tokens: shorter than one cache block "
                       f"({app[ENGINE].bounds.block_size} tokens), it has nothing to share",
                       "invalid_request_error", "prompt")
    return {"public_blocks": blocks, **await _warm(app, prompt, "", req.retention)}


async def _warm(app: web.Application, prompt: list[int], tenant: str, r: RetentionRequest | None) -> dict:
    """Compute `prompt` into `tenant`'s cache (its public prefix into the public one)."""
    stream = app[ENGINE].submit(Request(prompt, WARM, priority=r.priority if r else 0, namespace=tenant,
                                        retention=None if r is None else r.to_engine()))
    last = None
    async for out in stream:
        last = out
    if last is None or last.finish_reason not in ("length", "stop"):
        raise APIError(500, "warming the prefix failed", "server_error")
    return {"prompt_tokens": last.prompt_tokens, "cached_tokens": last.num_cached_tokens,
            "retention": None if r is None else r.model_dump()}


def _check_tenant(app: web.Application, tenant: str) -> None:
    if tenant not in ([t.name for t in app[CONFIG].tenants] or [""]):
        raise APIError(400, f"no tenant named {tenant!r}", "invalid_request_error", "tenant")


def _prompt(app: web.Application, req: PrefixRequest | EvictRequest | PublicRequest) -> list[int]:
    """The request's prompt as token ids (as completions take it)."""
    return completion_prompts(req, app[PROMPTS])[0]


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/cache", cache)
    app.router.add_post("/admin/cache/warm", warm)
    app.router.add_post("/admin/cache/evict", evict)
    app.router.add_post("/admin/cache/public", public)

