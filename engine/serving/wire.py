"""The messages between the API process and the engine process (engine/serving/process.py).

Two one-way ZMQ pipes (PUSH -> PULL over ipc sockets in a directory only this user can enter),
one msgpack array per message, its first item the kind:

    API -> engine                                   engine -> API
    ["submit", request]                             ["ready", gen, info]    started
    ["abort", [id, ...]]                            ["out", [output, ...]]      one per engine loop turn
    ["stats", token]                                ["rejected", id, message]   refused at submit
    ["admin", token, op, args]                      (answered as "stats": gateway/admin.py)
    ["stop", persist, keep_process, persist_s]      ["stats", token, snapshot]  shell.py `snapshot`
    ["reopen", gen, config]                         ["failed", message, is_config_error, gen]
                                                    ["stopped"]
                                                    ["beat"]                    every HEARTBEAT_S

`request` is engine.request.Request as a dict (`to_wire`); an output is RequestOutput as an array, cached tokens one
count per Tier, logprobs as [logprob, [[token id, logprob], ...]] per token (or nil). "reopen"
(tests: one process, many configurations, the model loaded once) carries the pickled
ServingConfig: only the API process that started the engine can write to the pipe. Everything
a client sends was validated in the API process before it is put on the pipe; the engine
validates it again (`Engine.submit`).
"""
from __future__ import annotations

import msgpack

from engine.sequence import RequestOutput
from store import Tier

HEARTBEAT_S = 0.5          # the engine process's heartbeat while its event loop turns

TIERS = tuple(Tier)


def pack(*message) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> list:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def output_to_wire(out: RequestOutput) -> list:
    return [out.request_id, out.token_ids, out.text, out.finish_reason, out.prompt_tokens,
            out.completion_tokens, [out.cached_tokens.get(t, 0) for t in TIERS], out.queued_s, out.logprobs,
            out.cache_report]


def output_from_wire(row: list) -> RequestOutput:
    request_id, token_ids, text, reason, prompt_tokens, completion_tokens, cached, queued_s, logprobs, report = row
    return RequestOutput(request_id, token_ids, text, reason, prompt_tokens, completion_tokens,
                         dict(zip(TIERS, cached)), queued_s, logprobs, report)
