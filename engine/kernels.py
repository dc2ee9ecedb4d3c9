"""Paged attention in Triton, one launch per layer for all sequences of a step.

- `paged_decode`: sequences with one new token. One program per (sequence, KV head) computes
  the attention of that KV head's group of query heads (GQA) over the sequence's blocks, reading
  each K/V tile once for the whole group, with an online softmax over tiles of TILE tokens
  gathered through the block table.
- `paged_prefill`: prompt chunks (any length, after any cached prefix). One program per
  (tile of BLOCK_M queries, query head), causal from the chunk's offset in its context, over K/V
  tiles gathered through the block table; optional sliding window.

Both are tested against `engine.attention.reference_attention` on random inputs
(tests/test_kernels.py). Triton is optional: without it (or without CUDA) the reference
implementation is used.
"""
from __future__ import annotations

import functools
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
                 num_warps: int = 4, num_stages: int = 2, partitions: int | None = None) -> None:
    """query: [S, H, D] (one new token per sequence); pool: [NB, L, 2, BS, KVH, D];
    block_tables: [S, max_blocks] int32; context_lens: [S] int32 (0: the row computes nothing
    useful and reads no K/V); out: [S, H, D].
    `partitions` splits each context into up to that many parts (of two tiles or more) computed
    by separate programs and combined after (split-K; None: enough to fill the GPU when S x KVH
    programs would not). It is a runtime value: no recompilation as batch sizes change.
    `tile`, `num_warps`, `num_stages`: launch parameters (see `python -m engine.bench --kernel`)."""
    seqs, heads, head_dim = query.shape
    block_size, kv_heads = pool.shape[3], pool.shape[4]
    group = heads // kv_heads
    tile = max(tile, block_size)
    if partitions is None:
        partitions = _partitions(seqs * kv_heads, block_tables.shape[1] * block_size, tile, query.device)
    assert 1 <= partitions <= MAX_PARTITIONS
    parts = stats = out
    if partitions > 1:   # per part: running max and sum [2, S, H, P], unnormalized output [S, H, P, D]
        stats = torch.empty(2, seqs, heads, partitions, dtype=torch.float32, device=query.device)
        parts = torch.empty(seqs, heads, partitions, head_dim, dtype=torch.float32, device=query.device)
    _decode_kernel[(seqs, kv_heads, partitions)](
        query, pool, block_tables, context_lens, parts, stats, layer, scale, partitions,
        query.stride(0), query.stride(1), pool.stride(0), pool.stride(1), pool.stride(2),
        pool.stride(3), pool.stride(4), block_tables.stride(0), parts.stride(0), parts.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, TILE=tile, SPLIT=partitions > 1, IEEE=query.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages)
    if partitions > 1:
        _combine_kernel[(seqs, heads)](stats, parts, out, partitions, out.stride(0), out.stride(1),
                                       MAX_PARTS=MAX_PARTITIONS, HEAD_DIM=head_dim)


MAX_PARTITIONS = 32


