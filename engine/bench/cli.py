"""The command line of `python -m engine.bench` (the package's docstring says what it runs)."""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import time

import torch

from engine.bench import step_profile, tiers
from engine.bench.common import run_kvgate, workload
from engine.config import EngineConfig, ModelConfig
from engine.engine import Engine
from engine.model import load_model
from store import StoreConfig


def run_peer(model, prompts: list[list[int]], out_len: int, name: str) -> dict:
    from transformers import GenerationConfig
    model.set_attn_implementation("sdpa")
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    try:
        if name == "decode1":   # plain generate, as the peer script measures it
            ids = torch.tensor(prompts[:1], device=model.device)
            gen = lambda n: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,  # noqa: E731
                                           pad_token_id=0)
            gen(4)
            sync()
            t = time.perf_counter()
            model(ids, use_cache=False, logits_to_keep=1)
            sync()
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            gen(out_len)
            sync()
            total = time.perf_counter() - t
            return dict(peer="generate", requests=1, out_tokens=out_len, wall_s=round(total, 3),
                        decode_tok_s=round(out_len / (total - prefill), 1))
        gc = GenerationConfig(max_new_tokens=out_len, do_sample=False, eos_token_id=-1, pad_token_id=0)
        sync()
        t = time.perf_counter()
        res = model.generate_batch(inputs=prompts, generation_config=gc)
        sync()
        wall = time.perf_counter() - t
        n = sum(len(r.generated_tokens) for r in res.values())
        return dict(peer="generate_batch", requests=len(prompts), out_tokens=n, wall_s=round(wall, 3),
                    out_tok_s=round(n / wall, 1))
    finally:
        from engine.attention import ATTN_IMPLEMENTATION
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


async def main_async(a: argparse.Namespace) -> list[dict]:
    loaded = load_model(ModelConfig(path=a.model, device=a.device, fuse=a.fuse), block_size=a.block_size)
    gpu = loaded.device.type == "cuda"
    vocab = loaded.model.config.vocab_size
    env = dict(model=a.model, device=str(loaded.device), dtype=str(loaded.dtype).removeprefix("torch."),
               gpu=torch.cuda.get_device_name() if gpu else None, torch=torch.__version__,
               async_scheduling=a.async_scheduling, switch_interval_s=sys.getswitchinterval())
    rows = []

    async def fresh_engine(gpu_blocks: int = a.gpu_blocks, host_blocks: int = 0, disk_path: str = "",
                           load_or_recompute: str = "auto") -> Engine:
        gc.collect()                      # engines are cyclic garbage: free the last one's pools first
        if gpu:
            torch.cuda.empty_cache()
        config = EngineConfig(max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_batched,
                              block_size=a.block_size, load_or_recompute=load_or_recompute,
                              async_scheduling=a.async_scheduling)
        store = StoreConfig(block_size=a.block_size, gpu_blocks=gpu_blocks, host_blocks=host_blocks,
                            disk_path=disk_path, disk_max_bytes=a.disk_gib << 30 if disk_path else 0)
        engine = Engine(loaded, config, store)
        await engine.start()
        return engine

    def record(name: str, found: dict | list[dict]) -> None:
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 1) if gpu else None
        for row in found if isinstance(found, list) else [found]:
            rows.append(dict(system="kvgate", workload=name, **row, peak_gpu_gib=peak, **env))
            print(json.dumps(rows[-1]), flush=True)

    if a.peer_script:   # first, on an idle GPU (its own process: it frees everything it took)
        rows += run_peer_script(a, [w for w in a.workloads.split(",") if w in ("gsp", "unique", "decode1")])
    engine = await fresh_engine()
    await run_kvgate(engine, [list(range(64))], 4)                  # warm-up
    await engine.stop(persist=False)
    for name in a.workloads.split(","):
        if gpu:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if name == "chat":
            engine = await fresh_engine()
            record(name, await tiers.chat(engine, vocab, max(1, round(16 * a.scale)), a.length))
            await engine.stop(persist=False)
        elif name == "chat-overflow":
            record(name, await tiers.chat_overflow(fresh_engine, vocab, max(2, round(32 * a.scale)),
                                                         a.block_size, a.length))
        elif name in tiers.THINK_SHAPES:
            shape = tiers.THINK_SHAPES[name]
            record(name, await tiers.chat_think(
                fresh_engine, vocab, a.scale, a.block_size, a.length, shape.think_s if a.think_s is None else a.think_s,
                configs=a.think_configs or shape.configs, shape=shape, repeat=a.repeat))
        elif name == "restart":
            record(name, await tiers.restart(fresh_engine, vocab, max(1, round(8 * a.scale)),
                                                   a.gpu_blocks, a.length))
        else:
            prompts, out_len = workload(name, vocab, a.scale, gpu, a.length)
            engine = await fresh_engine()                            # a cold cache
            record(name, await run_kvgate(engine, prompts, out_len))
            await engine.stop(persist=False)
            if a.peer and not a.peer_script:
                peer = run_peer(loaded.model, prompts, out_len, name)
                rows.append(dict(system="transformers", workload=name, **peer, **env))
                print(json.dumps(rows[-1]), flush=True)
    order = a.workloads.split(",")
    rows.sort(key=lambda r: (order.index(r["workload"]), r["system"] != "kvgate"))   # stable
    return rows


