"""From a validated OpenAI request to engine submissions, and back.

A request becomes one engine request per choice (each prompt x `n`). All are validated before
any runs; their streams are merged. The handler that submitted them ends them all (aborting the
unfinished) however it leaves: gateway/views.py, `_generate`.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engine import limits
from engine.errors import InvalidRequest
from engine.model import Prompts
from engine.sampling import SamplingParams
from engine.request import Request
from engine.sequence import Logprob, RequestOutput
from gateway.engines import Engines, RemoteStream
from gateway.protocol import ChatCompletionRequest, CompletionRequest


@dataclass
class Choice:
    """One generated sequence of a request, and what the response needs of it."""
    index: int
    prompt: list[int]
    params: SamplingParams
    stream: RemoteStream | None = None
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)   # one per token, if the request asked
    echo: str = ""                      # completions with `echo`: the prompt's text, before the output
    last: RequestOutput | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None


def chat_prompt(req: ChatCompletionRequest, prompts: Prompts) -> list[list[int]]:
    messages = chat_messages(req.messages)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.offers_tools() else None
    prompts.check_text_length(sum(len(m["content"]) for m in messages) + len(json.dumps(tools or [])) +
                              len(json.dumps([m.get("tool_calls") for m in messages])), "messages")
    return [prompts.encode_chat(messages, tools)]


def chat_messages(messages: list) -> list[dict]:
    """The chat template's input: each message's role and its text (content parts joined;
    only text parts are taken); an assistant turn's tool calls, their arguments as objects
    (as templates take them), and a tool turn's call id."""
    out = []
    for i, m in enumerate(messages):
        extra = {}
        if m.tool_calls:
            calls = []
            for j, call in enumerate(m.tool_calls):
                try:
                    arguments = json.loads(call.function.arguments)
                except ValueError:
                    arguments = None
                if not isinstance(arguments, dict):
                    raise InvalidRequest("tool call arguments must be a JSON object",
                                         f"messages[{i}].tool_calls[{j}].function.arguments")
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
            extra["tool_calls"] = calls
        if m.tool_call_id is not None:
            extra["tool_call_id"] = m.tool_call_id
        if isinstance(m.content, list):
            for j, part in enumerate(m.content):
                if part.type != "text":
                    raise InvalidRequest("only text content parts are supported", f"messages[{i}].content[{j}].type")
                if part.text is None:
                    raise InvalidRequest("a text content part needs a string `text`",
                                         f"messages[{i}].content[{j}].text")
            text = "".join(p.text for p in m.content)
        else:
            text = m.content or ""
        out.append({"role": m.role, "content": text, **extra})
    return out


def completion_prompts(req: CompletionRequest, prompts: Prompts) -> list[list[int]]:
    """The prompts' token ids. A completions prompt is the client's own raw text: special-token
    text in it is encoded as special tokens (there is no chat structure to forge)."""
    prompt = req.prompt
    if isinstance(prompt, list) and isinstance(prompt[0], int):
        return [prompt]
    if isinstance(prompt, list) and isinstance(prompt[0], list):
        return prompt
    texts = [prompt] if isinstance(prompt, str) else prompt
    if prompts.tokenizer is None:
        raise InvalidRequest("this model has no tokenizer: send the prompt as token ids", "prompt")
    for t in texts:
        prompts.check_text_length(len(t), "prompt")
    return [prompts.tokenizer.encode(t) for t in texts]


def echo_texts(req: CompletionRequest, prompt_ids: list[list[int]], prompts: Prompts) -> list[str]:
    """Each prompt's text for `echo`: as sent, or its token ids decoded."""
    texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if isinstance(texts[0], str):
        return texts
    if prompts.tokenizer is None:
        raise InvalidRequest("echo needs a tokenizer to show token-id prompts as text; this model has none", "echo")
    return [prompts.tokenizer.decode(ids) for ids in prompt_ids]


