"""Helpers for HTTP tests: request bodies, reading SSE and /metrics, raw bytes on a socket."""
from __future__ import annotations

import asyncio
import json
import re

MODEL = "builtin:tiny"


def chat(content="hello", **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0, **kw}


async def sse(resp) -> list:
    events = []
    async for line in resp.content:
        line = line.decode().strip()
        if line.startswith("data: "):
            events.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return events


def parse_metric(text: str, name: str, default: float | None = None, **labels) -> float:
    """One sample's value: the series `name` with exactly `labels` (and any `model_name`, which
    every series has, unless asked for)."""
    for m in re.finditer(r"^(\w+)(?:\{(.*)\})? (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if "model_name" not in labels:
            found.pop("model_name", None)
        if m.group(1) == name and found == {k: str(v) for k, v in labels.items()}:
            return float(m.group(3))
    if default is not None:
        return default
    raise AssertionError(f"{name}{labels} not in /metrics")


async def metric(client, name: str, headers: dict | None = None, default: float | None = None,
                 **labels) -> float:
    """One sample from /metrics, whatever the order of its labels (`default` if absent)."""
    return parse_metric(await (await client.get("/metrics", headers=headers)).text(), name, default, **labels)


async def raw(port: int, data: bytes, read_timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """Send raw bytes to 127.0.0.1:port; (status, headers, body) of the response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), read_timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        n = int(headers.get("content-length", 0))
        body = await asyncio.wait_for(reader.readexactly(n), read_timeout) if n else b""
        return status, headers, body
    finally:
        writer.close()


def post_bytes(path: str, body: bytes, headers: dict | None = None) -> bytes:
    """A raw HTTP/1.1 POST with Content-Length (or the headers given)."""
    hdrs = {"Host": "x", "Content-Type": "application/json", "Content-Length": str(len(body)),
            "Connection": "close", **(headers or {})}
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    return head.encode("latin-1", "surrogateescape") + b"\r\n" + body
