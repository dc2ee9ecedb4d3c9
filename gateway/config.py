"""The configuration file: one TOML document, validated at start-up into frozen dataclasses.

Sections and keys are those of configs/default.toml. Unknown keys, wrong types and bad values
are errors that name the key and say what is allowed. `--set section.key=value` overrides any
key; the value is read as TOML (`--set server.port=9000`, `--set model.path='"/models/x"'`),
and a value that is not valid TOML is taken as a string (`--set model.path=/models/x`).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from engine import limits
from engine.config import EngineConfig, ModelConfig, user_cache_dir
from engine.fairness import TenantShare
from engine.serving.config import (PERSIST_SHARE, ConfigError, DiskTierConfig, GpuTierConfig,  # noqa: F401
                                   HostTierConfig, KvEventsConfig, PublicPrefixConfig, ServingConfig,
                                   StoreTiers, check_env, require)


# A waiting request's prompt as the two processes hold it (lists of Python ints, the request, the
# sequence): about this many bytes a token; the automatic admission limit keeps them within
# QUEUED_PROMPT_BYTES
BYTES_PER_QUEUED_TOKEN = 64
QUEUED_PROMPT_BYTES = 1 << 30


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_concurrent_sequences: int = 0      # sequences taken at once (prompts x n), running or queued;
                                           # past it: 429. 0 = what the engine can keep waiting (docs)
    max_sequences_per_request: int = 0     # prompts x n of one request; past it: 400. 0 = 64 (at most
                                           # the admission limit)
    max_body_bytes: int = 8 << 20          # past it: 413
    max_response_bytes: int = 16 << 20     # the most a response may grow to (tokens x logprobs); past it: 400
    body_timeout_s: float = 30.0           # a request body must arrive within this; else 408
    write_timeout_s: float = 60.0          # a client that takes none of the response this long
                                           # is disconnected and its request aborted
    heartbeat_timeout_s: float = 10.0      # an engine silent this long is frozen: /health and requests 503
    shutdown_timeout_s: float = 25.0       # SIGTERM to exit, persisting what fits (a 30 s grace period)
    admin_api_key: str = ""                # guards /metrics (which it always does with tenants)
    admin_api_key_env: str = ""            # ... or the environment variable that holds it

    def __post_init__(self) -> None:
        require(0 < self.port < 65536, "server.port", "an int in 1..65535")
        require(self.max_concurrent_sequences >= 0, "server.max_concurrent_sequences", "an int >= 0 (0 = automatic)")
        require(self.max_sequences_per_request >= 0 and not (
                     self.max_concurrent_sequences and self.max_sequences_per_request > self.max_concurrent_sequences),
                 "server.max_sequences_per_request", "an int in 1..server.max_concurrent_sequences (0 = automatic)")
        require(self.max_body_bytes >= 1024, "server.max_body_bytes", "an int >= 1024")
        require(self.max_response_bytes >= 1 << 16, "server.max_response_bytes", "an int >= 65536")
        require(self.body_timeout_s > 0, "server.body_timeout_s", "a number of seconds > 0")
        require(self.write_timeout_s > 0, "server.write_timeout_s", "a number of seconds > 0")
        require(self.heartbeat_timeout_s >= 1, "server.heartbeat_timeout_s", "a number of seconds >= 1")
        require(self.shutdown_timeout_s >= 2, "server.shutdown_timeout_s", "a number of seconds >= 2")
        require(not (self.admin_api_key and self.admin_api_key_env), "server.admin_api_key",
                 "unset when server.admin_api_key_env is set (one of them)")
        check_env("server.admin_api_key_env", self.admin_api_key_env)

    def admission_limits(self, max_model_len: int, max_num_seqs: int) -> tuple[int, int]:
        """(sequences taken at once, sequences of one request) once the engine is known. The
        automatic limit queues a burst rather than refusing it: the engine's running batch plus
        what QUEUED_PROMPT_BYTES of waiting prompts at the context length hold."""
        concurrent = self.max_concurrent_sequences or max(
            256, max_num_seqs + min(4096, QUEUED_PROMPT_BYTES // (max_model_len * BYTES_PER_QUEUED_TOKEN)))
        return concurrent, self.max_sequences_per_request or min(64, concurrent)

    @property
    def admin_key(self) -> str:
        """The admin API key, "" if none is configured."""
        return self.admin_api_key or (os.environ[self.admin_api_key_env] if self.admin_api_key_env else "")


@dataclass(frozen=True)
class TenantConfig:
    name: str
    api_key: str = ""              # the key itself, or ...
    api_key_env: str = ""          # ... the environment variable that holds it
    priority: int = 0              # default priority of this tenant's requests
    max_priority: int | None = None  # the highest priority its requests may ask for; = priority
    weight: float = 1.0            # its share of the engine, relative to the other tenants' weights
    max_running: int = 0           # most sequences it may have running at once; 0 = no cap
    max_kv_share: float = 1.0      # above this share of the GPU KV pool, its cached blocks go first
    max_retention_s: float = 3600.0  # the longest `retention` its requests may ask for (0: none)

    def __post_init__(self) -> None:
        require(bool(self.name) and "\0" not in self.name, "tenants.name", "a non-empty string without NUL")
        require(bool(self.api_key) != bool(self.api_key_env), f"tenants[{self.name}]",
                 "exactly one of api_key and api_key_env")
        check_env(f"tenants[{self.name}].api_key_env", self.api_key_env)
        if self.max_priority is None:
            object.__setattr__(self, "max_priority", self.priority)
        for key in ("priority", "max_priority"):
            require(limits.PRIORITY_MIN <= getattr(self, key) <= limits.PRIORITY_MAX,
                     f"tenants[{self.name}].{key}", f"an int in [{limits.PRIORITY_MIN}, {limits.PRIORITY_MAX}]")
        require(self.priority <= self.max_priority, f"tenants[{self.name}].max_priority",
                 f">= its priority ({self.priority})")
        require(isinstance(self.weight, (int, float)) and 0 < self.weight <= 1e6, f"tenants[{self.name}].weight",
                 "a number in (0, 1e6]")
        require(self.max_running >= 0, f"tenants[{self.name}].max_running", ">= 0 (0 = no cap)")
        require(isinstance(self.max_kv_share, (int, float)) and 0 < self.max_kv_share <= 1,
                 f"tenants[{self.name}].max_kv_share", "a number in (0, 1]")
        require(isinstance(self.max_retention_s, (int, float)) and 0 <= self.max_retention_s <= limits.RETENTION_MAX_S,
                 f"tenants[{self.name}].max_retention_s", f"a number in [0, {limits.RETENTION_MAX_S:g}]")

    def share(self) -> TenantShare:
        return TenantShare(float(self.weight), self.max_running, float(self.max_kv_share))

    @property
    def key(self) -> str:
        return self.api_key or os.environ[self.api_key_env]


@dataclass(frozen=True)
class ReplicasConfig:
    """kvgate replicas on Ray Serve (gateway/engines/replicas.py; docs/scale-out.md)."""
    num_replicas: int = 0                 # 0: one engine process, no Ray; N: N replicas on Ray Serve
    max_replicas: int = 0                 # above num_replicas: autoscale between the two
    target_ongoing_requests: float = 64.0  # autoscaling's target of requests per replica
    max_ongoing_requests: int = 256       # requests one replica takes at once
    num_gpus: float = -1.0                # GPUs per replica; -1 = 1 with CUDA, else 0
    num_cpus: float = 1.0                 # CPUs per replica (fractions allowed)
    router: str = "prefix"                # "prefix" (by cached prefix) or "default" (Ray's)
    imbalance: int = 16                   # the prefix router's load imbalance threshold
    ray_address: str = ""                 # a Ray cluster to join; "" = RAY_ADDRESS or a local one

    def __post_init__(self) -> None:
        require(self.num_replicas >= 0, "replicas.num_replicas", ">= 0 (0 = no Ray)")
        require(self.max_replicas == 0 or self.max_replicas >= self.num_replicas >= 1, "replicas.max_replicas",
                 "0 (no autoscaling) or >= replicas.num_replicas >= 1")
        require(self.target_ongoing_requests > 0 and self.max_ongoing_requests >= 1,
                 "replicas.target_ongoing_requests", "> 0, and replicas.max_ongoing_requests >= 1")
        require(self.num_gpus == -1 or self.num_gpus >= 0, "replicas.num_gpus", "-1 (automatic) or >= 0")
        require(self.num_cpus >= 0, "replicas.num_cpus", ">= 0")
        require(self.router in ("prefix", "default"), "replicas.router", "one of prefix, default")
        require(self.imbalance >= 0, "replicas.imbalance", ">= 0")


@dataclass(frozen=True)
class ResponsesConfig:
    """Stored responses of /v1/responses (gateway/responses.py)."""
    path: str = ""                 # the SQLite file; "" = responses.sqlite3 in the user cache directory
    max_per_tenant: int = 10_000   # stored responses kept per tenant; past it the oldest go
    retention_s: float = 3600.0    # a stored conversation's prompt blocks kept warm this long (0: not);
                                   # at most the tenant's max_retention_s

    def __post_init__(self) -> None:
        require(self.max_per_tenant >= 1, "responses.max_per_tenant", "an int >= 1")
        require(0 <= self.retention_s <= limits.RETENTION_MAX_S, "responses.retention_s",
                f"a number of seconds in [0, {limits.RETENTION_MAX_S:g}]")

    def store_path(self) -> str:
        return self.path or os.path.join(user_cache_dir(), "kvgate", "responses.sqlite3")


@dataclass(frozen=True)
class KvgateConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    store: StoreTiers = field(default_factory=StoreTiers)
    kv_events: KvEventsConfig = field(default_factory=KvEventsConfig)
    replicas: ReplicasConfig = field(default_factory=ReplicasConfig)
    responses: ResponsesConfig = field(default_factory=ResponsesConfig)
    tenants: tuple[TenantConfig, ...] = ()
    public_prefixes: tuple[PublicPrefixConfig, ...] = ()

    def __post_init__(self) -> None:
        names = [t.name for t in self.tenants]
        require(len(set(names)) == len(names), "tenants", "tenants with distinct names")
        keys = [t.key for t in self.tenants]
        require(len(set(keys)) == len(keys), "tenants", "tenants with distinct api keys")
        require(not self.server.admin_key or self.server.admin_key not in keys, "server.admin_api_key",
                 "a key no tenant has")

    def serving(self) -> ServingConfig:
        """What the engine side opens: sent to the engine process, or to each Ray replica."""
        return ServingConfig(model=self.model, engine=self.engine, store=self.store, kv_events=self.kv_events,
                             tenants=tuple((t.name, t.share()) for t in self.tenants),
                             public_prefixes=self.public_prefixes,
                             persist_s=self.server.shutdown_timeout_s * PERSIST_SHARE)


ARRAYS = {"tenants": TenantConfig, "public_prefixes": PublicPrefixConfig}   # [[name]] arrays of tables
SECTIONS = {"server": ServerConfig, "model": ModelConfig, "engine": EngineConfig, "kv_events": KvEventsConfig,
            "replicas": ReplicasConfig, "responses": ResponsesConfig, "store.gpu": GpuTierConfig,
            "store.host": HostTierConfig, "store.disk": DiskTierConfig}


def load_config(path: str | None = None, overrides: list[str] = ()) -> KvgateConfig:
    """Read `path` (or nothing: all defaults), apply `section.key=value` overrides, validate."""
    doc: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path!r}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for item in overrides:
        _apply_override(doc, item)
    return build_config(doc)


def build_config(doc: dict[str, Any]) -> KvgateConfig:
    """The configuration of a parsed TOML document (`doc` is left as it was)."""
    doc = dict(doc)
    store = doc.pop("store", {})
    tables = {name: doc.pop(name, []) for name in ARRAYS}
    if not isinstance(store, dict):
        raise ConfigError("store: must be a table with gpu, host and disk sub-tables")
    for name in list(doc) + [f"store.{k}" for k in store]:
        if name not in SECTIONS:
            guess = _did_you_mean(name, [*SECTIONS, *ARRAYS, "store"])
            raise ConfigError(f"unknown section [{name}]{guess}; sections are "
                              f"{', '.join(sorted(SECTIONS))}, [[tenants]] and [[public_prefixes]]")
    for name, items in tables.items():
        if not isinstance(items, list):
            raise ConfigError(f"{name}: must be an array of tables ([[{name}]])")
    try:
        return KvgateConfig(
            server=_section("server", doc.get("server", {})),
            model=_section("model", doc.get("model", {})),
            engine=_section("engine", doc.get("engine", {})),
            kv_events=_section("kv_events", doc.get("kv_events", {})),
            replicas=_section("replicas", doc.get("replicas", {})),
            responses=_section("responses", doc.get("responses", {})),
            store=StoreTiers(*(_section(f"store.{t}", store.get(t, {})) for t in ("gpu", "host", "disk"))),
            **{name: tuple(_section(name, t, cls) for t in tables[name]) for name, cls in ARRAYS.items()})
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:   # raised by the dataclasses' own validation
        raise ConfigError(str(e)) from None


def _section(name: str, values: Any, cls: type | None = None) -> Any:
    cls = cls or SECTIONS[name]
    if not isinstance(values, dict):
        raise ConfigError(f"[{name}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key {name}.{key}{_did_you_mean(key, fields, f'{name}.')}; "
                              f"allowed: {', '.join(sorted(fields))}")
        expected = _python_type(fields[key])
        if not _has_type(value, expected):
            raise ConfigError(f"{name}.{key} must be {expected.__name__}, got {type(value).__name__} "
                              f"{value!r}")
    return cls(**values)


def _did_you_mean(name: str, known, prefix: str = "") -> str:
    """" (did you mean X?)" for the known name closest to a misspelt or renamed one, if one is close."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _python_type(f: dataclasses.Field) -> type:
    annotation = f.type if isinstance(f.type, str) else f.type.__name__
    return {"str": str, "int": int, "float": float, "bool": bool}[annotation.split(" ")[0]]


def _has_type(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _apply_override(doc: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: expected section.key=value (e.g. server.port=9000)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw                        # not TOML: a bare string such as a path
    table = doc
    for part in parts[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise ConfigError(f"--set {item!r}: {part} is not a table")
    table[parts[-1]] = value


