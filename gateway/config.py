"""The configuration file: one TOML document, validated at start-up into frozen dataclasses.

Sections and keys are those of configs/default.toml. Unknown keys, wrong types and bad values
are errors that name the key and say what is allowed. `--set section.key=value` overrides any
key; the value is read as TOML (`--set server.port=9000`, `--set model.path='"/models/x"'`),
and a value that is not valid TOML is taken as a string (`--set model.path=/models/x`).
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from engine.config import EngineConfig, ModelConfig


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_concurrent_requests: int = 256     # past it: 429 with Retry-After
    max_body_bytes: int = 8 << 20          # past it: 413

    def __post_init__(self) -> None:
        _require(0 < self.port < 65536, "server.port", "an int in 1..65535")
        _require(self.max_concurrent_requests >= 1, "server.max_concurrent_requests", "an int >= 1")
        _require(self.max_body_bytes >= 1024, "server.max_body_bytes", "an int >= 1024")


@dataclass(frozen=True)
class GpuTierConfig:
    num_blocks: int = 0            # 0 = from memory_fraction on CUDA, 2048 on the CPU
    memory_fraction: float = 0.85  # of the GPU memory free after loading the model

    def __post_init__(self) -> None:
        _require(self.num_blocks >= 0, "store.gpu.num_blocks", "an int >= 0 (0 = automatic)")
        _require(0.0 < self.memory_fraction <= 0.98, "store.gpu.memory_fraction", "a float in (0, 0.98]")


@dataclass(frozen=True)
class HostTierConfig:
    num_blocks: int = 0            # 0 = no host tier

    def __post_init__(self) -> None:
        _require(self.num_blocks >= 0, "store.host.num_blocks", "an int >= 0 (0 = no host tier)")


@dataclass(frozen=True)
class DiskTierConfig:
    path: str = ""                 # "" = no disk tier
    max_bytes: int = 0

    def __post_init__(self) -> None:
        _require(not self.path or self.max_bytes > 0, "store.disk.max_bytes",
                 "an int > 0 when store.disk.path is set")


@dataclass(frozen=True)
class TenantConfig:
    name: str
    api_key: str = ""              # the key itself, or ...
    api_key_env: str = ""          # ... the environment variable that holds it
    priority: int = 0              # default priority of this tenant's requests

    def __post_init__(self) -> None:
        _require(bool(self.name), "tenants.name", "a non-empty string")
        _require(bool(self.api_key) != bool(self.api_key_env), f"tenants[{self.name}]",
                 "exactly one of api_key and api_key_env")
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise ConfigError(f"tenants[{self.name}].api_key_env: environment variable "
                              f"{self.api_key_env!r} is not set or empty")

    @property
    def key(self) -> str:
        return self.api_key or os.environ[self.api_key_env]


@dataclass(frozen=True)
class StoreTiers:
    gpu: GpuTierConfig = field(default_factory=GpuTierConfig)
    host: HostTierConfig = field(default_factory=HostTierConfig)
    disk: DiskTierConfig = field(default_factory=DiskTierConfig)


@dataclass(frozen=True)
class KvgateConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    store: StoreTiers = field(default_factory=StoreTiers)
    tenants: tuple[TenantConfig, ...] = ()

    def __post_init__(self) -> None:
        names = [t.name for t in self.tenants]
        _require(len(set(names)) == len(names), "tenants", "tenants with distinct names")
        keys = [t.key for t in self.tenants]
        _require(len(set(keys)) == len(keys), "tenants", "tenants with distinct api keys")
        _require(not self.store.disk.path or self.store.host.num_blocks > 0, "store.host.num_blocks",
                 "> 0 when store.disk.path is set (disk reads are staged through the host tier; give it "
                 "at least the blocks of the longest prefix you want back from disk)")


SECTIONS = {"server": ServerConfig, "model": ModelConfig, "engine": EngineConfig,
            "store.gpu": GpuTierConfig, "store.host": HostTierConfig, "store.disk": DiskTierConfig}


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
    store = doc.pop("store", {})
    tenants = doc.pop("tenants", [])
    if not isinstance(store, dict):
        raise ConfigError("store: must be a table with gpu, host and disk sub-tables")
    for name in list(doc) + [f"store.{k}" for k in store]:
        if name not in SECTIONS:
            raise ConfigError(f"unknown section [{name}]; sections are "
                              f"{', '.join(sorted(SECTIONS))} and [[tenants]]")
    if not isinstance(tenants, list):
        raise ConfigError("tenants: must be an array of tables ([[tenants]])")
    try:
        return KvgateConfig(
            server=_section("server", doc.get("server", {})),
            model=_section("model", doc.get("model", {})),
            engine=_section("engine", doc.get("engine", {})),
            store=StoreTiers(*(_section(f"store.{t}", store.get(t, {})) for t in ("gpu", "host", "disk"))),
            tenants=tuple(_section("tenants", t, TenantConfig) for t in tenants))
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
            raise ConfigError(f"unknown key {name}.{key}; allowed: {', '.join(sorted(fields))}")
        expected = _python_type(fields[key])
        if not _has_type(value, expected):
            raise ConfigError(f"{name}.{key} must be {expected.__name__}, got {type(value).__name__} "
                              f"{value!r}")
    return cls(**values)


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


def _require(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {what}")
