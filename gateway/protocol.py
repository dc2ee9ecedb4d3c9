"""The OpenAI wire format: request schemas (validated with pydantic) and response builders.

Every field is honoured or refused with a 400 that names it; nothing that would change the
output is silently ignored (docs/api.md, "Request fields"):
- fields kvgate implements, with wrong types rejected (strict: "5" is not an int) and every
  number bounded by the limits the engine enforces (engine/limits.py);
- OpenAI fields that do not change the output (`user`, `metadata`, `store`, `service_tier`):
  accepted;
- OpenAI fields kvgate does not implement (`REFUSED`): accepted only at their no-op value
  (`response_format: {"type": "text"}`, `tool_choice: "auto"`, ...), else 400;
- any other field: 400, as OpenAI answers it.
kvgate's extensions: `priority` (int, higher = more urgent), `ignore_eos`, `top_k`,
`stop_token_ids`, `return_token_ids`, `cache_report`, `retention`; vLLM's `cache_salt`.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
)

from engine import limits
from engine.errors import InvalidRequest
from engine.sequence import Retention
from store import Tier

Number = StrictInt | StrictFloat
TokenId = Annotated[StrictInt, Field(ge=0, le=limits.TOKEN_ID_MAX)]
DEFAULT_COMPLETION_TOKENS = 16      # OpenAI's default for /v1/completions


def _no_op(value: Any) -> bool:
    """The value a client sends for a field it does not use."""
    return value in (None, False, 0, "", [], {}, {"type": "text"}, {"format": {"type": "text"}}, "none", "auto")


class _Refusing(BaseModel):
    """Fields of OpenAI's that kvgate does not implement (REFUSED): accepted at their no-op value
    only; `refused()` names the first one sent with another (intake.parse answers it with a 400)."""
    model_config = ConfigDict(extra="forbid")
    REFUSED: ClassVar[tuple[str, ...]] = ()

    def refused(self) -> str | None:
        return next((name for name in self.REFUSED if not _no_op(getattr(self, name))), None)


class RetentionRequest(BaseModel):
    """kvgate's `retention`: keep the prompt's blocks (those wholly in tokens [start, end)) at
    `priority` for `duration_s`, then let them fall back (engine.sequence.Retention)."""
    model_config = ConfigDict(extra="forbid")
    priority: Annotated[StrictInt, Field(ge=limits.PRIORITY_MIN, le=limits.PRIORITY_MAX)]
    duration_s: Annotated[Number, Field(gt=0, le=limits.RETENTION_MAX_S)]
    start: Annotated[StrictInt, Field(ge=0)] = 0
    end: Annotated[StrictInt, Field(ge=0)] | None = None

    @field_validator("end")
    @classmethod
    def _after_start(cls, end: int | None, info: ValidationInfo) -> int | None:
        start = info.data.get("start", 0)
        if end is not None and end <= start:
            raise ValueError(f"must be after start ({start}): the range [start, end) would retain nothing")
        return end

    def to_engine(self) -> Retention:
        return Retention(self.priority, float(self.duration_s), self.start, self.end)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _Common(_Refusing):
    REFUSED = ("response_format", "best_of", "suffix", "tool_choice", "functions", "function_call",
               "modalities", "audio", "prediction", "reasoning_effort", "web_search_options")
    model: StrictStr
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[Number, Field(ge=0, le=limits.TEMPERATURE_MAX)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    n: Annotated[StrictInt, Field(ge=1, le=limits.N_MAX)] = 1
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=limits.STOP_MAX)] | None = None
    seed: Annotated[StrictInt, Field(ge=limits.SEED_MIN, le=limits.SEED_MAX)] | None = None
    # no effect on the output: accepted
    user: StrictStr | None = None
    metadata: dict | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    parallel_tool_calls: StrictBool | None = None   # with tools: false keeps the first call
    # not implemented: accepted at their no-op value only (REFUSED)
    response_format: Any = None
    best_of: Any = None
    suffix: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] = 0.0
    logit_bias: Annotated[dict[str, Annotated[Number, Field(ge=-100, le=100)]],
                          Field(max_length=limits.LOGIT_BIAS_MAX)] | None = None
    # vLLM's sampling extensions
    repetition_penalty: Annotated[Number, Field(gt=0, le=limits.REPETITION_PENALTY_MAX)] = 1.0
    min_p: Annotated[Number, Field(ge=0, le=1)] = 0.0
    min_tokens: Annotated[StrictInt, Field(ge=0, le=limits.MAX_TOKENS_MAX)] = 0
    # kvgate extensions
    priority: Annotated[StrictInt, Field(ge=limits.PRIORITY_MIN, le=limits.PRIORITY_MAX)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0, le=limits.TOP_K_MAX)] = 0
    ignore_eos: StrictBool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=limits.STOP_TOKEN_IDS_MAX)] | None = None
    return_token_ids: StrictBool = False     # add each choice's generated token ids
    # vLLM's: a cache of its own within the tenant's (only requests with the same salt share blocks)
    cache_salt: Annotated[StrictStr, Field(min_length=1, max_length=256)] | None = None
    cache_report: StrictBool = False         # add why the prompt hit or missed the cache (docs/api.md)
    retention: RetentionRequest | None = None    # keep the prompt's blocks warm for a while
    # OpenAI's hint for requests that share a prefix: a routing affinity between replicas,
    # recorded in the cache report on one engine
    prompt_cache_key: Annotated[StrictStr, Field(max_length=256)] | None = None
    # OpenAI's: "in_memory" (the default) or "24h" (a `retention` of the whole prompt for a day:
    # gateway/views.py `_retention`)
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None

    def logit_biases(self) -> tuple[tuple[int, float], ...]:
        """OpenAI's {"token id": bias} as (id, bias) pairs; a key that is not a token id: 400."""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            # ASCII digits only: str.isdigit() takes "²" and "٣", which int() refuses or reads as a number
            if not (0 < len(key) <= 10 and key.isascii() and key.isdigit()) or int(key) > limits.TOKEN_ID_MAX:
                raise InvalidRequest(f"logit_bias keys must be token ids (decimal digits 0-9), got {key[:32]!r}",
                                     "logit_bias")
            pairs.append((int(key), float(bias)))
        return tuple(pairs)

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def num_sequences(self) -> int:
        """Sequences this request generates: prompts x n."""
        return self.n


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: StrictStr
    text: StrictStr | None = None       # required when type is "text" (checked by the caller)


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    arguments: StrictStr                # a JSON object, as OpenAI sends it


