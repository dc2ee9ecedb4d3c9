"""Authentication (tenant per API key) and the concurrency limit."""
from __future__ import annotations

import hmac

from aiohttp import web

from gateway.errors import APIError
from gateway.keys import CONFIG, STATE, TENANT

OPEN_PATHS = ("/health", "/metrics")


@web.middleware
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    """With tenants configured, /v1 needs `Authorization: Bearer <key>`; the key picks the
    tenant, and with it the cache namespace and default priority."""
    tenants = request.app[CONFIG].tenants
    request[TENANT] = None
    if tenants and request.path not in OPEN_PATHS:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        match = None
        for t in tenants:           # compare with every key, in constant time
            if hmac.compare_digest(key.strip().encode(), t.key.encode()) and scheme.lower() == "bearer":
                match = t
        if match is None:
            raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                           "authentication_error", code="invalid_api_key")
        request[TENANT] = match
    return await handler(request)


@web.middleware
async def limit_middleware(request: web.Request, handler) -> web.StreamResponse:
    """At most `server.max_concurrent_requests` generations at once; past it, 429."""
    if request.method != "POST":
        return await handler(request)
    state = request.app[STATE]
    if state.stopping:
        raise APIError(503, "the server is shutting down", "server_error", headers={"Retry-After": "5"})
    if state.in_flight >= request.app[CONFIG].server.max_concurrent_requests:
        raise APIError(429, "too many concurrent requests; retry later", "rate_limit_error",
                       headers={"Retry-After": "1"})
    state.in_flight += 1
    try:
        return await handler(request)
    finally:
        state.in_flight -= 1
