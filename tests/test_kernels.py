"""The Triton paged-decode kernel against the reference attention, on fresh random inputs
(CUDA only; Triton's interpreter can run it on the CPU with TRITON_INTERPRET=1)."""
import math

import pytest
import torch

from engine import kernels
from engine.attention import SeqSlice, reference_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not kernels.available(DEVICE), reason="needs CUDA and Triton")


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 8, 64), (32, 8, 128), (4, 1, 32)])
def test_paged_decode_matches_reference(dtype, tolerance, heads, kv_heads, head_dim):
    if DEVICE.type == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter computes bf16 dot products wrongly")
    g = torch.Generator().manual_seed(heads * 1000 + head_dim)
    blocks, layers, block_size = 300, 3, 16
    lens = [1, 15, 16, 17, 64, 129, 1000, 2500]
    pool = torch.randn(blocks, layers, 2, block_size, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    tables = [torch.randperm(blocks, generator=g)[:math.ceil(n / block_size)] for n in lens]
    table = torch.zeros(len(lens), max(len(t) for t in tables), dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, :len(t)] = t
    q = torch.randn(len(lens), heads, head_dim, generator=g).to(DEVICE, dtype)
    out = torch.full_like(q, float("nan"))                    # poisoned: every element must be written
    scale = head_dim ** -0.5
    kernels.paged_decode(q, pool, 1, table.to(DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE),
                         scale, out)
    seqs = tuple(SeqSlice(i, 1, n, t.to(DEVICE)) for i, (n, t) in enumerate(zip(lens, tables)))
    ref = reference_attention(q.double().transpose(0, 1)[None], pool.double(), 1, seqs, scale, None)[0]
    assert not out.isnan().any()
    error = (out.double() - ref).norm() / ref.norm()
    assert error < tolerance, f"relative error {error:.2e}"
