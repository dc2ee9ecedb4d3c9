"""`kvgate bench`: the workloads of BENCHMARKS.md against any OpenAI-compatible server.

    kvgate bench --base-url http://127.0.0.1:8000/v1 --workloads gsp,unique,decode1,chat \\
                 [--scale 1] [--length-scale 1] [--json out.json] [--plots DIR]

Prompts are random token ids (so any tokenizer works), sent to /v1/completions with greedy
decoding, `ignore_eos` and streaming; time to first token and time per output token are
measured on the client. Cached prompt tokens come from `usage.prompt_tokens_details` (per tier
where the server reports `cached_tokens_by_tier`, as kvgate does).

  gsp      G groups x 16 requests, a 2048-token group prefix + 128 own tokens, 128 out, at once
  unique   64 prompts of 2176 tokens, 128 out, at once
  decode1  one 2048-token prompt, 128 out
  chat     U users with a 1024-token private context; 8 rounds each: +64 user tokens, 128 out,
           the answer joins the history (needs the server's `return_token_ids`, else random)
  chat-think  chat with think time between a user's turns (seeded exponential, mean --think-s;
           first turns spread over one think period), 64 x scale users; TTFT p50/p90 of
           rounds >= 2 is what a returning user feels. The tiers are the server's: run it once
           per server configuration (docs/benchmarks.md)
  chat-think-long  the same users with long histories: 24 x scale users of 6,000-token
           contexts, 4 rounds of +128 user tokens and 64 out, think 6 s unless --think-s says
`--scale` multiplies the request counts (G = max(1, round(8 * scale)), U = max(1, round(16 *
scale))); `--length-scale` multiplies every length (for quick runs).
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import aiohttp
from tqdm import tqdm

from engine.bench.common import percentile
from engine.bench.tiers import THINK_SHAPES, ChatShape

TIERS = ("gpu", "host", "disk")


@dataclass
class Sample:
    """One request as the client saw it."""
    workload: str
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    decode_s: float                    # first token to last
    cached: dict[str, int]             # cached prompt tokens per tier ("total" if not reported)
    round: int = 0                     # chat round (0 elsewhere)
    token_ids: list[int] = field(default_factory=list, repr=False)


class Progress:
    """A workload's progress bar on stderr, from its first request: done / total, elapsed, ETA."""

    def __init__(self, label: str, total: int) -> None:
        self.bar = tqdm(total=total, desc=f"{label:<10}", unit="req", file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.2)

    def step(self) -> None:
        self.bar.update(1)
        if self.bar.n >= self.bar.total:
            self.bar.close()


class Client:
    def __init__(self, base_url: str, model: str, api_key: str | None) -> None:
        self.url = base_url.rstrip("/") + "/completions"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.session: aiohttp.ClientSession | None = None
        self.retries = 0           # requests sent again after a 429 or 503

    async def complete(self, workload: str, prompt: list[int], max_tokens: int, progress: Progress,
                       round_: int = 0) -> Sample:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                "return_token_ids": True}
        start = time.perf_counter()
        first = last = None
        tokens: list[int] = []
        usage = {}
        async with await self._post(workload, body) as resp:
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                for choice in chunk.get("choices") or []:
                    if choice.get("text") or choice.get("token_ids"):
                        first = first or now
                        last = now
                        tokens += choice.get("token_ids") or []
                usage = chunk.get("usage") or usage
        progress.step()
        details = usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens_by_tier") or {"total": details.get("cached_tokens", 0)}
        return Sample(workload, usage.get("prompt_tokens", len(prompt)), usage.get("completion_tokens", 0),
                      (first or time.perf_counter()) - start, (last - first) if first else 0.0, cached,
                      round_, tokens)

    async def _post(self, workload: str, body: dict) -> aiohttp.ClientResponse:
        """The response to `body`, retried as the official SDKs retry: a 429 or 503 waits its
        Retry-After (else 0.5 s doubling, at most 8 s, with jitter), up to MAX_RETRIES times.
        The request's time counts from the first try: waiting is part of what a user sees."""
        for attempt in range(MAX_RETRIES + 1):
            resp = await self.session.post(self.url, json=body, headers=self.headers)
            if resp.status == 200:
                return resp
            text = await resp.text()
            resp.release()
            if resp.status not in (429, 503) or attempt == MAX_RETRIES:
                raise RuntimeError(f"{workload}: HTTP {resp.status}: {text}")
            self.retries += 1
            await asyncio.sleep(retry_after(resp.headers.get("Retry-After"), attempt))
        raise AssertionError("unreachable")


MAX_RETRIES = 8


