"""Typed keys of the app's and each request's state."""
from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from engine.engine import Engine
from gateway.config import KvgateConfig
from gateway.metrics import Metrics
from gateway.tiers import TierReport


@dataclass
class ServerState:
    started: int                   # unix time, for /v1/models
    in_flight: int = 0             # sequences being generated (prompts x n of every request served)
    stopping: bool = False


CONFIG = web.AppKey("config", KvgateConfig)
ENGINE = web.AppKey("engine", Engine)
METRICS = web.AppKey("metrics", Metrics)
STATE = web.AppKey("state", ServerState)
TIERS = web.AppKey("tiers", list[TierReport])   # what each KV tier got at start-up
# request key: the TenantConfig, or None without tenants (aiohttp < 3.14 has no RequestKey)
TENANT = web.RequestKey("tenant", object) if hasattr(web, "RequestKey") else "kvgate.tenant"
