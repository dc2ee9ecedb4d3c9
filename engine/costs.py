"""Load or recompute: for each cache hit, how its KV gets back onto the GPU.

A block in the host tier costs one host -> GPU copy of its bytes; recomputing it costs
`block_size` tokens of prefill. The rates come from measurements on this machine: prefill
speed and host -> GPU bandwidth at start-up (`ModelRunner.warmup`), then prefill speed on every
step that prefills enough tokens to tell. Until a rate is known the policy loads: on a CPU
deployment loading wins by far. Tiers along a cached prefix only get slower (a parent is never
in a slower tier than its child), so the choice is one cut: load the host part, or recompute
from its first block.

The disk part of a prefix is not a choice between the two: the front computes it at full speed,
exactly as with the tier off, while the back is read from its last block (store/loader.py);
when they meet, the sequence skips what was read. So a read can only save steps, never add one.
Which blocks are worth reading at all is the meeting point (`read_from`): a block is read only
if it should arrive before the front would compute it, given the measured rates and the bytes
other loads have queued on the disk; a stalled disk is read from not at all. In "load" mode the
sequence waits for the read instead (unless the disk stalls). What came of each hit (loaded
from which tier, or recomputed) is counted by the engine when the request ends.
"""
from __future__ import annotations

import math

from store import BlockStore, Tier

MIN_PREFILL_TOKENS = 256   # steps prefilling fewer tokens say too little about prefill speed
_EMA = 0.2                 # weight of the newest measurement
MIN_SAVING_S = 0.005       # a read that saves less is not worth the step it may add (it waits at the meeting point)


class LoadOrRecompute:
    def __init__(self, store: BlockStore, mode: str = "auto") -> None:
        self.store = store
        self.block_bytes = store.layout.block_bytes
        self.block_size = store.block_size
        self.mode = mode                               # "auto", or "load": always load
        self.prefill_tokens_per_s: float | None = None
        self.host_bytes_per_s: float | None = None    # host -> GPU

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens >= MIN_PREFILL_TOKENS and seconds > 0:
            self.prefill_tokens_per_s = _ema(self.prefill_tokens_per_s, tokens / seconds)

    def worth_loading_from_host(self, blocks: int = 1) -> bool:
        """Is copying `blocks` host blocks faster than recomputing them?"""
        if self.mode == "load" or self.host_bytes_per_s is None or self.prefill_tokens_per_s is None:
            return True
        return blocks * self.block_bytes / self.host_bytes_per_s < blocks * self.block_size / self.prefill_tokens_per_s

    def slowest_tier_to_load(self, tiers: tuple[Tier, ...]) -> Tier:
        """HOST if the host part of a prefix whose blocks are in `tiers` is worth loading (the
        disk part is then loaded and computed at once), else GPU: everything past the GPU part
        is recomputed."""
        if self.worth_loading_from_host(max(1, sum(t is Tier.HOST for t in tiers))):
            return Tier.HOST
        return Tier.GPU

    def read_from(self, first: int, end: int, queued_bytes: int = 0, stalled: bool = False,
                  compute_ahead: int = 0) -> tuple[int, float | None]:
        """Where to read the disk part [first, end) of a prefix from: (the first block worth
        reading, the seconds until it is due). The front computes [first, j) after the
        `compute_ahead` prompt tokens other sequences compute first or beside it, while the rest
        is read from `end` backwards behind the `queued_bytes` other loads have queued: the
        front is done at (compute_ahead + (j - first) * block_size) / prefill, the read at
        (queued + (end - j) * block_bytes) / read; j is the meeting point, where the later of
        the two comes soonest. Due: the read's end, plus a quarter and 20 ms of slack
        (polling, jitter). (end, 0) (read nothing) when that saves less than MIN_SAVING_S, or
        when the disk has stalled; (first, None) (read it all) in "load" mode or until both
        rates are measured."""
        if stalled:
            return end, 0.0
        read = self.store.disk_read_rate
        if self.mode == "load" or self.prefill_tokens_per_s is None or read is None:
            return first, None
        per_read = self.block_bytes / read                          # s per block read
        per_compute = self.block_size / self.prefill_tokens_per_s   # s per block computed
        queued, ahead = queued_bytes / read, compute_ahead / self.prefill_tokens_per_s
        done = lambda j: max(ahead + (j - first) * per_compute, queued + (end - j) * per_read)  # noqa: E731
        meet = (queued - ahead + end * per_read + first * per_compute) / (per_read + per_compute)
        j = min((min(end, max(first, math.floor(meet) + d)) for d in (0, 1)), key=done)
        if done(end) - done(j) < MIN_SAVING_S:      # not worth a step more and the copies
            return end, 0.0
        return j, 1.25 * (queued + (end - j) * per_read) + 0.02

    def rates(self) -> dict[str, float | None]:
        return dict(prefill_tokens_per_s=self.prefill_tokens_per_s, host_bytes_per_s=self.host_bytes_per_s,
                    disk_bytes_per_s=self.store.disk_read_rate)


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - _EMA) * old + _EMA * new
