"""What the API process's engine clients share: the interface the app uses (`Engines`), what
the engine said of itself, and the detokenized stream of one request's outputs. Two clients
implement it: one engine process over its pipe (gateway/engines/pipe.py) and replicas on Ray
Serve (gateway/engines/replicas.py)."""
from __future__ import annotations

import abc
import asyncio
import dataclasses
from collections.abc import AsyncIterator

from engine import limits
from engine.detokenizer import Detokenizer
from engine.request import Request
from engine.sequence import RequestOutput, coalesced

ASK_TIMEOUT_S = 10.0        # a "stats" or "admin" message unanswered this long: EngineUnresponsive


class Engines(abc.ABC):
    """The API process's view of its engine(s): one engine process (`EngineClient`) or replicas
    on Ray Serve (`ReplicaClient`, replicas.py). The app uses this interface alone; the code
    both share (what the engine said of itself, the detokenized streams) is here once."""

    tokenizer = None                  # detokenizes every stream (None: token ids only)
    dead: str | None = None           # why the engine is gone (never, for replicas: Ray replaces them)

    def adopt(self, info: dict) -> None:
        """What the engine said of itself when it started (engine/serving/shell.py engine_info)."""
        self.name: str = info["name"]
        self.bounds = limits.RequestBounds(*info["bounds"])
        self.max_sequence_tokens: int = info["max_sequence_tokens"]
        self.steps: dict = info["steps"]
        self.tiers: list[dict] = info["tiers"]
        self.fingerprint: str = info["fingerprint"]
        self.kv: dict = info["kv"]            # engine/serving/tiers.py kv_arithmetic

    def stream(self, request: Request, queue: asyncio.Queue[RequestOutput]) -> RemoteStream:
        """The stream of `request`'s outputs as they arrive in `queue`, detokenized here."""
        params = request.params
        detokenizer = Detokenizer(self.tokenizer, params.stop) if self.tokenizer is not None else None
        return RemoteStream(self, request.request_id, queue, detokenizer, frozenset(params.stop_token_ids))

    @abc.abstractmethod
    def submit(self, request: Request) -> RemoteStream:
        """Check the request against the engine's bounds (InvalidRequest), then send it."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    def abort_all(self) -> None: ...

    @abc.abstractmethod
    async def stats(self) -> dict:
        """The engine's snapshot (engine/serving/shell.py `snapshot`; replicas': merged)."""

    @abc.abstractmethod
    async def ask(self, kind: str, *args):
        """"stats", or ("admin", op, args): an operator's operation (gateway/admin.py)."""

    @abc.abstractmethod
    def silent_for(self) -> float:
        """Seconds since the engine last showed its loop turning."""

    @abc.abstractmethod
    async def close(self, persist: bool = True, keep_process: bool = False, timeout_s: float = 0.0) -> None: ...


class RemoteStream:
    """One request's outputs from the engine process, detokenized here: the text of each delta
    and the stop strings (the engine sends token ids). A stop string ends the stream with
    "stop" and aborts the request in the engine; tokens it generated past the stop are dropped.
    Leaving the stream early aborts the request."""

    def __init__(self, client: Engines, request_id: str, queue: asyncio.Queue[RequestOutput],
                 detokenizer: Detokenizer | None, stop_token_ids: frozenset[int] = frozenset()) -> None:
        self._client = client
        self._stop_token_ids = stop_token_ids
        self._queue = queue
        self._detokenizer = detokenizer
        self._output_ids: list[int] = []      # every token received, the detokenizer's input
        self.request_id = request_id
        self.finished = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            async for out in coalesced(self._queue):
                if self._detokenizer is not None:
                    out = self._with_text(out)
                self.finished = out.finish_reason is not None
                yield out
                if self.finished:
                    return
        finally:
            self.close()

    def _with_text(self, out: RequestOutput) -> RequestOutput:
        """`out` with its text, cut at a stop string: the same text, tokens and finish reason
        as an in-process `Engine` gives (engine/engine.py, `_emit` and `_finish`)."""
        pieces = []
        for i, token in enumerate(out.token_ids):
            if token in self._stop_token_ids:      # it ended the output: no text of its own
                break
            self._output_ids.append(token)
            piece, stopped = self._detokenizer.step(self._output_ids, 0)
            pieces.append(piece)
            if stopped:
                self._client.abort(self.request_id)
                return dataclasses.replace(out, token_ids=out.token_ids[:i + 1], text="".join(pieces),
                                           finish_reason="stop", completion_tokens=len(self._output_ids),
                                           logprobs=None if out.logprobs is None else out.logprobs[:i + 1])
        if out.finish_reason not in (None, "stop"):
            pieces.append(self._detokenizer.flush())
        return dataclasses.replace(out, text="".join(pieces))

    def close(self) -> None:
        """Abort the request unless it has ended."""
        if not self.finished:
            self.finished = True
            self._client.abort(self.request_id)
