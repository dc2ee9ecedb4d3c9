"""Paged decode attention in Triton: every decoding sequence of a step, one launch per layer.

One program per (sequence, KV head) computes the attention of that KV head's group of query
heads (GQA) over the sequence's blocks, reading each K/V tile once for the whole group, with an
online softmax over tiles of TILE tokens gathered through the block table. Tested against
`engine.attention.reference_attention` on random inputs (tests/test_kernels.py, CUDA only).
Triton is optional: without it (or without CUDA) the reference implementation is used.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

TILE = 64  # tokens of K/V per loop iteration


def available(device: torch.device) -> bool:
    """On CUDA with Triton installed; on the CPU only under Triton's interpreter (tests)."""
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def paged_decode(query: torch.Tensor, pool: torch.Tensor, layer: int, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, out: torch.Tensor, tile: int = TILE,
                 num_warps: int = 4, num_stages: int = 2) -> None:
    """query: [S, H, D] (one new token per sequence); pool: [NB, L, 2, BS, KVH, D];
    block_tables: [S, max_blocks] int32; context_lens: [S] int32; out: [S, H, D].
    `tile`, `num_warps`, `num_stages`: launch parameters (see `python -m engine.bench --kernel`)."""
    seqs, heads, head_dim = query.shape
    block_size, kv_heads = pool.shape[3], pool.shape[4]
    group = heads // kv_heads
    _decode_kernel[(seqs, kv_heads)](
        query, pool, block_tables, context_lens, out, layer, scale,
        query.stride(0), query.stride(1), pool.stride(0), pool.stride(1), pool.stride(2),
        pool.stride(3), pool.stride(4), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, TILE=max(tile, block_size), IEEE=query.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages)


if triton is not None:
    @triton.jit
    def _decode_kernel(Q, Pool, BlockTables, ContextLens, Out, layer, scale,
                       stride_qs, stride_qh, stride_pb, stride_pl, stride_pkv, stride_pt, stride_ph,
                       stride_bt, stride_os, stride_oh,
                       GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       HEAD_DIM: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr):
        s = tl.program_id(0)
        kvh = tl.program_id(1)
        ctx = tl.load(ContextLens + s)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        t = tl.arange(0, TILE)
        heads = kvh * GROUP + g
        q = tl.load(Q + s * stride_qs + heads[:, None] * stride_qh + d[None, :],
                    mask=(g < GROUP)[:, None], other=0.0)                     # [GROUP_PAD, D]
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        base = Pool + layer * stride_pl + kvh * stride_ph
        for start in range(0, ctx, TILE):
            tok = start + t
            valid = tok < ctx
            block = tl.load(BlockTables + s * stride_bt + tok // BLOCK_SIZE, mask=valid, other=0)
            row = base + block.to(tl.int64) * stride_pb + (tok % BLOCK_SIZE) * stride_pt  # [TILE]
            k = tl.load(row[:, None] + d[None, :], mask=valid[:, None], other=0.0)     # [TILE, D]
            v = tl.load(row[:, None] + stride_pkv + d[None, :], mask=valid[:, None], other=0.0)
            if IEEE:   # fp32 inputs: exact products, as the reference computes them
                qk = tl.dot(q, tl.trans(k), input_precision="ieee") * scale         # [GROUP_PAD, TILE]
            else:
                qk = tl.dot(q, tl.trans(k)) * scale
            qk = tl.where(valid[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp(qk - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(Out + s * stride_os + heads[:, None] * stride_oh + d[None, :], acc.to(Out.dtype.element_ty),
                 mask=(g < GROUP)[:, None])
