"""The load-or-recompute arithmetic: the host part per request, the disk part's meeting point."""
from types import SimpleNamespace

import pytest

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
    costs.host_bytes_per_s = 2e9                                 # 1 ms a block: slower than prefill
    assert costs.slowest_tier_to_load(tiers) is Tier.GPU        # everything past the GPU part
    costs.mode = "load"
    assert costs.slowest_tier_to_load(tiers) is Tier.HOST


def test_the_front_and_the_read_meet_where_both_finish_together():
    """A block recomputes in 0.4 ms; at 10 GB/s it is read in 0.21 ms: of 100 disk blocks the
    front computes 34 (13.6 ms) while the last 66 are read (13.8 ms). A slower disk is read
    for less, one slower than computing not at all; the due time is the read's, with slack."""
    assert policy(disk_gb_s=10).read_from(0, 100) == (34, pytest.approx(1.25 * 66 * 2 * MIB / 10e9 + 0.02))
    assert policy(disk_gb_s=10).read_from(20, 120)[0] == 54               # the same gap, further on
    assert policy(disk_gb_s=1).read_from(0, 100)[0] == 84                  # 2.1 ms a block: 16 read
    assert policy(disk_gb_s=0.01).read_from(0, 100)[0] == 100              # nothing worth reading
    assert policy(disk_gb_s=10).read_from(0, 8) == (8, 0.0)    # saves 2 ms: not worth a step more
    assert policy(disk_gb_s=10).read_from(0, 20)[0] == 7       # saves 5.3 ms


def test_reads_queued_on_the_disk_push_the_meeting_point_back():
    """A new load waits behind what the others still mean to read: 64 MiB queued (6.7 ms) and
    it reads 55 blocks instead of 66; a full GiB queued, and computing it all is sooner."""
    assert policy(disk_gb_s=10).read_from(0, 100, queued_bytes=64 * MIB)[0] == 45
    assert policy(disk_gb_s=10).read_from(0, 100, queued_bytes=1 << 30)[0] == 100


def test_prompt_tokens_other_sequences_compute_first_move_the_meeting_point_forward():
    """The front shares the GPU: 400 tokens other prompts compute first (10 ms) and it reads 82
    blocks instead of 66; 4,000 (100 ms), and the whole disk part is read."""
    assert policy(disk_gb_s=10).read_from(0, 100, compute_ahead=400)[0] == 18
    assert policy(disk_gb_s=10).read_from(0, 100, compute_ahead=4000)[0] == 0


def test_a_stalled_disk_is_not_read_and_load_mode_or_missing_rates_read_it_all():
    assert policy(disk_gb_s=10).read_from(0, 100, stalled=True) == (100, 0.0)
    assert policy(disk_gb_s=10, mode="load").read_from(0, 100) == (0, None)
    unmeasured = policy(disk_gb_s=10)
    unmeasured.prefill_tokens_per_s = None
    assert unmeasured.read_from(0, 100) == (0, None)
