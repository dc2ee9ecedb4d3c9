"""The aiohttp application: `init_app(config)` builds it; the engine starts and stops with it."""
from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from engine.engine import Engine
from engine.model import LoadedModel, load_model
from gateway import views
from gateway.config import KvgateConfig
from gateway.errors import error_middleware, expect_continue
from gateway.keys import CONFIG, ENGINE, METRICS, STATE, TIERS, ServerState
from gateway.metrics import Metrics
from gateway.middlewares import auth_middleware
from gateway.tiers import open_engine

log = logging.getLogger("kvgate.gateway")


def init_app(config: KvgateConfig, loaded: LoadedModel | None = None) -> web.Application:
    """The app for `config`. `loaded` reuses a model already in memory (tests); otherwise the
    model is loaded when the app starts."""
    app = web.Application(middlewares=[error_middleware, auth_middleware],
                          client_max_size=config.server.max_body_bytes)
    app[CONFIG] = config
    app[STATE] = ServerState(started=int(time.time()))
    app.router.add_post("/v1/chat/completions", views.chat_completions, expect_handler=expect_continue)
    app.router.add_post("/v1/completions", views.completions, expect_handler=expect_continue)
    app.router.add_get("/v1/models", views.models)
    app.router.add_get("/health", views.health)
    app.router.add_get("/metrics", views.metrics)
    app.cleanup_ctx.append(_engine_ctx(loaded))
    app.on_shutdown.append(_on_shutdown)
    return app


def _engine_ctx(loaded: LoadedModel | None):
    async def ctx(app: web.Application):
        config = app[CONFIG]
        model = loaded or await asyncio.to_thread(load_model, config.model, config.engine.block_size)
        engine, reports = open_engine(config, model, lambda store: Engine(model, config.engine, store))
        app[ENGINE] = engine
        app[TIERS] = reports
        app[METRICS] = Metrics(engine, reports)
        await engine.start()
        log.info("serving %s on %s; KV tiers: %s; steps: %s", model.name, model.device,
                 ", ".join(r.describe() for r in reports), engine.config.describe(engine.configured))
        yield
        app[STATE].stopping = True
        await engine.stop(persist=True)     # aborts what is left, writes cached blocks to disk
    return ctx


async def _on_shutdown(app: web.Application) -> None:
    """Stop taking requests and end the streams in flight (they finish with "abort")."""
    app[STATE].stopping = True
    if ENGINE in app:
        app[ENGINE].abort_all()
