"""Errors at the edge: every failure becomes OpenAI's error object with the right status.

A client's mistake is a 4xx (clients retry 5xx): bad JSON or fields 400, auth 401, unknown model
or route 404, body too large 413, overload 429. Only a fault of kvgate itself is a 500.
"""
from __future__ import annotations

import logging

from aiohttp import web

from engine.errors import InvalidRequest
from gateway.protocol import error_body

log = logging.getLogger("kvgate.gateway")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> web.Response:
        return web.json_response(error_body(self.message, self.type, self.param, self.code),
                                 status=self.status, headers=self.headers)


class EngineDead(Exception):
    """The engine process has exited: requests get 503 until the server is restarted."""


class EngineUnresponsive(Exception):
    """The engine process is alive but has not answered (a stopped process, a blocked loop):
    503, and the request or probe is not left waiting."""


class ClientGone(Exception):
    """The client closed the connection, or took none of the response for write_timeout_s."""


_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error"}


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as e:
        return _unread_body_closes(request, e.response())
    except EngineDead as e:
        return APIError(503, f"the engine is not running ({e}); the server is exiting for its supervisor "
                        "to restart it", "server_error", headers={"Retry-After": "10"}).response()
    except EngineUnresponsive as e:
        return APIError(503, str(e), "server_error", headers={"Retry-After": "5"}).response()
    except InvalidRequest as e:
        return _unread_body_closes(request, APIError(400, str(e), "invalid_request_error", e.param,
                                                     e.code).response())
    except web.HTTPException as e:      # aiohttp's own: 404 route, 405 method, 413 body size
        if e.status < 400:
            raise
        message = (e.text or e.reason).removeprefix(f"{e.status}: ")
        return APIError(e.status, message, _HTTP_TYPES.get(
            e.status, "invalid_request_error"), headers={k: v for k, v in e.headers.items()
                                                           if k.lower() == "allow"}).response()
    except (ClientGone, ConnectionError) as e:    # nobody to answer: not an error of ours
        log.info("client %s went away during %s %s (%s)", request.remote, request.method, request.path, e)
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=499)
    except Exception:
        log.exception("internal error serving %s %s", request.method, request.path)
        return APIError(500, "internal server error", "server_error").response()


def _unread_body_closes(request: web.Request, resp: web.Response) -> web.Response:
    """An error answered before the whole body was read (auth, a body that timed out or does not
    decode) closes the connection: the rest of that body, maybe not even decodable, is not
    worth reading to keep it alive."""
    if request.body_exists and not request.content.is_eof():
        resp.force_close()
    return resp


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` is answered as HTTP says; any other expectation is a 417 error
    object (aiohttp's own answer is plain text)."""
    expect = request.headers.get("Expect", "")
    if request.version >= (1, 1) and expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0       # the response proper has not started
        return None
    resp = APIError(417, f"unsupported Expect header: {expect!r}", "invalid_request_error").response()
    resp.force_close()         # the body it announced may follow: this connection is done
    return resp
