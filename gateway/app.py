"""The aiohttp application: `init_app(config)` builds it; the engine starts and stops with it."""
from __future__ import annotations

import asyncio
import logging
import time

import torch
from aiohttp import web

from engine.engine import Engine
from engine.model import LoadedModel, load_model
from gateway import views
from gateway.config import ConfigError, KvgateConfig
from gateway.errors import error_middleware, expect_continue
from gateway.keys import CONFIG, ENGINE, METRICS, STATE, ServerState
from gateway.metrics import Metrics
from gateway.middlewares import auth_middleware
from store import DiskTierError, StoreConfig

log = logging.getLogger("kvgate.gateway")
CPU_DEFAULT_GPU_BLOCKS = 2048


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
        try:
            engine = Engine(model, config.engine, store_config(config, model))
        except DiskTierError as e:     # a directory that cannot be made, or moved aside when damaged
            raise ConfigError(f"store.disk.path: {e}") from None
        app[ENGINE] = engine
        app[METRICS] = Metrics(engine)
        await engine.start()
        s = engine.store
        log.info("serving %s on %s: KV blocks gpu=%d host=%d disk=%s", model.name, model.device,
                 s.gpu.num_blocks, s.host.num_blocks, config.store.disk.path or "off")
        yield
        app[STATE].stopping = True
        await engine.stop(persist=True)     # aborts what is left, writes cached blocks to disk
    return ctx


async def _on_shutdown(app: web.Application) -> None:
    """Stop taking requests and end the streams in flight (they finish with "abort")."""
    app[STATE].stopping = True
    if ENGINE in app:
        app[ENGINE].abort_all()


def store_config(config: KvgateConfig, model: LoadedModel) -> StoreConfig:
    """Tier sizes; GPU blocks from the memory left after loading the model when not given."""
    tiers = config.store
    gpu_blocks = tiers.gpu.num_blocks
    if not gpu_blocks:
        if model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(model.device)
            block_bytes = model.block_layout(config.engine.block_size).block_bytes
            gpu_blocks = int(free * tiers.gpu.memory_fraction) // block_bytes
        else:
            gpu_blocks = CPU_DEFAULT_GPU_BLOCKS
    return StoreConfig(block_size=config.engine.block_size, gpu_blocks=gpu_blocks,
                       host_blocks=tiers.host.num_blocks, disk_path=tiers.disk.path,
                       disk_max_bytes=tiers.disk.max_bytes)
