"""Paged attention, plugged into transformers through its public `AttentionInterface`.

One step packs every scheduled sequence into a single flat batch of T tokens (batch dim 1).
For each layer the model hands us the new tokens' query, key and value (after RoPE); we write
the new K/V into the slots the store gave each sequence, then let each sequence's new queries
attend over all of its blocks. The model is called with `kvgate=<PagedMetadata>`; transformers
passes unknown keyword arguments through to the attention function.

`reference_attention` is plain torch and runs everywhere; it is what the CPU tests check
against `transformers.generate`, and what a faster CUDA kernel would be tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from engine import kernels

ATTN_IMPLEMENTATION = "kvgate_paged"


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's part of the flat batch."""
    q_start: int                 # first of its new tokens in the flat batch
    q_len: int                   # number of new tokens
    ctx_len: int                 # tokens of context after this step (cached + new)
    block_table: torch.Tensor    # [ceil(ctx_len / block_size)] pool blocks, on the pool's device


@dataclass(frozen=True)
class DecodeBatch:
    """Sequences of the step with one new token each, for the batched decode kernel."""
    rows: torch.Tensor           # [S] their rows in the flat batch
    block_tables: torch.Tensor   # [S, max_blocks] int32, padded with 0
    context_lens: torch.Tensor   # [S] int32; 0: a padding row (a graph's), which computes nothing
    partitions: int | None = None  # split-K parts of the decode kernel (None: chosen from S)


@dataclass(frozen=True)
class PrefillBatch:
    """Prompt chunks of the step, for the prefill kernel (int32 tensors)."""
    tiles: torch.Tensor          # [NT, 2] (chunk index, first query of the tile within the chunk)
    chunks: torch.Tensor         # [P, 3] (first row in the flat batch, chunk length, context length)
    block_tables: torch.Tensor   # [P, max_blocks], padded with 0


@dataclass(frozen=True)
class PagedMetadata:
    kv_pool: torch.Tensor        # the GPU pool: [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]
    slot_block: torch.Tensor     # [T] pool block that receives each new token's K/V
    slot_offset: torch.Tensor    # [T] its position inside that block
    seqs: tuple[SeqSlice, ...]   # sequences attended by the reference path
    decode: DecodeBatch | None = None   # sequences attended by the decode kernel
    prefill: PrefillBatch | None = None  # chunks attended by the prefill kernel


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None = None,
                    sliding_window: int | None = None, kvgate: PagedMetadata | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """query: [1, H, T, D]; key, value: [1, KVH, T, D]. Returns ([1, T, H, D], None)."""
    if kvgate is None:
        raise RuntimeError("kvgate paged attention called without its metadata (kvgate=...)")
    layer = module.layer_idx
    pool = kvgate.kv_pool
    # write the new K/V: pool[block, layer, 0 (K) / 1 (V), offset] <- [T, KVH, D]
    pool[kvgate.slot_block, layer, 0, kvgate.slot_offset] = key[0].transpose(0, 1)
    pool[kvgate.slot_block, layer, 1, kvgate.slot_offset] = value[0].transpose(0, 1)
    _, heads, total, head_dim = query.shape
    out = query.new_empty(1, total, heads, head_dim)
    scale = scaling if scaling is not None else head_dim ** -0.5
    if kvgate.prefill is not None:
        p = kvgate.prefill
        kernels.paged_prefill(query[0].transpose(0, 1), pool, layer, p.tiles, p.chunks, p.block_tables,
                              scale, sliding_window or 0, out[0])                # [T, H, D] views
    if kvgate.decode is not None:
        d = kvgate.decode
        q = query[0, :, d.rows].transpose(0, 1).contiguous()                    # [S, H, D]
        o = torch.empty_like(q)
        kernels.paged_decode(q, pool, layer, d.block_tables, d.context_lens, scale, o,
                             partitions=d.partitions)
        out[0, d.rows] = o
    reference_attention(query, pool, layer, kvgate.seqs, scaling, sliding_window, out)
    return out, None


def reference_attention(query: torch.Tensor, pool: torch.Tensor, layer: int, seqs: tuple[SeqSlice, ...],
                        scaling: float | None, sliding_window: int | None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of each sequence's new queries over its blocks. query: [1, H, T, D];
    writes the rows of `seqs` into out: [1, T, H, D] (a new tensor if None)."""
    _, heads, total, head_dim = query.shape
    if out is None:
        out = query.new_empty(1, total, heads, head_dim)
    for s in seqs:
        kv = pool[s.block_table, layer]                       # [nb, 2, bs, KVH, D]
        # 4-D tensors: with 3-D ones CPU SDPA leaves its flash kernel for the much slower math one
        k = kv[:, 0].flatten(0, 1)[:s.ctx_len].transpose(0, 1)[None]  # [1, KVH, ctx, D]
        v = kv[:, 1].flatten(0, 1)[:s.ctx_len].transpose(0, 1)[None]
        q = query[:, :, s.q_start:s.q_start + s.q_len]       # [1, H, q_len, D]; H = KVH * groups
        mask, causal = None, False
        if s.q_len == s.ctx_len and s.q_len > 1 and not sliding_window:
            causal = True           # a whole-sequence prefill: the kernel's own causal path
        elif s.q_len > 1 or sliding_window:
            # query i sits at position ctx_len - q_len + i and sees keys j <= that position
            q_pos = torch.arange(s.ctx_len - s.q_len, s.ctx_len, device=q.device)[:, None]
            k_pos = torch.arange(s.ctx_len, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if sliding_window:
                mask &= q_pos - k_pos < sliding_window
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scaling,
                                           enable_gqa=k.shape[1] != heads)  # [1, H, q_len, D]
        out[0, s.q_start:s.q_start + s.q_len] = o[0].transpose(0, 1)
    return out


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
