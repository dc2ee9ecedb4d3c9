"""The CUDA path of the store: pinned host pool, copies on a side stream ordered by events.
Each test queues heavy work on the compute stream first, so a copy that did not wait for it
(or a kernel that did not wait for a copy) would see stale data."""
import pytest
import torch

from store import BlockLayout, Tier
from tests.conftest import cuda

pytestmark = cuda

BIG = BlockLayout(num_layers=8, block_size=16, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)  # 512 KiB


def busy(matmuls: int = 200) -> None:
    """Queue tens of ms of work on the compute stream (a 4096^3 bf16 matmul is ~0.2 ms)."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(matmuls):
        a = (a @ a).clamp_(-1, 1)


def test_host_pool_is_pinned_and_gpu_pool_on_cuda(store_factory):
    store = store_factory(gpu=4, host=4, layout=BIG)
    assert store.host.tensor.is_pinned() and store.gpu.tensor.is_cuda
    assert store.copier._side is not None and store.copier._side != torch.cuda.current_stream()


def test_shared_pools_are_pinned_and_copy_asynchronously(tmp_path):
    """With a disk tier the host pool and the disk staging area are shared memory, registered
    with CUDA: pinned, so copies to and from them are queued without a wait."""
    from store.pool import BlockPool
    from tests.conftest import make_store
    store = make_store(tmp_path, gpu=4, host=4, disk_blocks=16, layout=BIG)
    assert store.host.fd is not None and store.host.tensor.is_pinned()
    assert store.disk.staging.fd is not None and store.disk.staging.tensor.is_pinned()
    pool = BlockPool(Tier.HOST, BIG, 64, "cpu", pin_memory=True, shared=True)
    gpu = torch.randn(pool.tensor.shape, device="cuda").to(BIG.dtype)
    busy()
    pool.tensor.copy_(gpu, non_blocking=True)         # queued behind the busy stream, no wait
    assert not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert torch.equal(pool.tensor, gpu.cpu())
    store.close()


@pytest.mark.parametrize("n_blocks", [1, 24])
def test_demotion_copies_only_after_the_kernel_that_wrote_the_block(store_factory, n_blocks):
    store = store_factory(gpu=n_blocks, host=2 * n_blocks, layout=BIG)
    tokens = list(range(16 * n_blocks))
    seq = store.admit("writer", store.root_key(), tokens)
    busy()                                            # the compute stream is far behind...
    for slot in seq.slots:
        store.gpu.tensor[slot].fill_(slot + 1.0)      # ...when it finally writes the blocks
    store.commit("writer", tokens)
    store.release("writer")
    other = store.admit("evictor", store.root_key(), [99] * len(tokens))  # demotes them all
    for slot in other.slots:
        store.gpu.tensor[slot].fill_(-7.0)            # the freed slots are reused at once
    nodes = store.match(store.root_key(), tokens).nodes
    assert all(n.fastest is Tier.HOST for n in nodes)
    store.copier.host_ready()
    for n, slot in zip(nodes, seq.slots):
        assert torch.all(store.host.tensor[n.host_slot] == slot + 1.0), "copied before it was written"
    store.release("evictor")
    store.check_integrity()


def test_kernels_after_a_promotion_see_the_promoted_blocks(store_factory):
    store = store_factory(gpu=40, host=64, layout=BIG)
    tokens = list(range(16 * 32))
    seq = store.admit("a", store.root_key(), tokens)
    for i, slot in enumerate(seq.slots):
        store.gpu.tensor[slot].fill_(float(i))
    store.commit("a", tokens)
    store.release("a")
    store.admit("evict", store.root_key(), [5] * (16 * 40))   # all of "a" goes to the host
    store.release("evict")
    store.gpu.tensor.fill_(-1.0)
    busy()                                  # the promotion's copies queue behind this work
    again = store.admit("a2", store.root_key(), tokens + [1])
    assert again.cached_tokens[Tier.HOST] == len(tokens)
    # read on the compute stream right away: must wait for the copies, not see -1
    firsts = torch.stack([store.gpu.tensor[s][0, 0, 0, 0, 0] for s in again.slots[:32]]).float().cpu()
    assert torch.equal(firsts, torch.arange(32, dtype=torch.float32))
    store.release("a2")
    store.check_integrity()