class ToolCallIn(BaseModel):
    """A tool call of an assistant turn in the history."""
    model_config = ConfigDict(extra="forbid")
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: StrictStr | None = None
    parameters: dict | None = None      # a JSON Schema, shown to the model as the template writes it
    strict: StrictBool | None = None    # accepted; the arguments are not constrained to the schema


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class ChatMessage(_Refusing):
    # what an SDK sends back with an assistant turn of the history: accepted when empty
    REFUSED = ("name", "function_call", "audio", "refusal")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: Any = None
    tool_calls: Annotated[list[ToolCallIn], Field(max_length=limits.TOOLS_MAX)] | None = None   # assistant turns
    tool_call_id: StrictStr | None = None                                            # tool turns
    function_call: Any = None
    audio: Any = None
    refusal: Any = None
    annotations: list | None = None


MaxTokens = Annotated[StrictInt, Field(ge=1, le=limits.MAX_TOKENS_MAX)]


Logprobs = Annotated[StrictInt, Field(ge=0, le=limits.LOGPROBS_MAX)]


class ChatCompletionRequest(_Common):
    REFUSED = (*_Common.REFUSED, "echo")           # vLLM's chat extension: not implemented
    messages: Annotated[list[ChatMessage], Field(min_length=1)]

    def refused(self) -> str | None:
        return super().refused() or next((f"messages[{i}].{name}" for i, m in enumerate(self.messages)
                                          if (name := m.refused())), None)
    max_tokens: MaxTokens | None = None                # None: all the room the sequence has left
    max_completion_tokens: MaxTokens | None = None
    tools: Annotated[list[Tool], Field(max_length=limits.TOOLS_MAX)] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Logprobs | None = None
    echo: Any = None

    def check(self) -> None:
        """What no field's own type says (InvalidRequest names the field)."""
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", "top_logprobs")

    def offers_tools(self) -> bool:
        """Are tools offered to the model (sent, and `tool_choice` not "none")?"""
        return bool(self.tools) and self.tool_choice != "none"

    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs: the most likely tokens to return per token, None for none."""
        return (self.top_logprobs or 0) if self.logprobs else None


TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(_Common):
    # a text, token ids, a batch of texts, or a batch of token-id lists
    prompt: StrictStr | TokenIds | Annotated[list[StrictStr], Field(min_length=1)] | \
        Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: MaxTokens | None = DEFAULT_COMPLETION_TOKENS
    logprobs: Logprobs | None = None
    echo: StrictBool = False                  # the prompt's text before the completion's

    def check(self) -> None:
        """What no field's own type says (InvalidRequest names the field)."""
        if self.echo and self.logprobs is not None:     # the prompt's own logprobs: not computed
            raise InvalidRequest("echo with logprobs (the prompt's logprobs) is not supported", "echo")

    def num_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("max_tokens")
    @classmethod
    def _null_is_the_default(cls, v: int | None) -> int:
        return DEFAULT_COMPLETION_TOKENS if v is None else v

    def num_sequences(self) -> int:
        batch = isinstance(self.prompt, list) and isinstance(self.prompt[0], (str, list))
        return (len(self.prompt) if batch else 1) * self.n


