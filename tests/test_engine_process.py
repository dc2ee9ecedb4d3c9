"""The engine process and its pipe (engine/serving/process.py, gateway/engines/pipe.py, engine/serving/wire.py),
without HTTP: outputs across the boundary are token-exact, aborts and stop strings reach the
engine, a request outside the engine's bounds never leaves the API process, start-up failures are
one line, SIGINT is ignored and SIGTERM stops the engine as "stop" does."""
import asyncio
import dataclasses
import os
import signal

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import InvalidRequest
from engine.request import Request
from engine.sampling import SamplingParams
from engine.sequence import Retention
from engine.serving import wire
from gateway.config import ConfigError, build_config
from gateway.engines.pipe import EngineClient, EngineProcess
from store import BlockLayout, StoreConfig, Tier
from store.disk import DiskTier
from tests.conftest import engine_idle

SECTIONS = {"model": {"path": "builtin:tiny", "device": "cpu"}, "engine": {"check_integrity": True},
            "store": {"gpu": {"num_blocks": 64}, "host": {"enabled": False}, "disk": {"enabled": False}}}
PROMPT = [5 + (7 * i) % 200 for i in range(40)]


async def collect(stream) -> tuple[list[int], str, object]:
    tokens, text, last = [], "", None
    async for out in stream:
        tokens += out.token_ids
        text += out.text
        last = out
    return tokens, text, last


async def test_outputs_across_the_pipe_match_the_engine_in_this_process(engine_processes, demo):
    config = build_config(SECTIONS)
    client = EngineClient(await engine_processes.get(config), demo.tokenizer)
    try:
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        remote = [await collect(client.submit(Request(PROMPT, params))) for _ in range(2)]
        local = Engine(demo, EngineConfig(), StoreConfig(block_size=16, gpu_blocks=64))
        await local.start()
        try:
            expected = await collect(local.submit(Request(PROMPT, params)))
        finally:
            await local.stop(persist=False)
        assert remote[0][:2] == expected[:2] and remote[1][:2] == expected[:2]
        assert remote[0][2].cached_tokens[Tier.GPU] == 0 and remote[1][2].cached_tokens[Tier.GPU] == 32
        assert remote[1][2].completion_tokens == 12 and remote[1][2].finish_reason == "length"
        assert (await client.stats())["integrity_error"] is None
    finally:
        await client.close(persist=False, keep_process=True)
        engine_processes.release(client.process)


async def test_an_abort_and_a_stop_string_reach_the_engine(engine_processes, demo):
    config = build_config(SECTIONS)
    client = EngineClient(await engine_processes.get(config), demo.tokenizer)
    try:
        stream = client.submit(Request(PROMPT, SamplingParams(max_tokens=900, temperature=0.0, ignore_eos=True)))
        async for out in stream:
            if out.token_ids:
                break
        stream.close()                         # leaving the stream aborts the request
        stats = await engine_idle(client)
        assert stats["blocks"]["gpu"]["locked"] == 0
        greedy30 = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
        full = await collect(client.submit(Request(PROMPT, greedy30)))
        stop = full[1][10:13]
        cut = await collect(client.submit(Request(PROMPT, dataclasses.replace(greedy30, stop=(stop,)))))
        assert cut[1] == full[1][:full[1].index(stop)] and cut[2].finish_reason == "stop"
        assert cut[0] == full[0][:cut[2].completion_tokens]
        await engine_idle(client)                     # the stop string aborted the request in the engine
    finally:
        await client.close(persist=False, keep_process=True)
        engine_processes.release(client.process)


async def test_a_request_outside_the_engine_bounds_never_leaves_the_api_process(engine_processes, monkeypatch):
    config = build_config(SECTIONS)
    client = EngineClient(await engine_processes.get(config))
    sent = []
    monkeypatch.setattr(client.process, "send", lambda *m: sent.append(m))
    try:
        vocab = client.bounds.vocab_size
        with pytest.raises(InvalidRequest, match="prompt token ids") as e:
            client.submit(Request([1, vocab], SamplingParams(max_tokens=4)))
        assert e.value.param == "prompt"
        with pytest.raises(InvalidRequest, match="KV blocks") as e:   # 64 blocks of 16 tokens
            client.submit(Request([1] * 1000, SamplingParams(max_tokens=100)))
        with pytest.raises(InvalidRequest, match="priority"):
            client.submit(Request([1], SamplingParams(max_tokens=4), priority=2**40))
        assert sent == []
    finally:
        monkeypatch.undo()
        await client.close(persist=False, keep_process=True)
        engine_processes.release(client.process)