def run_peer_script(a: argparse.Namespace, workloads: list[str]) -> list[dict]:
    """The shared peer script (transformers, its own process) on the same workloads; one row per
    JSON line it prints."""
    if not workloads:
        return []
    shape = a.model.removeprefix("dummy:")
    cmd = [sys.executable, a.peer_script, "--model", shape, "--workloads", ",".join(workloads),
           "--scale", str(a.scale)] + (["--device", a.device] if a.device else [])
    print("$ python3 " + " ".join(cmd[1:]), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the peer script failed:\n{done.stderr[-3000:]}")
    rows = []
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            rows.append(dict(r, system="transformers", peer="hf_peer.py " + (
                "generate" if r["workload"] == "decode1" else "generate_batch")))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'workload':<13} {'system':<34} {'out tok/s':>10} {'decode tok/s':>12} {'TTFT p50':>9} "
          f"{'TTFT p99':>9} {'TPOT p50':>9} {'cached gpu/host/disk':>21}")
    for r in rows:
        system = r["system"] + (f" ({r['peer']})" if "peer" in r else "") + (
            f" [{r['config']}]" if "config" in r else "")
        tpot = f"{r['tpot_p50_ms']} ms" if "tpot_p50_ms" in r else "-"
        fractions = r.get("cached_fraction", {}).values()
        cached = "/".join(f"{v:.0%}" for v in fractions) or "-"
        print(f"{r['workload']:<13} {system:<34} {r.get('out_tok_s', '-'):>10} "
              f"{r.get('decode_tok_s', '-'):>12} {_ms(r.get('ttft_p50_s'))} {_ms(r.get('ttft_p99_s'))} "
              f"{tpot:>9} {cached:>21}")
    chats = [r for r in rows if "rounds" in r]
    if chats:
        print(f"\nchat rounds: TTFT p50 in ms (cached fraction of the prompt)\n{'config':<16} " +
              " ".join(f"{'round ' + str(i):>12}" for i in range(1, 9)))
        for r in chats:
            print(f"{r.get('config', '-'):<16} " + " ".join(
                f"{x['ttft_p50_s'] * 1e3:>5.0f} ({sum(x['cached_fraction'].values()):>3.0%})"
                for x in r["rounds"]))


def print_think_table(rows: list[dict]) -> None:
    for shape in tiers.THINK_SHAPES:
        _print_think_table(shape, [r for r in rows if r["workload"] == shape])


def _print_think_table(workload: str, rows: list[dict]) -> None:
    if not rows:
        return
    gpu = next((r for r in rows if r["config"] == "gpu"), None)
    small = next((r for r in rows if r["config"] == "small-host"), None)
    print(f"\n{workload}, rounds >= 2 (think {rows[0]['think_s']} s mean)\n{'config':<20} {'TTFT p50':>9} "
          f"{'p90':>8} {'÷ gpu':>6} {'÷ small':>7} {'queue p50':>9} {'out tok/s':>9} {'cached gpu/host/disk':>21} "
          f"{'preempt':>7} {'blocked':>7} {'read waits':>10} "
          f"{'disk writes':>11} {'skipped':>8} {'recomputed':>10} {'sched ms/step':>13} {'loop ms/step':>12} "
          f"{'1st-token step':>14} {'step p50':>8}")
    for r in rows:
        ratio = lambda base: f"{r['ttft_later_p50_s'] / base['ttft_later_p50_s']:.2f}" if base else "-"  # noqa: E731
        cached = "/".join(f"{v:.0%}" for v in r["cached_fraction"].values())
        name = r["config"] + (f" #{r['run'] + 1}" if r.get("run") else "")
        per_step = lambda key: f"{1e3 * r[key] / max(1, r['steps']):.2f}" if key in r else "-"  # noqa: E731
        print(f"{name:<20} {_ms(r['ttft_later_p50_s'])} {_ms(r['ttft_later_p90_s'])[1:]} {ratio(gpu):>6} "
              f"{ratio(small):>7} {_ms(r['queue_later_p50_s'])} {r['out_tok_s']:>9} {cached:>21} {r['preemptions']:>7} "
              f"{r['admissions_blocked']:>7} {r['read_waits']:>10} "
              f"{r['disk_writes']:>11} {sum(r['disk_writes_skipped'].values()):>8} {r['hits_recomputed']:>10} "
              f"{per_step('schedule_s'):>13} {per_step('loop_cpu_s'):>12} "
              f"{r['first_token_step_ms']:>7} ms/{r['first_token_step_prefill']:>5} {r['step_ms_p50']:>5} ms")


