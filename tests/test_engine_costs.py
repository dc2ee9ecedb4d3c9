"""The load-or-recompute arithmetic: the host part per request, the disk part's share."""
from types import SimpleNamespace

from engine.costs import LoadOrRecompute
from store import Tier

MIB = 1 << 20


def policy(disk_gb_s: float, mode: str = "auto") -> LoadOrRecompute:
    store = SimpleNamespace(layout=SimpleNamespace(block_bytes=2 * MIB), block_size=16,
                            disk_read_rate=disk_gb_s * 1e9)
    costs = LoadOrRecompute(store, mode)
    costs.prefill_tokens_per_s = 40_000.0       # a block recomputes in 0.4 ms
    costs.host_bytes_per_s = 50e9               # and comes from the host in 0.04 ms
    return costs


def test_a_fast_host_tier_loads_and_a_slow_one_is_recomputed():
    tiers = (Tier.GPU,) * 2 + (Tier.HOST,) * 3 + (Tier.DISK,) * 4
    costs = policy(disk_gb_s=10)
    assert costs.slowest_tier_to_load(tiers) is Tier.HOST       # 0.04 ms a block against 0.4 ms
    assert costs.recomputed_blocks == {Tier.HOST: 0, Tier.DISK: 0}
    costs.host_bytes_per_s = 2e9                                 # 1 ms a block: slower than prefill
    assert costs.slowest_tier_to_load(tiers) is Tier.GPU
    assert costs.recomputed_blocks == {Tier.HOST: 3, Tier.DISK: 4}   # everything past the GPU part
    costs.mode = "load"
    assert costs.slowest_tier_to_load(tiers) is Tier.HOST


def test_the_front_computes_its_share_of_a_disk_part():
    """Compute and load at once: the front takes compute / (compute + read) of the gap."""
    costs = policy(disk_gb_s=10)                  # prefill 40k tokens/s = 5.2 GB/s of KV
    assert abs(costs.compute_share() - 5.24 / 15.24) < 0.01
    assert abs(policy(disk_gb_s=1).compute_share() - 5.24 / 6.24) < 0.01
    costs.prefill_tokens_per_s = None
    assert costs.compute_share() == 0.0           # nothing measured yet: it loads


def test_the_front_computes_nothing_once_it_would_delay_others_more_than_it_saves():
    """Computing x of a gap G saves its sequence x*G/read and costs each other sequence in the
    step x*G/compute: the front computes its share only while others < compute / read."""
    slow_disk = policy(disk_gb_s=1)               # compute 5.24 GB/s of KV: 5.24x the read
    assert abs(slow_disk.compute_share(others=5) - 5.24 / 6.24) < 0.01
    assert slow_disk.compute_share(others=6) == 0.0
    fast_disk = policy(disk_gb_s=10)              # compute / read = 0.52: only alone
    assert abs(fast_disk.compute_share(others=0) - 5.24 / 15.24) < 0.01
    assert fast_disk.compute_share(others=1) == 0.0
