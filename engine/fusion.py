"""Fused decoder layers for the Llama family (Llama, Mistral, Qwen2).

A decode step of one sequence is bound by launches, not bytes: transformers' eager layer runs
some forty small kernels (seven for each RMSNorm, a dozen for the rotary embedding, separate
q/k/v and gate/up projections, residual adds), each a few microseconds even inside a CUDA graph.
`fuse(model)` gives every decoder layer a forward with the same arithmetic in fewer, larger
pieces, over the same weights:
  - q, k and v come from one projection, gate and up from another: the Linear modules' weights
    become views into one concatenated weight (no extra memory);
  - RMSNorm, the residual add feeding the next RMSNorm, the rotary embedding, and SiLU(gate) * up
    are small functions that `torch.compile` turns into one Triton kernel each.
The engine fuses on CUDA only (`model.fuse`), where the compiled kernels are the point; the
CPU tests fuse eagerly all the same, to check the arithmetic token for token against
`transformers.generate`.
Attention itself is kvgate's paged attention, called directly.
"""
from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

from engine.attention import paged_attention

log = logging.getLogger("kvgate.engine")

FUSED = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalized in fp32, scaled in the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual)."""
    s = x + residual
    return rms_norm(s, weight, eps), s


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, T, H, D], k: [B, T, KVH, D]; cos, sin: [B, T, D] (rotate-half convention)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, -1)
        return torch.cat((-x2, x1), -1)
    return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up


class _Ops:
    """The fusible functions, compiled or not (one set per process: compiled code is shared by
    every layer and every engine)."""

    def __init__(self, compiled: bool) -> None:
        wrap = (lambda f: torch.compile(f, dynamic=True, fullgraph=True)) if compiled else (lambda f: f)
        self.rms_norm, self.add_rms_norm = wrap(rms_norm), wrap(add_rms_norm)
        self.rope, self.silu_mul = wrap(rope), wrap(silu_mul)


_OPS: dict[bool, _Ops] = {}


def fuse(model: torch.nn.Module, compiled: bool) -> int:
    """Give each Llama-family decoder layer of `model` the fused forward; returns how many.
    Other architectures are left as they are."""
    ops = _OPS.setdefault(compiled, _Ops(compiled))
    layers = [m for m in model.modules() if type(m).__name__ in FUSED
              and getattr(m.mlp.config, "hidden_act", "silu") == "silu"]
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        _concat_weights(attn, ("q_proj", "k_proj", "v_proj"), "qkv")
        _concat_weights(mlp, ("gate_proj", "up_proj"), "gate_up")
        layer.ops = ops
        layer.forward = types.MethodType(_layer_forward, layer)
    if layers:
        log.info("fused %d decoder layers (%s)", len(layers), "compiled" if compiled else "eager")
    return len(layers)


def _concat_weights(module: torch.nn.Module, names: tuple[str, ...], fused: str) -> None:
    """One [sum(out), in] weight (and bias) for the Linear modules `names`; theirs become views."""
    linears = [getattr(module, n) for n in names]
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = None
    if linears[0].bias is not None:
        bias = torch.cat([lin.bias.detach() for lin in linears])
    start = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = torch.nn.Parameter(weight[start:start + n], requires_grad=False)
        if bias is not None:
            lin.bias = torch.nn.Parameter(bias[start:start + n], requires_grad=False)
        start += n
    setattr(module, f"{fused}_weight", weight)
    setattr(module, f"{fused}_bias", bias)
    setattr(module, f"{fused}_sizes", [lin.weight.shape[0] for lin in linears])


def _layer_forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None,
                   past_key_values=None, use_cache=False, position_embeddings=None, **kwargs) -> torch.Tensor:
    """hidden_states: [1, T, hidden]; the layer's output, as transformers' forward computes it.
    Called without kvgate's metadata (transformers' own generate on the same model), it is
    transformers' forward."""
    if "kvgate" not in kwargs:
        return type(self).forward(self, hidden_states, attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=past_key_values,
                                  use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
    ops, attn, mlp = self.ops, self.self_attn, self.mlp
    ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
    batch, tokens, _ = hidden_states.shape
    x = ops.rms_norm(hidden_states, ln1.weight, ln1.variance_epsilon)
    q, k, v = F.linear(x, attn.qkv_weight, attn.qkv_bias).split(attn.qkv_sizes, -1)
    q = q.view(batch, tokens, -1, attn.head_dim)                        # [1, T, H, D]
    k = k.view(batch, tokens, -1, attn.head_dim)                        # [1, T, KVH, D]
    v = v.view(batch, tokens, -1, attn.head_dim)
    q, k = ops.rope(q, k, *position_embeddings)
    out, _ = paged_attention(attn, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None,
                             scaling=attn.scaling, sliding_window=_window(attn), **kwargs)
    x = attn.o_proj(out.reshape(batch, tokens, -1))
    x, residual = ops.add_rms_norm(x, hidden_states, ln2.weight, ln2.variance_epsilon)
    x = F.linear(x, mlp.gate_up_weight, mlp.gate_up_bias)
    return residual + mlp.down_proj(ops.silu_mul(x))


def _window(attn: torch.nn.Module) -> int | None:
    """The layer's sliding window, as transformers passes it to the attention function."""
    if type(attn).__name__ == "MistralAttention":
        return getattr(attn.config, "sliding_window", None)
    return getattr(attn, "sliding_window", None)
