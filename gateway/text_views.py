"""Endpoints about the model's text and the server itself, answered in the API process (the
engine is not asked): /tokenize and /detokenize (vLLM's shapes), /version, /v1/models/{id}."""
from __future__ import annotations

from aiohttp import web

from engine.errors import InvalidRequest
from gateway import intake, version
from gateway.generation import chat_messages
from gateway.keys import CONFIG, ENGINE, PROMPTS, STATE
from gateway.protocol import DetokenizeRequest, TokenizeRequest


async def tokenize(request: web.Request) -> web.Response:
    req = await _read(request, TokenizeRequest)
    prompts = request.app[PROMPTS]
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequest("send either `prompt` or `messages`", "prompt")
    if req.messages is not None:
        messages = chat_messages(req.messages)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        prompts.check_text_length(sum(len(m["content"]) for m in messages), "messages")
        tokens = prompts.encode_chat(messages, tools)
    else:
        _need_tokenizer(prompts)
        prompts.check_text_length(len(req.prompt), "prompt")
        tokens = prompts.tokenizer.encode(req.prompt)
    return web.json_response({"count": len(tokens), "max_model_len": prompts.max_model_len, "tokens": tokens})


async def detokenize(request: web.Request) -> web.Response:
    req = await _read(request, DetokenizeRequest)
    prompts = request.app[PROMPTS]
    _need_tokenizer(prompts)
    vocab = request.app[ENGINE].bounds.vocab_size
    if any(t >= vocab for t in req.tokens):
        raise InvalidRequest(f"token ids must be in [0, {vocab})", "tokens")
    return web.json_response({"prompt": prompts.tokenizer.decode(req.tokens)})


async def server_version(request: web.Request) -> web.Response:
    return web.json_response({"version": version()})


async def model(request: web.Request) -> web.Response:
    card = model_card(request)
    if request.match_info["model"] != card["id"]:
        raise intake.model_not_found(request.match_info["model"])
    return web.json_response(card)


def model_card(request: web.Request) -> dict:
    bounds = request.app[ENGINE].bounds
    return {"id": request.app[PROMPTS].name, "object": "model", "created": request.app[STATE].started,
            "owned_by": "kvgate", "max_model_len": bounds.max_model_len, "vocab_size": bounds.vocab_size}


async def _read(request: web.Request, schema):
    return await intake.read_request(request, schema, request.app[PROMPTS].name,
                                     request.app[CONFIG].server.body_timeout_s)


def _need_tokenizer(prompts) -> None:
    if prompts.tokenizer is None:
        raise InvalidRequest("this model has no tokenizer", "model")
