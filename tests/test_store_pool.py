import pytest
import torch

from store import BlockLayout, OutOfBlocks, Tier
from store.copier import BlockCopier, slot_runs
from store.pool import BlockPool
from tests.conftest import LAYOUT


def test_layout_shape_and_bytes():
    lay = BlockLayout(num_layers=32, block_size=16, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    assert lay.block_shape == (32, 2, 16, 8, 128)
    assert lay.block_bytes == 2 * 1024 * 1024  # the 8B shape: 2 MiB per 16-token block
    with pytest.raises(ValueError, match="head_dim"):
        BlockLayout(1, 16, 1, 0, torch.float32)


def test_pool_is_page_major_and_allocates_lowest_first():
    pool = BlockPool(Tier.GPU, LAYOUT, 6, "cpu")
    assert pool.tensor.shape == (6, *LAYOUT.block_shape)
    assert pool.tensor[3].is_contiguous()
    assert pool.allocate(2) == [0, 1]
    pool.free([0])
    assert pool.allocate(3) == [0, 2, 3]
    assert pool.num_free == 2


def test_allocation_is_all_or_nothing():
    pool = BlockPool(Tier.HOST, LAYOUT, 4, "cpu")
    pool.allocate(3)
    with pytest.raises(OutOfBlocks, match="2 blocks asked, 1 free of 4"):
        pool.allocate(2)
    assert pool.num_free == 1 and pool.allocate(1) == [3]


def test_double_free_is_caught():
    pool = BlockPool(Tier.GPU, LAYOUT, 2, "cpu")
    slots = pool.allocate(1)
    pool.free(slots)
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free(slots)


def test_slot_runs():
    assert slot_runs([4, 5, 6, 9, 2, 3]) == [(0, 4, 3), (3, 9, 1), (4, 2, 2)]
    assert slot_runs([]) == []


def _copier(device, staging=3):
    gpu = BlockPool(Tier.GPU, LAYOUT, 16, device)
    host = BlockPool(Tier.HOST, LAYOUT, 16, "cpu", pin_memory=device != "cpu")
    return gpu, host, BlockCopier(gpu, host, staging_bytes=staging * LAYOUT.block_bytes)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gpu_slots,host_slots", [
    ([0, 1, 2, 3, 4], [7, 8, 9, 10, 11]),          # both consecutive: direct copies
    ([9, 2, 14, 5, 6, 7, 0], [1, 2, 3, 10, 11, 4, 15]),  # scattered: staging, 3 chunks
])
def test_copies_move_exactly_the_named_blocks(device, gpu_slots, host_slots):
    gpu, host, copier = _copier(device)
    host.tensor.copy_(torch.randn(host.tensor.shape))
    gpu.tensor.fill_(float("nan"))
    before = gpu.tensor.cpu().clone()
    copier.to_gpu(host_slots, gpu_slots)
    copier.host_ready()
    after = gpu.tensor.cpu()
    for g, h in zip(gpu_slots, host_slots):
        assert torch.equal(after[g], host.tensor[h])
    untouched = [s for s in range(16) if s not in gpu_slots]
    assert torch.equal(after[untouched].isnan(), before[untouched].isnan())

    gpu.tensor.copy_(torch.randn(gpu.tensor.shape).to(device))
    host.tensor.fill_(float("nan"))
    copier.to_host(gpu_slots, host_slots)
    copier.host_ready()
    for g, h in zip(gpu_slots, host_slots):
        assert torch.equal(host.tensor[h], gpu.tensor[g].cpu())
    assert host.tensor[[s for s in range(16) if s not in host_slots]].isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_per_block_baseline_copies_the_same(device):
    gpu, host, copier = _copier(device)
    host.tensor.copy_(torch.randn(host.tensor.shape))
    copier.per_block_to_gpu([3, 1], [5, 0])
    copier.per_block_to_host([5, 0], [8, 9])
    copier.host_ready()
    assert torch.equal(host.tensor[8], host.tensor[3]) and torch.equal(host.tensor[9], host.tensor[1])
