"""Helpers for engine tests: engines over the tiny test models, and running requests.

KVGATE_TEST_DEVICE=cuda runs the engine side of these tests on the GPU (fp32, so greedy output
must still match the CPU reference token for token)."""
from __future__ import annotations

import os
import random

from engine.config import EngineConfig, ModelConfig
from engine.engine import Engine
from engine.fusion import fuse
from engine.model import load_model
from engine.request import Request
from engine.sampling import SamplingParams
from engine.sequence import RequestOutput
from store import StoreConfig

BS = 4


def make_engine(path: str, gpu: int = 64, host: int = 0, disk: str = "", disk_blocks: int = 0,
                max_batched: int = 32, max_seqs: int = 16, fused: bool = True,
                write_policy: str = "all", async_scheduling: bool = True, tenants: dict | None = None) -> Engine:
    """On the CPU the engine keeps transformers' layers; `fused` fuses them eagerly anyway, so
    that the fused arithmetic is what these tests compare with transformers (on CUDA the
    engine fuses and compiles them itself)."""
    device = os.environ.get("KVGATE_TEST_DEVICE", "cpu")
    loaded = load_model(ModelConfig(path=path, device=device, dtype="float32", fuse=fused), block_size=BS)
    if fused and loaded.device.type == "cpu":
        fuse(loaded.model, compiled=False)
    store = StoreConfig(block_size=BS, gpu_blocks=gpu, host_blocks=host, disk_path=disk,
                        disk_max_bytes=disk_blocks * (loaded.block_layout(BS).block_bytes + 512),
                        write_policy=write_policy)
    return Engine(loaded, EngineConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max_batched,
                                       block_size=BS, async_scheduling=async_scheduling,
                                       check_integrity=True), store, tenants=tenants)


def prompt(seed: int, n: int) -> list[int]:
    """`n` token ids drawn from a seeded generator (3..255: clear of the special ids)."""
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(n)]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


async def collect(stream) -> tuple[list[int], RequestOutput]:
    """All tokens of a request stream, and its last output."""
    tokens, last = [], None
    async for out in stream:
        tokens += out.token_ids
        last = out
    return tokens, last


async def run(engine: Engine, prompt: list[int], params: SamplingParams,
              **kw) -> tuple[list[int], RequestOutput]:
    return await collect(engine.submit(Request(prompt, params, **kw)))
