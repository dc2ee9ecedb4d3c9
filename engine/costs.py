"""Load or recompute: for each cache hit, how its KV gets back onto the GPU.

A block in the host tier costs one host -> GPU copy of its bytes; recomputing it costs
`block_size` tokens of prefill. The rates come from measurements on this machine: prefill
speed and host -> GPU bandwidth at start-up (`ModelRunner.warmup`), then prefill speed on every
step that prefills enough tokens to tell. Until a rate is known the policy loads: on a CPU
deployment loading wins by far. Tiers along a cached prefix only get slower (a parent is never
in a slower tier than its child), so the choice is one cut: load the host part, or recompute
from its first block.

The disk part of a prefix is not a choice between the two: it is computed from the front while
it is read from the back (store/loader.py), and whichever is faster covers more of it — while
the GPU has few other sequences computing to delay (`compute_share`). In "load" mode the
sequence waits for the read instead. `recomputed_blocks` counts the hits that were computed
rather than loaded, per tier.
"""
from __future__ import annotations

from store import BlockStore, Tier

MIN_PREFILL_TOKENS = 256   # steps prefilling fewer tokens say too little about prefill speed
_EMA = 0.2                 # weight of the newest measurement


class LoadOrRecompute:
    def __init__(self, store: BlockStore, mode: str = "auto") -> None:
        self.store = store
        self.block_bytes = store.layout.block_bytes
        self.block_size = store.block_size
        self.mode = mode                               # "auto", or "load": always load
        self.prefill_tokens_per_s: float | None = None
        self.host_bytes_per_s: float | None = None    # host -> GPU
        self.recomputed_blocks = {Tier.HOST: 0, Tier.DISK: 0}   # hits recomputed instead of loaded

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
        is recomputed, and counted."""
        if self.worth_loading_from_host(max(1, sum(t is Tier.HOST for t in tiers))):
            return Tier.HOST
        for tier in tiers:
            if tier > Tier.GPU:
                self.recomputed_blocks[tier] += 1
        return Tier.GPU

    def compute_share(self, others: int = 0) -> float:
        """The share of a disk part the front should compute while the rest is read, with
        `others` other sequences computing in the step. Alone on the GPU: the computing rate
        over both rates (in KV bytes/s), so that both finish together. But every sequence that
        computes in a step waits for the tokens computed in it, while a read costs it nothing:
        computing a fraction x of a gap G saves its own sequence x*G/read and costs the others
        others*x*G/compute. So once `others` >= compute / read the front computes none of it and
        waits for the read (a busy GPU: many decoding sequences). Until both rates are measured:
        0 (load)."""
        read = self.store.disk_read_rate
        if self.prefill_tokens_per_s is None or read is None:
            return 0.0
        compute = self.prefill_tokens_per_s * self.block_bytes / self.block_size
        if others >= compute / read:
            return 0.0
        return compute / (compute + read)

    def rates(self) -> dict[str, float | None]:
        return dict(prefill_tokens_per_s=self.prefill_tokens_per_s, host_bytes_per_s=self.host_bytes_per_s,
                    disk_bytes_per_s=self.store.disk_read_rate)


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - _EMA) * old + _EMA * new
