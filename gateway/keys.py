"""Typed keys of the app's and each request's state."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from aiohttp import web

from engine.model import Prompts
from gateway.config import KvgateConfig
from gateway.engines import Engines
from gateway.logprobs import TokenText
from gateway.metrics import Metrics
from gateway.response_store import ResponseStore
from engine.serving.tiers import TierReport


@dataclass
class ServerState:
    started: int                   # unix time, for /v1/models
    in_flight: int = 0             # sequences being generated (prompts x n of every request served)
    max_in_flight: int = 0         # the admission limit (ServerConfig.admission_limits), once the engine is known
    max_per_request: int = 0       # sequences of one request, likewise
    stopping: bool = False
    exit_code: int = 0             # what `kvgate serve` exits with once stopped
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    stop_at: float | None = None    # time.monotonic() of the stop request: shutdown_timeout_s counts from it

    def request_stop(self, exit_code: int) -> None:
        """Shut the server down (SIGTERM: exit 0; the engine process died: exit 1). The first
        reason wins: an engine that exits on the SIGTERM its server also got is no failure."""
        if not self.stop_requested.is_set():
            self.exit_code = exit_code
            self.stop_at = time.monotonic()
        self.stopping = True
        self.stop_requested.set()

    def shutdown_left(self, timeout_s: float) -> float:
        """Seconds left of a shutdown bounded by `timeout_s` from the stop request (all of it if
        none was requested: a test's app closing)."""
        return timeout_s if self.stop_at is None else timeout_s - (time.monotonic() - self.stop_at)


CONFIG = web.AppKey("config", KvgateConfig)
ENGINE = web.AppKey("engine", Engines)   # one engine process, or replicas
PROMPTS = web.AppKey("prompts", Prompts)         # tokenizer and chat template, in this process
TOKEN_TEXT = web.AppKey("token_text", TokenText)  # token ids as logprobs show them
TOOL_PARSER = web.AppKey("tool_parser", str)      # how replies carry tool calls ("": no tools)
METRICS = web.AppKey("metrics", Metrics)
STATE = web.AppKey("state", ServerState)
TIERS = web.AppKey("tiers", list[TierReport])   # what each KV tier got at start-up
RESPONSES = web.AppKey("responses", ResponseStore)   # stored responses of /v1/responses
# request key: the TenantConfig, or None without tenants (aiohttp < 3.14 has no RequestKey)
TENANT = web.RequestKey("tenant", object) if hasattr(web, "RequestKey") else "kvgate.tenant"
