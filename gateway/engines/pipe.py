"""The API process's side of the engine process: start it, submit to it, stream from it, stop it.

    process = EngineProcess(config); await process.start()    # spawns; waits for "ready"
    client = EngineClient(process)
    stream = client.submit(Request(prompt_ids, params, priority=p))   # checked here first
    async for out in stream: ...                                      # RequestOutput deltas
    await client.stats(); await client.close(persist=True)   # stops the process too

One reader task takes every message off the pipe and hands each output to its request's queue.
If the engine process dies, every open stream ends with finish_reason "error", new submissions
raise EngineDead (503 at the HTTP edge) and `on_death` is called (the server then exits 1, for
its supervisor to restart it).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable

import zmq
import zmq.asyncio

from engine import limits
from engine.request import Request
from engine.sequence import RequestOutput
from engine.serving import process as engine_process
from engine.serving import wire
from engine.serving.config import PERSIST_SHARE
from gateway.config import ConfigError, KvgateConfig
from gateway.engines import ASK_TIMEOUT_S, Engines, RemoteStream
from gateway.errors import EngineDead, EngineUnresponsive

log = logging.getLogger("kvgate.gateway")
STOP_TIMEOUT_S = 120.0      # the default bound of a stop (the server passes server.shutdown_timeout_s)


class EngineStartError(RuntimeError):
    """The engine process could not start (the message is its one-line cause)."""


class EngineProcess:
    """The engine process and its two pipes. `start` spawns it and waits until its engine is
    ready; `reopen` (tests) swaps the engine inside for one of another configuration."""

    def __init__(self, config: KvgateConfig, log_level: str = "info",
                 entry: Callable = engine_process.main) -> None:
        self.config = config
        self.entry = entry            # the process's main (tests wrap it to inject faults)
        self.log_level = log_level
        self.info: dict = {}
        self._gen = itertools.count()
        self._dir = ""
        self._process: multiprocessing.Process | None = None
        self._exit_waiters: set[asyncio.Future] = set()
        self._ctx: zmq.asyncio.Context | None = None
        self.to_engine: zmq.Socket | None = None
        self.from_engine: zmq.asyncio.Socket | None = None

    async def start(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="kvgate-")        # mode 0700: only this user reaches the pipes
        inbox, outbox = (f"ipc://{os.path.join(self._dir, n)}" for n in ("in", "out"))
        self._ctx = zmq.asyncio.Context()
        self.to_engine = zmq.Context.instance().socket(zmq.PUSH)
        self.to_engine.setsockopt(zmq.SNDHWM, 0)
        self.to_engine.bind(inbox)
        self.from_engine = self._ctx.socket(zmq.PULL)
        self.from_engine.bind(outbox)
        spawn = multiprocessing.get_context("spawn")
        self._process = spawn.Process(target=self.entry, name="kvgate-engine", daemon=False,
                                      args=(self.config.serving(), inbox, outbox, self.log_level, os.getpid()))
        self._process.start()
        next(self._gen)
        await self._await_ready(0)

    async def reopen(self, config: KvgateConfig) -> None:
        """Stop the engine inside (nothing persisted) and open one for `config` in the same
        process: tests reuse one process, and its loaded model, for many configurations."""
        self.send("stop", False, True, None)
        await self._receive("stopped")
        gen = next(self._gen)
        self.config = config
        self.send("reopen", gen, pickle.dumps(config.serving()))
        await self._await_ready(gen)

    async def _await_ready(self, gen: int) -> None:
        while True:
            msg = await self._receive("ready", "failed")
            if msg[-1] != gen and msg[0] == "failed" or msg[0] == "ready" and msg[1] != gen:
                continue                              # an answer to an earlier reopen
            if msg[0] == "ready":
                self.info = msg[2]
                return
            _, message, is_config, _ = msg
            raise (ConfigError if is_config else EngineStartError)(message)

    async def _receive(self, *kinds: str) -> list:
        """The next message of one of `kinds` (others are dropped: nothing else is in flight
        while starting or stopping); EngineStartError if the process exits first."""
        while True:
            poll = asyncio.ensure_future(self.from_engine.recv())
            exited = asyncio.ensure_future(self.wait_exit())
            await asyncio.wait([poll, exited], return_when=asyncio.FIRST_COMPLETED)
            exited.cancel()
            if not poll.done():
                poll.cancel()
                raise EngineStartError(f"the engine process exited with code {self._process.exitcode}")
            msg = wire.unpack(poll.result())
            if msg[0] in kinds:
                return msg

    async def wait_exit(self) -> None:
        """Return when the process has exited. Any number of tasks may wait: one reader on the
        process's sentinel wakes them all."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        if not self._exit_waiters:
            loop.add_reader(self._process.sentinel, self._exited)
        self._exit_waiters.add(waiter)
        try:
            await waiter
        finally:
            self._exit_waiters.discard(waiter)
            if not self._exit_waiters:
                loop.remove_reader(self._process.sentinel)

    def _exited(self) -> None:
        for waiter in self._exit_waiters:
            if not waiter.done():
                waiter.set_result(None)

    def join(self, timeout: float) -> None:
        if self._process is not None:
            self._process.join(timeout)

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def exitcode(self) -> int | None:
        return None if self._process is None else self._process.exitcode

    def send(self, *message) -> None:
        """Put a message on the pipe, never waiting: with no engine at the other end (it has
        exited) the message is dropped, and the exit is seen through the process's sentinel."""
        try:
            self.to_engine.send(wire.pack(*message), zmq.NOBLOCK)
        except zmq.Again:
            log.warning("the engine process is not reading; %r dropped", message[0])

    async def stop(self, persist: bool = True, ask: bool = True, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Ask the engine to abort what is left, persist its cache (if `persist`, for a share of
        `timeout_s`) and exit (`ask=False`: it was asked already); kill it if it has not within
        `timeout_s` (what reached LMDB survives a kill). Idempotent."""
        if self._process is None:
            return
        try:
            if self._process.is_alive():
                if ask:
                    self.send("stop", persist, False, timeout_s * PERSIST_SHARE)
                try:
                    async with asyncio.timeout(timeout_s):
                        await self.wait_exit()
                except TimeoutError:
                    log.error("the engine process did not stop within %g s; killing it", timeout_s)
                    self._process.kill()
            await asyncio.to_thread(self._process.join)
        finally:
            self._process = None
            self.to_engine.close(linger=0)
            self.from_engine.close(linger=0)
            self._ctx.term()
            shutil.rmtree(self._dir, ignore_errors=True)


class EngineClient(Engines):
    """Requests to one engine process: the API process's view of the engine."""

    def __init__(self, process: EngineProcess, tokenizer=None,
                 on_death: Callable[[str], None] | None = None) -> None:
        self.process = process
        self.tokenizer = tokenizer
        self.adopt(process.info)
        self.dead = None
        self._on_death = on_death
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._stats: dict[int, asyncio.Future] = {}
        self._tokens = itertools.count()
        self._stopped = asyncio.Event()      # the engine said "stopped": everything before it is read
        self._last_beat = time.monotonic()    # when the engine process last showed its loop turning
        self._reader = asyncio.create_task(self._read())
        self._watch = asyncio.create_task(self._watch_process())

    def submit(self, request: Request) -> RemoteStream:
        if self.dead:
            raise EngineDead(self.dead)
        limits.check_request(self.bounds, request.prompt_ids, request.params, request.priority)
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request.request_id] = queue
        self.process.send("submit", request.to_wire())
        return self.stream(request, queue)

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None and not self.dead:
            self.process.send("abort", [request_id])

    def abort_all(self) -> None:
        ids = list(self._streams)
        self._streams.clear()
        if ids and not self.dead:
            self.process.send("abort", ids)

    async def stats(self) -> dict:
        """The engine's snapshot (engine/serving/shell.py `snapshot`); EngineDead if it is gone."""
        return await self.ask("stats")

    def silent_for(self) -> float:
        """Seconds since the engine process's last heartbeat (or any message)."""
        return time.monotonic() - self._last_beat

    async def ask(self, kind: str, *args, timeout_s: float = ASK_TIMEOUT_S):
        """Send a message that the engine answers ("stats", "admin"); its answer, within
        `timeout_s` (EngineUnresponsive past it: /metrics and the admin API never hang)."""
        if self.dead:
            raise EngineDead(self.dead)
        token = next(self._tokens)
        self._stats[token] = asyncio.get_running_loop().create_future()
        self.process.send(kind, token, *args)
        try:
            async with asyncio.timeout(timeout_s):
                return await self._stats[token]
        except TimeoutError:
            raise EngineUnresponsive(f"the engine process has not answered for {timeout_s:g} s "
                                     f"(last heartbeat {self.silent_for():.1f} s ago)") from None
        finally:
            self._stats.pop(token, None)

    async def close(self, persist: bool = True, keep_process: bool = False, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop the engine within `timeout_s`: abort what is left (its streams end), write the
        cache to the disk tier if `persist` (what fits in time), close the store; then the
        process exits (killed past the deadline), unless `keep_process` (tests: the next app
        reopens it)."""
        deadline = time.monotonic() + timeout_s
        self._watch.cancel()
        if not self.dead and self.process.alive:
            self.process.send("stop", persist, keep_process, timeout_s * PERSIST_SHARE)
            waits = [asyncio.ensure_future(self._stopped.wait()), asyncio.ensure_future(self.process.wait_exit())]
            done, _ = await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                log.error("the engine did not stop within %g s", timeout_s)
            for w in waits:
                w.cancel()
        self._end_all("the engine was stopped")
        self._reader.cancel()
        await asyncio.gather(self._reader, self._watch, return_exceptions=True)
        if not keep_process:
            await self.process.stop(persist, ask=not self._stopped.is_set(),
                                    timeout_s=max(0.5, deadline - time.monotonic()))

    async def _read(self) -> None:
        while True:
            msg = wire.unpack(await self.process.from_engine.recv())
            kind = msg[0]
            self._last_beat = time.monotonic()
            if kind == "out":
                for row in msg[1]:
                    queue = self._streams.get(row[0])
                    if queue is not None:
                        out = wire.output_from_wire(row)
                        queue.put_nowait(out)
                        if out.finish_reason is not None:
                            del self._streams[row[0]]
            elif kind == "stats":
                future = self._stats.get(msg[1])
                if future is not None and not future.done():
                    future.set_result(msg[2])
            elif kind == "stopped":
                self._stopped.set()
            elif kind == "rejected":
                log.error("the engine refused request %s that the API process let through: %s", msg[1], msg[2])
                self._end(msg[1], "error")

    async def _watch_process(self) -> None:
        await self.process.wait_exit()
        await asyncio.to_thread(self.process.join, 5)     # reaped: its exit code is known
        if self.process.exitcode == 0:    # it stopped on its own SIGTERM: its last outputs and
            try:                          # "stopped" are on the pipe; the reader takes them first
                async with asyncio.timeout(5):
                    await self._stopped.wait()
            except TimeoutError:
                pass
        self.dead = f"the engine process exited (code {self.process.exitcode})"
        log.error("%s; in-flight requests fail and new ones get 503", self.dead)
        self._end_all(self.dead)
        if self._on_death is not None:
            self._on_death(self.dead)

    def _end_all(self, why: str) -> None:
        """End every open stream: "abort" if the engine stopped as asked (it had not taken them
        up yet), "error" if it died."""
        reason = "abort" if self._stopped.is_set() else "error"
        for request_id in list(self._streams):
            self._end(request_id, reason)
        for future in self._stats.values():
            if not future.done():
                future.set_exception(EngineDead(why))

    def _end(self, request_id: str, reason: str) -> None:
        queue = self._streams.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(RequestOutput(request_id, [], "", reason, 0, 0, {}))
