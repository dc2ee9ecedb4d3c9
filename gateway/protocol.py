"""The OpenAI wire format: request schemas (validated with pydantic) and response builders.

Requests: unknown fields are ignored, as OpenAI's API does; known fields with a wrong type are
rejected (strict types: "5" is not an int). kvgate's extensions: `priority` (int, higher = more
urgent), `ignore_eos`, `top_k`, `stop_token_ids`.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from store import Tier

Number = StrictInt | StrictFloat


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    n: Annotated[StrictInt, Field(ge=1, le=16)] = 1
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    logprobs: StrictBool | StrictInt | None = None
    # kvgate extensions
    priority: StrictInt | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] = 0
    ignore_eos: StrictBool = False
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None
    return_token_ids: StrictBool = False     # add each choice's generated token ids

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[dict] | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are rejected by the caller."""
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    tools: list | None = None


class CompletionRequest(_Common):
    prompt: StrictStr | Annotated[list[StrictInt], Field(min_length=1)] | \
        Annotated[list[StrictStr], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = 16
    echo: StrictBool = False


def usage(prompt_tokens: int, completion_tokens: int, cached: dict[Tier, int]) -> dict:
    """OpenAI's usage object, plus the cached tokens per tier (a kvgate extension)."""
    by_tier = {t.name.lower(): n for t, n in cached.items()}
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(cached.values()),
                                      "cached_tokens_by_tier": by_tier}}


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