def _partitions(programs: int, max_context: int, tile: int, device: torch.device) -> int:
    """Split-K factor: none when there are two programs per SM already; otherwise about four
    programs per SM, at least one tile per part."""
    sms = _num_sms(device)
    if programs >= 2 * sms:
        return 1
    return max(1, min(MAX_PARTITIONS, -(-4 * sms // programs), -(-max_context // (2 * tile))))


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def paged_prefill(query: torch.Tensor, pool: torch.Tensor, layer: int, tiles: torch.Tensor,
                  seqs: torch.Tensor, block_tables: torch.Tensor, scale: float, window: int,
                  out: torch.Tensor) -> None:
    """query, out: [T, H, D] (the step's flat batch); tiles: [NT, 2] int32 (sequence index,
    first query of the tile within its chunk); seqs: [P, 3] int32 (first row in the flat batch,
    chunk length, context length after the chunk); block_tables: [P, max_blocks] int32;
    window: sliding window in tokens, 0 = none."""
    heads, head_dim = query.shape[1], query.shape[2]
    kv_heads = pool.shape[4]
    _prefill_kernel[(tiles.shape[0], heads)](
        query, pool, out, tiles, seqs, block_tables, layer, scale, window,
        query.stride(0), query.stride(1), pool.stride(0), pool.stride(1), pool.stride(2), pool.stride(3),
        pool.stride(4), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=heads // kv_heads, BLOCK_SIZE=pool.shape[3], HEAD_DIM=head_dim, BLOCK_M=PREFILL_TILE,
        BLOCK_N=PREFILL_TILE, IEEE=query.dtype == torch.float32)


PREFILL_TILE = 64  # queries per program, and K/V tokens per loop iteration


# Arguments that change from step to step (the layer, table widths, the window) must not be
# specialized on (Triton compiles a variant per "== 1" / "divisible by 16" value otherwise, which
# costs a second or more in the middle of serving).
_VARYING = ["layer", "window", "stride_bt"]

if triton is not None:
    @triton.jit
    def _kv_tile(base, BlockTables, s, stride_bt, stride_pb, stride_pt, stride_pkv, tok, valid, d,
                 BLOCK_SIZE: tl.constexpr):
        """K and V ([N, D] each) of sequence s's tokens `tok` ([N]), through its block table."""
        block = tl.load(BlockTables + s * stride_bt + tok // BLOCK_SIZE, mask=valid, other=0)
        row = base + block.to(tl.int64) * stride_pb + (tok % BLOCK_SIZE) * stride_pt      # [N]
        k = tl.load(row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(row[:, None] + stride_pkv + d[None, :], mask=valid[:, None], other=0.0)
        return k, v

    @triton.jit
    def _online_softmax(q, k, v, keep, scale, m_i, l_i, acc, IEEE: tl.constexpr):
        """Fold one K/V tile into the running (max, sum, output) of the rows of q ([M, D]);
        `keep` ([M, N]) masks the scores. fp32 inputs use exact products (IEEE), as the
        reference does; others the tensor cores' native precision."""
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            qk = tl.dot(q, tl.trans(k)) * scale                                         # [M, N]
        qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing to see yet
        p = tl.exp(qk - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit(do_not_specialize=_VARYING)
    def _prefill_kernel(Q, Pool, Out, Tiles, Seqs, BlockTables, layer, scale, window,
                        stride_qt, stride_qh, stride_pb, stride_pl, stride_pkv, stride_pt, stride_ph,
                        stride_bt, stride_ot, stride_oh,
                        GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        tile = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.load(Tiles + tile * 2)
        m0 = tl.load(Tiles + tile * 2 + 1)
        row0 = tl.load(Seqs + s * 3)
        q_len = tl.load(Seqs + s * 3 + 1)
        ctx = tl.load(Seqs + s * 3 + 2)
        m = m0 + tl.arange(0, BLOCK_M)
        d = tl.arange(0, HEAD_DIM)
        n = tl.arange(0, BLOCK_N)
        valid_m = m < q_len
        pos = ctx - q_len + m                          # each query's position in its sequence
        q = tl.load(Q + (row0 + m)[:, None] * stride_qt + h * stride_qh + d[None, :],
                    mask=valid_m[:, None], other=0.0)                                 # [BLOCK_M, D]
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        base = Pool + layer * stride_pl + (h // GROUP) * stride_ph
        last = tl.minimum(ctx, ctx - q_len + m0 + BLOCK_M)     # causal: no key after the last query
        first = 0
        if window > 0:
            first = tl.maximum(0, (ctx - q_len + m0 - window + 1) // BLOCK_N * BLOCK_N)
        for start in range(first, last, BLOCK_N):
            tok = start + n
            valid_n = tok < ctx
            k, v = _kv_tile(base, BlockTables, s, stride_bt, stride_pb, stride_pt, stride_pkv, tok,
                            valid_n, d, BLOCK_SIZE)                          # [BLOCK_N, D] each
            keep = valid_n[None, :] & (tok[None, :] <= pos[:, None])
            if window > 0:
                keep = keep & (pos[:, None] - tok[None, :] < window)
            m_i, l_i, acc = _online_softmax(q, k, v, keep, scale, m_i, l_i, acc, IEEE)
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]     # rows past the chunk: not stored
        tl.store(Out + (row0 + m)[:, None] * stride_ot + h * stride_oh + d[None, :],
                 acc.to(Out.dtype.element_ty), mask=valid_m[:, None])

    @triton.jit(do_not_specialize=["layer", "parts", "stride_bt"])
    def _decode_kernel(Q, Pool, BlockTables, ContextLens, Out, Stats, layer, scale, parts,
                       stride_qs, stride_qh, stride_pb, stride_pl, stride_pkv, stride_pt, stride_ph,
                       stride_bt, stride_os, stride_oh,
                       GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       HEAD_DIM: tl.constexpr, TILE: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr):
        """One program per (sequence, KV head, part of the context). Unsplit, it writes the
        output; split, Out is [S, H, parts, D] (unnormalized) and Stats [2, S, H, parts] (running
        max, sum) for `_combine_kernel`. A sequence uses at most ctx / (2 TILE) parts; a part
        it leaves unused keeps max -inf, sum 0, output 0."""
        s = tl.program_id(0)
        kvh = tl.program_id(1)
        part = tl.program_id(2)
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
        used = tl.maximum(1, tl.minimum(parts, tl.cdiv(ctx, 2 * TILE)))   # ctx 0 (padding): no tile
        part_len = tl.cdiv(tl.cdiv(ctx, used), TILE) * TILE
        end = tl.where(part < used, tl.minimum(ctx, (part + 1) * part_len), 0)
        for start in range(part * part_len, end, TILE):
            tok = start + t
            valid = tok < ctx
            k, v = _kv_tile(base, BlockTables, s, stride_bt, stride_pb, stride_pt, stride_pkv, tok, valid, d,
                            BLOCK_SIZE)                                                # [TILE, D] each
            m_i, l_i, acc = _online_softmax(q, k, v, valid[None, :], scale, m_i, l_i, acc, IEEE)
        if SPLIT:
            row = (s * tl.num_programs(1) * GROUP + heads) * parts + part              # [GROUP_PAD]
            tl.store(Out + row[:, None] * HEAD_DIM + d[None, :], acc, mask=(g < GROUP)[:, None])
            tl.store(Stats + row, m_i, mask=g < GROUP)
            tl.store(Stats + tl.num_programs(0) * tl.num_programs(1) * GROUP * parts + row, l_i,
                     mask=g < GROUP)
        else:
            acc = acc / l_i[:, None]
            tl.store(Out + s * stride_os + heads[:, None] * stride_oh + d[None, :],
                     acc.to(Out.dtype.element_ty), mask=(g < GROUP)[:, None])

    @triton.jit(do_not_specialize=["parts"])
    def _combine_kernel(Stats, Parts, Out, parts, stride_os, stride_oh, MAX_PARTS: tl.constexpr,
                        HEAD_DIM: tl.constexpr):
        """Out[s, h] from the partial results of (sequence s, head h)."""
        s = tl.program_id(0)
        h = tl.program_id(1)
        p = tl.arange(0, MAX_PARTS)
        d = tl.arange(0, HEAD_DIM)
        row = (s * tl.num_programs(1) + h) * parts
        total = tl.num_programs(0) * tl.num_programs(1) * parts
        m = tl.load(Stats + row + p, mask=p < parts, other=float("-inf"))
        l_p = tl.load(Stats + total + row + p, mask=p < parts, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))                    # [MAX_PARTS]
        acc = tl.load(Parts + (row + p)[:, None] * HEAD_DIM + d[None, :], mask=(p < parts)[:, None],
                      other=0.0)                                                    # [MAX_PARTS, D]
        o = tl.sum(acc * w[:, None], 0) / tl.sum(l_p * w, 0)
        tl.store(Out + s * stride_os + h * stride_oh + d, o.to(Out.dtype.element_ty))
