"""The Triton paged-attention kernels against the reference attention, on fresh random inputs
(CUDA only; Triton's interpreter can run them on the CPU with TRITON_INTERPRET=1)."""
import math

import pytest
import torch

from engine import kernels
from engine.attention import SeqSlice, reference_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not kernels.available(DEVICE), reason="needs CUDA and Triton")


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("heads,kv_heads,head_dim,partitions", [(8, 8, 64, None), (32, 8, 128, None),
                                                                (4, 1, 32, 1), (32, 8, 128, 5)])
def test_paged_decode_matches_reference(dtype, tolerance, heads, kv_heads, head_dim, partitions):
    """Whole contexts per program, and split-K (parts past short contexts stay empty)."""
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
                         scale, out, partitions=partitions)
    seqs = tuple(SeqSlice(i, 1, n, t.to(DEVICE)) for i, (n, t) in enumerate(zip(lens, tables)))
    ref = reference_attention(q.double().transpose(0, 1)[None], pool.double(), 1, seqs, scale, None)[0]
    assert not out.isnan().any()
    error = (out.double() - ref).norm() / ref.norm()
    assert error < tolerance, f"relative error {error:.2e}"


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("heads,kv_heads,head_dim,window", [(8, 8, 64, 0), (32, 8, 128, 0), (4, 1, 32, 40)])
def test_paged_prefill_matches_reference(dtype, tolerance, heads, kv_heads, head_dim, window):
    if DEVICE.type == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter computes bf16 dot products wrongly")
    g = torch.Generator().manual_seed(heads * 7 + head_dim + window)
    blocks, layers, block_size = 400, 2, 16
    chunks = [(5, 5), (70, 70), (30, 100), (1, 17), (64, 200), (129, 1500)]   # (new tokens, context)
    pool = torch.randn(blocks, layers, 2, block_size, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    total = sum(n for n, _ in chunks)
    q = torch.randn(total, heads, head_dim, generator=g).to(DEVICE, dtype)
    tables, rows, tiles, seqs, row = [], [], [], [], 0
    for i, (n, ctx) in enumerate(chunks):
        tables.append(torch.randperm(blocks, generator=g)[:math.ceil(ctx / block_size)])
        rows.append((row, n, ctx))
        tiles += [(i, m) for m in range(0, n, kernels.PREFILL_TILE)]
        seqs.append(SeqSlice(row, n, ctx, tables[-1].to(DEVICE)))
        row += n
    table = torch.nn.utils.rnn.pad_sequence(tables, batch_first=True).to(torch.int32)
    out = torch.full_like(q, float("nan"))
    scale = head_dim ** -0.5
    kernels.paged_prefill(q, pool, 1, torch.tensor(tiles, dtype=torch.int32, device=DEVICE),
                          torch.tensor(rows, dtype=torch.int32, device=DEVICE), table.to(DEVICE), scale,
                          window, out)
    ref = reference_attention(q.double().transpose(0, 1)[None], pool.double(), 1, tuple(seqs), scale,
                              window or None)[0]
    assert not out.isnan().any()
    error = (out.double() - ref).norm() / ref.norm()
    assert error < tolerance, f"relative error {error:.2e}"
