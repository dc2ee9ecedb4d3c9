"""The engine process: it loads the model, owns the engine loop and the KV store, and talks to
the API process over the pipes of engine/serving/wire.py. Nothing else runs on its event loop,
so HTTP parsing, tokenization and SSE writing in the API process never delay a step.

It ignores SIGINT (a terminal's Ctrl-C reaches the whole process group; the API process then
asks it to stop). SIGTERM stops it as "stop" does: requests aborted, the cache persisted to the
disk tier, the store closed. If the API process dies, it is killed at once (PR_SET_PDEATHSIG):
what reached the disk tier is kept (LMDB survives a kill), and a restarted server finds the
tier's directory free rather than held by an orphan still persisting.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import pickle
import signal
import sys
import time

import zmq
import zmq.asyncio

from engine.errors import InvalidRequest
from engine.model import LoadedModel, load_model
from engine.serving import wire
from engine.serving.config import ConfigError, ServingConfig
from engine.serving.shell import EngineShell

log = logging.getLogger("kvgate.engine")
_PR_SET_PDEATHSIG = 1


def main(config: ServingConfig, inbox: str, outbox: str, log_level: str, parent_pid: int) -> None:
    """The process's entry point (multiprocessing, spawned): serve until told to stop."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:        # the API process died before the line above
        return
    asyncio.run(_serve(config, inbox, outbox))


class _Models:
    """Models loaded so far, by what determines them: a "reopen" with the same model section
    reuses the weights in memory."""

    def __init__(self) -> None:
        self._loaded: dict[tuple, LoadedModel] = {}

    async def get(self, config: ServingConfig) -> LoadedModel:
        key = (config.model, config.engine.block_size)
        if key not in self._loaded:
            log.info("loading %s", config.model.path)
            started = time.monotonic()
            self._loaded = {key: await asyncio.to_thread(load_model, config.model, config.engine.block_size)}
            log.info("loaded %s in %.1f s", config.model.path, time.monotonic() - started)
        return self._loaded[key]


async def _serve(config: ServingConfig, inbox: str, outbox: str) -> None:
    ctx = zmq.asyncio.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(inbox)
    push = zmq.Context.instance().socket(zmq.PUSH)    # sends never wait: no high-water mark
    push.setsockopt(zmq.SNDHWM, 0)
    push.setsockopt(zmq.LINGER, 5000)
    push.connect(outbox)
    terminated = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, terminated.set)
    models = _Models()
    core = await EngineCore.open(config, models, push, gen=0)
    beats = asyncio.create_task(_beat(push))
    receive = asyncio.ensure_future(pull.recv())
    term = asyncio.ensure_future(terminated.wait())
    drain = zmq.Socket.shadow(pull.underlying)       # what else has arrived, read without waiting
    try:
        while True:
            await asyncio.wait([receive, term], return_when=asyncio.FIRST_COMPLETED)
            if term.done():
                log.info("SIGTERM: stopping the engine and writing the cache to the disk tier")
                if core is not None:
                    await core.stop(True, config.persist_s)
                push.send(wire.pack("stopped"))
                return
            batch = [receive.result()]            # a burst (128 submits) is taken in one turn
            while True:
                try:
                    batch.append(drain.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
            receive = asyncio.ensure_future(pull.recv())
            for data in batch:
                msg = wire.unpack(data)
                kind = msg[0]
                if kind == "stop":
                    _, persist, keep_process, persist_s = msg
                    if core is not None:
                        await core.stop(persist, persist_s)
                        core = None
                    push.send(wire.pack("stopped"))
                    if not keep_process:
                        return
                elif kind == "reopen":
                    _, gen, pickled = msg
                    core = await EngineCore.open(pickle.loads(pickled), models, push, gen)
                elif core is None:
                    log.warning("engine message %r while no engine is open; ignored", kind)
                else:
                    core.handle(msg)
    finally:
        beats.cancel()
        receive.cancel()
        term.cancel()
        pull.close(linger=0)
        push.close()


async def _beat(push: zmq.Socket) -> None:
    """A heartbeat every HEARTBEAT_S while this process's event loop turns: the API process's
    /health says the engine is frozen when they stop (a stopped process, a blocked loop)."""
    while True:
        push.send(wire.pack("beat"))
        await asyncio.sleep(wire.HEARTBEAT_S)


class EngineCore:
    """The engine shell behind the pipe: outputs are gathered over one turn of the event loop
    (every sequence of a step makes its delta in the same turn) and sent as one message."""

    def __init__(self, push: zmq.Socket) -> None:
        self.shell: EngineShell | None = None      # set once it has started
        self.push = push
        self._pending: list[list] = []

    @classmethod
    async def open(cls, config: ServingConfig, models: _Models, push: zmq.Socket, gen: int) -> EngineCore | None:
        """Load (or reuse) the model, open the store, start the engine; says "ready" with what
        the API process needs, or "failed" with one line (None then)."""
        core = cls(push)
        try:
            core.shell = await EngineShell.open(config, await models.get(config), on_output=core.output)
        except (ConfigError, ValueError) as e:    # a key of the configuration: the API process says it
            push.send(wire.pack("failed", str(e), True, gen))
            return None
        except Exception as e:
            log.exception("engine start-up failed")
            push.send(wire.pack("failed", f"{type(e).__name__}: {e}", False, gen))
            return None
        push.send(wire.pack("ready", gen, core.shell.info))
        return core

    def handle(self, msg: list) -> None:
        kind = msg[0]
        if kind == "submit":
            try:
                self.shell.submit(msg[1])                 # its outputs: `output`
            except InvalidRequest as e:
                self.push.send(wire.pack("rejected", msg[1].get("request_id"), str(e)))
        elif kind == "abort":
            for request_id in msg[1]:
                self.shell.abort(request_id)
        elif kind == "stats":
            self.push.send(wire.pack("stats", msg[1], self.shell.stats()))
        elif kind == "admin":                # an operator's request, checked in the API process
            _, token, op, args = msg
            self.push.send(wire.pack("stats", token, self.shell.admin(op, args)))
        else:
            log.warning("unknown engine message %r; ignored", kind)

    def output(self, out) -> None:
        """The engine's `on_output`: queue the row; the first of a loop turn schedules the send."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(wire.output_to_wire(out))

    def _flush(self) -> None:
        if self._pending:
            self.push.send(wire.pack("out", self._pending))
            self._pending = []

    async def stop(self, persist: bool, persist_s: float | None = None) -> None:
        """Abort what is left (its last outputs are sent), stop the loop, persist (choosing and
        copying blocks for at most `persist_s`), close."""
        try:
            await self.shell.stop(persist, persist_s)
        except AssertionError:
            log.exception("the engine's invariants were broken")
        self._flush()
