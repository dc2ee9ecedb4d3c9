"""Authentication: a tenant per API key on /v1, the admin key on /metrics; and the count of
responses by status."""
from __future__ import annotations

import hmac

from aiohttp import web

from gateway.errors import APIError
from gateway.keys import CONFIG, METRICS, TENANT

OPEN_PATHS = ("/health", "/version")      # no tenant's data: open to all
ADMIN_PATHS = ("/metrics", "/v1/cache")


@web.middleware
async def status_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Count every response by status (the outermost middleware: errors are responses by then)."""
    resp = await handler(request)
    if METRICS in request.app:
        request.app[METRICS].http_responses.labels(str(resp.status)).inc()
    return resp


@web.middleware
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    """With tenants configured, /v1 needs `Authorization: Bearer <key>`; the key picks the
    tenant, and with it the cache namespace and priorities. /metrics (every tenant's traffic)
    needs the admin key when one is set, and is closed when tenants are configured without one.
    The admin API (/admin/...) always needs the admin key: without one it is closed."""
    config = request.app[CONFIG]
    request[TENANT] = None
    if request.path in OPEN_PATHS:
        return await handler(request)
    key = _bearer(request)
    operator = request.path.startswith("/admin/") or request.path == "/admin"
    if request.path in ADMIN_PATHS or operator:
        admin = config.server.admin_key
        if not admin and (config.tenants or operator):   # the admin API is never open
            raise APIError(403, f"{request.path} is closed: with tenants configured it needs server.admin_api_key",
                           "permission_error", code="admin_key_not_configured")
        if admin and not (key is not None and hmac.compare_digest(key, admin.encode())):
            raise APIError(401, "missing or invalid admin API key (Authorization: Bearer <key>)",
                           "authentication_error", code="invalid_api_key")
    elif config.tenants:
        match = None
        for t in config.tenants:           # compare with every key, in constant time
            if hmac.compare_digest(key or b"", t.key.encode()) and key is not None:
                match = t
        if match is None:
            raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                           "authentication_error", code="invalid_api_key")
        request[TENANT] = match
    return await handler(request)


def _bearer(request: web.Request) -> bytes | None:
    """The key of `Authorization: Bearer <key>` as bytes (whatever bytes the client sent), or
    None without one."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip().encode("utf-8", "surrogateescape")
