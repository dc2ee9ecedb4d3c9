"""What the engine process (or a Ray replica) needs of kvgate's configuration: `ServingConfig`,
built by the API process from the configuration file (gateway/config.py,
`KvgateConfig.serving`) and sent to the engine side whole. The sections defined here are the
file's `[store.*]` and `[kv_events]` tables; `[model]` and `[engine]` are engine/config.py's.
Errors name the key and say what is allowed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from zmq.utils.z85 import decode as z85_decode

from engine.config import EngineConfig, ModelConfig
from engine.fairness import TenantShare
from store.config import WRITE_POLICIES

PERSIST_SHARE = 0.7        # of a stop's time, what the engine may spend choosing and copying blocks
                           # to persist (a stop's persist_s); the rest writes what it queued, syncs, exits


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


@dataclass(frozen=True)
class GpuTierConfig:
    num_blocks: int = 0            # 0 = from memory_fraction on CUDA, 2048 on the CPU
    memory_fraction: float = 0.85  # of the GPU memory free after loading the model

    def __post_init__(self) -> None:
        require(self.num_blocks >= 0, "store.gpu.num_blocks", "an int >= 0 (0 = automatic)")
        require(0.0 < self.memory_fraction <= 0.98, "store.gpu.memory_fraction", "a float in (0, 0.98]")


@dataclass(frozen=True)
class HostTierConfig:
    enabled: bool = True           # false = no host tier
    num_blocks: int = 0            # 0 = automatic: memory_fraction of the available memory
    memory_fraction: float = 0.2   # of the memory available at start-up (automatic size only)

    def __post_init__(self) -> None:
        require(self.num_blocks >= 0, "store.host.num_blocks", "an int >= 0 (0 = automatic)")
        require(0.0 < self.memory_fraction <= 0.9, "store.host.memory_fraction", "a float in (0, 0.9]")


@dataclass(frozen=True)
class DiskTierConfig:
    enabled: bool = True           # false = no disk tier
    path: str = ""                 # "" = the user cache directory, one tier per model fingerprint
    max_bytes: int = 0             # 0 = automatic: free_space_fraction of the free space
    free_space_fraction: float = 0.25   # of the free space at start-up (automatic size only)
    write_policy: str = "auto"    # which blocks leaving the GPU are written (docs/store.md)
    staging_bytes: int = 512 << 20   # pinned memory of the tier's own: reads in flight, spilled writes

    def __post_init__(self) -> None:
        require(self.max_bytes >= 0, "store.disk.max_bytes", "an int >= 0 (0 = automatic)")
        require(0.0 < self.free_space_fraction <= 0.9, "store.disk.free_space_fraction",
                 "a float in (0, 0.9]")
        require(self.staging_bytes > 0, "store.disk.staging_bytes", "an int > 0")
        require(self.write_policy in WRITE_POLICIES, "store.disk.write_policy",
                 f"one of {', '.join(WRITE_POLICIES)}")
        require(self.enabled or not self.path, "store.disk.path",
                 "unset when store.disk.enabled = false (or enable the tier)")


@dataclass(frozen=True)
class StoreTiers:
    gpu: GpuTierConfig = field(default_factory=GpuTierConfig)
    host: HostTierConfig = field(default_factory=HostTierConfig)
    disk: DiskTierConfig = field(default_factory=DiskTierConfig)


@dataclass(frozen=True)
class KvEventsConfig:
    """KV events in vLLM's wire format for KV-aware routers (engine/serving/kv_events.py). They carry
    every tenant's token ids: loopback by default; beyond it, CURVE-authenticated subscribers
    only, unless `allow_unauthenticated` (docs/scale-out.md, "Security")."""
    enabled: bool = False
    endpoint: str = "tcp://127.0.0.1:5557"         # the PUB socket, bound
    replay_endpoint: str = "tcp://127.0.0.1:5558"  # the ROUTER socket for replays, bound; "" = none
    buffer_steps: int = 10_000            # batches kept for replay
    hwm: int = 100_000                    # batches queued per subscriber before it loses some
    topic: str = ""
    curve_secret_key: str = ""            # this server's CURVE secret key (Z85, 40 characters), or ...
    curve_secret_key_env: str = ""        # ... the environment variable that holds it
    curve_client_keys: str = ""           # the subscribers' CURVE public keys (Z85), space-separated
    allow_unauthenticated: bool = False   # bind beyond loopback with no authentication (a warning)

    def __post_init__(self) -> None:
        for key in ("endpoint", "replay_endpoint"):
            value = getattr(self, key)
            require(not value or value.split("://")[0] in ("tcp", "ipc", "inproc"), f"kv_events.{key}",
                     "a ZMQ endpoint (tcp://, ipc:// or inproc://)")
        require(bool(self.endpoint), "kv_events.endpoint", "a ZMQ endpoint")
        require(self.buffer_steps >= 1 and self.hwm >= 1, "kv_events.buffer_steps",
                 ">= 1, and so must kv_events.hwm")
        require(not (self.curve_secret_key and self.curve_secret_key_env), "kv_events.curve_secret_key",
                 "unset when kv_events.curve_secret_key_env is set (one of them)")
        check_env("kv_events.curve_secret_key_env", self.curve_secret_key_env)
        secret = self.secret_key
        require(not secret or _is_z85_key(secret), "kv_events.curve_secret_key",
                 "a Z85 CURVE key of 40 characters (`kvgate keygen` makes a pair)")
        clients = self.client_keys
        require(all(_is_z85_key(k) for k in clients), "kv_events.curve_client_keys",
                 "Z85 CURVE public keys of 40 characters, separated by spaces")
        require(bool(clients) == bool(secret), "kv_events.curve_client_keys",
                 "set together with kv_events.curve_secret_key: the subscribers allowed to connect")
        if not self.enabled or secret or self.allow_unauthenticated:
            return
        for key in ("endpoint", "replay_endpoint"):
            require(is_local_endpoint(getattr(self, key)), f"kv_events.{key}",
                     "a loopback, ipc:// or inproc:// endpoint: the events carry every tenant's token ids. "
                     "To publish beyond this machine, set kv_events.curve_secret_key and curve_client_keys "
                     "(or, on a network you trust, kv_events.allow_unauthenticated = true)")

    @property
    def secret_key(self) -> str:
        """The CURVE secret key, "" for none."""
        return self.curve_secret_key or (os.environ[self.curve_secret_key_env] if self.curve_secret_key_env else "")

    @property
    def client_keys(self) -> list[str]:
        return self.curve_client_keys.replace(",", " ").split()


def is_local_endpoint(endpoint: str) -> bool:
    """Does binding `endpoint` keep it on this machine? ipc:// and inproc:// do, and tcp:// on a
    loopback address; "" (no endpoint) does. `*`, 0.0.0.0, an interface or another address do not."""
    scheme, _, rest = endpoint.partition("://")
    if not endpoint or scheme in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host == "::1" or host.startswith("127.")


def _is_z85_key(key: str) -> bool:
    try:
        return len(key) == 40 and len(z85_decode(key)) == 32
    except (ValueError, KeyError):          # a character outside Z85's alphabet
        return False


@dataclass(frozen=True)
class PublicPrefixConfig:
    """A prefix every tenant's requests share the cache of (docs/configuration.md)."""
    text: str = ""                 # a text, tokenized as a completions prompt is, or ...
    system: str = ""               # ... a chat's system message, rendered by the chat template

    def __post_init__(self) -> None:
        require(bool(self.text) != bool(self.system), "public_prefixes", "tables with exactly one of text and system")


@dataclass(frozen=True)
class ServingConfig:
    """One engine's configuration, as its process or replica opens it (engine/serving/shell.py)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    store: StoreTiers = field(default_factory=StoreTiers)
    kv_events: KvEventsConfig = field(default_factory=KvEventsConfig)
    tenants: tuple[tuple[str, TenantShare], ...] = ()     # (name, share): the engine's fair shares
    public_prefixes: tuple[PublicPrefixConfig, ...] = ()  # declared by a replica as it starts
    persist_s: float = 0.0                 # a stop's time for writing the cache to the disk tier


def check_env(key: str, variable: str) -> None:
    if variable and not os.environ.get(variable):
        raise ConfigError(f"{key}: environment variable {variable!r} is not set or empty")


def require(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {what}")
