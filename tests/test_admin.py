"""The admin API (gateway/admin.py): only with the admin key; warm a prefix into a tenant's
cache (with a retention), list what each tenant's cache holds (counts, no contents), evict a
prefix — each checked by what the tenants' next requests find."""
from tests.http_util import MODEL

TENANTS = [{"name": "a", "api_key": "sk-a"}, {"name": "b", "api_key": "sk-b"}]
ADMIN = {"Authorization": "Bearer sk-admin"}
DOC = "the operating manual of the bookshop, section one, " * 4


async def cached(client, key: str) -> int:
    resp = await client.post("/v1/completions", headers={"Authorization": f"Bearer {key}"},
                             json={"model": MODEL, "prompt": DOC, "max_tokens": 1})
    assert resp.status == 200
    return (await resp.json())["usage"]["prompt_tokens_details"]["cached_tokens"]


async def test_the_admin_api_is_closed_without_an_admin_key(make_client):
    client = await make_client()                       # no tenants, no admin key
    resp = await client.get("/admin/cache")
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "admin_key_not_configured"


async def test_warm_list_and_evict_a_tenants_prefix(make_client):
    client = await make_client(tenants=TENANTS, server={"admin_api_key": "sk-admin"})
    assert (await client.get("/admin/cache", headers={"Authorization": "Bearer sk-a"})).status == 401
    empty = await (await client.get("/admin/cache", headers=ADMIN)).json()
    assert empty == {"tenants": {t: {"gpu": 0, "host": 0, "disk": 0, "bytes": 0} for t in ("a", "b")},
                     "public": {"gpu": 0, "host": 0, "disk": 0, "bytes": 0, "prefixes": 0}}
    warm = await client.post("/admin/cache/warm", headers=ADMIN,
                             json={"tenant": "a", "prompt": DOC, "retention": {"priority": 3, "duration_s": 60}})
    assert warm.status == 200 and (await warm.json())["cached_tokens"] == 0
    listed = (await (await client.get("/admin/cache", headers=ADMIN)).json())["tenants"]
    assert listed["a"]["gpu"] > 0 and listed["a"]["bytes"] > 0 and listed["b"]["gpu"] == 0
    assert await cached(client, "sk-a") > 0            # warm for its tenant ...
    assert await cached(client, "sk-b") == 0           # ... and only for it
    evicted = await (await client.post("/admin/cache/evict", headers=ADMIN, json={"tenant": "a", "prompt": DOC})).json()
    assert evicted["evicted_blocks"] >= listed["a"]["gpu"]
    assert await cached(client, "sk-a") == 0
    bad = await client.post("/admin/cache/warm", headers=ADMIN, json={"tenant": "nobody", "prompt": DOC})
    assert bad.status == 400 and (await bad.json())["error"]["param"] == "tenant"