class InputContent(BaseModel):
    """A text part of a Responses input message (an assistant turn of the history sends output_text)."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["input_text", "output_text"]
    text: StrictStr
    annotations: list | None = None


class InputMessage(BaseModel):
    """One message of a Responses `input` list: text only (images, files and tool outputs: 400)."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: StrictStr | list[InputContent]
    id: StrictStr | None = None
    status: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseTool(BaseModel):
    """A function the model may call, in the Responses API's flat shape (built-in tools: 400)."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: StrictStr | None = None
    parameters: dict | None = None
    strict: StrictBool | None = None

    def for_template(self) -> dict:
        """As chat's `tools` give it to the chat template."""
        function = {"name": self.name, "parameters": self.parameters or {"type": "object", "properties": {}}}
        return {"type": "function", "function": {**function, **({"description": self.description}
                                                                 if self.description else {})}}


class FunctionCallItem(BaseModel):
    """A call the model made, sent back in a later request's `input` (without store)."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["function_call"]
    call_id: StrictStr
    name: StrictStr
    arguments: StrictStr
    id: StrictStr | None = None
    status: StrictStr | None = None


class FunctionCallOutputItem(BaseModel):
    """What a call returned: a `tool` turn of the conversation."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["function_call_output"]
    call_id: StrictStr
    output: StrictStr
    id: StrictStr | None = None
    status: StrictStr | None = None


class ResponsesRequest(_Refusing):
    """OpenAI's POST /v1/responses, for text and function calls (gateway/responses.py)."""
    REFUSED = ("background", "include", "reasoning", "tool_choice", "conversation", "prompt",
               "top_logprobs", "max_tool_calls", "text")
    model: StrictStr
    input: StrictStr | Annotated[list[InputMessage | FunctionCallItem | FunctionCallOutputItem], Field(min_length=1)]
    tools: Annotated[list[ResponseTool], Field(max_length=limits.TOOLS_MAX)] | None = None
    instructions: StrictStr | None = None
    previous_response_id: Annotated[StrictStr, Field(max_length=128)] | None = None
    store: StrictBool = True
    stream: StrictBool = False
    max_output_tokens: MaxTokens | None = None       # None: all the room the conversation leaves
    temperature: Annotated[Number, Field(ge=0, le=limits.TEMPERATURE_MAX)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    truncation: Literal["disabled"] = "disabled"       # "auto" (dropping old turns): not implemented
    prompt_cache_key: Annotated[StrictStr, Field(max_length=256)] | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    # no effect on the output: accepted
    user: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    metadata: dict[str, StrictStr] | None = None
    service_tier: StrictStr | None = None
    parallel_tool_calls: StrictBool | None = None
    # not implemented: accepted at their no-op value only (REFUSED)
    background: Any = None
    include: Any = None
    reasoning: Any = None
    tool_choice: Any = None                  # "auto" and "none" only
    conversation: Any = None
    prompt: Any = None
    top_logprobs: Any = None
    max_tool_calls: Any = None
    text: Any = None

    def offers_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def messages(self) -> list[dict]:
        """The new turn as chat-template messages: a call the model made is an assistant turn's
        tool call (consecutive calls in one turn), its output a `tool` turn."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        out: list[dict] = []
        for i, item in enumerate(self.input):
            if isinstance(item, InputMessage):
                out.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallOutputItem):
                out.append({"role": "tool", "content": item.output, "tool_call_id": item.call_id})
            elif (turn := assistant_call(item.call_id, item.name, item.arguments, f"input[{i}].arguments", out)):
                out.append(turn)
        return out


def assistant_call(call_id: str, name: str, arguments: str, param: str, turns: list[dict]) -> dict | None:
    """A tool call as the chat template takes it, added to the assistant turn that ends `turns`
    if it is one of calls (None then), else a new assistant turn. InvalidRequest naming `param`
    for arguments that are not a JSON object."""
    try:
        parsed = json.loads(arguments)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise InvalidRequest("function call arguments must be a JSON object", param)
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": parsed}}
    if turns and turns[-1]["role"] == "assistant" and "tool_calls" in turns[-1]:
        turns[-1]["tool_calls"].append(call)
        return None
    return {"role": "assistant", "content": "", "tool_calls": [call]}


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


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a completion `prompt`, or chat `messages` rendered with the chat
    template ready for the assistant's turn (what /v1/chat/completions would compute)."""
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None         # optional, as vLLM takes it; if sent, this server's model
    prompt: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    tools: Annotated[list[Tool], Field(max_length=limits.TOOLS_MAX)] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    tokens: Annotated[list[TokenId], Field(max_length=1 << 20)]
