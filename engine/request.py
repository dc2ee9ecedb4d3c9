"""A request as the engine takes it: built once by the API side, carried across the pipe to the
engine process or the Ray handle to a replica (`to_wire` / `from_wire`), taken by
`Engine.submit`. Adding a request field is a change here, to the HTTP schema, and to the place
that reads it."""
from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.errors import InvalidRequest
from engine.sampling import SamplingParams
from engine.sequence import Retention


@dataclass(frozen=True)
class Request:
    prompt_ids: Sequence[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    priority: int = 0
    namespace: str = ""               # the tenant's cache: no hit crosses it (store/keys.py)
    cache_salt: str = ""              # narrows the namespace (vLLM's cache_salt)
    cache_report: bool = False        # add why the prompt hit or missed the cache to the last output
    retention: Retention | None = None
    prompt_cache_key: str = ""        # OpenAI's routing hint; carried, not used by the engine

    @property
    def cache_namespace(self) -> str:
        """The namespace the request's blocks are cached under: the tenant's, narrowed by its
        salt. The one place this rule lives (the engine's scope, the replica router's keys)."""
        return f"{self.namespace}\0{self.cache_salt}" if self.cache_salt else self.namespace

    def to_wire(self) -> dict:
        """As plain values (msgpack, or Ray's serialization)."""
        return {"request_id": self.request_id, "prompt_ids": list(self.prompt_ids),
                "params": {f.name: getattr(self.params, f.name) for f in dataclasses.fields(self.params) if f.init},
                "priority": self.priority, "namespace": self.namespace, "cache_salt": self.cache_salt,
                "cache_report": self.cache_report, "prompt_cache_key": self.prompt_cache_key,
                "retention": None if self.retention is None else dataclasses.astuple(self.retention)}

    @classmethod
    def from_wire(cls, values: dict) -> Request:
        """The request `to_wire` wrote; the sampling parameters are validated again (raises
        InvalidRequest), the rest by `Engine.submit`."""
        try:
            retention = values["retention"]
            return cls(values["prompt_ids"], SamplingParams(**values["params"]), values["request_id"],
                       values["priority"], values["namespace"], values["cache_salt"], values["cache_report"],
                       None if retention is None else Retention(*retention), values["prompt_cache_key"])
        except (KeyError, TypeError) as e:
            raise InvalidRequest(f"malformed request: {e}") from None