def retry_after(header: str | None, attempt: int) -> float:
    """Seconds to wait before retry `attempt` (0-based): the server's Retry-After if it gives
    a number of seconds (at most 60), else exponential backoff with jitter."""
    try:
        return min(60.0, max(0.0, float(header)))
    except (TypeError, ValueError):
        return min(8.0, 0.5 * 2 ** attempt) * random.uniform(0.75, 1.0)


def _rand(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


async def run_workload(client: Client, name: str, vocab: int, scale: float,
                       length: float, think_s: float | None = None) -> tuple[list[Sample], float]:
    """All samples of one workload and its wall time."""
    rng = random.Random(f"kvgate-bench-{name}")   # workloads never share tokens by accident
    n = lambda x: max(1, round(x * length))  # noqa: E731
    if name == "chat":
        return await _chat(client, rng, vocab, max(1, round(16 * scale)), n)
    if name in THINK_SHAPES:
        shape = THINK_SHAPES[name]
        return await _chat(client, rng, vocab, max(2, round(shape.users * scale)), n,
                           shape.think_s if think_s is None else think_s, name, shape)
    if name == "gsp":
        prompts = []
        for _ in range(max(1, round(8 * scale))):
            prefix = _rand(rng, vocab, n(2048))
            prompts += [prefix + _rand(rng, vocab, n(128)) for _ in range(16)]
    elif name == "unique":
        prompts = [_rand(rng, vocab, n(2176)) for _ in range(max(1, round(64 * scale)))]
    elif name == "decode1":
        prompts = [_rand(rng, vocab, n(2048))]
    else:
        raise ValueError(f"unknown workload {name!r}; one of gsp, unique, decode1, chat, chat-think, "
                         "chat-think-long")
    progress = Progress(name, len(prompts))
    start = time.perf_counter()
    samples = await asyncio.gather(*(client.complete(name, p, n(128), progress) for p in prompts))
    return list(samples), time.perf_counter() - start


async def _chat(client: Client, rng: random.Random, vocab: int, users: int, n, think_s: float = 0.0,
                name: str = "chat", shape: ChatShape = THINK_SHAPES["chat-think"]) -> tuple[list[Sample], float]:
    context, turn, answer, rounds = shape.context, shape.turn, shape.answer, shape.rounds
    progress = Progress(name, users * rounds)

    async def user(u: int) -> list[Sample]:
        own = random.Random(f"{name}-{u}")           # each user's think times, whatever the others do
        history = _rand(rng, vocab, n(context))
        samples = []
        if think_s:
            await asyncio.sleep(own.uniform(0, think_s))
        for r in range(1, rounds + 1):
            history += _rand(rng, vocab, n(turn))
            s = await client.complete(name, history, n(answer), progress, r)
            history += s.token_ids or _rand(rng, vocab, n(answer))    # the answer joins the history
            samples.append(s)
            if think_s:
                await asyncio.sleep(own.expovariate(1 / think_s))
        return samples
    start = time.perf_counter()
    per_user = await asyncio.gather(*(user(u) for u in range(users)))
    return [s for samples in per_user for s in samples], time.perf_counter() - start


def summarize(name: str, samples: list[Sample], wall: float) -> dict:
    ttft = sorted(s.ttft_s for s in samples)
    tpot = [s.decode_s / (s.output_tokens - 1) for s in samples if s.output_tokens > 1]
    prompt = sum(s.prompt_tokens for s in samples)
    tiers = sorted({t for s in samples for t in s.cached})
    out = sum(s.output_tokens for s in samples)
    row = dict(workload=name, requests=len(samples), out_tokens=out, wall_s=round(wall, 3),
               out_tok_s=round(out / wall, 1), ttft_p50_s=round(percentile(ttft, 50), 4),
               ttft_p99_s=round(percentile(ttft, 99), 4),
               tpot_p50_ms=round(statistics.median(tpot) * 1e3, 2) if tpot else None,
               cached_fraction={t: round(sum(s.cached.get(t, 0) for s in samples) / prompt, 3)
                                for t in tiers})
    if name in THINK_SHAPES:
        later = sorted(s.ttft_s for s in samples if s.round >= 2)
        row.update(ttft_later_p50_s=round(percentile(later, 50), 4), ttft_later_p90_s=round(percentile(later, 90), 4))
    if name == "chat" or name in THINK_SHAPES:
        row["rounds"] = []
        for r in sorted({s.round for s in samples}):
            of_round = [s for s in samples if s.round == r]
            cached = sum(sum(s.cached.values()) for s in of_round) / sum(s.prompt_tokens for s in of_round)
            ttft_p50 = percentile(sorted(s.ttft_s for s in of_round), 50)
            row["rounds"].append(dict(round=r, ttft_p50_s=round(ttft_p50, 4),
                                      cached_fraction=round(cached, 3)))
    return row


def print_table(rows: list[dict]) -> None:
    print(f"\n{'workload':<15} {'requests':>8} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'TPOT p50':>9}  cached (per tier)")
    for r in rows:
        cached = " ".join(f"{t} {v:.0%}" for t, v in r["cached_fraction"].items())
        tpot = f"{r['tpot_p50_ms']} ms" if r["tpot_p50_ms"] is not None else "-"
        print(f"{r['workload']:<15} {r['requests']:>8} {r['out_tok_s']:>10} {r['ttft_p50_s'] * 1e3:>7.0f}ms "
              f"{r['ttft_p99_s'] * 1e3:>7.0f}ms {tpot:>9}  {cached}")
        if "ttft_later_p50_s" in r:
            print(f"  rounds >= 2: TTFT p50 {r['ttft_later_p50_s'] * 1e3:.0f} ms, "
                  f"p90 {r['ttft_later_p90_s'] * 1e3:.0f} ms")
        for rd in r.get("rounds", []):
            print(f"  round {rd['round']}: TTFT p50 {rd['ttft_p50_s'] * 1e3:.0f} ms, "
                  f"cached {rd['cached_fraction']:.0%}")


def plot(rows: list[dict], directory: str, details: str = "") -> list[str]:
    """PNG plots: throughput per workload; per chat round, TTFT and the share of the prompt that
    came from the cache. `details` (model, scale, date) goes under each title. Needs matplotlib."""
    import os

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(directory, exist_ok=True)
    paths = []

    def save(fig, ax, title: str, name: str) -> None:
        ax.set_title(f"{title}\n{details}" if details else title, fontsize=9)
        ax.set_ylim(bottom=0)
        paths.append(os.path.join(directory, name))
        fig.tight_layout()
        fig.savefig(paths[-1])
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["workload"] for r in rows], [r["out_tok_s"] for r in rows])
    ax.set_ylabel("output tokens / s")
    save(fig, ax, "kvgate bench: throughput per workload", "throughput.png")
    for r in rows:
        if r.get("rounds"):
            fig, ax = plt.subplots(figsize=(6, 3.5))
            rounds = [x["round"] for x in r["rounds"]]
            ax.plot(rounds, [x["ttft_p50_s"] * 1e3 for x in r["rounds"]], marker="o", label="TTFT p50")
            ax.set_xlabel("chat round")
            ax.set_ylabel("TTFT p50 (ms)")
            hits = ax.twinx()
            hits.plot(rounds, [x["cached_fraction"] * 100 for x in r["rounds"]], marker="s", color="tab:green",
                      label="prompt from cache")
            hits.set_ylabel("prompt from cache (%)")
            hits.set_ylim(0, 100)
            save(fig, ax, f"kvgate bench {r['workload']}: time to first token and cache hits per round",
                 f"{r['workload']}_ttft.png")
    return paths


