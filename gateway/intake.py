"""From the bytes on the wire to a validated request: the body read within a deadline, decoded
as UTF-8 JSON, checked against the request schema; every way it can be wrong is a 4xx naming
what is wrong. Large bodies are decoded, validated and tokenized on a worker thread, so one big
message never stalls the event loop that serves every other stream.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from engine.errors import InvalidRequest
from gateway.errors import APIError

OFFLOAD_BYTES = 64 << 10     # bodies larger than this are decoded and tokenized off the loop
T = TypeVar("T")


async def read_body(request: web.Request, timeout_s: float) -> bytes:
    """The raw body, all of it within `timeout_s` (408 otherwise: a client sending slowly, or
    less than its Content-Length, gives its connection up)."""
    try:
        body = await asyncio.wait_for(request.read(), timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s",
                       "invalid_request_error", code="request_timeout") from None
    except web.RequestPayloadError as e:      # a Content-Encoding that does not decode, a broken chunk
        detail = str(e).split("message:", 1)[-1].strip() or "malformed payload"
        raise APIError(400, f"the body could not be read: {detail}", "invalid_request_error") from None
    charset = request.charset
    if charset and charset.lower().replace("_", "-") not in ("utf-8", "utf8"):
        raise APIError(415, f"the body must be UTF-8 JSON; charset={charset} is not supported",
                       "invalid_request_error", code="unsupported_media_type")
    return body


async def off_loop_if_large(nbytes: int, fn: Callable[..., T], *args) -> T:
    """`fn(*args)`, on a worker thread when it works on a body of more than OFFLOAD_BYTES."""
    if nbytes > OFFLOAD_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


async def read_request(request: web.Request, schema: type[BaseModel], model: str, timeout_s: float) -> BaseModel:
    """The body, read within `timeout_s` and validated against `schema` (off the loop when
    large); a request for another model than `model` is a 404 (/tokenize and /detokenize may
    leave `model` out)."""
    body = await read_body(request, timeout_s)
    req = await off_loop_if_large(len(body), parse, body, schema)
    if req.model is not None and req.model != model:
        raise model_not_found(req.model)
    return req


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist", "invalid_request_error", "model", "model_not_found")


def parse(body: bytes, schema: type[BaseModel]) -> BaseModel:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the body is not valid UTF-8 (byte {e.start})", "invalid_request_error") from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, "the body's JSON is nested too deeply", "invalid_request_error") from None
    except ValueError as e:     # JSONDecodeError, an int of too many digits, NaN / Infinity
        raise APIError(400, f"the body is not valid JSON: {e}", "invalid_request_error") from None
    if not isinstance(doc, dict):
        raise APIError(400, "the body must be a JSON object", "invalid_request_error")
    _check_text(doc)
    try:
        req = schema.model_validate(doc)
    except ValidationError as e:
        param, what = _first_error(e)
        raise APIError(400, f"{param}: {what}" if param else what, "invalid_request_error", param or None) from None
    refused = getattr(req, "refused", lambda: None)()
    if refused:      # an OpenAI field kvgate does not implement, sent with an effect
        raise APIError(400, f"{refused}: not supported by kvgate (docs/api.md lists every field)",
                       "invalid_request_error", refused)
    getattr(req, "check", lambda: None)()        # what spans fields: InvalidRequest, a 400 naming one
    return req


# pydantic's names for the branches of a union in an error's location ("temperature.int"), which
# no client wrote: dropped, so the location is the field as the client wrote it
_UNION_TAGS = {"int", "float", "str", "bool", "none", "dict", "list"}


def _first_error(e: ValidationError) -> tuple[str, str]:
    """The first failing field, named as the client wrote it, and what is wrong with it (every
    branch of a union it failed, joined: "a valid integer or a valid number")."""
    def where(err: dict) -> str:
        return ".".join(str(p) if isinstance(p, int) else p for p in err["loc"]
                        if isinstance(p, int) or ("[" not in p and p not in _UNION_TAGS))
    errors = e.errors()
    param = where(errors[0])
    if errors[0]["type"] == "extra_forbidden":
        return param, "unknown field (kvgate takes OpenAI's fields and its own: docs/api.md)"
    # pydantic prefixes a validator's own ValueError with "Value error, "
    messages = list(dict.fromkeys(err["msg"].removeprefix("Value error, ") for err in errors if where(err) == param))
    return param, " or ".join(messages[:1] + [m[0].lower() + m[1:] for m in messages[1:]])


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _check_text(doc: object) -> None:
    """Every string must be encodable as UTF-8: JSON's \\ud800 escapes decode to lone surrogates,
    which no tokenizer takes. (Iterative: the document may be nested as deep as the parser allows.)"""
    stack = [doc]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest("a string in the body holds a lone UTF-16 surrogate (\\ud800-\\udfff)",
                                     None) from None
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