async def test_a_configuration_the_engine_cannot_open_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    bad = build_config({**SECTIONS, "store": {"disk": {"path": str(tmp_path / "a-file" / "kv"),
                                                       "max_bytes": 1_000_000}}})
    process = EngineProcess(bad, log_level="warning")
    with pytest.raises(ConfigError, match="^store.disk.path: .* is not a directory$"):
        await process.start()
    await process.stop(persist=False)
    assert not process.alive


async def test_sigint_is_ignored_and_sigterm_stops_the_engine_like_stop(tmp_path):
    config = build_config({**SECTIONS, "store": {"gpu": {"num_blocks": 64}, "host": {"num_blocks": 16},
                                                 "disk": {"path": str(tmp_path / "kv"), "max_bytes": 50_000_000}}})
    process = EngineProcess(config, log_level="warning")
    await process.start()
    deaths, dead = [], asyncio.Event()
    client = EngineClient(process, on_death=lambda why: (deaths.append(why), dead.set()))
    try:
        await collect(client.submit(Request(PROMPT, SamplingParams(max_tokens=4, temperature=0.0))))
        os.kill(process.pid, signal.SIGINT)     # a terminal's Ctrl-C: the API process decides
        await collect(client.submit(Request(PROMPT, SamplingParams(max_tokens=4, temperature=0.0))))
        long = client.submit(Request(PROMPT, SamplingParams(max_tokens=900, temperature=0.0, ignore_eos=True)))
        os.kill(process.pid, signal.SIGTERM)
        tokens, _, last = await collect(long)
        assert last.finish_reason == "abort"   # ended by the engine's stop, not by its death ("error")
        await asyncio.wait_for(dead.wait(), 60)
        assert process.exitcode == 0 and deaths == ["the engine process exited (code 0)"]
        with pytest.raises(Exception, match="engine process exited"):
            client.submit(Request(PROMPT, SamplingParams(max_tokens=4)))
    finally:
        await client.close(persist=False)
    layout = BlockLayout(num_layers=4, block_size=16, num_kv_heads=2, head_dim=32, dtype=torch.float32)
    disk = DiskTier(str(tmp_path / "kv"), client.fingerprint, layout, max_bytes=50_000_000)
    assert len(disk.scan()) >= 2                # the prompt's two full blocks, persisted on SIGTERM
    disk.close()


def test_messages_round_trip():
    params = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, top_k=3, seed=11, stop=("x",),
                            stop_token_ids=(4,), ignore_eos=True)
    request = Request([5, 6, 7], params, priority=3, namespace="t", cache_salt="s", cache_report=True,
                      retention=Retention(2, 30.0, 0, 16), prompt_cache_key="k")
    back = Request.from_wire(wire.unpack(wire.pack("submit", request.to_wire()))[1])
    assert back == dataclasses.replace(request, prompt_ids=[5, 6, 7]) and back.cache_namespace == "t\0s"
    from engine.sequence import RequestOutput
    out = RequestOutput("r", [1, 2], "ab", None, 9, 2, {Tier.GPU: 16, Tier.HOST: 0, Tier.DISK: 32}, 0.25)
    assert wire.output_from_wire(wire.unpack(wire.pack(wire.output_to_wire(out)))[0]) == out
    with pytest.raises(InvalidRequest, match="temperature"):   # the engine validates what it receives
        wire_request = request.to_wire()
        Request.from_wire({**wire_request, "params": {**wire_request["params"], "temperature": 7.0}})
    with pytest.raises(InvalidRequest, match="malformed request"):
        Request.from_wire({"request_id": "r"})