def session_for_workloads() -> aiohttp.ClientSession:
    """An HTTP session that sends every request of a workload at once: aiohttp's default
    connector holds requests past 100 connections back in the client (gsp sends 128 at once,
    and 28 of them then waited for the first 100 to finish: a TTFT p99 of ~3 s on the H200 that
    was the client's)."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                 connector=aiohttp.TCPConnector(limit=0))


async def main_async(a) -> list[dict]:
    if a.plots and importlib.util.find_spec("matplotlib") is None:     # say so before an hour of work
        print("kvgate bench: --plots needs matplotlib (pip install matplotlib)", file=sys.stderr)
        raise SystemExit(2)
    client = Client(a.base_url, a.model, a.api_key)
    async with session_for_workloads() as session:
        client.session = session
        if not client.model or not a.vocab:
            async with session.get(a.base_url.rstrip("/") + "/models", headers=client.headers) as resp:
                card = (await resp.json())["data"][0]
            client.model = client.model or card["id"]
            a.vocab = a.vocab or card.get("vocab_size") or 256
        rows, samples = [], []
        for name in a.workloads.split(","):
            got, wall = await run_workload(client, name, a.vocab, a.scale, a.length_scale, a.think_s)
            rows.append(summarize(name, got, wall))
            samples += got
    print_table(rows)
    if client.retries:
        print(f"{client.retries} requests were retried after a 429 or 503 (Retry-After honoured; their wait "
              "is in their times)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(base_url=a.base_url, model=client.model, rows=rows,
                           samples=[{k: v for k, v in asdict(s).items() if k != "token_ids"}
                                    for s in samples]),
                      f, indent=1)
    if a.plots:
        details = (f"{client.model} at {a.base_url}, scale {a.scale:g}, length scale {a.length_scale:g}, "
                   f"{time.strftime('%Y-%m-%d %H:%M')}")
        print("plots:", ", ".join(plot(rows, a.plots, details)))
    return rows