def plan(req: ChatCompletionRequest | CompletionRequest, prompts: list[list[int]],
         max_sequence_tokens: int) -> list[Choice]:
    """One Choice per prompt and sample, with its sampling parameters (InvalidRequest names the
    field that is wrong)."""
    choices = []
    for p, prompt in enumerate(prompts):
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if max_tokens is None:                # chat default: all the room the sequence has left
            max_tokens = max(1, max_sequence_tokens - len(prompt))
        for i in range(req.n):
            params = SamplingParams(
                max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                seed=None if req.seed is None else limits.generator_seed(req.seed, i),
                stop=req.stop_strings(), stop_token_ids=tuple(req.stop_token_ids or ()),
                ignore_eos=req.ignore_eos, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
                logit_bias=req.logit_biases(), min_p=req.min_p, min_tokens=req.min_tokens,
                logprobs=req.num_logprobs())
            choices.append(Choice(p * req.n + i, prompt, params))
    return choices


# What a response can cost the API process per generated token, as JSON: its text and id, and
# each logprob entry (token, logprob, bytes) — about 64 bytes on the demo model (docs/reliability.md)
BYTES_PER_TOKEN, BYTES_PER_LOGPROB = 8, 64


def check_response_size(req: ChatCompletionRequest | CompletionRequest, choices: list[Choice], max_bytes: int,
                        max_sequence_tokens: int) -> None:
    """The most a response can grow to — every choice's `max_tokens` (or the room its context
    leaves: a `max_tokens` past it is the engine's context_length_exceeded), each token with its
    logprob entries — must fit `max_bytes` (`server.max_response_bytes`), checked before
    anything runs: a 200-byte request must not make a 40 MB answer. InvalidRequest names the
    field."""
    def most(c: Choice) -> int:
        entries = 0 if c.params.logprobs is None else 1 + c.params.logprobs
        tokens = min(c.params.max_tokens, max(1, max_sequence_tokens - len(c.prompt)))
        return tokens * (BYTES_PER_TOKEN + BYTES_PER_LOGPROB * entries)
    total = sum(most(c) for c in choices)
    if total <= max_bytes:
        return
    scored = choices[0].params.logprobs is not None
    field = ("top_logprobs" if getattr(req, "top_logprobs", None) else "logprobs") if scored else "max_tokens"
    raise InvalidRequest(f"this response could reach {total / 2**20:.1f} MiB ({len(choices)} sequences x max_tokens "
                         f"{choices[0].params.max_tokens}{' with logprobs' if scored else ''}); the limit is "
                         f"{max_bytes / 2**20:g} MiB: ask for fewer tokens, choices or logprobs", field,
                         "response_too_large")


def submit(engine: Engines, choices: list[Choice], **fields) -> None:
    """Submit every choice as a `Request(prompt, params, **fields)`, or none: if one fails,
    those already submitted are aborted."""
    try:
        for c in choices:
            c.stream = engine.submit(Request(c.prompt, c.params, **fields))
    except BaseException:
        for c in choices:
            if c.stream is not None:
                engine.abort(c.stream.request_id)
        raise


async def merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, RequestOutput]]:
    """Outputs of all choices as they come. Leaving early stops reading them (the caller ends
    the choices themselves)."""
    queue: asyncio.Queue[tuple[Choice, RequestOutput | None]] = asyncio.Queue()

    async def pump(c: Choice) -> None:
        try:
            async for out in c.stream:
                now = time.perf_counter()
                if out.token_ids:
                    c.first_token_at = c.first_token_at or now
                    c.last_token_at = now
                c.text.append(out.text)
                c.token_ids += out.token_ids
                c.logprobs += out.logprobs or ()
                c.last = out
                await queue.put((c, out))
        finally:
            await queue.put((c, None))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        running = len(tasks)
        while running:
            c, out = await queue.get()
            if out is None:
                running -= 1
            else:
                yield c, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
