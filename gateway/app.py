"""The aiohttp application: `init_app(config)` builds it. It is the API process: HTTP, auth,
tokenization, chat templates and SSE. The engine runs in its own process (engine/serving/
process.py), started and stopped with the app."""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import time

from aiohttp import web

from engine.model import Prompts, load_tokenizer
from gateway import admin, responses, text_views, tools, views
from gateway.config import ConfigError, KvgateConfig
from gateway.engines.pipe import EngineClient, EngineProcess, EngineStartError
from gateway.errors import error_middleware, expect_continue
from gateway.keys import (CONFIG, ENGINE, METRICS, PROMPTS, RESPONSES, STATE, TIERS, TOKEN_TEXT, TOOL_PARSER,
                          ServerState)
from gateway.response_store import ResponseStore
from gateway.logprobs import TokenText
from gateway.metrics import Metrics
from gateway.middlewares import auth_middleware, status_middleware
from engine.serving.tiers import TierReport

log = logging.getLogger("kvgate.gateway")


def init_app(config: KvgateConfig, engine_process: EngineProcess | None = None,
             log_level: str = "info") -> web.Application:
    """The app for `config`. It starts its own engine process, unless given one already
    started (tests: one process, reopened for each configuration, serves many apps in turn;
    the app then leaves it running)."""
    app = web.Application(middlewares=[status_middleware, error_middleware, auth_middleware],
                          client_max_size=config.server.max_body_bytes)
    app[CONFIG] = config
    app[STATE] = ServerState(started=int(time.time()))
    app.router.add_post("/v1/chat/completions", views.chat_completions, expect_handler=expect_continue)
    app.router.add_post("/v1/completions", views.completions, expect_handler=expect_continue)
    app.router.add_post("/v1/responses", responses.create_response, expect_handler=expect_continue)
    app.router.add_get("/v1/responses/{id}", responses.get_response)
    app.router.add_delete("/v1/responses/{id}", responses.delete_response)
    app.router.add_get("/v1/models", views.models)
    app.router.add_get("/v1/models/{model}", text_views.model)
    app.router.add_post("/tokenize", text_views.tokenize)
    app.router.add_post("/detokenize", text_views.detokenize)
    app.router.add_get("/version", text_views.server_version)
    app.router.add_get("/health", views.health)
    app.router.add_get("/metrics", views.metrics)
    app.router.add_get("/v1/cache", views.cache)
    admin.add_routes(app)
    app.cleanup_ctx.append(_responses_ctx)
    app.cleanup_ctx.append(_engine_ctx(engine_process, log_level))
    app.on_shutdown.append(_on_shutdown)
    return app


async def _responses_ctx(app: web.Application):
    """The stored responses' file, open while the app runs (a path it cannot open: ConfigError)."""
    path = app[CONFIG].responses.store_path()
    try:
        app[RESPONSES] = ResponseStore(path, app[CONFIG].responses.max_per_tenant)
    except (OSError, sqlite3.Error) as e:
        raise ConfigError(f"responses.path: cannot open {path!r}: {e}") from None
    yield
    app[RESPONSES].close()


def _engine_ctx(given: EngineProcess | None, log_level: str):
    async def ctx(app: web.Application):
        config, state = app[CONFIG], app[STATE]
        if config.replicas.num_replicas:
            from gateway.engines.replicas import open_replicas  # Ray is needed only with replicas
            engine = await open_replicas(config)
        else:
            engine = await _open_engine(config, given, log_level, on_death=lambda why: state.request_stop(1))
        app[ENGINE] = engine
        app[PROMPTS] = Prompts.of(engine.name, engine.tokenizer, engine.bounds.max_model_len,
                                  config.model.chat_template)
        app[TOKEN_TEXT] = TokenText(engine.tokenizer)
        app[TOOL_PARSER] = tools.parser_for(config.model.tool_call_parser,
                                            getattr(engine.tokenizer, "chat_template", None)) or ""
        state.max_in_flight, state.max_per_request = config.server.admission_limits(
            engine.bounds.max_model_len, engine.steps["max_num_seqs"])
        app[TIERS] = reports = [TierReport(**t) for t in engine.tiers]
        app[METRICS] = Metrics(reports, engine.name, engine.bounds.block_size)
        try:
            await admin.declare_public_prefixes(app)
        except BaseException:
            await engine.close(persist=False, keep_process=given is not None)
            raise
        yield
        state.stopping = True
        # aborts what is left, writes cached blocks to disk within what is left of the shutdown's
        # time (server.serve set the deadline); a given process stays for the next app
        left = state.shutdown_left(config.server.shutdown_timeout_s)
        await engine.close(persist=True, keep_process=given is not None, timeout_s=max(1.0, left - 0.5))
    return ctx


async def _open_engine(config: KvgateConfig, given: EngineProcess | None, log_level: str, on_death) -> EngineClient:
    """The engine process (started here unless `given`) and the client of it."""
    process = given or EngineProcess(config, log_level)
    tokenizer = asyncio.create_task(asyncio.to_thread(load_tokenizer, config.model))
    if given is None:
        try:
            await process.start()
        except (ConfigError, EngineStartError):   # it answered "failed": it exits when asked (~1 s)
            tokenizer.cancel()
            await process.stop(persist=False, timeout_s=10.0)
            raise
        except BaseException:       # a signal while starting: it may not be listening, not waited for long
            tokenizer.cancel()
            await process.stop(persist=False, timeout_s=1.0)
            raise
    return EngineClient(process, await tokenizer, on_death=on_death)


async def _on_shutdown(app: web.Application) -> None:
    """Stop taking requests and end the streams in flight (they finish with "abort")."""
    app[STATE].stopping = True
    if ENGINE in app:
        app[ENGINE].abort_all()
