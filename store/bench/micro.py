"""Store micro-benchmark: hashing and matching, host<->GPU block copies, LMDB throughput.

    python -m store.bench                      # the 8B shape, GPU if there is one
    python -m store.bench --layout tiny --copy-blocks 256 --json out.json

Reports medians of repeated runs. Copies: "batched" is the store's copier (runs of
consecutive host slots in one copy each, GPU side gathered through a staging buffer);
"per-block" is one copy per block. "scattered" GPU slots are a random permutation.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time

import torch

from store.block_store import BlockStore, StoreConfig
from store.copier import BlockCopier
from store.disk import BlockRecord, DiskTier
from store.keys import block_keys, chain_key, token_bytes
from store.pool import BlockLayout, BlockPool, Tier

LAYOUTS = {  # name -> (num_layers, block_size, num_kv_heads, head_dim, dtype)
    "llama3-8b": (32, 16, 8, 128, torch.bfloat16),   # 2 MiB per 16-token block
    "tiny": (4, 16, 2, 32, torch.float32),           # the CPU test model: 32 KiB per block
}


def median_s(fn, repeat: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_hashing(layout: BlockLayout, tokens: int, repeat: int) -> list[tuple[str, str]]:
    ids = [random.randrange(128256) for _ in range(tokens)]
    root = chain_key(b"\0" * 16, b"bench")
    cfg = StoreConfig(block_size=layout.block_size, gpu_blocks=tokens // layout.block_size + 1)
    store = BlockStore(cfg, BlockLayout(1, layout.block_size, 1, 1, torch.float32), "bench", device="cpu")
    seq = store.admit(0, root, ids)
    store.commit(0, ids)
    store.release(0)
    t_hash = median_s(lambda: block_keys(root, token_bytes(ids), layout.block_size), repeat)
    t_match = median_s(lambda: store.match(root, ids), repeat)
    assert len(store.match(root, ids).nodes) == len(seq.slots) - (tokens % layout.block_size > 0)
    return [(f"hash {tokens} tokens (list -> keys)", f"{t_hash * 1e3:.3f} ms"),
            (f"match {tokens} tokens, full hit ({tokens // layout.block_size} blocks)",
             f"{t_match * 1e3:.3f} ms")]


def bench_copies(layout: BlockLayout, n: int, device: str, repeat: int) -> list[tuple[str, str]]:
    cuda = device == "cuda"
    gpu = BlockPool(Tier.GPU, layout, n, device)
    host = BlockPool(Tier.HOST, layout, n, "cpu", pin_memory=cuda)
    copier = BlockCopier(gpu, host)
    host.tensor.copy_(torch.randn(host.tensor.shape).to(layout.dtype))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    nbytes = n * layout.block_bytes
    contiguous = list(range(n))
    scattered = random.sample(contiguous, n)
    rows = []
    for name, slots in (("contiguous", contiguous), ("scattered", scattered)):
        for direction, batched, per_block in (
                ("host->gpu", copier.to_gpu, copier.per_block_to_gpu),
                ("gpu->host", copier.to_host, copier.per_block_to_host)):
            src, dst = (contiguous, slots) if direction == "host->gpu" else (slots, contiguous)
            tb = median_s(lambda: batched(src, dst), repeat, sync)
            tp = median_s(lambda: per_block(src, dst), repeat, sync)
            rows.append((f"{direction} {n} blocks, {name} GPU slots",
                         f"batched {nbytes / tb / 1e9:6.1f} GB/s | per-block {nbytes / tp / 1e9:6.1f} GB/s"))
    copier.to_gpu(contiguous, scattered)
    copier.host_ready()
    assert torch.equal(gpu.tensor[scattered].cpu(), host.tensor), "copies moved the wrong blocks"
    return rows


def bench_lmdb(layout: BlockLayout, n: int, path: str) -> list[tuple[str, str]]:
    """The store's disk path — blocks encoded and written by the disk process from the shared host
    pool, then read back into a shared pool and verified — alone and beside a thread that runs
    Python without pause: the engine loop's stand-in. Threads of the engine's process had to take
    the interpreter lock back from it each time they gave it up (writes 21 blocks/s against 209
    alone, reads 197 against 1,341: docs/store.md); the disk process has a lock of its own."""
    host = BlockPool(Tier.HOST, layout, n, "cpu", shared=True)
    out = BlockPool(Tier.HOST, layout, n, "cpu", shared=True)
    host.tensor.copy_(torch.randn(host.tensor.shape).to(layout.dtype))
    rows = []
    for busy in (False, True):
        disk = DiskTier(f"{path}/{busy}", "bench", layout, max_bytes=4 * n * layout.block_bytes,
                        max_pending_bytes=2 * n * layout.block_bytes, shared_pools=(host, out))
        stop = threading.Event()

        def spin() -> None:
            while not stop.is_set():
                sum(range(100))
        spinner = threading.Thread(target=spin)
        if busy:
            spinner.start()
        items = [(chain_key(b"\0" * 16, token_bytes([i] * layout.block_size)), b"\0" * 16,
                  token_bytes([i] * layout.block_size)) for i in range(n)]
        t = time.perf_counter()
        for i, (key, parent, tokens) in enumerate(items):
            disk.put(key, BlockRecord(parent, tokens, 0, 0, host.bytes[i]))
        disk.flush_sync()
        write_s = time.perf_counter() - t
        out.tensor.zero_()
        t = time.perf_counter()
        assert all(asyncio.run(disk.load(items, out, list(range(n)))))
        read_s = time.perf_counter() - t
        stop.set()
        if busy:
            spinner.join()
        assert torch.equal(out.tensor, host.tensor), "LMDB returned different bytes"
        disk.close()
        where = "beside a busy thread" if busy else "alone"
        mb = n * layout.block_bytes / 1e6
        rows.append((f"LMDB write {n} blocks ({mb:.0f} MB) from host memory, {where}",
                     f"{mb / write_s:7.0f} MB/s, {n / write_s:7.0f} blocks/s"))
        rows.append((f"LMDB read+verify {n} blocks (page cache warm), {where}",
                     f"{mb / read_s:7.0f} MB/s, {n / read_s:7.0f} blocks/s"))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m store.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="llama3-8b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=32768, help="prompt length for hashing and match")
    p.add_argument("--copy-blocks", type=int, default=128, help="blocks per copy batch")
    p.add_argument("--disk-blocks", type=int, default=256, help="blocks written to / read from LMDB")
    p.add_argument("--disk-dir", default=None, help="LMDB directory (default: a temporary one)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--switch-interval", type=float, default=None,
                   help="sys.setswitchinterval for the run (seconds; Python's default is 0.005)")
    a = p.parse_args(argv)
    if a.switch_interval is not None:
        sys.setswitchinterval(a.switch_interval)
    layout = BlockLayout(*LAYOUTS[a.layout])
    random.seed(0)
    torch.manual_seed(0)
    env = f"device={a.device}" + (f" ({torch.cuda.get_device_name()})" if a.device == "cuda" else "")
    print(f"store micro-benchmark: layout={a.layout} ({layout.block_bytes // 1024} KiB/block), {env}, "
          f"torch {torch.__version__}, switch interval {sys.getswitchinterval() * 1e3:g} ms")
    rows = []
    for part in (lambda: bench_hashing(layout, a.tokens, a.repeat),
                 lambda: bench_copies(layout, a.copy_blocks, a.device, a.repeat),
                 lambda: bench_lmdb(layout, a.disk_blocks, a.disk_dir or tmp)):
        with tempfile.TemporaryDirectory() as tmp:
            for name, value in part():
                print(f"  {name:<62}  {value}", flush=True)
                rows.append((name, value))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(layout=a.layout, device=env, torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
