"""Load or recompute: for each cache hit, the faster way to get its KV back onto the GPU.

A block in the host tier costs one host -> GPU copy of its bytes; a block on disk costs a disk
read into the host tier and that copy; recomputing it costs `block_size` tokens of prefill. The
rates come from measurements on this machine: prefill speed and host -> GPU bandwidth at
start-up (`ModelRunner.warmup`), then prefill speed on every step that prefills enough tokens
to tell, and disk read bandwidth at start-up and on every disk load (`BlockStore.disk_read_rate`).
A disk load also waits for the loads queued before it. Until a rate is known the policy loads:
on a CPU deployment, or with a fast disk, loading wins by far.

Tiers along a cached prefix only get slower (a parent is never in a slower tier than its
child), so the choice is one cut: load the blocks of every tier worth loading, recompute from
the first block that is not.
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
        self.queued_disk_blocks = 0       # blocks of the disk loads started and not finished (engine's)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens >= MIN_PREFILL_TOKENS and seconds > 0:
            self.prefill_tokens_per_s = _ema(self.prefill_tokens_per_s, tokens / seconds)

    def block_load_seconds(self, tier: Tier) -> float | None:
        """Time to bring one block from `tier` to the GPU; None if not measured yet."""
        if tier is Tier.GPU:
            return 0.0
        if self.host_bytes_per_s is None:
            return None
        seconds = self.block_bytes / self.host_bytes_per_s
        if tier is Tier.DISK:
            if self.store.disk_read_rate is None:
                return None
            seconds += self.block_bytes / self.store.disk_read_rate
        return seconds

    def worth_loading(self, tier: Tier, blocks: int = 1) -> bool:
        """Is loading `blocks` blocks from `tier` faster than recomputing them? Disk loads queue
        behind the loads already in flight (one I/O thread), so their bytes count too."""
        if self.mode == "load" or tier is Tier.GPU:
            return True
        per_block = self.block_load_seconds(tier)
        if per_block is None or self.prefill_tokens_per_s is None:
            return True
        load = blocks * per_block
        if tier is Tier.DISK:
            load += self.queued_disk_blocks * self.block_bytes / self.store.disk_read_rate
        return load < blocks * self.block_size / self.prefill_tokens_per_s

    def slowest_tier_to_load(self, tiers: tuple[Tier, ...]) -> Tier:
        """The slowest tier worth loading from, for a prefix whose blocks are in `tiers`
        (recomputation starts at its first block in a slower tier); counts what is recomputed."""
        limit = Tier.GPU
        for tier in (Tier.HOST, Tier.DISK):
            if not self.worth_loading(tier, max(1, sum(t is tier for t in tiers))):
                break
            limit = tier
        for tier in tiers:
            if tier > limit:
                self.recomputed_blocks[tier] += 1
        return limit

    def rates(self) -> dict[str, float | None]:
        return dict(prefill_tokens_per_s=self.prefill_tokens_per_s, host_bytes_per_s=self.host_bytes_per_s,
                    disk_bytes_per_s=self.store.disk_read_rate)


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - _EMA) * old + _EMA * new