def plot_rounds(rows: list[dict], directory: str) -> str:
    """TTFT p50 per chat round, one line per configuration (needs matplotlib)."""
    import os

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(directory, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in rows:
        if r.get("rounds"):
            ax.plot([x["round"] for x in r["rounds"]], [x["ttft_p50_s"] * 1e3 for x in r["rounds"]], marker="o",
                    label=f"{r['workload']} {r.get('config', '')}")
    ax.set_xlabel("chat round")
    ax.set_ylabel("TTFT p50 (ms)")
    ax.legend(fontsize=7)
    path = os.path.join(directory, "chat_ttft_per_round.png")
    fig.tight_layout()
    fig.savefig(path)
    return path


def _ms(s: float | None) -> str:
    return f"{s * 1e3:7.0f}ms" if s is not None else f"{'-':>9}"


def build_parser() -> argparse.ArgumentParser:
    import engine.bench
    p = argparse.ArgumentParser(prog="python -m engine.bench", description=engine.bench.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dummy:tiny")
    p.add_argument("--device", default="")
    p.add_argument("--workloads", default="gsp,unique,decode1")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--gpu-blocks", type=int, default=12000)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-batched", type=int, default=4096, help="max_num_batched_tokens")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="skip transformers")
    p.add_argument("--peer-script", default="", help="run this peer script (hf_peer.py) in its own process "
                   "after kvgate's runs, instead of the in-process peer")
    p.add_argument("--no-fuse", dest="fuse", action="store_false", help="transformers' own decoder layers")
    p.add_argument("--no-async", dest="async_scheduling", action="store_false",
                   help="engine.async_scheduling = false: each step read back before the next is scheduled")
    p.add_argument("--length", type=float, default=1.0, help="multiplies every token count (tests)")
    p.add_argument("--disk-gib", type=int, default=32, help="disk tier cap for chat-overflow and restart")
    p.add_argument("--think-s", type=float, default=None,
                   help="chat-think: mean think time between turns (default 5 s; chat-think-long 6 s)")
    p.add_argument("--repeat", type=int, default=1, help="chat-think: run every configuration this many times")
    p.add_argument("--think-configs", default="",
                   help="chat-think: tier configurations to run (gpu, host, small-host, small-host+disk, host+disk; "
                   "a /load suffix runs one with engine.load_or_recompute = load). Default: chat-think "
                   "gpu,host,small-host+disk,host+disk; chat-think-long gpu,host+disk,small-host,small-host+disk")
    p.add_argument("--plots", default=None, help="write PNG plots (TTFT per chat round) to this directory")
    p.add_argument("--json", default=None)
    p.add_argument("--switch-interval", type=float, default=None,
                   help="sys.setswitchinterval for the run (seconds; Python's 0.005 by default): how long the "
                   "disk tier's threads may wait for the interpreter lock while the engine loop runs")
    p.add_argument("--kernel", action="store_true", help="time the decode kernel alone (CUDA)")
    p.add_argument("--profile-step", action="store_true",
                   help="time a decode step and a mixed step (decode + one returning user)")
    p.add_argument("--profile-prefill", type=int, default=80, help="--profile-step: the returning user's new tokens")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    if a.switch_interval is not None:
        sys.setswitchinterval(a.switch_interval)
    if a.kernel or a.profile_step:
        if a.kernel:
            step_profile.bench_kernel(a.device or "cuda")
        else:
            asyncio.run(step_profile.profile_step(a))
        return
    rows = asyncio.run(main_async(a))
    print_table(rows)
    print_think_table(rows)
    if a.plots and any(r.get("rounds") for r in rows):
        try:
            print("plot:", plot_rounds(rows, a.plots))
        except ImportError:
            print("plots skipped: install matplotlib (pip install matplotlib)", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
