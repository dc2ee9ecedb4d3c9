"""Running the app: aiohttp's server, with the errors it answers by itself (malformed HTTP,
before any handler runs) as OpenAI error objects instead of plain text, logged without a
traceback (a client's bad bytes are not a fault of kvgate)."""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.keys import STATE
from gateway.protocol import error_body

log = logging.getLogger("kvgate.gateway")


class _Handler(RequestHandler):
    def log_exception(self, message: str, *args, exc_info=None, **kw) -> None:
        """A body that fails to decode (a bad gzip stream) surfaces again while aiohttp drains
        the rest of it after our 400: the client's fault, logged as such."""
        if isinstance(exc_info, web.RequestPayloadError):
            log.info("malformed request body from a client: %s", " ".join(str(exc_info).split()))
        else:
            super().log_exception(message, *args, exc_info=exc_info, **kw)

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            log.error("error serving %s", request.remote, exc_info=exc)
            what, type_ = "internal server error", "server_error"
        else:
            what = " ".join((message or HTTPStatus(status).phrase).split())
            log.info("malformed HTTP from %s: %s", request.remote, what)
            what, type_ = f"malformed HTTP request: {what}", "invalid_request_error"
        if request.writer.output_size > 0:
            raise ConnectionError("a response is already under way; the connection is closed")
        resp = web.json_response(error_body(what, type_), status=status)
        resp.force_close()
        return resp


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    _wound_down = False

    async def wind_down(self) -> None:
        """The app's shutdown and cleanup (streams end, the engine stops and persists its cache)
        while the port still answers — with 503 and Retry-After from now on, not a refused
        connection; `cleanup` then closes the port."""
        await super().shutdown()
        await super()._cleanup_server()
        self._wound_down = True

    async def shutdown(self) -> None:
        if not self._wound_down:
            await super().shutdown()

    async def _cleanup_server(self) -> None:
        if not self._wound_down:
            await super()._cleanup_server()

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return _Server(server.request_handler, request_factory=server.request_factory,
                       handler_cancellation=server.handler_cancellation, loop=server._loop, **server._kwargs)


# After an error answered before the body was read (a 408, a 401 on a large body), aiohttp reads
# and discards the rest for this long before closing, so the client sees the answer rather than
# a reset; its default of 10 s made a 30 s body timeout a 40 s wait for the connection's end
LINGERING_S = 1.0


def make_runner(app: web.Application, **kwargs) -> web.AppRunner:
    """The runner `serve` uses (tests run their servers through it too)."""
    return _Runner(app, **{"handler_cancellation": True, "lingering_time": LINGERING_S, **kwargs})


async def serve(app: web.Application, sock: socket.socket, banner: str = "") -> int:
    """Serve `app` until SIGINT or SIGTERM (or the app asks to stop: its engine process died),
    then shut down gracefully within server.shutdown_timeout_s (the app's shutdown and cleanup:
    streams end, the engine writes what fits of its cache to the disk tier) while the port
    answers 503, then close it. A signal while the engine starts stops the start. `sock` is
    bound to the server's address (not listening: connections are refused until the engine has
    started); `banner` is printed once it listens. Returns the exit code."""
    state = app[STATE]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, state.request_stop, 0)
    runner = make_runner(app, shutdown_timeout=2)     # handlers have ended by then (wind_down)
    setup = asyncio.ensure_future(runner.setup())     # starts the engine: loads the model, opens tiers
    stopped = asyncio.ensure_future(state.stop_requested.wait())
    await asyncio.wait([setup, stopped], return_when=asyncio.FIRST_COMPLETED)
    if not setup.done():
        setup.cancel()              # the engine process is stopped (killed if it does not listen)
        await asyncio.gather(setup, return_exceptions=True)
        log.info("stopped while starting")
        return state.exit_code
    stopped.cancel()
    setup.result()                  # a start-up failure: ConfigError, EngineStartError
    try:
        await web.SockSite(runner, sock).start()
        if banner:
            print(banner, flush=True)
        await state.stop_requested.wait()
        if banner:
            print("kvgate: stopping: requests in flight end, the cache is written to the disk tier", flush=True)
        await runner.wind_down()
    finally:
        await runner.cleanup()
    return app[STATE].exit_code


def run(app: web.Application, sock: socket.socket, banner: str = "") -> int:
    return asyncio.run(serve(app, sock, banner))
