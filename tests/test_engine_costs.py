"""The load-or-recompute arithmetic: per tier, per request, with the disk's backlog."""
from types import SimpleNamespace

from engine.costs import LoadOrRecompute
from store import Tier

MIB = 1 << 20


def policy(disk_gb_s: float, pending_mib: int = 0, mode: str = "auto") -> LoadOrRecompute:
    store = SimpleNamespace(layout=SimpleNamespace(block_bytes=2 * MIB), block_size=16,
                            disk_read_rate=disk_gb_s * 1e9)
    costs = LoadOrRecompute(store, mode)
    costs.queued_disk_blocks = pending_mib // 2
    costs.prefill_tokens_per_s = 40_000.0       # a block recomputes in 0.4 ms
    costs.host_bytes_per_s = 50e9               # and comes from the host in 0.04 ms
    return costs


def test_fast_tiers_load_and_a_slow_disk_is_recomputed():
    tiers = (Tier.GPU,) * 2 + (Tier.HOST,) * 3 + (Tier.DISK,) * 4
    assert policy(disk_gb_s=10).slowest_tier_to_load(tiers) is Tier.DISK     # 0.21 ms a block
    slow = policy(disk_gb_s=2)                                                # 1.05 ms a block
    assert slow.slowest_tier_to_load(tiers) is Tier.HOST
    assert slow.recomputed_blocks == {Tier.HOST: 0, Tier.DISK: 4}
    assert policy(disk_gb_s=2, mode="load").slowest_tier_to_load(tiers) is Tier.DISK


def test_loads_already_queued_for_the_disk_count():
    tiers = (Tier.DISK,) * 128                     # 256 MiB: 32 ms to load, 51 ms to recompute
    assert policy(disk_gb_s=10).slowest_tier_to_load(tiers) is Tier.DISK
    backlog = policy(disk_gb_s=10, pending_mib=512)                 # + 54 ms of loads queued before
    assert backlog.slowest_tier_to_load(tiers) is Tier.HOST


def test_unmeasured_rates_load():
    costs = policy(disk_gb_s=1)
    costs.prefill_tokens_per_s = None
    assert costs.slowest_tier_to_load((Tier.DISK,) * 8) is Tier.DISK
